"""bench_store.py section 3: a million-event backlog (latest(), paging, peak RSS)."""

from __future__ import annotations

import argparse
import json
import random
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from store_common import (
    BUILD_BATCH,
    REF_RSS_MIB,
    TARGET_LATEST_MS,
    TARGET_RSS_MIB,
    THIS,
    file_size,
    iter_backlog,
    make_arrivals,
    ratio,
)

from agent.store import EventStore, StoreSection

# -- 3. a million-event backlog --------------------------------------------------------------


def build_store(path: Path, n: int, streams: int, batch: int, seed: int) -> float:
    """A store with `n` interleaved events, appended in big batches; returns seconds.

    synchronous=OFF: this is a fixture, its durability is not what is measured.
    """
    rng = random.Random(seed)
    store = EventStore(path, StoreSection(synchronous="OFF"))
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
    store = EventStore(db, StoreSection())
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
