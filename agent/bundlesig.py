"""The vehicle's signature on an export bundle: made by `ironfleet export`, checked by
`ironfleet-collector import` before anything of the bundle is stored.

A bundle travels on a USB stick, outside the broker's authentication: anyone holding the
stick, or a laptop it was plugged into, could write a bundle that claims to come from any
vehicle and feed the fleet's database with it. So the vehicle signs it with its own
Ed25519 key (`[agent] signing_key_file`), and the collector verifies it with that
vehicle's public key (`--vehicle-keys DIR`, one `<vehicle id>.pub` per vehicle).

What is signed: the exact bytes of SHA256SUMS, behind a domain-separation prefix. SUMS
lists the SHA-256 of the manifest (vehicle id, export id, rowid runs) and of every chunk,
so one signature covers the whole bundle; a chunk or manifest changed after signing fails
its digest, a SUMS changed fails the signature. The prefix keeps a bundle signature from
ever verifying as anything else the same key might sign.

The SIGNATURE file is small JSON: {"format", "version", "alg": "ed25519", "key": the
signer's fingerprint (agent/fleet_auth.py `key_fingerprint`), "signature": hex}. It is
written before SHA256SUMS, which stays the bundle's last file (its commit point). Pure
functions: the callers read and write the files and raise their own errors.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.fleet_auth import key_fingerprint

SIGNATURE_NAME: Final = "SIGNATURE"
SIGNATURE_FORMAT: Final = "ironfleet-bundle-signature"
SIGNATURE_VERSION: Final = 1
MAX_SIGNATURE_BYTES: Final = 4096  # the file is ~250 bytes
_DOMAIN: Final = b"ironfleet bundle SHA256SUMS v1\x00"
_HEX_SIGNATURE: Final = re.compile(r"\A[0-9a-f]{128}\Z")  # Ed25519: 64 bytes


def signature_file(key: Ed25519PrivateKey, sums: bytes) -> bytes:
    """The SIGNATURE file's bytes for a bundle whose SHA256SUMS is `sums`."""
    doc = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "alg": "ed25519",
        "key": key_fingerprint(key),
        "signature": key.sign(_DOMAIN + sums).hex(),
    }
    return (json.dumps(doc, sort_keys=True) + "\n").encode("ascii")


def check_signature(data: bytes, sums: bytes, key: Ed25519PublicKey) -> str | None:
    """None if `data` (a SIGNATURE file, untrusted) is `key`'s signature on `sums`; else
    what is wrong, in words for an operator. Total: any bytes give one or the other."""
    doc = _parse(data)
    if isinstance(doc, str):
        return doc
    try:
        key.verify(bytes.fromhex(doc["signature"]), _DOMAIN + sums)
    except InvalidSignature:
        signer = doc.get("key")
        named = (
            f" (signed by key {signer!r})" if isinstance(signer, str) and len(signer) < 80 else ""
        )
        return f"does not verify with the vehicle's key {key_fingerprint(key)}{named}"
    return None


def _parse(data: bytes) -> dict[str, Any] | str:
    """The SIGNATURE document with a well-formed signature, or what is wrong with it."""
    if len(data) > MAX_SIGNATURE_BYTES:
        return f"larger than {MAX_SIGNATURE_BYTES} bytes"
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "not JSON"
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
        return f"not an {SIGNATURE_FORMAT} file"
    if doc.get("version") != SIGNATURE_VERSION or doc.get("alg") != "ed25519":
        return f"version {doc.get('version')!r:.20}, alg {doc.get('alg')!r:.20}: not known here"
    signature = doc.get("signature")
    if not isinstance(signature, str) or not _HEX_SIGNATURE.match(signature):
        return "no well-formed signature"
    return doc
