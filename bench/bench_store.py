"""Event store and ingest path: durable appends, drains, serial-to-ACK, RSS at 1M events.

Every figure is printed next to a baseline measured in the same run (absolute figures
drift 20-30 % between runs on this machine kind, more when other work shares its two
CPUs; the ratios are what counts), and next to the reference from DESIGN.md
"Performance targets" where there is one.

1. Durable append, synchronous=FULL, 1,000 interleaved streams, 60-100 B payloads:
   `EventStore.append` with group commit (one transaction per batch) against
   (a) the same store, one event per `append` (one transaction per event);
   (b) persist-queue's `SQLiteAckQueue.put` with its defaults (WAL, SQLite's default
       synchronous=FULL, auto_commit: one transaction per put, pickle);
   (c) plain sqlite3 with a UNIQUE(stream, seq) index, same batches (DESIGN's raw
       reference), and the same table without any index (the SQLite floor).
   Bytes written per event for each: /proc/self/io write_bytes (what reached the block
   layer: WAL frames, checkpoints and the final checkpoint) next to the database growth.
   Drain (read the oldest, acknowledge durably): `SQLiteAckQueue` get + ack, and
   `EventStore.backlog` pages + `mark_delivered`, each at the start of the backlog and
   again after most of it was acknowledged; and read-only paging. `--profile` adds a
   cProfile of the group commit and its wall time per SQL statement.
2. End to end through a real pseudo-terminal: this process plays the controller
   (`firmware_bridge.controller.ControllerLink`, the simulator's state machine; its
   `ack_latencies` give first send -> ACK) and the agent is the real `ironfleet-agent run`
   process with default settings (uplink off: no broker here). Saturating producer at
   controller windows 64 and 256; the same with the uplink on and its broker unreachable
   (link lost: when a backlog builds up); paced at 1,536 frames/s (921,600 baud for 60 B
   frames) for latency. Same-run baselines: a minimal single-threaded "raw loop" agent
   (read, split, COBS, CRC-32C, unpackb, executemany + COMMIT with synchronous=FULL,
   cumulative ACK) on the same harness, which also shows the harness's own ceiling; and
   the disk's floor, one-row durable commits at the paced rate.
3. A 1,000,000-event store: in a fresh process, open it, time `latest()`, page through the
   whole backlog with `backlog(after_rowid=..., limit=1000)`; peak RSS of that process
   against a process that only imports sqlite3 and the agent modules; raw sqlite3
   baselines for `latest()`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import math
import os
import pstats
import random
import resource
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgpack
from cobs import cobs

from agent.resilience import Event
from agent.store import EventStore, StoreConfig, StoredEvent
from firmware_bridge.controller import ControllerLink
from firmware_bridge.frames import encode
from firmware_bridge.link import Received
from firmware_bridge.protocol import Ack, EventBody, Frame, FrameType, Hello, TimeQuality

AGENT = str(Path(sys.executable).with_name("ironfleet-agent"))
THIS = str(Path(__file__).resolve())
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


# -- 1. durable append -----------------------------------------------------------------------


def store_group_commit(path: Path, warm: list[Received], timed: list[Received], batch: int) -> Run:
    store = EventStore(path, StoreConfig())
    store.append(warm)  # first sight of every stream: not part of the steady state
    checkpoint(store.conn)
    size0 = file_size(path)
    io = IoWindow()
    run = Run(f"EventStore.append, {batch:,}-event txns", len(timed), 0.0)
    io.start()
    t0 = time.perf_counter()
    for chunk in batches(timed, batch):
        store.append(chunk)
    run.seconds = time.perf_counter() - t0
    checkpoint(store.conn)
    io.stop(run)
    run.stored_bytes = file_size(path) - size0
    assert store.event_count == len(warm) + len(timed), store.event_count
    again = store.append(timed[:batch])  # correctness: a resent batch is all duplicates
    assert again.stored == 0, again
    assert again.duplicates == min(batch, len(timed)), again
    store.close()
    return run


def store_one_per_call(path: Path, warm: list[Received], timed: list[Received]) -> Run:
    store = EventStore(path, StoreConfig())
    store.append(warm)
    checkpoint(store.conn)
    size0 = file_size(path)
    io = IoWindow()
    run = Run("EventStore.append, 1 event per call (a)", len(timed), 0.0)
    io.start()
    t0 = time.perf_counter()
    for arrival in timed:
        store.append((arrival,))
    run.seconds = time.perf_counter() - t0
    checkpoint(store.conn)
    io.stop(run)
    run.stored_bytes = file_size(path) - size0
    assert store.event_count == len(warm) + len(timed)
    store.close()
    return run


RAW_COLUMNS = "stream, boot_epoch, seq, ts, ts_quality, kind, priority, payload, received_at"


def raw_sqlite(
    path: Path, warm: list[tuple[Any, ...]], rows: list[tuple[Any, ...]], batch: int, unique: bool
) -> Run:
    """Plain sqlite3, WAL + synchronous=FULL, prebuilt rows, one transaction per batch."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    constraint = ", UNIQUE (stream, seq)" if unique else ""
    conn.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, "
        "boot_epoch INTEGER NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, "
        "ts_quality INTEGER NOT NULL, kind TEXT NOT NULL, priority INTEGER NOT NULL, "
        f"payload BLOB NOT NULL, received_at REAL NOT NULL{constraint})"
    )
    verb = "INSERT OR IGNORE" if unique else "INSERT"
    sql = f"{verb} INTO events ({RAW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"

    def commit(chunk: Sequence[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, chunk)
        conn.execute("COMMIT")

    commit(warm)
    checkpoint(conn)
    size0 = file_size(path)
    label = "sqlite3 + UNIQUE(stream, seq) (c)" if unique else "sqlite3, no index"
    run = Run(f"{label}, {batch:,}-row txns", len(rows), 0.0)
    io = IoWindow()
    io.start()
    t0 = time.perf_counter()
    for chunk in batches(rows, batch):
        commit(chunk)
    run.seconds = time.perf_counter() - t0
    checkpoint(conn)
    io.stop(run)
    run.stored_bytes = file_size(path) - size0
    count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert count == len(warm) + len(rows), count
    conn.close()
    return run


@dataclass
class DrainResult:
    label: str
    early: Run
    late: Run
    backlog_early: int
    backlog_late: int
    acked_ahead_late: int


def persist_queue(
    directory: Path, items: list[tuple[Any, ...]], window: int
) -> tuple[Run, DrainResult, str]:
    """SQLiteAckQueue with its defaults: put every item, then drain with get + ack."""
    from persistqueue import SQLiteAckQueue  # noqa: PLC0415 - optional bench dependency

    queue = SQLiteAckQueue(str(directory))
    conn = cast(sqlite3.Connection, queue._putter)
    settings = "journal_mode={}, synchronous={}, auto_commit={}".format(
        conn.execute("PRAGMA journal_mode").fetchone()[0],
        {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[
            conn.execute("PRAGMA synchronous").fetchone()[0]
        ],
        queue.auto_commit,
    )
    db = directory / "data.db"
    size0 = file_size(db)
    put = Run("persist-queue SQLiteAckQueue.put (b)", len(items), 0.0)
    io = IoWindow()
    io.start()
    t0 = time.perf_counter()
    for item in items:
        queue.put(item)
    put.seconds = time.perf_counter() - t0
    checkpoint(conn)
    io.stop(put)
    put.stored_bytes = file_size(db) - size0
    assert queue.qsize() == len(items)

    def drain(count: int) -> float:
        t = time.perf_counter()
        for _ in range(count):
            item = queue.get(block=False)
            queue.ack(item)
        return time.perf_counter() - t

    n = len(items)
    window = min(window, n // 2)
    early = Run("get+ack", window, drain(window))
    drain(n - 2 * window)  # acked rows pile up in front of the ready ones
    late = Run("get+ack", window, drain(window))
    assert queue.qsize() == 0
    assert queue.acked_count() == n
    queue.close()
    result = DrainResult("persist-queue get+ack (1 txn each)", early, late, n, window, n - window)
    return put, result, settings


def store_drain(path: Path, window_pages: int) -> tuple[Run, DrainResult]:
    """Page the whole backlog read-only, then again with a fleet ACK after every page."""
    store = EventStore(path, StoreConfig())
    total = store.event_count
    t0 = time.perf_counter()
    count = sum(len(page) for page in iter_backlog(store))
    read = Run("EventStore.backlog pages of 1,000, read only", count, time.perf_counter() - t0)
    assert count == total, (count, total)

    after = 0
    drained = 0

    def drain(pages: int) -> tuple[int, float]:
        nonlocal after, drained
        t = time.perf_counter()
        got = 0
        for _ in range(pages):
            page = store.backlog(after_rowid=after, limit=1000)
            if not page:
                break
            positions = {e.event.stream: (e.event.boot_epoch, e.event.seq) for e in page}
            assert store.mark_delivered(page[-1].rowid, positions)
            got += len(page)
            after = page[-1].rowid
        drained += got
        return got, time.perf_counter() - t

    window_pages = min(window_pages, total // 2000)
    got, secs = drain(window_pages)
    early = Run("backlog page + mark_delivered", got, secs)
    middle = math.ceil(total / 1000) - 2 * window_pages
    drain(middle)
    acked_ahead = drained
    got, secs = drain(window_pages)
    late = Run("backlog page + mark_delivered", got, secs)
    assert drained == total, (drained, total)
    assert not store.backlog(), "everything was acknowledged"
    store.close()
    result = DrainResult(
        "EventStore backlog page + mark_delivered (1 txn/page)",
        early,
        late,
        total,
        total - acked_ahead,
        acked_ahead,
    )
    return read, result


def iter_backlog(store: EventStore, limit: int = 1000) -> Iterator[list[StoredEvent]]:
    after = 0
    while True:
        page = store.backlog(after_rowid=after, limit=limit)
        if not page:
            return
        yield page
        after = page[-1].rowid


def section_append(args: argparse.Namespace, tmp: Path) -> None:
    rng = random.Random(args.seed)
    streams, batch = args.streams, args.batch
    warm = make_arrivals(0, streams, streams, rng)
    timed = make_arrivals(streams, args.events, streams, rng)
    single = timed[: args.single_events]
    received_at = time.time()
    warm_rows, rows = raw_rows(warm, received_at), raw_rows(timed, received_at)
    pq_items = [r[:8] for r in rows[: args.pq_events]]
    payload_mean = statistics.fmean(len(a.event.payload) for a in timed)
    settle_heap()

    print(
        f"[1] durable append: synchronous=FULL, {streams:,} interleaved streams, payload "
        f"{payload_mean:.0f} B mean (60-100), one warm-up event per stream first (untimed)"
    )
    group = store_group_commit(tmp / "group.db", warm, timed, batch)
    one = store_one_per_call(tmp / "single.db", warm, single)
    unique = raw_sqlite(tmp / "unique.db", warm_rows, rows, batch, unique=True)
    plain = raw_sqlite(tmp / "plain.db", warm_rows, rows, batch, unique=False)
    put, pq_drain, pq_settings = persist_queue(tmp / "pq", pq_items, args.pq_window)
    read, our_drain = store_drain(tmp / "group.db", args.drain_pages)

    head = f"    {'':<50} {'events':>8} {'events/s':>10} {'ours is':>8} {'reference':>16}"
    print(head)
    row = "    {:<50} {:>8,} {:>10,.0f} {:>8} {:>16}"
    print(row.format(group.label, group.events, group.rate, "1.00x", "target >= 100k"))
    print(row.format(one.label, one.events, one.rate, ratio(group.rate, one.rate), ""))
    print(row.format(put.label, put.events, put.rate, ratio(group.rate, put.rate),
                     f"{REF_PQ_PUT:,}/s; >= 20x"))  # fmt: skip
    print(row.format(unique.label, unique.events, unique.rate, ratio(group.rate, unique.rate),
                     f"{REF_RAW_UNIQUE_EPS:,}/s"))  # fmt: skip
    print(row.format(plain.label, plain.events, plain.rate, ratio(group.rate, plain.rate), ""))
    print(f"    persist-queue settings (its defaults, queried): {pq_settings}, pickle")
    print()
    print("    bytes written per event, timed part + final checkpoint (WAL frames and checkpoints)")
    print(
        f"    {'':<50} {'block layer':>11} {'write(2)':>9} {'db growth':>10} "
        f"{'vs unique':>9} {'vs db growth':>12}"
    )
    row_b = "    {:<50} {:>9,.0f} B {:>7,.0f} B {:>8,.0f} B {:>9} {:>12}"
    for r in (group, one, put, unique, plain):
        wb = r.per_event(r.write_bytes)
        print(
            row_b.format(
                r.label,
                wb,
                r.per_event(r.wchar),
                r.per_event(r.stored_bytes),
                ratio(wb, unique.per_event(unique.write_bytes)),
                ratio(wb, r.per_event(r.stored_bytes)),
            )
        )
    print(
        f"    reference: {REF_UNIQUE_BYTES:,} B/row to the WAL with the unique index; target for"
        " ours <= 3x the row size"
    )
    print()
    print("    drain (read the oldest, acknowledge, durably), early vs after most was acknowledged")
    print(f"    {'':<56} {'backlog':>9} {'acked ahead':>11} {'events/s':>10} {'late/early':>10}")
    row_d = "    {:<56} {:>9,} {:>11,} {:>10,.0f} {:>10}"
    for d in (pq_drain, our_drain):
        print(row_d.format(d.label, d.backlog_early, 0, d.early.rate, ""))
        print(
            row_d.format("", d.backlog_late, d.acked_ahead_late, d.late.rate,
                         ratio(d.late.rate, d.early.rate))
        )  # fmt: skip
    print(
        row_d.format("EventStore backlog pages, read only (whole backlog)", read.events, 0,
                     read.rate, "")
    )  # fmt: skip
    print(
        f"    ours vs persist-queue: early {ratio(our_drain.early.rate, pq_drain.early.rate)},"
        f" late {ratio(our_drain.late.rate, pq_drain.late.rate)}; reference persist-queue"
        f" {REF_PQ_DRAIN[0]:,}/s falling to {REF_PQ_DRAIN[1]:,}/s; target: flat"
    )
    print()

    if args.profile:
        profile_append(tmp / "profile.db", warm, timed, batch)


class TimedConnection:
    """Delegates to a sqlite3 connection, timing execute/executemany per statement kind."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.seconds: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def _timed(self, fn: Callable[..., Any], sql: str, *args: Any) -> Any:
        key = " ".join(sql.split()[:3])
        t0 = time.perf_counter()
        try:
            return fn(sql, *args)
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    def execute(self, sql: str, *args: Any) -> Any:
        return self._timed(self.conn.execute, sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        return self._timed(self.conn.executemany, sql, *args)


def profile_append(path: Path, warm: list[Received], timed: list[Received], batch: int) -> None:
    """cProfile of the group commit, then wall time per SQL statement kind, per event."""
    store = EventStore(path, StoreConfig())
    store.append(warm)
    profiler = cProfile.Profile()
    profiler.enable()
    for chunk in batches(timed, batch):
        store.append(chunk)
    profiler.disable()
    print(f"    profile of EventStore.append ({len(timed):,} events, batches of {batch:,}):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(8)
    spy = TimedConnection(store.conn)
    store.conn = cast(sqlite3.Connection, spy)
    again = make_arrivals(len(warm) + len(timed), len(timed), len(warm), random.Random(5))
    t0 = time.perf_counter()
    for chunk in batches(again, batch):
        store.append(chunk)
    total = time.perf_counter() - t0
    store.conn = spy.conn
    store.close()
    print(f"    wall time per event by statement (no profiler), {len(again):,} more events:")
    print(f"      {'whole append':<28} {total / len(again) * 1e6:6.2f} us")
    for key, secs in sorted(spy.seconds.items(), key=lambda kv: -kv[1]):
        print(f"      {key:<28} {secs / len(again) * 1e6:6.2f} us")
    python = total - sum(spy.seconds.values())
    print(f"      {'Python (_plan, _apply)':<28} {python / len(again) * 1e6:6.2f} us")
    print()


# -- 2. end to end over a pty ----------------------------------------------------------------


def make_bodies(n: int, streams: int, seed: int) -> list[EventBody]:
    """Controller events of about 60-70 B on the wire; stream = index % streams."""
    rng = random.Random(seed)
    wall = time.time()
    return [
        EventBody(f"e0/{i % streams:03d}", i // streams + 1, wall + i / 1e4,
                  TimeQuality.SYNCED, "s", i % 4, {"v": rng.randrange(1 << 20)})
        for i in range(n)
    ]  # fmt: skip


@dataclass
class E2E:
    label: str
    frames: int
    seconds: float
    latencies: list[float]
    retransmits: int
    agent_cpu: float
    own_cpu: float
    max_ring: int
    stored: int
    commits: int

    @property
    def per_commit(self) -> float:
        return self.stored / self.commits if self.commits else 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class Controller:
    """This process as the controller: a pty, a ControllerLink, and the write backlog."""

    window: int
    master: int = -1
    slave: int = -1
    device: str = ""
    pending: bytearray = field(default_factory=bytearray)
    link: ControllerLink = field(init=False)

    def __post_init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.device = os.ttyname(self.slave)
        self.link = ControllerLink(
            "ecu0", "bench-1", EPOCH, window=self.window, ring_capacity=4096,
            retransmit_timeout=0.5, heartbeat_interval=1.0,
        )  # fmt: skip

    def close(self) -> None:
        for fd in (self.master, self.slave):
            os.close(fd)

    def drive(self, bodies: Sequence[EventBody], rate: float | None) -> tuple[float, int]:
        """Send `bodies` (saturating, or paced at `rate`/s) until all are ACKed.

        Returns the seconds from the first offer to the last ACK and the largest ring.
        """
        link, master = self.link, self.master
        total, offered = len(bodies), 0
        acked0 = link.acked
        max_ring = 0
        t0 = time.perf_counter()
        progress_at, progress = t0, 0
        while link.acked - acked0 < total:
            now = time.perf_counter()
            due = total if rate is None else min(total, int((now - t0) * rate) + 1)
            while offered < due and link.offer(bodies[offered]):
                offered += 1
            max_ring = max(max_ring, len(link.ring))
            link.poll(now)
            self.pending += link.outgoing()
            if self.pending:
                with contextlib.suppress(BlockingIOError):
                    del self.pending[: os.write(master, self.pending)]
            if rate is None or offered >= total:
                timeout = 0.05
            else:
                timeout = max(0.0, t0 + offered / rate - time.perf_counter())
            readable, _, _ = select.select([master], [master] if self.pending else [], [], timeout)
            if readable:
                self.read()
            done = link.acked - acked0
            if done != progress:
                progress, progress_at = done, now
            elif now - progress_at > STALL_SECONDS:
                raise TimeoutError(f"no ACK for {STALL_SECONDS} s; {done:,} of {total:,} ACKed")
        return time.perf_counter() - t0, max_ring

    def read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self.link.receive(data, time.perf_counter())


def start_real_agent(
    work: Path, device: str, uplink: bool = False
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """`ironfleet-agent run` with default settings; the uplink off unless asked for."""
    state = work / "state"
    config = work / "agent.toml"
    config.write_text(
        f'[agent]\nvehicle_id = "bench"\nstate_dir = "{state}"\n'
        f'[serial]\ndevice = "{device}"\n'
        "[store]\nmin_free_bytes = 0\n"
        # No broker listens on this port: the uplink retries with backoff, as after link loss.
        f"[uplink]\nenabled = {'true' if uplink else 'false'}\nport = {UNREACHABLE_PORT}\n"
        "allow_unsigned = true\n",  # nothing answers on that port anyway
        encoding="utf-8",
    )
    log = work / "agent.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [AGENT, "run", "--config", str(config)], stdout=fh, stderr=subprocess.STDOUT
        )
    wait_started(proc, log, b"agent_started")
    return proc, state / "agent.db", log


def start_raw_agent(work: Path, device: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    db = work / "raw.db"
    log = work / "raw.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, THIS, "--child", "raw-agent", device, str(db)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    wait_started(proc, log, b"raw_agent_started")
    return proc, db, log


def wait_started(proc: subprocess.Popen[bytes], log: Path, marker: bytes) -> None:
    deadline = time.monotonic() + 30
    while marker not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise RuntimeError(f"{marker.decode()} not seen: {log.read_text()[-2000:]}")
        time.sleep(0.01)


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"agent ignored SIGTERM: {log.read_text()[-2000:]}") from None


def count_events(db: Path) -> int:
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def e2e_run(
    label: str,
    *,
    start: Callable[[Path, str], tuple[subprocess.Popen[bytes], Path, Path]],
    work: Path,
    bodies: Sequence[EventBody],
    warm: int,
    window: int,
    rate: float | None,
) -> E2E:
    work.mkdir(parents=True, exist_ok=True)
    ctl = Controller(window)
    try:
        proc, db, log = start(work, ctl.device)
    except BaseException:
        ctl.close()
        raise
    try:
        ctl.drive(bodies[:warm], None)  # handshake, first sight of every stream
        ctl.link.ack_latencies.clear()
        retransmits = ctl.link.retransmits
        agent0, own0 = cpu_seconds_of(proc.pid), own_cpu_seconds()
        seconds, max_ring = ctl.drive(bodies[warm:], rate)
        agent_cpu = cpu_seconds_of(proc.pid) - agent0
        own_cpu = own_cpu_seconds() - own0
        latencies = list(ctl.link.ack_latencies)
        retransmits = ctl.link.retransmits - retransmits
    except BaseException:
        print(f"{label} failed; {log} ends with:\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        stop(proc, log)
        ctl.close()
    stored = count_events(db)
    assert stored == len(bodies), f"{label}: {stored:,} stored, {len(bodies):,} ACKed"
    frames = len(bodies) - warm
    return E2E(
        label, frames, seconds, latencies, retransmits, agent_cpu, own_cpu, max_ring, stored,
        commits_of(db, log),
    )  # fmt: skip


def commits_of(db: Path, log: Path) -> int:
    """Transactions the agent committed in the whole run (warm-up included)."""
    if log.name == "raw.log":
        return int(json.loads(log.read_text().strip().splitlines()[-1])["commits"])
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM agent_state WHERE key = 'daemon.counters'")
        return int(json.loads(row.fetchone()[0])["batches"])
    finally:
        conn.close()


def section_e2e(args: argparse.Namespace, tmp: Path) -> None:
    warm = args.streams
    n = warm + args.e2e_frames
    paced_n = warm + int(args.paced_rate * args.paced_seconds)
    bodies = make_bodies(max(n, paced_n), args.streams, args.seed)
    settle_heap()
    sizes = [len(encode(Frame(EPOCH, i + 1, b))) for i, b in enumerate(bodies[:n])]
    mean = statistics.fmean(sizes)
    print(
        "[2] end to end over a pty: controller = this process (ControllerLink), agent = "
        "`ironfleet-agent run` (defaults: synchronous=FULL, group commit)"
    )
    print(
        f"    frames {mean:.1f} B mean on the wire ({min(sizes)}-{max(sizes)}), "
        f"{args.streams:,} streams; {warm:,} warm-up frames per run (untimed); every ACKed "
        "frame checked stored"
    )
    rows: list[tuple[E2E, E2E]] = []  # (run, the raw-loop run it is compared with)
    for window in args.windows:
        common: dict[str, Any] = {"bodies": bodies[:n], "warm": warm, "window": window}
        raw = e2e_run(
            f"raw loop, window {window}", start=start_raw_agent, work=tmp / f"raw-w{window}",
            rate=None, **common,
        )  # fmt: skip
        ours = e2e_run(
            f"ironfleet-agent, window {window}", start=start_real_agent,
            work=tmp / f"agent-w{window}", rate=None, **common,
        )  # fmt: skip
        rows += [(raw, raw), (ours, raw)]
    if args.uplink_down_frames:
        # Default config has the uplink on; with the broker unreachable (link lost: when the
        # backlog builds up) ingest must not suffer.
        window = max(args.windows)
        raw = next(r for r, _ in rows if r.label == f"raw loop, window {window}")
        down = e2e_run(
            "  same, uplink on, broker down", work=tmp / "agent-uplink-down",
            start=lambda work, device: start_real_agent(work, device, uplink=True),
            bodies=bodies[: warm + args.uplink_down_frames], warm=warm, window=window, rate=None,
        )  # fmt: skip
        rows.append((down, raw))
    # Paced at line rate; a window of 64 is never the limit there.
    common = {"bodies": bodies[:paced_n], "warm": warm, "window": 64, "rate": args.paced_rate}
    raw = e2e_run(
        f"raw loop, paced {args.paced_rate:,.0f}/s", start=start_raw_agent,
        work=tmp / "raw-paced", **common,
    )  # fmt: skip
    paced = e2e_run(
        f"ironfleet-agent, paced {args.paced_rate:,.0f}/s", start=start_real_agent,
        work=tmp / "agent-paced", **common,
    )  # fmt: skip
    rows += [(raw, raw), (paced, raw)]
    floor = commit_latency(tmp / "floor.db", args.paced_rate, min(args.paced_seconds, 3.0))

    print(
        f"    {'':<34} {'frames':>8} {'frames/s':>9} {'vs raw':>7} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'max ms':>7} {'resent':>6} {'ev/txn':>6} {'agent CPU':>10} {'ctl CPU':>9}"
    )
    fmt = (
        "    {:<34} {:>8,} {:>9,.0f} {:>7} {:>7.2f} {:>7.2f} {:>7.2f} {:>6,} {:>6,.0f}"
        " {:>7.1f} us {:>6.1f} us"
    )
    for r, base in rows:
        print(
            fmt.format(
                r.label, r.frames, r.fps, ratio(r.fps, base.fps), r.pct(0.5), r.pct(0.99),
                max(r.latencies) * 1000, r.retransmits, r.per_commit,
                r.agent_cpu / r.frames * 1e6, r.own_cpu / r.frames * 1e6,
            )
        )  # fmt: skip
    line = 921_600 / 10 / mean
    print(
        f"    paced: offered {args.paced_rate:,.0f}/s (921,600 baud carries 1,536/s of 60 B,"
        f" {line:,.0f}/s of these {mean:.0f} B frames); sustained {paced.fps:,.0f}/s;"
        f" p99 ours vs raw {ratio(paced.pct(0.99), raw.pct(0.99))}"
    )
    print(
        f"    disk floor, same run: a 1-row INSERT + COMMIT (WAL, FULL) every"
        f" {1000 / args.paced_rate:.2f} ms here: p50 {floor[0]:.2f} ms, p99 {floor[1]:.2f} ms"
    )
    print(
        "    latency = the controller's first send of a frame -> its ACK decoded by the controller"
        " (ControllerLink.ack_latencies)"
    )
    print(
        "    ev/txn = events per committed transaction (whole run); CPU = per timed frame, agent"
        " process (all threads) / this controller process"
    )
    print(
        f"    reference (DESIGN): raw loop {REF_LOOP_FPS[0]:,}-{REF_LOOP_FPS[1]:,} frames/s,"
        f" p99 ACK {REF_P99_MS} ms; targets >= 60k frames/s, line rate with p99 <= 2 ms"
    )
    print()


def commit_latency(path: Path, rate: float, seconds: float) -> tuple[float, float]:
    """p50 and p99 (ms) of one-row durable commits paced at `rate`: the disk's own floor."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
    payload = bytes(60)
    samples = []
    t0 = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (payload) VALUES (?)", (payload,))
        conn.execute("COMMIT")
        samples.append(time.perf_counter() - t)
    conn.close()
    samples.sort()
    return samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99)] * 1000


def raw_agent(device: str, db: str) -> None:
    """The baseline agent: one thread, no schema, no dedup, commit then cumulative ACK."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, stream TEXT, "
        "boot_epoch INTEGER, seq INTEGER, ts REAL, ts_quality INTEGER, kind TEXT, "
        "priority INTEGER, payload BLOB, received_at REAL)"
    )
    session = 77
    os.write(fd, encode(Frame(session, 1, Hello("raw-loop", "0"))))
    print("raw_agent_started", flush=True)
    counts = {"commits": 0, "events": 0}
    try:
        raw_loop(fd, conn, session, counts)
    finally:
        print(json.dumps(counts), flush=True)


def raw_loop(fd: int, conn: sqlite3.Connection, session: int, counts: dict[str, int]) -> None:
    """Read, split, COBS, CRC-32C, unpackb; one transaction per read; ACK after COMMIT."""
    from crc32c import crc32c  # noqa: PLC0415 - untyped; kept out of the module namespace

    sql = f"INSERT INTO events ({RAW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"
    cobs_decode, unpackb, packb = cobs.decode, msgpack.unpackb, msgpack.packb
    hello, event = int(FrameType.HELLO), int(FrameType.EVENT)
    epoch: int | None = None
    cumulative = 0
    carry = b""
    while True:
        data = os.read(fd, 65536)
        parts = (carry + data).split(b"\x00")
        carry = parts.pop()
        rows: list[tuple[Any, ...]] = []
        ack = False
        now = time.time()
        for part in parts:
            if not part:
                continue
            try:  # the tail of a frame cut by the flush at open: skip it, as a real agent does
                raw = cobs_decode(part)
                envelope = raw[:-4]
                if crc32c(envelope) != int.from_bytes(raw[-4:], "little"):
                    continue
                _version, ftype, sess, link_seq, body = unpackb(envelope)
            except (cobs.DecodeError, ValueError):
                continue
            if ftype == hello:
                if sess != epoch:
                    epoch, cumulative = sess, link_seq - 1
                ack = True
            elif ftype == event and sess == epoch:
                if link_seq == cumulative + len(rows) + 1:
                    rows.append(
                        (body["s"], sess, body["q"], body["t"], body["tq"], body["k"],
                         body["p"], packb(body["d"]), now)
                    )  # fmt: skip
                elif link_seq <= cumulative:
                    ack = True  # a retransmit of something stored: ACK again
        if rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
            cumulative += len(rows)
            counts["commits"] += 1
            counts["events"] += len(rows)
            ack = True
        if ack and epoch is not None:
            os.write(fd, encode(Frame(session, 1, Ack(epoch, cumulative))))


# -- 3. a million-event backlog --------------------------------------------------------------


def build_store(path: Path, n: int, streams: int, batch: int, seed: int) -> float:
    """A store with `n` interleaved events, appended in big batches; returns seconds.

    synchronous=OFF: this is a fixture, its durability is not what is measured.
    """
    rng = random.Random(seed)
    store = EventStore(path, StoreConfig(synchronous="OFF"))
    t0 = time.perf_counter()
    for first in range(0, n, batch):
        store.append(make_arrivals(first, min(batch, n - first), streams, rng))
    seconds = time.perf_counter() - t0
    assert store.event_count == n
    store.close()
    return seconds


def child_json(*extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, THIS, "--child", *extra], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def rss_child(db: str, events: int, streams: int) -> None:
    """Open the store, time latest(), page through the whole backlog; print JSON."""
    t0 = time.perf_counter()
    store = EventStore(db, StoreConfig())
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    latest = store.latest()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.latest()
    second = time.perf_counter() - t0
    assert len(latest) == streams, len(latest)
    hwm_before_paging = vm_hwm_kib()
    t0 = time.perf_counter()
    count = 0
    for page in iter_backlog(store):
        count += len(page)
    paged = time.perf_counter() - t0
    assert count == events, (count, events)
    store.close()
    print(
        json.dumps(
            {
                "open_s": opened,
                "latest_ms": first * 1000,
                "latest_again_ms": second * 1000,
                "page_s": paged,
                "events": count,
                "hwm_kib_before_paging": hwm_before_paging,
                "hwm_kib": vm_hwm_kib(),
                "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


def vm_hwm_kib() -> int:
    """Peak RSS of this process image since exec (VmHWM), in KiB.

    `ru_maxrss` is not usable here: Linux carries the spawning process's peak across
    vfork + exec (subprocess uses vfork), so every child would report at least the
    bench's own peak. VmHWM belongs to the address space exec created.
    """
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


BASELINE_CODE = (
    "import sqlite3, resource, json\n"
    "import agent.store, agent.daemon\n"
    "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "print(json.dumps({'hwm_kib': hwm,"
    " 'maxrss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n"
)


def naive_latest(db: Path) -> tuple[float, float, float, int]:
    """Same-run baselines for latest(), raw sqlite3 returning rows (no Event objects).

    Point reads by rowid, one per stream (what latest() does); the same as one join
    query; and the bare-column GROUP BY scan one would write without `stream_epochs`.
    """
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        t0 = time.perf_counter()
        ids = [r[0] for r in conn.execute("SELECT latest_rowid FROM stream_epochs")]
        rows = [conn.execute("SELECT * FROM events WHERE id = ?", (i,)).fetchone() for i in ids]
        seeks = time.perf_counter() - t0
        t0 = time.perf_counter()
        joined = conn.execute(
            "SELECT e.* FROM stream_epochs AS se JOIN events AS e ON e.id = se.latest_rowid"
        ).fetchall()
        join = time.perf_counter() - t0
        t0 = time.perf_counter()
        grouped = conn.execute(
            "SELECT stream_id, max(seq), payload FROM events GROUP BY stream_id"
        ).fetchall()
        group_by = time.perf_counter() - t0
        assert len(grouped) == len(rows) == len(joined)
        return seeks, join, group_by, len(rows)
    finally:
        conn.close()


def section_rss(args: argparse.Namespace, tmp: Path) -> None:
    db = tmp / "million.db"
    n = args.rss_events
    build = build_store(db, n, args.streams, BUILD_BATCH, args.seed)
    size = file_size(db)
    base = json.loads(
        subprocess.run(
            [sys.executable, "-c", BASELINE_CODE], capture_output=True, text=True, check=True
        ).stdout
    )
    res = child_json("rss", str(db), str(n), str(args.streams))
    seeks, join, group_by, got = naive_latest(db)
    mib = 1024
    print(
        f"[3] {n:,}-event store, {args.streams:,} streams ({size / 2**20:,.0f} MiB; built in "
        f"{build:.1f} s: {BUILD_BATCH:,}-event appends, synchronous=OFF, {n / build:,.0f} events/s)"
    )
    print(f"    fresh process: EventStore(...) open {res['open_s'] * 1000:,.0f} ms")
    print(
        f"    latest(): {res['latest_ms']:.1f} ms first call, {res['latest_again_ms']:.1f} ms"
        f" again ({got:,} streams); target <= {TARGET_LATEST_MS:.0f} ms"
    )
    ours = res["latest_ms"] / 1000
    print(
        f"      same-run raw sqlite3 (rows only): {got:,} point reads {seeks * 1000:.1f} ms"
        f" (ours {ratio(ours, seeks)}); one join via stream_epochs {join * 1000:.1f} ms"
        f" (ours {ratio(ours, join)}); bare-column GROUP BY scan {group_by * 1000:,.0f} ms"
        f" (ours {ratio(ours, group_by)})"
    )
    print(
        f"    backlog(after_rowid, limit=1000) through all {res['events']:,} events: "
        f"{res['page_s']:.1f} s, {res['events'] / res['page_s']:,.0f} events/s"
    )
    rss, rss_open, rss_base = (
        res["hwm_kib"] / mib,
        res["hwm_kib_before_paging"] / mib,
        base["hwm_kib"] / mib,
    )
    print(
        f"    peak RSS (VmHWM): {rss:.1f} MiB (after open + latest: {rss_open:.1f} MiB) vs a"
        f" process that only imports sqlite3, agent.store, agent.daemon: {rss_base:.1f} MiB;"
        f" {ratio(rss, rss_base)}, +{rss - rss_base:.1f} MiB"
    )
    print(
        f"      (ru_maxrss says {res['maxrss_kib'] / mib:.1f} and {base['maxrss_kib'] / mib:.1f}"
        f" MiB: on Linux it keeps the spawner's peak across vfork + exec; this bench's"
        f" is {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mib:.1f} MiB)"
    )
    print(
        f"    reference: interpreter + sqlite3 ~ {REF_RSS_MIB} MiB; target <= {TARGET_RSS_MIB} MiB"
    )
    print()


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="1,2,3", help="which sections to run")
    parser.add_argument("--streams", type=int, default=1000, help="interleaved streams")
    parser.add_argument("--events", type=int, default=200_000, help="group-commit events")
    parser.add_argument("--batch", type=int, default=1000, help="events per transaction")
    parser.add_argument("--single-events", type=int, default=2000, help="one-per-call events")
    parser.add_argument("--pq-events", type=int, default=6000, help="persist-queue items")
    parser.add_argument("--pq-window", type=int, default=1000, help="drain window, items")
    parser.add_argument("--drain-pages", type=int, default=20, help="drain window, pages")
    parser.add_argument("--e2e-frames", type=int, default=60_000, help="frames per e2e run")
    parser.add_argument(
        "--windows", type=lambda s: [int(w) for w in s.split(",")], default=[64, 256]
    )
    parser.add_argument(
        "--uplink-down-frames", type=int, default=10_000, help="0: skip the uplink-on run"
    )
    parser.add_argument("--paced-rate", type=float, default=1536.0, help="frames/s, paced")
    parser.add_argument("--paced-seconds", type=float, default=6.0)
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--profile", action="store_true", help="cProfile the group commit")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "raw-agent":
            raw_agent(rest[0], rest[1])
        elif kind == "rss":
            rss_child(rest[0], int(rest[1]), int(rest[2]))
        return
    sections = {s.strip() for s in args.sections.split(",")}
    print(
        f"IronFleet store benchmark · Python {sys.version.split()[0]} · SQLite "
        f"{sqlite3.sqlite_version} · {os.cpu_count()} CPUs"
    )
    print()
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-", dir=os.environ.get("TMPDIR", "/tmp")))
    t0 = time.perf_counter()
    try:
        if "1" in sections:
            section_append(args, tmp)
        if "2" in sections:
            section_e2e(args, tmp)
        if "3" in sections:
            section_rss(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"total {time.perf_counter() - t0:.0f} s; 1-min load average {load:.2f} at start,"
        f" {os.getloadavg()[0]:.2f} at end (2 CPUs: above ~1 means other work shared them)"
    )


if __name__ == "__main__":
    main()
