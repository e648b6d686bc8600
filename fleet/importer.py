"""`ironfleet-collector import DIR`: a bundle carried home, loaded as if it came over MQTT.

The bundle (agent/export.py) is checked whole before anything is stored: the vehicle's
signature on SHA256SUMS with that vehicle's public key (`--vehicle-keys DIR`,
agent/bundlesig.py), SHA256SUMS against the manifest, every chunk's size and SHA-256
against the manifest. A missing,
truncated or altered file refuses the whole bundle with an error naming it. Then each
chunk is read again (what is stored is what was checked), decoded by the same total
`Batch.decode` as an MQTT message, stored by `CollectorStore.ingest` (idempotent: a
second import stores nothing and counts duplicates) and acknowledged exactly as the MQTT
path would: an `Ack` with the SHA-256 of the chunk's bytes, signed by the fleet key, made
only after that chunk's commit. The acks go into a receipt file (agent/receipts.py),
written atomically once every chunk is committed: if the import stops half-way, no
receipt is written at all, and running it again completes it.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.bundlesig import MAX_SIGNATURE_BYTES, SIGNATURE_NAME, check_signature
from agent.config import KEY_FILE_NAME
from agent.errors import AgentError, ConfigError
from agent.export import (
    MANIFEST_NAME,
    MAX_CHUNK_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SUMS_BYTES,
    SUMS_NAME,
    BundleError,
    Chunk,
    Manifest,
    read_bounded,
    write_atomic,
)
from agent.fleet import MAX_DOCUMENT_BYTES, Ack, Batch, FleetMessageError, batch_digest
from agent.fleet_auth import FleetSigner, load_public_key
from agent.receipts import RECEIPT_NAME, Receipt
from fleet.collector import FleetStore

_SUMS_LINE: Final = re.compile(r"\A([0-9a-f]{64})  (\S+)\Z")  # sha256sum(1)'s own format


class VehicleKeys:
    """The vehicles' public keys, one PEM file `<vehicle id>.pub` each in `directory`
    (`ironfleet-agent keygen --public` writes one; the fleet collects them)."""

    def __init__(self, directory: Path) -> None:
        if not directory.is_dir():
            raise ConfigError(f"--vehicle-keys {directory}: not a directory")
        self.directory = directory

    def key(self, vehicle: str) -> Ed25519PublicKey:
        """`vehicle`'s key; BundleError if the id cannot name a file or has no key."""
        if not KEY_FILE_NAME.match(vehicle):
            raise BundleError(f"vehicle id {vehicle[:80]!r} cannot name a key file in "
                              f"{self.directory}: not importable with --vehicle-keys")  # fmt: skip
        path = self.directory / f"{vehicle}.pub"
        if not path.exists():
            raise BundleError(f"{path}: no public key for vehicle {vehicle!r}: add the key "
                              "its `ironfleet-agent keygen` wrote, or the bundle is not "
                              "from a vehicle of this fleet")  # fmt: skip
        try:
            return load_public_key(str(path), "--vehicle-keys")
        except ConfigError as exc:
            raise BundleError(str(exc)) from None


class ImportFailed(AgentError):
    """A chunk could not be stored (database or file system error); no receipt written."""


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What one import did."""

    vehicle: str
    export: int
    chunks: int
    events: int  # events in the bundle (state chunks included)
    stored: int  # newly stored
    duplicates: int  # already held (a second import: all of them)
    receipt: str
    seconds: float


def open_bundle(directory: Path, vehicle_keys: VehicleKeys | None = None) -> Manifest:
    """The manifest of the bundle in `directory`, checked against SHA256SUMS (which must
    list exactly the manifest and its chunks, with the manifest's digests) and, with
    `vehicle_keys`, SHA256SUMS against the vehicle's signature; BundleError naming the file
    for a missing, truncated, altered or unsigned one. Chunks: `read_chunk`."""
    sums_path = directory / SUMS_NAME
    if not sums_path.exists() and (directory / MANIFEST_NAME).exists():
        raise BundleError(f"{sums_path}: missing: the bundle is incomplete (export interrupted "
                          "or the stick pulled before it finished); export again")  # fmt: skip
    raw = read_bounded(sums_path, MAX_SUMS_BYTES, "the checksum list")
    sums: dict[str, str] = {}
    try:
        lines = raw.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise BundleError(f"{sums_path}: not a checksum list") from None
    for line in lines:
        match = _SUMS_LINE.match(line)
        if not match or match.group(2) in sums:
            raise BundleError(f"{sums_path}: bad line {line[:100]!r}")
        sums[match.group(2)] = match.group(1)
    manifest_path = directory / MANIFEST_NAME
    data = read_bounded(manifest_path, MAX_MANIFEST_BYTES, "the manifest")
    if sums.pop(MANIFEST_NAME, None) != hashlib.sha256(data).hexdigest():
        raise BundleError(f"{manifest_path}: its SHA-256 is not the one in {SUMS_NAME}: "
                          "damaged or truncated")  # fmt: skip
    manifest = Manifest.from_json(data, str(manifest_path))
    if sums != {c.file: c.sha256 for c in manifest.chunks}:
        raise BundleError(f"{sums_path}: does not list exactly the manifest's chunks")
    if vehicle_keys is not None:
        key = vehicle_keys.key(manifest.vehicle)
        path = directory / SIGNATURE_NAME
        if not path.exists():
            raise BundleError(f"{path}: missing: the bundle is not signed by its vehicle "
                              "([agent] signing_key_file on the vehicle)")  # fmt: skip
        problem = check_signature(read_bounded(path, MAX_SIGNATURE_BYTES, "the signature"),
                                  raw, key)  # fmt: skip
        if problem is not None:
            raise BundleError(f"{path}: {problem}: not imported (altered, or not written "
                              f"by vehicle {manifest.vehicle!r})")  # fmt: skip
    return manifest


def read_chunk(directory: Path, chunk: Chunk) -> bytes:
    """The bytes of `chunk`, checked for size and SHA-256; BundleError naming the file."""
    path = directory / chunk.file
    data = read_bounded(path, min(MAX_CHUNK_FILE_BYTES, MAX_DOCUMENT_BYTES), "a chunk")
    if len(data) != chunk.size:
        raise BundleError(f"{path}: {len(data)} bytes, the manifest says {chunk.size}: truncated?")
    if hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise BundleError(f"{path}: SHA-256 differs from the manifest's: damaged")
    return data


def import_bundle(
    store: FleetStore,
    directory: Path,
    signer: FleetSigner | None,
    *,
    vehicle_keys: VehicleKeys | None = None,
    receipt_path: Path | None = None,
    clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> ImportResult:
    """Check the bundle in `directory`, store every chunk, write the receipt (by default
    `directory/receipt.msgpack`). BundleError for a damaged bundle (nothing stored),
    ImportFailed when storing stops (no receipt). Without `vehicle_keys` nothing checks
    who wrote the bundle (the command line allows that only with --unsigned)."""
    started = time.monotonic()
    manifest = open_bundle(directory, vehicle_keys)
    for chunk in manifest.chunks:  # the whole bundle first: a bad file refuses all of it
        read_chunk(directory, chunk)
    acks = []
    stored = duplicates = 0
    for done, chunk in enumerate(manifest.chunks):
        data = read_chunk(directory, chunk)
        path = directory / chunk.file
        try:
            batch = Batch.decode(data)
        except FleetMessageError as exc:
            raise BundleError(f"{path}: not a batch: {exc}") from None
        shape = (batch.vehicle, batch.batch_id, batch.kind, len(batch.events))
        if shape != (manifest.vehicle, chunk.batch, chunk.kind, chunk.events):
            raise BundleError(f"{path}: (vehicle, batch, type, events) is {shape!r:.160}, not "
                              "what the manifest says")  # fmt: skip
        try:
            new, dups = store.ingest(batch)
        except (sqlite3.Error, OSError, AgentError) as exc:  # CommitFailed: PostgreSQL
            raise ImportFailed(
                f"storing {path} failed after {done} of {len(manifest.chunks)} chunks: {exc}; "
                "no receipt written; run the import again (it stores nothing twice)"
            ) from None
        stored += new
        duplicates += dups
        ack = Ack(chunk.batch, chunk.kind, new, dups, batch_digest(data), clock_ms())
        acks.append(signer.sign_ack(manifest.vehicle, ack) if signer is not None else ack)
    target = receipt_path or directory / RECEIPT_NAME
    try:
        write_atomic(target, Receipt(manifest.vehicle, manifest.export, tuple(acks)).encode())
    except OSError as exc:
        why = exc.strerror or exc
        raise ImportFailed(f"{target}: cannot write the receipt: {why}; the events are "
                           "stored: run the import again to write it") from None  # fmt: skip
    return ImportResult(
        manifest.vehicle, manifest.export, len(manifest.chunks),
        manifest.events + manifest.state_events, stored, duplicates, str(target),
        round(time.monotonic() - started, 3),
    )  # fmt: skip
