"""Shared by the bench_store.py sections: constants, the workload, measuring helpers."""

from __future__ import annotations

import gc
import os
import random
import resource
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.resilience import Event
from agent.store import EventStore, StoredEvent
from firmware_bridge.link import Received
from firmware_bridge.protocol import TimeQuality

AGENT = str(Path(sys.executable).with_name("ironfleet-agent"))
# The entry script: children are started as `python bench_store.py --child ...`.
THIS = str(Path(__file__).resolve().with_name("bench_store.py"))
EPOCH = 1  # boot epoch of every generated stream
KIND = "sample"
STALL_SECONDS = 30.0  # no ACK progress for this long: the end-to-end run failed
BUILD_BATCH = 20_000  # events per append when building the big store
PAYLOAD_POOL = 4096  # distinct random payloads, cycled

UNREACHABLE_PORT = 9  # discard: nothing listens, connects are refused at once

# DESIGN.md "Performance targets" (measured here earlier with plain Python).
REF_RAW_UNIQUE_EPS = 34_700
REF_PQ_PUT = 3_700
REF_PQ_DRAIN = (1_600, 400)
REF_UNIQUE_BYTES = 2_900
REF_LOOP_FPS = (67_000, 103_000)
REF_P99_MS = 1.19
REF_RSS_MIB = 15
TARGET_RSS_MIB = 64
TARGET_LATEST_MS = 10.0


# -- workload --------------------------------------------------------------------------------


def stream_name(k: int) -> str:
    """Stream `k` of ten controllers with 100 streams each."""
    return f"ecu{k // 100}/s{k % 100:03d}"


def make_arrivals(first: int, n: int, streams: int, rng: random.Random) -> list[Received]:
    """Events `first`..`first+n-1` of the interleaved workload: stream = index % streams.

    Sequences run 1, 2, ... per stream; payloads are 60-100 random bytes (incompressible,
    like packed sensor values), drawn from a pool so that building a million is quick.
    """
    names = [stream_name(k) for k in range(streams)]
    controllers = [f"ecu{k // 100}" for k in range(streams)]
    pool = [rng.randbytes(rng.randint(60, 100)) for _ in range(PAYLOAD_POOL)]
    trusted, synced = Event.trusted, TimeQuality.SYNCED
    out = []
    for i in range(first, first + n):
        k = i % streams
        event = trusted(
            names[k], i // streams + 1, EPOCH, 1_714_000_000.0 + i / 1000, KIND, k % 4,
            pool[i % PAYLOAD_POOL],
        )  # fmt: skip
        out.append(Received((EPOCH, i + 1), event, synced, controllers[k]))
    return out


def raw_rows(arrivals: Sequence[Received], received_at: float) -> list[tuple[Any, ...]]:
    """The same events as rows of a plain table (stream name as text, as a user would)."""
    return [
        (a.event.stream, EPOCH, a.event.seq, a.event.ts, int(a.time_quality), KIND,
         a.event.priority, a.event.payload, received_at)
        for a in arrivals
    ]  # fmt: skip


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


RAW_COLUMNS = "stream, boot_epoch, seq, ts, ts_quality, kind, priority, payload, received_at"


def iter_backlog(store: EventStore, limit: int = 1000) -> Iterator[list[StoredEvent]]:
    after = 0
    while True:
        page = store.backlog(after_rowid=after, limit=limit)
        if not page:
            return
        yield page
        after = page[-1].rowid


# -- measuring helpers -----------------------------------------------------------------------


def proc_io() -> dict[str, int]:
    """This process's I/O counters (Linux /proc/self/io)."""
    out = {}
    with open("/proc/self/io", encoding="ascii") as fh:
        for line in fh:
            key, value = line.split(":")
            out[key] = int(value)
    return out


@dataclass
class Run:
    """One timed run: events, seconds, and bytes written meanwhile."""

    label: str
    events: int
    seconds: float
    write_bytes: int = 0  # reached the block layer (page-granular, fsynced)
    wchar: int = 0  # passed to write(2)
    stored_bytes: int = 0  # database file growth after a full checkpoint

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else float("inf")

    def per_event(self, value: int) -> float:
        return value / self.events if self.events else 0.0


class IoWindow:
    """write_bytes / wchar between `start()` and `stop()`."""

    def start(self) -> None:
        self._before = proc_io()

    def stop(self, run: Run) -> None:
        after = proc_io()
        run.write_bytes = after["write_bytes"] - self._before["write_bytes"]
        run.wchar = after["wchar"] - self._before["wchar"]


def settle_heap() -> None:
    """Keep the prebuilt workload out of the cyclic GC's way.

    The workload (hundreds of thousands of objects) lives all section long; without this
    every full collection triggered by the measured code would walk it, a cost the agent,
    whose heap is small, never pays.
    """
    gc.collect()
    gc.freeze()


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def checkpoint(conn: sqlite3.Connection) -> None:
    busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0, "checkpoint blocked"


def cpu_seconds_of(pid: int) -> float:
    """utime + stime of another process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"
