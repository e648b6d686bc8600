"""Serial frame codec throughput, in memory and through a pseudo-terminal, against line rate.

What it measures, all in one run so the ratios are meaningful (absolute figures drift
20-30 % between runs on this machine kind):

1. `FrameDecoder.feed` decoding a stream of typical EVENT frames (60-100 bytes on the wire)
   fed in 4096-byte reads, next to the "raw" minimum a hand-written loop needs for the same
   bytes (split at 0x00, COBS decode, CRC-32C, `msgpack.unpackb`, no schema validation);
   the same for `encode` against packb + CRC + COBS of prebuilt wire lists.
2. The decoder behind a real pseudo-terminal: a writer (process by default) writes the
   encoded stream into the master side, the reader selects on the raw-mode slave, reads up
   to 64 KiB and decodes; next to it the same transport with a reader that only counts
   delimiters. Every frame must arrive, in order, with no reject.
3. The line rate at 115,200 and 921,600 baud (8N1: 10 bits per byte) for the measured mean
   frame size and for 60 B and 100 B frames, and the headroom of (1) and (2) over it.

Why: the serial reader must keep up with the line with room to spare for the store and the
uplink on a 2-core box, and the schema checks must not cost a multiple of the bare codec.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import random
import select
import sys
import threading
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import msgpack
from cobs import cobs

from firmware_bridge.frames import FrameDecoder, encode
from firmware_bridge.protocol import (
    PROTOCOL_VERSION,
    EventBody,
    Frame,
    FrameType,
    Scalar,
    TimeQuality,
)

MB = 1_000_000  # decimal megabytes, as line rates are quoted
BAUDS = (115_200, 921_600)
BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit
READ_MAX = 65_536
STALL_SECONDS = 10.0  # no byte for this long through the pty: the benchmark failed

# -- workload --------------------------------------------------------------------------------

_STREAM_KINDS: tuple[tuple[str, str], ...] = (
    ("engine.rpm", "sample"),
    ("coolant", "sample"),
    ("gnss", "position"),
    ("battery", "sample"),
    ("brake", "state"),
    ("door", "state"),
    ("imu", "sample"),
    ("fuel", "sample"),
)


def _signals(name: str, rng: random.Random) -> dict[str, Scalar]:
    """A realistic payload for stream family `name`: one to three signal values."""
    payloads: dict[str, Callable[[], dict[str, Scalar]]] = {
        "engine.rpm": lambda: {"rpm": rng.randrange(600, 4200)},
        "coolant": lambda: {"c": round(rng.uniform(60.0, 110.0), 1)},
        "gnss": lambda: {"lat": rng.uniform(47.0, 48.0), "lon": rng.uniform(7.0, 8.0)},
        "battery": lambda: {"v": round(rng.uniform(23.0, 28.8), 2), "a": rng.randrange(-40, 90)},
        "brake": lambda: {"on": rng.random() < 0.2},
        "door": lambda: {"open": rng.random() < 0.1},
        # milli-g integers, as a controller packs them
        "imu": lambda: {"x": rng.randrange(-2000, 2000), "y": rng.randrange(-2000, 2000)},
        "fuel": lambda: {"pct": rng.randrange(0, 101)},
    }
    return payloads[name]()


def make_frames(n: int, controllers: int = 4, seed: int = 7) -> list[Frame]:
    """`n` EVENT frames from `controllers` ECUs, streams interleaved, sequences per stream."""
    rng = random.Random(seed)
    streams = [
        (f"ecu{c}/{name}", name, kind) for c in range(controllers) for name, kind in _STREAM_KINDS
    ]
    seqs = dict.fromkeys((s for s, _, _ in streams), 0)
    session = 1_714_000_000  # boot epoch
    ts = 1_714_000_000.0
    frames: list[Frame] = []
    for link_seq in range(1, n + 1):
        stream, name, kind = streams[rng.randrange(len(streams))]
        seqs[stream] += 1
        ts += rng.uniform(0.0001, 0.002)
        body = EventBody(
            stream,
            seqs[stream],
            ts,
            TimeQuality.SYNCED,
            kind,
            rng.choice((1, 2, 2, 3, 5)),
            _signals(name, rng),
        )
        frames.append(Frame(session, link_seq, body))
    return frames


def chunked(data: bytes, size: int) -> list[bytes]:
    """`data` cut into reads of `size` bytes, as a serial driver would hand them over."""
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- codec, in memory ------------------------------------------------------------------------


def decode_codec(chunks: Sequence[bytes], keep: list[Frame] | None = None) -> int:
    """Frames decoded by `FrameDecoder`; handed to `keep` if given, else dropped per read."""
    decoder = FrameDecoder()
    count = 0
    for chunk in chunks:
        frames = decoder.feed(chunk)
        count += len(frames)
        if keep is not None:
            keep += frames
    assert decoder.rejected == 0, decoder.rejects
    return count


def decode_raw(chunks: Sequence[bytes], keep: list[Any] | None = None) -> int:
    """The floor: split, COBS, CRC, unpackb. No caps, no schema, no reject accounting."""
    cobs_decode = cobs.decode
    crc = crc32c.crc32c
    unpackb = msgpack.unpackb
    from_bytes = int.from_bytes
    count = 0
    carry = b""
    for chunk in chunks:
        parts = (carry + chunk).split(b"\x00")
        carry = parts.pop()
        objs = []
        for part in parts:
            if not part:
                continue
            raw = cobs_decode(part)
            envelope = raw[:-4]
            if crc(envelope) != from_bytes(raw[-4:], "little"):
                raise ValueError("crc mismatch")
            objs.append(unpackb(envelope))
        count += len(objs)
        if keep is not None:
            keep += objs
    return count


def encode_codec(frames: Sequence[Frame]) -> list[bytes]:
    return [encode(frame) for frame in frames]


def encode_raw(wires: Sequence[list[Any]]) -> list[bytes]:
    """The floor: packb of a prebuilt envelope list, CRC, COBS, delimiter."""
    packb = msgpack.packb
    crc = crc32c.crc32c
    cobs_encode = cobs.encode
    out: list[bytes] = []
    for wire in wires:
        envelope = packb(wire, use_bin_type=True)
        out.append(cobs_encode(envelope + crc(envelope).to_bytes(4, "little")) + b"\x00")
    return out


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of `fn`, in seconds, after a collection."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- pseudo-terminal -------------------------------------------------------------------------


@dataclass(frozen=True)
class PtyResult:
    seconds: float
    frames: int
    reads: int


def _write_all(fd: int, data: bytes, chunk: int, go: int) -> None:
    """Writer side: wait for the go byte, then write `data` in `chunk`-byte writes."""
    os.read(go, 1)
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        piece = view[start : start + chunk]
        while piece:
            piece = piece[os.write(fd, piece) :]


def _writer_process(fd: int, data: bytes, chunk: int, go: int) -> None:
    try:
        _write_all(fd, data, chunk, go)
    finally:
        os._exit(0)  # skip interpreter teardown of the forked copy


def through_pty(
    stream: bytes, expected: int, *, decode: bool, write_chunk: int, writer: str
) -> PtyResult:
    """Push `stream` through a pty and read it back; decode it or only count delimiters."""
    master, slave = os.openpty()
    tty.setraw(slave)
    go_read, go_write = os.pipe()
    worker: multiprocessing.process.BaseProcess | threading.Thread
    if writer == "process":
        ctx = multiprocessing.get_context("fork")
        worker = ctx.Process(target=_writer_process, args=(master, stream, write_chunk, go_read))
    else:
        worker = threading.Thread(
            target=_write_all, args=(master, stream, write_chunk, go_read), daemon=True
        )
    worker.start()
    decoder = FrameDecoder()
    count = reads = 0
    try:
        gc.collect()
        t0 = time.perf_counter()
        os.write(go_write, b"g")
        while count < expected:
            ready, _, _ = select.select([slave], [], [], STALL_SECONDS)
            if not ready:
                raise TimeoutError(f"pty stalled after {count:,} of {expected:,} frames")
            data = os.read(slave, READ_MAX)
            reads += 1
            if decode:
                frames = decoder.feed(data)
                if frames:
                    count += len(frames)
                    # In order, none lost or repeated: link_seq runs 1..expected.
                    assert frames[-1].link_seq == count, (frames[-1].link_seq, count)
            else:
                count += data.count(b"\x00")
        seconds = time.perf_counter() - t0
    except BaseException:
        # A writer process blocked on a full pty would outlive us: end it. A thread is a
        # daemon and goes with the interpreter.
        if isinstance(worker, multiprocessing.process.BaseProcess):
            worker.terminate()
        raise
    finally:
        worker.join(timeout=STALL_SECONDS)
        for fd in (master, slave, go_read, go_write):
            os.close(fd)
    assert count == expected, (count, expected)
    if decode:
        assert decoder.accepted == expected, decoder.accepted
        assert decoder.rejected == 0, decoder.rejects
    return PtyResult(seconds, count, reads)


# -- report ----------------------------------------------------------------------------------


def line_fps(baud: int, frame_bytes: float) -> float:
    """Frames per second a `baud` 8N1 line carries at `frame_bytes` per frame."""
    return baud / BITS_PER_BYTE / frame_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200_000, help="frames for the codec")
    parser.add_argument("--pty-frames", type=int, default=200_000, help="frames through the pty")
    parser.add_argument("--runs", type=int, default=3, help="rounds; best of N is reported")
    parser.add_argument("--chunk", type=int, default=4096, help="read size fed to the codec")
    parser.add_argument("--write-chunk", type=int, default=4096, help="pty writer write size")
    parser.add_argument("--writer", choices=("process", "thread"), default="process")
    args = parser.parse_args()
    runs = max(args.runs, 1)

    n_all = max(args.frames, args.pty_frames)
    frames_all = make_frames(n_all)
    frames = frames_all[: args.frames]
    wires = [
        [PROTOCOL_VERSION, int(FrameType.EVENT), f.session, f.link_seq, f.body.to_wire()]
        for f in frames
    ]
    encoded = encode_codec(frames)
    assert encoded == encode_raw(wires), "raw encode disagrees with encode()"
    sizes = [len(e) for e in encoded]
    stream = b"".join(encoded)
    mean = len(stream) / len(frames)
    chunks = chunked(stream, args.chunk)

    # Correctness before timing: every frame back, equal to what was sent.
    decoded: list[Frame] = []
    assert decode_codec(chunks, decoded) == len(frames)
    assert decoded == frames, "codec round trip differs"
    raw_objs: list[Any] = []
    assert decode_raw(chunks, raw_objs) == len(frames)
    assert raw_objs == wires, "raw decode differs"
    del decoded, raw_objs
    # The workload stays alive all run; keep it out of the collector's way, as an agent's
    # heap is small and decoded frames are handed on and released read by read.
    gc.collect()
    gc.freeze()

    pty_frames = frames_all[: args.pty_frames]
    pty_stream = b"".join(encode(f) for f in pty_frames)
    pty_n = len(pty_frames)
    pty_kw: dict[str, Any] = {"write_chunk": args.write_chunk, "writer": args.writer}

    # Rounds interleave every measurement, so drift during the run hits them all alike.
    t_dec = t_dec_raw = t_enc = t_enc_raw = float("inf")
    pty = bare = PtyResult(float("inf"), 0, 1)
    for _ in range(runs):
        t_dec = min(t_dec, timed(lambda: decode_codec(chunks)))
        t_dec_raw = min(t_dec_raw, timed(lambda: decode_raw(chunks)))
        t_enc = min(t_enc, timed(lambda: encode_codec(frames)))
        t_enc_raw = min(t_enc_raw, timed(lambda: encode_raw(wires)))
        run = through_pty(pty_stream, pty_n, decode=True, **pty_kw)
        pty = min(pty, run, key=lambda r: r.seconds)
        run = through_pty(pty_stream, pty_n, decode=False, **pty_kw)
        bare = min(bare, run, key=lambda r: r.seconds)

    n = len(frames)
    fps_dec, fps_raw = n / t_dec, n / t_dec_raw
    fps_pty, fps_bare = pty_n / pty.seconds, pty_n / bare.seconds
    print(
        f"IronFleet frame benchmark · Python {sys.version.split()[0]} · {os.cpu_count()} CPUs"
        f" · best of {runs}"
    )
    print(
        f"workload: {n:,} EVENT frames, mean {mean:.1f} B on the wire"
        f" (min {min(sizes)}, max {max(sizes)}), {len(stream) / MB:.1f} MB"
    )
    print()
    print(f"[1] codec in memory, fed in {args.chunk}-byte reads")
    print(f"    {'':<44} {'frames/s':>10} {'MB/s':>9} {'vs raw':>8}")
    row = "    {:<44} {:>10,.0f} {:>9.1f} {:>8}"
    print(
        row.format(
            "decode FrameDecoder.feed", fps_dec, fps_dec * mean / MB, f"{fps_dec / fps_raw:.2f}x"
        )
    )
    print(
        row.format("decode raw: split+cobs+crc32c+unpackb", fps_raw, fps_raw * mean / MB, "1.00x")
    )
    fps_enc, fps_enc_raw = n / t_enc, n / t_enc_raw
    print(
        row.format(
            "encode firmware_bridge.frames.encode",
            fps_enc,
            fps_enc * mean / MB,
            f"{fps_enc / fps_enc_raw:.2f}x",
        )
    )
    print(
        row.format(
            "encode raw: packb+crc32c+cobs (prebuilt list)",
            fps_enc_raw,
            fps_enc_raw * mean / MB,
            "1.00x",
        )
    )
    print()
    pty_mean = len(pty_stream) / pty_n
    print(
        f"[2] pty ({args.writer} writer, {args.write_chunk}-byte writes; reader select +"
        f" os.read {READ_MAX})"
    )
    print(f"    {pty_n:,} frames, {len(pty_stream) / MB:.1f} MB; all arrived in order, 0 rejects")
    print(f"    {'':<44} {'frames/s':>10} {'MB/s':>9} {'mean read':>10}")
    row2 = "    {:<44} {:>10,.0f} {:>9.1f} {:>8,.0f} B"
    print(
        row2.format(
            "pty + FrameDecoder", fps_pty, fps_pty * pty_mean / MB, len(pty_stream) / pty.reads
        )
    )
    print(
        row2.format(
            "pty transport only (count 0x00)",
            fps_bare,
            fps_bare * pty_mean / MB,
            len(pty_stream) / bare.reads,
        )
    )
    print(
        f"    ratio pty+decode / transport only: {fps_pty / fps_bare:.2f}x;"
        f" pty+decode / codec alone: {fps_pty / fps_dec:.2f}x"
    )
    print()
    print("[3] line rate, 8N1 (10 bits/byte); headroom = measured frames/s / line frames/s")
    print("    (codec and pty rates are those measured at the mean frame size)")
    print("       baud   frame B   line frames/s   codec headroom   pty headroom")
    for baud in BAUDS:
        for label, size in ((f"{mean:.1f}", mean), ("60", 60.0), ("100", 100.0)):
            line = line_fps(baud, size)
            print(
                f"    {baud:>7,} {label:>9} {line:>15,.1f} {fps_dec / line:>15,.0f}x"
                f" {fps_pty / line:>13,.0f}x"
            )


if __name__ == "__main__":
    main()
