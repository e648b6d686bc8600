"""bench_store.py section 1: durable append and drain."""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import random
import sqlite3
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from store_common import (
    RAW_COLUMNS,
    REF_PQ_DRAIN,
    REF_PQ_PUT,
    REF_RAW_UNIQUE_EPS,
    REF_UNIQUE_BYTES,
    IoWindow,
    Run,
    batches,
    checkpoint,
    file_size,
    iter_backlog,
    make_arrivals,
    ratio,
    raw_rows,
    settle_heap,
)

from agent.store import EventStore, StoreSection
from firmware_bridge.link import Received

# -- 1. durable append -----------------------------------------------------------------------


def store_group_commit(path: Path, warm: list[Received], timed: list[Received], batch: int) -> Run:
    store = EventStore(path, StoreSection())
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
    store = EventStore(path, StoreSection())
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
    store = EventStore(path, StoreSection())
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
    store = EventStore(path, StoreSection())
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
