"""docs/protocol.md stays true: its wire dumps decode to what it says, its limits match the code.

Every ```hex block of the document is fed to the project's own decoder and must yield exactly
the frame listed in EXPECTED (same order as the document's examples), and re-encoding that
frame must give the same bytes, so an edit to either the document or the codec that makes
them disagree fails here. The annotated envelope dumps, stated envelope lengths, CRCs and
CRC trailers are compared with the encoder's output too. The limits table, the unpack
limits, the frame and time-quality numbers are compared with the constants in the code,
every MAX_* constant of `firmware_bridge.protocol` and every FrameType name must be
mentioned, each body table of section 4 must list exactly the keys its frame type sends,
and the behaviour the document states for the version 1 fixes (session-bound ACK/NACK,
window cap, EVENT link_seq >= 1) is checked against the code.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest

from firmware_bridge import controller, link, protocol
from firmware_bridge.errors import REJECT_REASONS
from firmware_bridge.frames import FrameDecoder, crc, encode, seal
from firmware_bridge.protocol import (
    Ack,
    Command,
    EventBody,
    Frame,
    FrameType,
    Heartbeat,
    Hello,
    Nack,
    Response,
    TimeQuality,
    pack_envelope,
)

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
DOC = DOC_PATH.read_text(encoding="utf-8")

HEX_BLOCK = re.compile(r"^```hex\n(.*?)^```", re.MULTILINE | re.DOTALL)
STATED_CRC = re.compile(r"CRC-32C of the envelope: `0x([0-9A-F]{8})`")
STATED_WIRE_LEN = re.compile(r"Wire bytes, (\d+) including the final delimiter")
STATED_ENVELOPE_LEN = re.compile(r"^Envelope, (\d+) bytes:$", re.MULTILINE)
STATED_TRAILER = re.compile(r"appended little-endian as `((?:[0-9a-f]{2} ){3}[0-9a-f]{2})`")
ANNOTATED_BLOCK = re.compile(r"^```text\noff   bytes +meaning\n(.*?)^```", re.MULTILINE | re.DOTALL)
ANNOTATED_ROW = re.compile(r"^([0-9a-f]{4})  ((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:  |$)")

AGENT_SESSION = 0x12345678
BOOT_EPOCH = 7

# The frames of section 11, in the order of the document's examples.
EXPECTED: list[Frame] = [
    Frame(BOOT_EPOCH, 1, Hello("ecu0", "2.14.3")),
    Frame(
        BOOT_EPOCH,
        1,
        EventBody(
            stream="ecu0/engine",
            seq=1,
            ts=1717171717.25,
            time_quality=TimeQuality.SYNCED,
            kind="sample",
            priority=2,
            signals={"rpm": 2150, "temp": 88.5, "ok": True},
        ),
    ),
    Frame(AGENT_SESSION, 1, Ack(BOOT_EPOCH, 3, ((5, 6),))),
    Frame(AGENT_SESSION, 1, Nack(BOOT_EPOCH, ((4, 4),))),
    Frame(BOOT_EPOCH, 7, Heartbeat()),
    Frame(AGENT_SESSION, 1, Command(9, "status", {})),
    Frame(BOOT_EPOCH, 7, Response(9, True, {"ring": 1})),
]

# Constants of the limits table (section 8) that are not MAX_* of protocol.py.
OTHER_TABLE_CONSTANTS: dict[str, int] = {
    "PROTOCOL_VERSION": protocol.PROTOCOL_VERSION,
    "CRC_BYTES": protocol.CRC_BYTES,
    "MIN_INT_VALUE": protocol.MIN_INT_VALUE,
    "RX_WINDOW": link.RX_WINDOW,
    "DEFAULT_RING": controller.DEFAULT_RING,
}

MAX_CONSTANTS: dict[str, int] = {
    name: getattr(protocol, name) for name in dir(protocol) if name.startswith("MAX_")
}


def _hex_blocks() -> list[bytes]:
    return [bytes.fromhex(block) for block in HEX_BLOCK.findall(DOC)]


def _table_value(name: str) -> int:
    """The value cell of the row `| `name` | value | ...` in a table of the document."""
    match = re.search(rf"^\| `{re.escape(name)}` \| (-?\d+)\b", DOC, re.MULTILINE)
    assert match is not None, f"no table row for {name} in {DOC_PATH.name}"
    return int(match.group(1))


def _annotated_envelopes() -> list[bytes]:
    """The bytes column of each annotated envelope dump; offsets must run without gaps."""
    envelopes = []
    for block in ANNOTATED_BLOCK.findall(DOC):
        data = bytearray()
        for line in block.splitlines():
            row = ANNOTATED_ROW.match(line)
            assert row is not None, f"unparsable dump row: {line!r}"
            assert int(row.group(1), 16) == len(data), f"offset out of step: {line!r}"
            data += bytes.fromhex(row.group(2))
        envelopes.append(bytes(data))
    return envelopes


def _body_table_keys(frame_type: FrameType) -> set[str]:
    """Keys listed in the section 4 table of `frame_type` (4.6 holds two tables)."""
    heading = re.search(
        rf"^### 4\.\d+ .*\b{frame_type.name} \({frame_type.value}\)", DOC, re.MULTILINE
    )
    assert heading is not None, f"no section 4 heading for {frame_type.name}"
    end = re.compile(r"^##", re.MULTILINE).search(DOC, heading.end())
    section = DOC[heading.end() : end.start() if end else len(DOC)]
    if frame_type in (FrameType.COMMAND, FrameType.RESPONSE):
        command, response = section.split("\nRESPONSE:\n")
        section = command if frame_type is FrameType.COMMAND else response
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE))


def test_doc_has_one_hex_block_per_expected_frame() -> None:
    assert len(_hex_blocks()) == len(EXPECTED)


def test_examples_cover_every_frame_type() -> None:
    assert {frame.type for frame in EXPECTED} == set(FrameType)


@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_hex_block_decodes_to_the_stated_frame(index: int) -> None:
    wire = _hex_blocks()[index]
    decoder = FrameDecoder()

    frames = decoder.feed(wire)

    assert frames == [EXPECTED[index]]
    assert decoder.rejected == 0
    assert decoder.buffered == 0
    assert wire.endswith(b"\x00")
    assert wire.count(0) == 1  # COBS leaves the delimiter as the only zero byte


@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_hex_block_is_what_the_encoder_writes(index: int) -> None:
    assert _hex_blocks()[index] == encode(EXPECTED[index])


def test_stated_crcs_match_the_envelopes() -> None:
    stated = [int(value, 16) for value in STATED_CRC.findall(DOC)]
    assert stated == [crc(pack_envelope(frame)) for frame in EXPECTED]


def test_stated_wire_lengths_match() -> None:
    stated = [int(value) for value in STATED_WIRE_LEN.findall(DOC)]
    assert stated == [len(encode(frame)) for frame in EXPECTED]


def test_stated_envelope_lengths_match() -> None:
    stated = [int(value) for value in STATED_ENVELOPE_LEN.findall(DOC)]
    assert stated == [len(pack_envelope(frame)) for frame in EXPECTED]


def test_annotated_envelopes_are_what_the_encoder_writes() -> None:
    assert _annotated_envelopes() == [pack_envelope(frame) for frame in EXPECTED]


def test_stated_crc_trailers_match() -> None:
    stated = [bytes.fromhex(value) for value in STATED_TRAILER.findall(DOC)]
    assert stated == [crc(pack_envelope(frame)).to_bytes(4, "little") for frame in EXPECTED]


def test_crc_check_value_is_stated_and_true() -> None:
    assert crc(b"123456789") == 0xE3069283
    assert "0xE3069283" in DOC
    assert "0x1EDC6F41" in DOC
    assert "0x82F63B78" in DOC


def test_every_max_constant_is_named() -> None:
    assert MAX_CONSTANTS, "protocol.py defines no MAX_* constants?"
    missing = [name for name in MAX_CONSTANTS if f"`{name}`" not in DOC]
    assert missing == []


@pytest.mark.parametrize("name", sorted(MAX_CONSTANTS))
def test_limits_table_matches_max_constant(name: str) -> None:
    assert _table_value(name) == MAX_CONSTANTS[name]


@pytest.mark.parametrize("name", sorted(OTHER_TABLE_CONSTANTS))
def test_limits_table_matches_other_constant(name: str) -> None:
    assert _table_value(name) == OTHER_TABLE_CONSTANTS[name]


@pytest.mark.parametrize("key", sorted(protocol.UNPACK_LIMITS))
def test_unpack_limits_table_matches(key: str) -> None:
    assert _table_value(key) == protocol.UNPACK_LIMITS[key]


def test_every_frame_type_is_named_with_its_number() -> None:
    missing = [t.name for t in FrameType if f"`{t.name}` = {t.value}" not in DOC]
    assert missing == []


def test_every_time_quality_is_in_its_table() -> None:
    missing = [q.name for q in TimeQuality if f"| {q.value} | `{q.name}` |" not in DOC]
    assert missing == []


def test_every_body_key_has_a_table_row() -> None:
    keys = {key for frame in EXPECTED for key in frame.body.to_wire()}
    missing = sorted(key for key in keys if f"| `{key}` |" not in DOC)
    assert missing == []


@pytest.mark.parametrize("frame", EXPECTED, ids=lambda frame: frame.type.name)
def test_body_table_lists_exactly_the_sent_keys(frame: Frame) -> None:
    assert _body_table_keys(frame.type) == set(frame.body.to_wire())


def test_controller_ignores_ack_and_nack_of_another_session() -> None:
    event = EventBody("ecu0/engine", 1, 1.0, TimeQuality.SYNCED, "sample", 0, {})
    ctl = controller.ControllerLink("ecu0", "2.14.3", BOOT_EPOCH)
    assert ctl.offer(event)
    ctl.poll(0.0)
    ctl.outgoing()

    ctl.receive(encode(Frame(AGENT_SESSION, 1, Ack(BOOT_EPOCH - 1, 1))), 0.1)
    ctl.receive(encode(Frame(AGENT_SESSION, 1, Nack(BOOT_EPOCH - 1, ((1, 1),)))), 0.1)
    assert (len(ctl.ring), ctl.stale_acks, ctl.retransmits, ctl.outgoing()) == (1, 2, 0, b"")

    ctl.receive(encode(Frame(AGENT_SESSION, 1, Ack(BOOT_EPOCH, 1))), 0.2)
    assert (len(ctl.ring), ctl.acked) == (0, 1)


@pytest.mark.parametrize("window", [0, protocol.MAX_WINDOW + 1])
def test_window_outside_the_cap_is_refused(window: int) -> None:
    assert protocol.MAX_WINDOW < link.RX_WINDOW
    with pytest.raises(ValueError, match="window must be within"):
        controller.ControllerLink("ecu0", "2.14.3", BOOT_EPOCH, window=window)


def test_offer_refuses_once_link_seq_is_exhausted() -> None:
    event = EventBody("ecu0/engine", 1, 1.0, TimeQuality.SYNCED, "sample", 0, {})
    ctl = controller.ControllerLink("ecu0", "2.14.3", BOOT_EPOCH)
    ctl.next_seq = protocol.MAX_U32
    assert ctl.offer(event)
    assert not ctl.offer(event)


@pytest.mark.parametrize(
    ("frame_type", "link_seq", "body"),
    [
        (FrameType.EVENT, 0, EXPECTED[1].body.to_wire()),  # link_seq 0 (section 5.3)
        (FrameType.ACK, 1, {"c": 3, "r": []}),  # ACK without `e` (section 9)
    ],
    ids=["event-link-seq-0", "ack-without-e"],
)
def test_stated_schema_rejects(
    frame_type: FrameType, link_seq: int, body: dict[str, object]
) -> None:
    envelope = msgpack.packb([1, int(frame_type), BOOT_EPOCH, link_seq, body])
    decoder = FrameDecoder()

    assert decoder.feed(seal(envelope)) == []
    assert decoder.rejects["schema"] == 1


def test_every_reject_reason_is_named() -> None:
    missing = [reason for reason in REJECT_REASONS if f"`{reason}`" not in DOC]
    assert missing == []
