"""Coverage-guided fuzzing of the serial frame decoder and the agent side of the link.

    python tests/chaos/fuzz_frames.py [libFuzzer flags] CORPUS_DIR
    python tests/chaos/fuzz_frames.py --write-seeds CORPUS_DIR

Every input is checked against an oracle that can fail, not only for crashes: a reference
decoder written from docs/protocol.md section 2.4 classifies each delimited chunk, and
`FrameDecoder` fed the same bytes in fuzz-chosen chunks must return the same frames and
count the same rejects by reason; `decode_one` may only raise `FrameCorrupt` with the
reference's reason; every accepted frame re-encodes to bytes that decode to an equal frame;
`AgentLink` fed the stream never raises, writes only frames that decode cleanly, and never
ACKs a link_seq the caller did not report durable. `check(data)` is the whole oracle;
tests/chaos/test_fuzz.py replays the corpus through it.

Input layout (so mutations of the seeds stay meaningful):

    byte 0        flags: bits 0-2 = k, the number of chunk-size bytes that follow;
                  bit 3 = sealed mode; bits 4-6 = the link's clock step; bit 7 = the
                  caller withholds durability (received events stay pending)
    bytes 1..k    chunk sizes (value + 1), cycled over the stream (MAX_CHUNKS - 1 cuts at
                  most, the rest in one piece); k = 0: one feed
    rest          raw mode: the wire bytes themselves. Sealed mode: records of a 2-byte
                  big-endian word (bit 15 = raw bytes, bits 0-9 = length) and that many
                  bytes; a sealed record is an envelope given a valid CRC and COBS here,
                  so the fuzzer reaches the msgpack and schema checks without having to
                  forge a CRC-32C.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import atheris
import crc32c
import msgpack
from cobs import cobs

# Instrumented here so libFuzzer sees the branches of the code under test; pytest imports
# these packages before it loads this file, which leaves them uninstrumented there.
with atheris.instrument_imports(include=["firmware_bridge"]):
    from firmware_bridge import frames
    from firmware_bridge.errors import REJECT_REASONS, FrameCorrupt, FrameTooLarge
    from firmware_bridge.link import AgentLink
    from firmware_bridge.protocol import (
        CRC_BYTES,
        MAX_ENCODED_FRAME_BYTES,
        MAX_ENVELOPE_BYTES,
        MAX_FRAME_BYTES,
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
        parse_envelope,
    )

AGENT_SESSION = 1  # fixed, so a run is deterministic (AgentLink picks a random one)
CLOCK_STEPS = (0.0, 0.001, 0.02, 0.05, 0.3, 1.0, 3.5, 30.0)  # s: below and past each timer
FLOAT_GROWTH = 9 - 5  # a float32 value re-encodes as float64: 4 bytes more
SEALED_FLAG = 0x08
WITHHOLD_FLAG = 0x80
RAW_RECORD = 0x8000
RECORD_LENGTH_MASK = 0x3FF
# Each chunk costs a feed, a link step and a poll: beyond this many the input runs slowly
# and a few dozen cuts already put boundaries in every frame of a typical stream.
MAX_CHUNKS = 64


class OracleViolation(AssertionError):
    """The code under test did something the protocol or the link's contract forbids."""


@dataclass(frozen=True)
class KnownBug:
    """A product bug already reported: recognised so a fuzz run can look past it."""

    name: str
    reason: str
    matches: Callable[[BaseException], bool]


# While a bug is open its crasher stays in the corpus (crash-<name>, an xfail(strict=True)
# regression test); the fuzz run counts further hits instead of stopping at the first.
# Open bugs the fuzzer may run into (none: crash-link-ack-below-cumulative, a same-session
# HELLO passing a selective ACK, was fixed in firmware_bridge/link.py and is a regression
# input now).
KNOWN_BUGS: tuple[KnownBug, ...] = ()


@dataclass
class Stats:
    """What one `check` saw: frames accepted and rejected, open bugs it ran into."""

    accepted: int = 0
    rejected: int = 0
    known_bugs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Parsed:
    """A fuzz input split into the stream to feed and how to feed it."""

    stream: bytes
    chunk_sizes: tuple[int, ...]
    clock_step: float
    withhold: bool


def check(data: bytes, *, tolerate_known: bool = False) -> Stats:
    """Run every oracle on one input; raise OracleViolation on the first failure."""
    parsed = parse_input(data)
    stats = Stats()
    _check_decode_one(data[1:])  # any bytes at all, delimiters included
    expected, rejects, envelope_lengths = _reference(parsed.stream)
    got = _feed_decoder(parsed)
    if got.frames != expected:
        raise OracleViolation(f"decoder frames {got.frames!r} != reference {expected!r}")
    if got.rejects != rejects:
        raise OracleViolation(f"decoder rejects {got.rejects} != reference {rejects}")
    if got.accepted != len(expected):
        raise OracleViolation(f"accepted {got.accepted} but returned {len(expected)} frames")
    last = parsed.stream.rsplit(b"\x00", 1)[-1]
    held = len(last) if len(last) <= MAX_ENCODED_FRAME_BYTES else 0
    if got.buffered != held:
        raise OracleViolation(f"decoder holds {got.buffered} bytes, the stream leaves {held}")
    for frame, envelope_length in zip(expected, envelope_lengths, strict=True):
        _check_round_trip(frame, envelope_length)
    stats.accepted, stats.rejected = len(expected), sum(rejects.values())
    try:
        _check_link(parsed, expected, rejects)
    except OracleViolation as exc:
        known = known_bug(exc.__cause__) if tolerate_known else None
        if known is None:
            raise
        stats.known_bugs.append(known)
    return stats


def parse_input(data: bytes) -> Parsed:
    """Split a fuzz input per the layout in the module docstring."""
    if not data:
        return Parsed(b"", (), 0.0, False)
    flags = data[0]
    k = flags & 0x07
    sizes = tuple(b + 1 for b in data[1 : 1 + k])
    body = data[1 + k :]
    stream = _unseal_records(body) if flags & SEALED_FLAG else body
    return Parsed(stream, sizes, CLOCK_STEPS[(flags >> 4) & 0x07], bool(flags & WITHHOLD_FLAG))


def wire(envelope: bytes) -> bytes:
    """COBS(envelope + CRC) + delimiter with no size cap (`frames.seal` refuses > 508)."""
    trailer = crc32c.crc32c(envelope).to_bytes(CRC_BYTES, "little")
    encoded: bytes = cobs.encode(envelope + trailer)
    return encoded + b"\x00"


def seeds() -> dict[str, bytes]:
    """Seed inputs: every frame type, raw and sealed, in chunks, and hostile streams."""
    hello = Frame(7, 1, Hello("ecu0", "2.14.3"))
    signals = {"temp": 88.5, "ok": True, "note": None, "mode": "eco", "neg": -(2**63)}
    events = [
        Frame(7, n, EventBody("ecu0/engine", n, 1.7e9 + n, TimeQuality.SYNCED, "telemetry", n % 8,
                              {"rpm": 2150 + n, **signals}))
        for n in range(1, 4)
    ]  # fmt: skip
    others = [
        Frame(7, 4, Heartbeat()),
        Frame(7, 4, Command(9, "status", {"verbose": True})),
        Frame(7, 4, Response(9, True, {"ring": 1})),
        Frame(AGENT_SESSION, 1, Ack(7, 3, ((5, 6),))),
        Frame(AGENT_SESSION, 1, Nack(7, ((4, 4), (8, 9)))),
    ]
    session = [hello, *events, *others]
    envelopes = [pack_envelope(f) for f in session]
    out: dict[str, bytes] = {}
    for f, env in zip(session, envelopes, strict=True):
        name = f"{f.type.name.lower()}-{f.link_seq}"
        out[f"raw-{name}"] = b"\x00" + frames.encode(f)
        out[f"sealed-{name}"] = bytes([SEALED_FLAG]) + _record(env)
    stream = b"".join(frames.encode(f) for f in session)
    out["raw-session"] = b"\x00" + stream
    out["raw-session-chunked"] = bytes([0x23, 0, 6, 40]) + stream  # 1, 7, 41-byte chunks
    records = b"".join(map(_record, envelopes))
    out["sealed-session-slow-clock"] = bytes([SEALED_FLAG | 0x60]) + records
    out["sealed-session-withheld"] = bytes([SEALED_FLAG | WITHHOLD_FLAG | 0x20]) + records
    # Retransmits, a gap and a reboot (new boot epoch), and a gap then a HELLO answering
    # the agent's; each frame in its own read, so durability is reported in between.
    reboot = [hello, events[0], events[2], events[0], Frame(8, 1, Hello("ecu0", "2.14.4")),
              events[1]]  # fmt: skip
    out["sealed-gap-retransmit-reboot"] = sealed_per_frame(reboot, 0x30)
    out["sealed-gap-then-hello"] = sealed_per_frame([hello, events[0], events[2], hello], 0x30)
    out.update(_hostile(envelopes[1], stream))
    return out


def sealed_per_frame(sequence: list[Frame], flags: int = 0) -> bytes:
    """A sealed-mode input whose chunk sizes cut the stream at frame boundaries (<= 7)."""
    envelopes = [pack_envelope(f) for f in sequence]
    sizes = [len(wire(e)) - 1 for e in envelopes[:7]]
    if max(sizes) > 0xFF:
        raise ValueError("a chunk size is one byte: frames up to 256 wire bytes")
    header = bytes([SEALED_FLAG | len(sizes) | flags, *sizes])
    return header + b"".join(map(_record, envelopes))


def write_seeds(directory: Path) -> None:
    """Write `seeds()` into `directory` (file name = seed name)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (directory / name).write_bytes(data)


def known_bug(exc: BaseException | None) -> str | None:
    """Name of the open bug `exc` is an instance of, if any."""
    if exc is None:
        return None
    return next((bug.name for bug in KNOWN_BUGS if bug.matches(exc)), None)


def main(argv: list[str]) -> None:
    """libFuzzer entry; known bugs are counted on stderr, anything else is a crash."""
    if len(argv) == 3 and argv[1] == "--write-seeds":
        write_seeds(Path(argv[2]))
        return
    logging.disable(logging.WARNING)  # link_down and friends, thousands of times a second
    hits: dict[str, int] = {}

    def one_input(data: bytes) -> None:
        for name in check(data, tolerate_known=True).known_bugs:
            hits[name] = hits.get(name, 0) + 1
            if hits[name] == 1:
                print(f"KNOWN-BUG {name}: first hit, input {data.hex()}", file=sys.stderr)

    # -merge=1, -fork and -minimize_crash re-run argv[0] through sh: make it the interpreter
    # and this script, as this file is not executable itself.
    atheris.Setup([shlex.join([sys.executable, argv[0]]), *argv[1:]], one_input)
    atheris.Fuzz()


# -- oracle pieces ---------------------------------------------------------------------------


def _record(envelope: bytes, *, raw: bool = False) -> bytes:
    return ((RAW_RECORD if raw else 0) | len(envelope)).to_bytes(2, "big") + envelope


def _unseal_records(body: bytes) -> bytes:
    out = bytearray()
    at = 0
    while at + 2 <= len(body):
        word = int.from_bytes(body[at : at + 2], "big")
        piece = body[at + 2 : at + 2 + (word & RECORD_LENGTH_MASK)]
        at += 2 + len(piece)
        out += piece if word & RAW_RECORD else wire(piece)
    return bytes(out)


def _reference_one(chunk: bytes) -> tuple[Frame | None, str | None, int]:
    """docs/protocol.md 2.4 restated: (frame, None, envelope length) or (None, reason, 0)."""
    envelope = _reference_unseal(chunk)
    if isinstance(envelope, str):
        return None, envelope, 0
    try:
        return parse_envelope(envelope), None, len(envelope)
    except FrameCorrupt as exc:
        return None, exc.reason, 0
    except Exception as exc:
        raise OracleViolation(f"parse_envelope raised {exc!r} on {envelope.hex()}") from exc


def _reference_unseal(chunk: bytes) -> bytes | str:
    """The envelope of one delimited chunk, or the reason it is rejected, stage by stage."""
    if len(chunk) > MAX_ENCODED_FRAME_BYTES:
        return "too_long"
    try:
        raw: bytes = cobs.decode(chunk)
    except cobs.DecodeError:
        return "cobs"
    if len(raw) > MAX_FRAME_BYTES:
        return "too_long"
    if len(raw) <= CRC_BYTES or crc32c.crc32c(raw[:-CRC_BYTES]) != int.from_bytes(
        raw[-CRC_BYTES:], "little"
    ):
        return "crc"
    return raw[:-CRC_BYTES]


def _reference(stream: bytes) -> tuple[list[Frame], dict[str, int], list[int]]:
    """Frames, reject counts and envelope lengths the stream must produce."""
    found: list[Frame] = []
    lengths: list[int] = []
    rejects: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
    for part in stream.split(b"\x00")[:-1]:
        if not part:
            continue  # idle fill between frames
        frame, reason, length = _reference_one(part)
        _check_decode_one(part, frame, reason)
        if frame is None:
            assert reason is not None
            rejects[reason] += 1
        else:
            found.append(frame)
            lengths.append(length)
    return found, rejects, lengths


def _check_decode_one(chunk: bytes, frame: Frame | None = None, reason: str | None = None) -> None:
    """`decode_one` raises only FrameCorrupt; with a reference verdict it must agree."""
    verdict = reason if reason is not None else repr(frame)
    try:
        got = frames.decode_one(chunk)
    except FrameCorrupt as exc:
        if frame is not None or (reason is not None and exc.reason != reason):
            raise OracleViolation(
                f"decode_one rejected {chunk.hex()} as {exc.reason}; reference: {verdict}"
            ) from exc
        return
    except Exception as exc:
        raise OracleViolation(f"decode_one raised {exc!r} on {chunk.hex()}") from exc
    if reason is not None or (frame is not None and got != frame):
        raise OracleViolation(f"decode_one gave {got!r} for {chunk.hex()}; reference: {verdict}")


@dataclass
class _Fed:
    frames: list[Frame]
    rejects: dict[str, int]
    accepted: int
    buffered: int


def _chunks(parsed: Parsed) -> Iterator[bytes]:
    """The stream cut by the cycled chunk sizes; past MAX_CHUNKS the rest goes in one piece."""
    if not parsed.chunk_sizes:
        yield parsed.stream
        return
    at = 0
    for i in range(MAX_CHUNKS - 1):
        if at >= len(parsed.stream):
            return
        size = parsed.chunk_sizes[i % len(parsed.chunk_sizes)]
        yield parsed.stream[at : at + size]
        at += size
    if at < len(parsed.stream):
        yield parsed.stream[at:]


def _feed_decoder(parsed: Parsed) -> _Fed:
    decoder = frames.FrameDecoder()
    out: list[Frame] = []
    for chunk in _chunks(parsed):
        try:
            out += decoder.feed(chunk)
        except Exception as exc:
            raise OracleViolation(f"FrameDecoder.feed raised {exc!r}") from exc
        if decoder.buffered > MAX_ENCODED_FRAME_BYTES:
            raise OracleViolation(f"decoder holds {decoder.buffered} bytes")
    if decoder.rejected != sum(decoder.rejects.values()):
        raise OracleViolation("rejected is not the sum of rejects")
    rejects: dict[str, int] = {str(reason): n for reason, n in decoder.rejects.items()}
    return _Fed(out, rejects, decoder.accepted, decoder.buffered)


def _floats(frame: Frame) -> int:
    body = frame.body
    values: list[object] = []
    if isinstance(body, EventBody):
        values = [body.ts, *body.signals.values()]
    elif isinstance(body, Command):
        values = list(body.args.values())
    elif isinstance(body, Response):
        values = list(body.result.values())
    return sum(type(v) is float for v in values)


def _check_round_trip(frame: Frame, envelope_length: int) -> None:
    """Re-encoding an accepted frame gives bytes that decode to an equal frame.

    The encoder is canonical (float64 floats, shortest ints), so a valid envelope of
    float32 values can grow past MAX_ENVELOPE_BYTES; that is the one allowed refusal,
    and only by as much as its floats account for.
    """
    try:
        encoded = frames.encode(frame)
    except FrameTooLarge as exc:
        canonical = len(pack_envelope(frame))
        if canonical - FLOAT_GROWTH * _floats(frame) > envelope_length:
            raise OracleViolation(
                f"{frame!r} arrived in {envelope_length} bytes, re-encodes to {canonical}"
            ) from exc
        return
    if not encoded.endswith(b"\x00") or b"\x00" in encoded[:-1]:
        raise OracleViolation(f"encode gave a badly delimited frame {encoded.hex()}")
    again = frames.decode_one(encoded[:-1])
    if again != frame:
        raise OracleViolation(f"round trip changed {frame!r} into {again!r}")


def _check_link(parsed: Parsed, expected: list[Frame], rejects: dict[str, int]) -> None:
    """AgentLink on the same chunks: never raises, emits clean frames, ACKs only durables."""
    link = AgentLink(session=AGENT_SESSION)
    now = 0.0
    durable: dict[int, set[int]] = {}
    out = bytearray()
    try:
        link.start(now)
        for chunk in _chunks(parsed):
            now += parsed.clock_step
            received = link.receive(chunk, now)
            tokens = [r.token for r in received]
            if not parsed.withhold:
                for epoch, link_seq in tokens:
                    durable.setdefault(epoch, set()).add(link_seq)
                link.durable(tokens, now)
            link.poll(now)
            out += link.outgoing()
        now += parsed.clock_step
        link.poll(now)
        out += link.outgoing()
    except Exception as exc:
        raise OracleViolation(f"AgentLink raised {exc!r}") from exc
    if link.decoder.accepted != len(expected) or link.decoder.rejects != rejects:
        raise OracleViolation("the link's decoder disagrees with the reference")
    _check_link_output(bytes(out), expected, durable)


def _check_link_output(out: bytes, fed: list[Frame], durable: dict[int, set[int]]) -> None:
    decoder = frames.FrameDecoder()
    sent = decoder.feed(out)
    if decoder.rejected or decoder.buffered:
        raise OracleViolation(f"the link wrote bytes that do not decode: {out.hex()}")
    # A controller HELLO settles everything below its link_seq; all above must be durable.
    settled: dict[int, int] = {}
    for f in fed:
        if isinstance(f.body, Hello):
            settled[f.session] = max(settled.get(f.session, 0), f.link_seq - 1)
    for f in sent:
        if f.session != AGENT_SESSION or isinstance(f.body, EventBody):
            raise OracleViolation(f"the link sent {f!r}")
        if isinstance(f.body, Ack | Nack) and f.body.epoch not in settled:
            raise OracleViolation(f"{f.body!r} names a session no HELLO opened")
        if isinstance(f.body, Ack):
            done = durable.get(f.body.epoch, set())
            base = settled[f.body.epoch]
            if f.body.cumulative - base > len(done) or any(
                n not in done for n in range(base + 1, f.body.cumulative + 1)
            ):
                raise OracleViolation(f"{f.body!r} covers link_seqs never reported durable")
            for lo, hi in f.body.ranges:
                if hi - lo + 1 > len(done) or any(n not in done for n in range(lo, hi + 1)):
                    raise OracleViolation(f"{f.body!r} selectively ACKs undurable link_seqs")


def _envelope_of(size: int, **msgpack_options: bool) -> bytes:
    """An EVENT envelope of exactly `size` bytes (>= about 80), padded with string signals."""
    body = {"s": "ecu0/engine", "q": 1, "t": 1.5, "tq": 3, "k": "telemetry", "p": 0, "d": {}}
    signals: dict[str, object] = body["d"]  # type: ignore[assignment]
    envelope = b""
    for i in range(64):
        envelope = msgpack.packb([1, 2, 7, 1, body], **msgpack_options)
        if len(envelope) >= size:
            break
        signals[f"x{i}"] = "a" * min(100, size - len(envelope) - 4)
    if len(envelope) != size:
        raise ValueError(f"cannot build an envelope of {size} bytes")
    return envelope


def _hostile(event_envelope: bytes, stream: bytes) -> dict[str, bytes]:
    """Streams a careless decoder gets wrong: bad CRC, caps at max and max + 1, bombs."""
    bad_crc = bytearray(wire(event_envelope))
    bad_crc[-2] = bad_crc[-2] % 255 + 1  # the last CRC byte, still non-zero
    at_cap = _envelope_of(MAX_ENVELOPE_BYTES)
    # 32 float32 signals: valid on the wire, 4 bytes longer each when re-encoded (float64).
    floats = {f"f{i:02d}-pad": 1.5 for i in range(32)}
    float32 = msgpack.packb(
        [1, 2, 7, 1, {"s": "e/s", "q": 1, "t": 1.5, "tq": 3, "k": "t", "p": 0, "d": floats}],
        use_single_float=True,
    )
    event = {"s": "e/s", "q": 1, "t": float("nan"), "tq": 3, "k": "t", "p": 0, "d": {}}
    sealed = bytes([SEALED_FLAG])
    return {
        "hostile-bad-crc": b"\x00" + bytes(bad_crc) + stream,
        "hostile-oversize-then-frame": b"\x00" + b"\x01" * 600 + b"\x00" + stream,
        "hostile-oversize-chunked": bytes([0x01, 0xFF]) + b"\x7f" * 1100 + b"\x00" + stream,
        "hostile-zeros": b"\x00" * 65,
        "hostile-cobs-overrun": b"\x00" + b"\x05\x01\x02\x00\xff\x01\x00",
        "hostile-crc-only": b"\x00" + b"\x05\x01\x02\x03\x04\x00",
        "sealed-at-cap": sealed + _record(at_cap) + _record(b"\x00\xff", raw=True),
        "sealed-over-cap": sealed + _record(at_cap + b"\xc0"),
        "sealed-float32-reencode-grows": sealed + _record(float32),
        "sealed-array32-bomb": sealed + _record(b"\x95\x01\x02\x07\x01\xdd\xff\xff\xff\xff"),
        "sealed-map32-bomb": sealed + _record(b"\x95\x01\x02\x07\x01\xdf\xff\xff\xff\xff"),
        "sealed-ext-timestamp": sealed + _record(b"\x95\x01\x05\x07\x01\xd6\xff\x00\x00\x00\x01"),
        "sealed-bin": sealed + _record(b"\x95\x01\x05\x07\x01\xc4\x00"),
        "sealed-bad-utf8": sealed + _record(b"\x95\x01\x01\x07\x01\x82\xa2id\xa1\xff\xa2fw\xa11"),
        "sealed-nan-ts": sealed + _record(msgpack.packb([1, 2, 7, 1, event])),
        "sealed-trailing-bytes": sealed + _record(event_envelope + b"\xc0"),
        "sealed-0xc1": sealed + _record(b"\x95\x01\x05\x07\x01\xc1"),
        "sealed-deep-nesting": sealed + _record(b"\x95\x01\x06\x07\x01" + b"\x91" * 500),
        # A HELLO of the same session whose link_seq (lowest unACKed) jumps past a frame
        # the agent ACKed selectively: AgentLink builds an invalid ACK and raises.
        "crash-link-ack-below-cumulative": sealed_per_frame(
            [
                Frame(7, 1, Hello("ecu0", "1.0")),
                Frame(7, 1, EventBody("ecu0/s0", 1, 1.0, TimeQuality.SYNCED, "t", 0, {})),
                Frame(7, 3, EventBody("ecu0/s0", 3, 1.0, TimeQuality.SYNCED, "t", 0, {})),
                Frame(7, 5, Hello("ecu0", "1.0")),
            ]
        ),
    }


if __name__ == "__main__":
    main(sys.argv)
