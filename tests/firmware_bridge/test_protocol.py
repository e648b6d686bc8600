"""Schema: every peer-set size at max and max + 1, and a hostile corpus, all rejected cleanly."""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgpack
import pytest

from firmware_bridge.errors import FrameCorrupt
from firmware_bridge.frames import FrameDecoder, seal
from firmware_bridge.protocol import (
    MAX_FIRMWARE_LEN,
    MAX_ID_LEN,
    MAX_INT_VALUE,
    MAX_KIND_LEN,
    MAX_NAME_LEN,
    MAX_PRIORITY,
    MAX_RANGES,
    MAX_SEQ,
    MAX_STR_VALUE_LEN,
    MAX_STREAM_LEN,
    MAX_U32,
    MIN_INT_VALUE,
    PROTOCOL_VERSION,
    Ack,
    FrameType,
    parse_envelope,
)


def envelope(ftype: int, body: Any, *, session: Any = 1, link_seq: Any = 1) -> bytes:
    packed: bytes = msgpack.packb([PROTOCOL_VERSION, ftype, session, link_seq, body])
    return packed


def event_body(**override: Any) -> dict[str, Any]:
    body = {"s": "ecu0/s000", "q": 1, "t": 1.5, "tq": 3, "k": "telemetry", "p": 0, "d": {"v": 1}}
    body.update(override)
    return body


def hello_body(**override: Any) -> dict[str, Any]:
    body = {"id": "ecu0", "fw": "1.0"}
    body.update(override)
    return body


def rejected(data: bytes) -> FrameCorrupt:
    """Parse must raise FrameCorrupt (never anything else) and the decoder must count it."""
    with pytest.raises(FrameCorrupt) as info:
        parse_envelope(data)
    decoder = FrameDecoder()
    assert decoder.feed(seal(data)) == []
    assert decoder.rejected == 1  # (an empty envelope is caught earlier, as a CRC-only frame)
    return info.value


def accepted(data: bytes) -> None:
    frame = parse_envelope(data)
    assert FrameDecoder().feed(seal(data)) == [frame]


# -- every cap at max and max + 1 -------------------------------------------------------------

STRING_CAPS = [
    (FrameType.EVENT, event_body, "s", MAX_STREAM_LEN),
    (FrameType.EVENT, event_body, "k", MAX_KIND_LEN),
    (FrameType.HELLO, hello_body, "id", MAX_ID_LEN),
    (FrameType.HELLO, hello_body, "fw", MAX_FIRMWARE_LEN),
]


@pytest.mark.parametrize(("ftype", "make", "key", "cap"), STRING_CAPS)
def test_string_caps(ftype: FrameType, make: Any, key: str, cap: int) -> None:
    accepted(envelope(ftype, make(**{key: "a" * cap})))
    assert "longer than" in str(rejected(envelope(ftype, make(**{key: "a" * (cap + 1)}))))


def test_multibyte_strings_are_capped_in_bytes() -> None:
    accepted(envelope(FrameType.EVENT, event_body(s="é" * (MAX_STREAM_LEN // 2))))
    rejected(envelope(FrameType.EVENT, event_body(s="é" * (MAX_STREAM_LEN // 2) + "a")))


def test_signal_name_and_value_caps() -> None:
    accepted(envelope(FrameType.EVENT, event_body(d={"n" * MAX_NAME_LEN: 1})))
    rejected(envelope(FrameType.EVENT, event_body(d={"n" * (MAX_NAME_LEN + 1): 1})))
    accepted(envelope(FrameType.EVENT, event_body(d={"v": "x" * MAX_STR_VALUE_LEN})))
    assert rejected(envelope(FrameType.EVENT, event_body(d={"v": "x" * (MAX_STR_VALUE_LEN + 1)})))


@pytest.mark.parametrize(("key", "maximum"), [("q", MAX_SEQ), ("p", MAX_PRIORITY), ("tq", 3)])
def test_event_integer_caps(key: str, maximum: int) -> None:
    accepted(envelope(FrameType.EVENT, event_body(**{key: maximum})))
    rejected(envelope(FrameType.EVENT, event_body(**{key: maximum + 1})))
    rejected(envelope(FrameType.EVENT, event_body(**{key: -1})))


def test_signal_integer_range() -> None:
    accepted(envelope(FrameType.EVENT, event_body(d={"v": MAX_INT_VALUE, "w": MIN_INT_VALUE})))
    rejected(envelope(FrameType.EVENT, event_body(d={"v": MAX_INT_VALUE + 1})))


@pytest.mark.parametrize("field", ["session", "link_seq"])
def test_envelope_u32_caps(field: str) -> None:
    accepted(envelope(FrameType.HEARTBEAT, {}, **{field: MAX_U32}))
    rejected(envelope(FrameType.HEARTBEAT, {}, **{field: MAX_U32 + 1}))


def test_range_count_cap() -> None:
    ok = [[i * 10, i * 10 + 1] for i in range(1, MAX_RANGES + 1)]
    accepted(envelope(FrameType.NACK, {"e": 1, "m": ok}))
    too_many = [[i * 10, i * 10 + 1] for i in range(1, MAX_RANGES + 2)]
    rejected(envelope(FrameType.NACK, {"e": 1, "m": too_many}))


def test_ranges_must_be_sorted_disjoint_and_forward() -> None:
    for bad in ([[5, 4]], [[5, 6], [1, 2]], [[1, 4], [3, 6]], [[1, 2], [3, 4]], [[0, 1]], []):
        rejected(envelope(FrameType.NACK, {"e": 1, "m": bad}))
    rejected(envelope(FrameType.ACK, {"e": 1, "c": 5, "r": [[6, 7]]}))  # must leave a gap above c
    accepted(envelope(FrameType.ACK, {"e": 1, "c": 5, "r": [[7, 7]]}))
    assert Ack(1, 5, ((7, 9),)).ranges == ((7, 9),)


# -- hostile corpus -----------------------------------------------------------------------------

HUGE_HEADERS = {
    "array32 of 4G": b"\xdd\xff\xff\xff\xff",
    "map32 of 4G": b"\xdf\xff\xff\xff\xff",
    "str32 of 4G": b"\xdb\xff\xff\xff\xff",
    "bin32 of 4G": b"\xc6\xff\xff\xff\xff",
    "ext32 of 4G": b"\xc9\xff\xff\xff\xff\x01",
    "array16 in envelope": b"\x95\x01\x02\x01\x01\xdc\xff\xff",
}


@pytest.mark.parametrize("name", list(HUGE_HEADERS))
def test_huge_headers_rejected_without_allocation(name: str) -> None:
    tracemalloc.start()
    try:
        error = rejected(HUGE_HEADERS[name])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.reason == "msgpack"
    assert peak < 1_000_000


CORPUS: dict[str, bytes] = {
    "deep nesting": b"\x91" * 400 + b"\x01",
    "reserved byte 0xc1": b"\xc1",
    "invalid utf-8 string": envelope(FrameType.EVENT, event_body()).replace(
        b"\xa9ecu0/s000", b"\xa9ecu0/s\xff\xfe0"
    ),
    "fixext1": envelope(FrameType.EVENT, event_body(d={"v": msgpack.ExtType(1, b"x")})),
    "timestamp ext": envelope(FrameType.EVENT, event_body(d={"v": msgpack.Timestamp(1, 0)})),
    "bin value": msgpack.packb([1, 2, 1, 1, event_body(d={"v": b"\x00\x01"})], use_bin_type=True),
    "NaN timestamp": envelope(FrameType.EVENT, event_body(t=float("nan"))),
    "infinite timestamp": envelope(FrameType.EVENT, event_body(t=float("inf"))),
    "NaN signal": envelope(FrameType.EVENT, event_body(d={"v": float("nan")})),
    "integer timestamp": envelope(FrameType.EVENT, event_body(t=1)),
    "trailing bytes": envelope(FrameType.HEARTBEAT, {}) + b"\x00",
    "non-string body key": envelope(FrameType.HEARTBEAT, {1: 2}),
    "non-string signal key": envelope(FrameType.EVENT, event_body(d={1: 2})),
    "bool as seq": envelope(FrameType.EVENT, event_body(q=True)),
    "float as seq": envelope(FrameType.EVENT, event_body(q=1.0)),
    "negative seq": envelope(FrameType.EVENT, event_body(q=-5)),
    "unknown frame type": envelope(99, {}),
    "bool frame type": envelope(True, {}),
    "future version": msgpack.packb([PROTOCOL_VERSION + 1, 5, 1, 1, {}]),
    "envelope not an array": msgpack.packb({"v": 1}),
    "envelope too short": msgpack.packb([1, 5, 1, 1]),
    "envelope too long": msgpack.packb([1, 5, 1, 1, {}, 0]),
    "body not a map": envelope(FrameType.HEARTBEAT, []),
    "unknown body key": envelope(FrameType.EVENT, event_body(zz=1)),
    "missing body key": envelope(FrameType.HELLO, {"id": "x"}),
    "nested map signal": envelope(FrameType.EVENT, event_body(d={"v": {"a": 1}})),
    "list signal": envelope(FrameType.EVENT, event_body(d={"v": [1, 2]})),
    "empty stream": envelope(FrameType.EVENT, event_body(s="")),
    "empty controller id": envelope(FrameType.HELLO, hello_body(id="")),
    "payload not a map": envelope(FrameType.EVENT, event_body(d=[1])),
    "response ok not bool": envelope(FrameType.RESPONSE, {"id": 1, "ok": 1, "r": {}}),
    "range not a pair": envelope(FrameType.NACK, {"e": 1, "m": [[1, 2, 3]]}),
    "empty input": b"",
    "event with link_seq 0": envelope(FrameType.EVENT, event_body(), link_seq=0),
    "ack without epoch": envelope(FrameType.ACK, {"c": 1, "r": []}),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_corpus_rejected(name: str) -> None:
    error = rejected(CORPUS[name])
    assert error.reason in ("msgpack", "schema")
    assert str(error)  # a readable reason for the log


def test_corpus_is_not_vacuous() -> None:
    # The same shapes, well-formed, are accepted: the rejections above are about the flaw.
    accepted(envelope(FrameType.EVENT, event_body()))
    accepted(envelope(FrameType.HELLO, hello_body()))
    accepted(envelope(FrameType.HEARTBEAT, {}))
    accepted(envelope(FrameType.RESPONSE, {"id": 1, "ok": True, "r": {}}))
