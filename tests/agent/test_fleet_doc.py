"""docs/fleet-protocol.md matches the code: every hex example, the reasons, the limits."""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import fleet
from agent.fleet import Ack, Batch, Command, batch_digest
from agent.fleet_auth import FleetSigner, ack_signed_bytes, command_signed_bytes
from agent.fleet_inbox import REASONS
from agent.resilience import Event

DOC = Path(__file__).resolve().parents[2] / "docs" / "fleet-protocol.md"
HEX_BLOCK = re.compile(r"^```hex (\S+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
VEHICLE = "truck-0042"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # the doc's test vector


def examples() -> dict[str, bytes]:
    """What the code produces for the doc's worked examples."""
    event = Event("ecu0/engine", 12, boot_epoch=3, ts=1700000000.5, kind="telemetry",
                  priority=2, payload=b"\x81\xa3rpm\xcd\x08\x66")  # fmt: skip
    batch = Batch(VEHICLE, 7 << 32 | 1, "events", False, ((event, 3),)).encode(compress=False)
    ack = Ack(7 << 32 | 1, "events", 1, 0, batch_digest(batch), 1_764_748_800_000)
    cmd = Command("replay", 1_764_748_800_123)
    signer = FleetSigner(KEY)
    return {
        "batch": batch,
        "ack": signer.sign_ack(VEHICLE, ack).encode(),
        "command": signer.sign_command(VEHICLE, cmd).encode(),
        "ack-signed-bytes": ack_signed_bytes(VEHICLE, ack),
        "command-signed-bytes": command_signed_bytes(VEHICLE, cmd),
    }


def test_every_hex_example_is_what_the_code_produces() -> None:
    text = DOC.read_text()
    blocks = {name: bytes.fromhex("".join(body.split())) for name, body in HEX_BLOCK.findall(text)}
    assert blocks == examples()
    digest = batch_digest(examples()["batch"]).hex()
    assert digest in text
    public = KEY.public_key().public_bytes_raw().hex()
    assert public in text


def test_the_examples_decode() -> None:
    ex = examples()
    assert Batch.decode(ex["batch"]).events[0][0].seq == 12
    ack = Ack.decode(ex["ack"])
    KEY.public_key().verify(ack.signature, ack_signed_bytes(VEHICLE, ack))
    cmd = Command.decode(ex["command"])
    KEY.public_key().verify(cmd.signature, command_signed_bytes(VEHICLE, cmd))


def test_reasons_and_limits_are_documented() -> None:
    text = DOC.read_text()
    for reason in REASONS:
        assert f"`{reason}`" in text, reason
    for name in ("MAX_CONTROL_BYTES", "MAX_CONTROL_FIELDS", "MAX_CONTROL_STR",
                 "MAX_DOCUMENT_BYTES", "MAX_BATCH_EVENTS", "MAX_SQL_INT"):  # fmt: skip
        assert f"`{name}`" in text, name
    assert f"| `MAX_CONTROL_BYTES` | {fleet.MAX_CONTROL_BYTES:,} |" in text
    assert f"| `MAX_BATCH_EVENTS` | {fleet.MAX_BATCH_EVENTS:,} |" in text
