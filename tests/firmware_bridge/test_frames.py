"""Codec: round trips in any chunking, caps at max and max + 1, CRC and COBS rejects."""

from __future__ import annotations

import random

import pytest
from cobs import cobs
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.errors import FrameTooLarge
from firmware_bridge.frames import FrameDecoder, crc, encode, seal
from firmware_bridge.protocol import (
    MAX_ENCODED_FRAME_BYTES,
    MAX_ENVELOPE_BYTES,
    MAX_FRAME_BYTES,
    MAX_RANGES,
    MAX_SIGNALS,
    MAX_U32,
    Ack,
    Command,
    EventBody,
    Frame,
    Heartbeat,
    Hello,
    Nack,
    Response,
    TimeQuality,
    pack_envelope,
)


def event(seq: int = 1, **signals: int | float | bool | str | None) -> Frame:
    body = EventBody("ecu0/s000", seq, 1764196000.5, TimeQuality.SYNCED, "telemetry", 1, signals)
    return Frame(3, seq, body)


def padded_event(envelope_size: int) -> Frame:
    """An EVENT frame whose envelope is exactly `envelope_size` bytes."""
    for chunk in (100, 90):
        for total in range(envelope_size):
            sizes = [chunk] * (total // chunk) + [total % chunk]
            frame = event(**{f"p{i}": "x" * n for i, n in enumerate(sizes)})
            if len(pack_envelope(frame)) == envelope_size:
                return frame
    raise AssertionError(f"cannot build an envelope of {envelope_size} bytes")


# -- round trips ------------------------------------------------------------------------------

scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(st.characters(codec="ascii"), max_size=20),
)
names = st.text(st.characters(codec="ascii"), min_size=1, max_size=12)
signal_maps = st.dictionaries(names, scalars, max_size=6)
ranges = st.lists(st.integers(1, 1000), max_size=MAX_RANGES, unique=True).map(
    lambda xs: tuple((x * 3, x * 3 + 1) for x in sorted(xs))
)
bodies = st.one_of(
    st.builds(Hello, names, names),
    st.builds(
        EventBody,
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=16),
        st.integers(0, 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(list(TimeQuality)),
        names,
        st.integers(0, 7),
        signal_maps,
    ),
    st.builds(Ack, st.integers(0, MAX_U32), st.just(1), ranges),
    st.builds(Nack, st.integers(0, MAX_U32), ranges.filter(bool)),
    st.just(Heartbeat()),
    st.builds(Command, st.integers(0, MAX_U32), names, signal_maps),
    st.builds(Response, st.integers(0, MAX_U32), st.booleans(), signal_maps),
)
frames_st = st.builds(Frame, st.integers(0, MAX_U32), st.integers(1, MAX_U32), bodies)


@settings(max_examples=200)
@given(st.lists(frames_st, max_size=12), st.randoms())
def test_round_trip_in_random_chunks(frames: list[Frame], rnd: random.Random) -> None:
    frames = [f for f in frames if len(pack_envelope(f)) <= MAX_ENVELOPE_BYTES]
    wire = b"".join(encode(f) for f in frames)
    decoder = FrameDecoder()
    out: list[Frame] = []
    pos = 0
    while pos < len(wire):
        step = rnd.randint(1, 97)
        out += decoder.feed(wire[pos : pos + step])
        pos += step
    assert out == frames
    assert decoder.rejected == 0
    assert decoder.buffered == 0


def test_idle_delimiters_are_not_errors() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00" + encode(event()) + b"\x00") == [event()]
    assert decoder.rejected == 0


# -- frame size cap: exactly max and max + 1 --------------------------------------------------


def test_envelope_at_max_is_accepted() -> None:
    frame = padded_event(MAX_ENVELOPE_BYTES)
    wire = encode(frame)
    assert len(cobs.decode(wire[:-1])) == MAX_FRAME_BYTES
    assert len(wire) - 1 <= MAX_ENCODED_FRAME_BYTES
    assert FrameDecoder().feed(wire) == [frame]


def test_envelope_at_max_plus_one_is_refused_both_ways() -> None:
    frame = padded_event(MAX_ENVELOPE_BYTES + 1)
    with pytest.raises(FrameTooLarge):
        encode(frame)
    envelope = pack_envelope(frame)
    wire = cobs.encode(envelope + crc(envelope).to_bytes(4, "little")) + b"\x00"
    decoder = FrameDecoder()
    assert decoder.feed(wire) == []
    assert decoder.rejects["too_long"] == 1


def test_receive_buffer_capped_and_resyncs_after_overflow() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x01" * MAX_ENCODED_FRAME_BYTES)
    assert decoder.buffered == MAX_ENCODED_FRAME_BYTES  # exactly max is held
    decoder.feed(b"\x01")  # max + 1: dropped, with everything up to the next delimiter
    assert decoder.buffered == 0
    for _ in range(1000):
        decoder.feed(b"\x01" * 4096)
        assert decoder.buffered == 0
    assert decoder.feed(b"\x00" + encode(event())) == [event()]
    assert decoder.rejects["too_long"] == 1


# -- integrity --------------------------------------------------------------------------------


def test_every_single_bit_flip_is_rejected() -> None:
    wire = encode(event(v=7, x=1.5))
    decoder = FrameDecoder()
    for bit in range(len(wire) * 8):
        damaged = bytearray(wire)
        damaged[bit // 8] ^= 1 << (bit % 8)
        assert decoder.feed(bytes(damaged) + b"\x00") == []
    assert decoder.accepted == 0
    assert decoder.rejected >= len(wire) * 8


def test_up_to_five_bit_errors_under_cobs_never_pass_crc() -> None:
    rng = random.Random(5)
    envelope = pack_envelope(event(v=1, lat=48.85, lon=2.35))
    sealed = bytearray(envelope + crc(envelope).to_bytes(4, "little"))
    decoder = FrameDecoder()
    for _ in range(20_000):
        damaged = bytearray(sealed)
        for bit in rng.sample(range(len(damaged) * 8), rng.randint(1, 5)):
            damaged[bit // 8] ^= 1 << (bit % 8)
        decoder.feed(cobs.encode(bytes(damaged)) + b"\x00")
    assert decoder.accepted == 0
    assert decoder.rejects["crc"] + decoder.rejects["msgpack"] + decoder.rejects["schema"] == (
        20_000 - decoder.rejects["cobs"] - decoder.rejects["too_long"]
    )


def test_bad_cobs_and_short_frames_are_counted() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x05\x01\x00")  # length code runs past the end
    decoder.feed(b"\x02\x01\x00")  # decodes to one byte: no room for a CRC
    assert decoder.rejects["cobs"] == 1
    assert decoder.rejects["crc"] == 1
    assert isinstance(decoder.last_reject, Exception)


def test_seal_refuses_oversize() -> None:
    with pytest.raises(FrameTooLarge):
        seal(b"\x90" * (MAX_ENVELOPE_BYTES + 1))


def test_signals_cap_at_max_and_max_plus_one() -> None:
    ok = event(**{f"k{i}": i for i in range(MAX_SIGNALS)})
    assert FrameDecoder().feed(encode(ok)) == [ok]
    envelope = bytearray(pack_envelope(ok))
    # Rewrite the payload map header 0xde 0x00 0x20 (map16, 32) to 33 entries and add one.
    header = b"\xde\x00\x20"
    at = envelope.index(header)
    envelope[at : at + 3] = b"\xde\x00\x21"
    envelope += b"\xa3k32\x00"
    decoder = FrameDecoder()
    assert decoder.feed(seal(bytes(envelope))) == []
    assert decoder.rejects["msgpack"] == 1
