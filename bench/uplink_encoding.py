"""Section 4 of bench_uplink.py: bytes and CPU per event on the wire, per encoding.

The input is the simulator's vehicle profile (firmware_bridge/telemetry.py: position and
speed at 10 Hz, engine at 5 Hz, status at 1 Hz, from one seeded drive), packed as the
agent stores it, cut into batches as the agent sends them. Each encoding publishes the
same batches; the figures are bytes per event of the MQTT payload and CPU (process time)
per event to encode and to decode back to events, against codec 1 (zlib over rows, the
default before codec 2) in the same run:

- zlib rows (codec 1)           what agents sent until now
- zstd + trained dictionary     zstandard over the same rows, a 16 KiB dictionary trained
                                 on up to 2,000 other batches of another drive (the dictionary must
                                 be shipped to every agent and collector, and retrained when
                                 the streams change); only with the bench extra installed;
                                 its decode stops at msgpack rows, the others' at checked
                                 events (Batch.decode), so it is flattered there
- columnar (codec 2)            agent/wirecodec.py: the shipped choice

No assertion: the sizes are exact (seeded input), the CPU figures drift with the machine.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import msgpack

from agent.fleet import Batch
from agent.resilience import Event
from firmware_bridge.telemetry import drive

try:
    import zstandard
except ImportError:  # the bench extra is not installed
    zstandard = None


def _batches(count: int, size: int, per_family: int, seed: int) -> list[Batch]:
    events = [
        (Event.trusted(s, q, 3, ts, "telemetry", 1, msgpack.packb(signals)), 1)
        for s, q, ts, signals in drive(count, seed=seed, per_family=per_family)
    ]
    return [
        Batch("truck-0042", n + 1, "events", True, tuple(events[i : i + size]))
        for n, i in enumerate(range(0, len(events), size))
    ]


def _measure(
    batches: list[Batch], encode: Callable[[Batch], bytes], decode: Callable[[bytes], object]
) -> tuple[float, float, float]:
    """(bytes, encode µs, decode µs) per event."""
    n = sum(len(b.events) for b in batches)
    t0 = time.process_time()
    wire = [encode(b) for b in batches]
    t1 = time.process_time()
    for w in wire:
        decode(w)
    t2 = time.process_time()
    return sum(map(len, wire)) / n, (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


def _rows(b: Batch) -> bytes:
    return msgpack.packb(
        [[e.stream, e.boot_epoch, e.seq, e.ts, q, e.kind, e.priority, e.payload]
         for e, q in b.events]
    )  # fmt: skip


def section_encoding(args: argparse.Namespace) -> None:
    print("4. Bytes and CPU per event on the wire (vehicle profile: position, speed, engine,")
    print("   status; one seeded drive; MQTT payload bytes; CPU is process time)")
    zstd = zstandard.__version__ if zstandard else "not installed (pip install .[bench])"
    print(f"   load average {os.getloadavg()[0]:.2f}; zstandard {zstd}")
    count = args.encoding_events
    for per_family in (1, 4):
        for size in (20, 100, 500, 5000):
            batches = _batches(count, size, per_family, seed=7)
            encodings: list[tuple[str, Callable[[Batch], bytes], Callable[[bytes], object]]] = [
                ("zlib rows (codec 1)", lambda b: b.encode(codec="zlib"), Batch.decode),
            ]
            if zstandard is not None:
                samples = max(40, min(2_000, 200_000 // size))
                training = [_rows(b) for b in _batches(samples * size, size, per_family, 8)]
                dictionary = zstandard.train_dictionary(16 * 1024, training)
                zc = zstandard.ZstdCompressor(level=3, dict_data=dictionary)
                zd = zstandard.ZstdDecompressor(dict_data=dictionary)
                encodings.append(
                    (
                        "zstd + dictionary",
                        lambda b, zc=zc: zc.compress(_rows(b)),
                        lambda w, zd=zd: msgpack.unpackb(zd.decompress(w)),
                    )
                )
            encodings.append(
                ("columnar (codec 2)", lambda b: b.encode(codec="columnar"), Batch.decode)
            )
            print(f"   {4 * per_family} streams, {size}-event batches, {count:,} events:")
            base = 0.0
            for name, enc, dec in encodings:
                size_b, enc_us, dec_us = _measure(batches, enc, dec)
                base = base or size_b
                print(f"     {name:<22} {size_b:7.2f} B/event ({size_b / base:4.2f}x)  "
                      f"encode {enc_us:5.2f} us/event  decode {dec_us:5.2f} us/event")  # fmt: skip
    print()
