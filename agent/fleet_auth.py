"""Signatures on what the fleet tells a vehicle: acks and commands (Ed25519).

The collector holds the fleet's private key and signs; every agent holds the public key
(`[uplink] fleet_key_file`, a PEM file, e.g. through systemd's LoadCredential=) and
verifies before it acts. The signed bytes are built here, byte for byte as
docs/fleet-protocol.md section 4 specifies, so another implementation can produce them:

    ack:     ACK_DOMAIN ‖ str16(vehicle) ‖ u64(batch) ‖ digest[32] ‖ str16(kind)
             ‖ u64(stored) ‖ u64(duplicates) ‖ u64(issued)
    command: COMMAND_DOMAIN ‖ str16(vehicle) ‖ str16(op) ‖ u64(id)

(u64 big-endian; str16 = u16 big-endian byte length, then UTF-8). The two domain prefixes
differ, so an ack signature never verifies as a command and vice versa; the vehicle id
makes a signature for one vehicle useless on another; the digest ties an ack to the exact
bytes the agent published, so a real signature replayed onto another batch fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.config import Config, UplinkSection
from agent.errors import ConfigError
from agent.fleet import Ack, Command

log = logging.getLogger(__name__)

ACK_DOMAIN: Final = b"ironfleet/v1/ack-signature\x00"
COMMAND_DOMAIN: Final = b"ironfleet/v1/cmd-signature\x00"
MAX_KEY_FILE_BYTES: Final = 4096  # a PEM Ed25519 key is ~120 bytes; refuse odd files early


def _str16(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def ack_signed_bytes(vehicle: str, ack: Ack) -> bytes:
    """The exact bytes an ack's signature covers (docs/fleet-protocol.md 4.1)."""
    return b"".join((
        ACK_DOMAIN, _str16(vehicle), struct.pack(">Q", ack.batch_id), ack.digest,
        _str16(ack.kind), struct.pack(">QQQ", ack.stored, ack.duplicates, ack.issued),
    ))  # fmt: skip


def command_signed_bytes(vehicle: str, cmd: Command) -> bytes:
    """The exact bytes a command's signature covers (docs/fleet-protocol.md 4.2)."""
    return COMMAND_DOMAIN + _str16(vehicle) + _str16(cmd.op) + struct.pack(">Q", cmd.cmd_id)


@dataclass(frozen=True)
class FleetSigner:
    """The collector's side: signs acks and commands with the fleet's private key."""

    key: Ed25519PrivateKey

    def sign_ack(self, vehicle: str, ack: Ack) -> Ack:
        sig = self.key.sign(ack_signed_bytes(vehicle, ack))
        return Ack(ack.batch_id, ack.kind, ack.stored, ack.duplicates, ack.digest,
                   ack.issued, sig)  # fmt: skip

    def sign_command(self, vehicle: str, cmd: Command) -> Command:
        return Command(cmd.op, cmd.cmd_id, self.key.sign(command_signed_bytes(vehicle, cmd)))


class FleetAuth:
    """The agent's side: does this ack or command come from the fleet?

    `key` None is the unsigned lab mode (`[uplink] allow_unsigned = true`): everything is
    taken as genuine, signatures are ignored.
    """

    def __init__(self, vehicle: str, key: Ed25519PublicKey | None) -> None:
        self.vehicle = vehicle
        self.key = key

    @property
    def signed(self) -> bool:
        return self.key is not None

    @property
    def fingerprint(self) -> str:
        """The key's fingerprint (`key_fingerprint`), "unsigned" in lab mode."""
        return key_fingerprint(self.key) if self.key is not None else "unsigned"

    def ack_ok(self, ack: Ack) -> bool:
        """True if the ack's signature is the fleet's over this vehicle and its fields."""
        return self._verify(ack.signature, ack_signed_bytes(self.vehicle, ack))

    def command_ok(self, cmd: Command) -> bool:
        """True if the command's signature is the fleet's over this vehicle and its fields."""
        return self._verify(cmd.signature, command_signed_bytes(self.vehicle, cmd))

    def _verify(self, signature: bytes, message: bytes) -> bool:
        if self.key is None:
            return True
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


# -- keys ----------------------------------------------------------------------------------


def _read_key_file(path: str, where: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where} = {path!r}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{where} = {path!r}: over {MAX_KEY_FILE_BYTES} bytes, not a key")
    return data


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """`sha256:` and the first 16 hex digits of SHA-256 over the raw public key: what a
    technician compares between a vehicle (`ironfleet doctor`) and the collector
    (`ironfleet-collector keygen` prints it) when acks fail verification."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str, where: str = "fleet_key_file") -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file `path`; ConfigError naming `where` and the path."""
    data = _read_key_file(path, where)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where} = {path!r}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where} = {path!r}: not an Ed25519 key")
    return key


def load_private_key(path: str, where: str = "--signing-key") -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file `path` (unencrypted PKCS#8)."""
    data = _read_key_file(path, where)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where} = {path!r}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{where} = {path!r}: not an Ed25519 key")
    return key


def keygen(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """Write a new key pair (the fleet's, or a vehicle's): the private key 0600 (never
    overwritten), the public 0644; return the private key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    public_path.write_bytes(public)
    return key


# -- configuration -------------------------------------------------------------------------


def trust_warnings(section: UplinkSection) -> list[str]:
    """What weakens the broker -> agent trust boundary in this [uplink] (for `doctor`)."""
    if not section.enabled:
        return []
    out = []
    if section.allow_unsigned:
        out.append(
            "[uplink] allow_unsigned = true: acks and commands are not authenticated; anyone "
            "who can publish on the broker can fake deliveries (lab brokers only)"
        )
    if section.username and not section.tls:
        out.append(
            "[uplink] allow_plaintext_password = true: the MQTT password crosses the network "
            "in clear (tls = false)"
        )
    return out


def load_fleet_auth(config: Config) -> FleetAuth:
    """The verifier for this agent's [uplink]; ConfigError naming key and file if the key
    cannot be loaded. Unsigned lab mode is announced with a WARNING."""
    section = config.uplink
    vehicle = config.agent.vehicle_id
    if section.allow_unsigned:
        log.warning(
            "fleet_auth_disabled allow_unsigned=true config=%s: acks and commands are NOT "
            "verified; anyone who can publish on the broker can fake deliveries and commands. "
            "Lab brokers only: set [uplink] fleet_key_file instead",
            config.source,
        )
        return FleetAuth(vehicle, None)
    try:
        key = load_public_key(section.fleet_key_file, "[uplink] fleet_key_file")
    except ConfigError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None
    log.info("fleet_key_loaded path=%s fingerprint=%s", section.fleet_key_file,
             key_fingerprint(key))  # fmt: skip
    return FleetAuth(vehicle, key)
