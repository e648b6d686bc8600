"""Technician reads against hostile sizes: WAL growth, 1M streams, allocating queries.

Issue 12, part B. Three sections, each printed with the figures of a given "before" CLI
(`--before PATH`: a copy of agent/cli.py from before the change, run as a script) next to
the current `ironfleet`:

  1 wal      the real daemon (`ironfleet-agent run`) ingests at --rate events/s from a
             controller on a pty (store_e2e.Controller) for --seconds; a hostile reader
             loops `ironfleet --timeout T query <endless CTE>` the whole time (T = 60 for the
             before CLI, which accepted it; the cap for the current one). Reported: the
             peak WAL size, sampled every 5 ms, against a phase with no reader. Each phase
             has a fresh agent and database (a WAL never shrinks below its high-water mark
             under journal_size_limit, so one phase would pollute the next). Target: <= 2x.
  2 streams  `streams` and `replay` (--json and table) on a store of --streams distinct
             streams, one event each (written with raw SQL into the store's own schema, for
             speed): wall time and peak RSS (wait4). Target: < 2 s and < 100 MiB.
  3 query    `SELECT zeroblob(1e9)` and a string-doubling recursive CTE under --timeout 2:
             wall time, peak RSS, exit status.

Wall-clock figures drift with the machine's load (printed); none is asserted here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from store_e2e import Controller, make_bodies, start_real_agent, stop

from agent.cliaccess import MAX_TIMEOUT
from agent.readsafe import WAL_CEILING_BYTES, WAL_GROWTH_BYTES, wal_bytes
from agent.store import EventStore

IRONFLEET = str(Path(sys.executable).with_name("ironfleet"))
SLOW_SQL = (  # reads a table first, so it holds a snapshot, then counts forever
    "WITH RECURSIVE c(x) AS (SELECT (SELECT count(*) FROM agent_state) UNION ALL "
    "SELECT x + 1 FROM c) SELECT count(*) FROM c"
)
DOUBLING = (
    "WITH RECURSIVE c(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM c) SELECT length(s) FROM c"
)
WARMUP_SECONDS = 5.0  # ingest before a phase's measurement starts: the WAL reaches its size
SAMPLE_SECONDS = 0.005
TARGET_WAL_RATIO = 2.0
TARGET_SECONDS = 2.0
TARGET_RSS = 100 * 2**20
BATCH_ROWS = 50_000  # rows per transaction while building the many-streams store


@dataclass
class Measured:
    """One CLI process: exit status, wall seconds, peak RSS, last stderr line."""

    code: int
    seconds: float
    rss: int
    err: str


def command(before: Path | None) -> list[str]:
    """The CLI to run: the current `ironfleet`, or the before copy as a script."""
    return [IRONFLEET] if before is None else [sys.executable, str(before)]


def measure(argv: list[str], timeout: float = 600.0) -> Measured:
    """Run `argv`, output discarded (stderr kept): status, wall time, peak RSS (wait4)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    return Measured(proc.returncode, seconds, usage.ru_maxrss * 1024, lines[-1] if lines else "")


def mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


# -- 1. WAL under a hostile read -------------------------------------------------------------


@dataclass
class WalPhase:
    label: str
    start: int  # WAL bytes when the measurement began
    peak: int
    reads: list[Measured]
    events: int


def wal_phase(label: str, args: argparse.Namespace, reader: list[str] | None) -> WalPhase:
    """A fresh agent ingesting at args.rate for args.seconds; `reader` looped meanwhile."""
    work = Path(tempfile.mkdtemp(prefix="ironfleet-hostile-"))
    ctl = Controller(window=256)
    proc, db, log = start_real_agent(work, ctl.device)
    try:
        warm = int(WARMUP_SECONDS * args.rate)
        total = int(args.seconds * args.rate)
        bodies = make_bodies(warm + total, args.wal_streams, seed=7)
        ctl.drive(bodies[:warm], args.rate)
        peak = [0]
        reads: list[Measured] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], wal_bytes(db))
                done.wait(SAMPLE_SECONDS)

        def hostile() -> None:
            while reader is not None and not done.is_set():
                reads.append(measure(reader_argv(reader, db)))

        start = wal_bytes(db)
        threads = [threading.Thread(target=sample), threading.Thread(target=hostile)]
        for t in threads:
            t.start()
        ctl.drive(bodies[warm:], args.rate)
        done.set()
        for t in threads:
            t.join()
        return WalPhase(label, start, peak[0], reads, total)
    finally:
        stop(proc, log)
        ctl.close()
        shutil.rmtree(work, ignore_errors=True)


def reader_argv(reader: list[str], db: Path) -> list[str]:
    """`reader` is [cli..., --timeout, T]; the query goes after the database."""
    return [*reader[:-2], "--db", str(db), *reader[-2:], "query", SLOW_SQL]


def section_wal(args: argparse.Namespace) -> None:
    print(f"== 1. WAL under a hostile read: {args.rate:,.0f} events/s, {args.seconds:g} s "
          f"per phase, {args.wal_streams} streams, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    phases = [wal_phase("no reader", args, None)]
    if args.before:
        phases.append(wal_phase("before: --timeout 60 query", args,
                                [*command(args.before), "--timeout", "60"]))  # fmt: skip
    phases.append(wal_phase(f"after: --timeout {MAX_TIMEOUT:g} query", args,
                            [*command(None), "--timeout", str(MAX_TIMEOUT)]))  # fmt: skip
    base = phases[0].peak
    print(f"{'phase':<32} {'WAL start':>11} {'WAL peak':>11} {'x no reader':>11}  reads")
    for p in phases:
        ends: dict[str, int] = {}
        for r in p.reads:
            key = r.err.split(":", 2)[1].strip()[:40] if ":" in r.err else f"exit {r.code}"
            ends[key] = ends.get(key, 0) + 1
        ratio = p.peak / base if base else 0.0
        print(
            f"{p.label:<32} {mib(p.start):>11} {mib(p.peak):>11} {ratio:>10.2f}x  "
            f"{len(p.reads)} ({'; '.join(f'{k}: {v}' for k, v in ends.items()) or '-'})"
        )
    print(
        f"target: peak <= {TARGET_WAL_RATIO:g}x the no-reader peak; one read may grow the WAL "
        f"by {mib(WAL_GROWTH_BYTES)}, never past {mib(WAL_CEILING_BYTES)} (agent/readsafe.py)\n"
    )


# -- 2. one million streams ------------------------------------------------------------------


def build_streams(path: Path, count: int) -> None:
    """`count` streams with one event each, straight into the store's own schema."""
    EventStore(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    now = time.time()
    payload = b"\x81\xa1v\x01"  # msgpack {"v": 1}
    try:
        conn.execute("PRAGMA synchronous = OFF")
        for first in range(1, count + 1, BATCH_ROWS):
            ids = range(first, min(count + 1, first + BATCH_ROWS))
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO streams (id, name, controller, priority, first_seen, last_seen) "
                "VALUES (?, ?, 'ecu0', 3, ?, ?)",
                ((i, f"ecu0/s{i:07d}", now, now) for i in ids),
            )
            conn.executemany(
                "INSERT INTO events (id, stream_id, boot_epoch, seq, ts, ts_quality, kind, "
                "priority, payload, received_at) VALUES (?, ?, 1, 1, ?, 3, 'telemetry', 3, ?, ?)",
                ((i, i, now, payload, now) for i in ids),
            )
            conn.executemany(
                "INSERT INTO stream_epochs (stream_id, boot_epoch, low_seq, high_seq, "
                "latest_rowid, events) VALUES (?, 1, 1, 1, ?, 1)",
                ((i, i) for i in ids),
            )
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def section_streams(args: argparse.Namespace, tmp: Path) -> None:
    db = tmp / "streams.db"
    t0 = time.perf_counter()
    build_streams(db, args.streams)
    print(f"== 2. {args.streams:,} distinct streams (built in {time.perf_counter() - t0:.1f} s), "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'command':<28} {'cli':<7} {'exit':>4} {'seconds':>8} {'peak RSS':>11}  verdict")
    for cmd in (["streams", "--json"], ["streams"], ["replay", "--json"], ["replay"]):
        # The before CLI takes minutes and GBs per run at 1M streams: its JSON runs only.
        runs = [("after", None, str(MAX_TIMEOUT))]
        if args.before and "--json" in cmd:
            runs.insert(0, ("before", args.before, "60"))
        for label, before, timeout in runs:
            m = measure([*command(before), "--db", str(db), "--timeout", timeout, *cmd])
            ok = m.code == 0 and m.seconds < TARGET_SECONDS and m.rss < TARGET_RSS
            print(
                f"{' '.join(cmd):<28} {label:<7} {m.code:>4} {m.seconds:>8.2f} "
                f"{mib(m.rss):>11}  {'ok' if ok else 'MISSES'} {m.err[:60]}"
            )
    print(
        f"target: < {TARGET_SECONDS:g} s and < {mib(TARGET_RSS)} (the current CLI shows one "
        "page; --after walks the rest)\n"
    )


# -- 3. allocating queries ---------------------------------------------------------------------


def section_query(args: argparse.Namespace, tmp: Path) -> None:
    db = tmp / "small.db"
    EventStore(db).close()
    print(f"== 3. allocating queries, --timeout 2, load {os.getloadavg()[0]:.2f}")
    print(f"{'query':<16} {'cli':<7} {'exit':>4} {'seconds':>8} {'peak RSS':>11}  message")
    for name, sql in (("zeroblob(1e9)", "SELECT zeroblob(1e9)"), ("doubling CTE", DOUBLING)):
        for label, before in (("before", args.before), ("after", None)):
            if label == "before" and before is None:
                continue
            m = measure([*command(before), "--db", str(db), "--timeout", "2", "query", sql],
                        timeout=args.query_timeout)  # fmt: skip
            print(
                f"{name:<16} {label:<7} {m.code:>4} {m.seconds:>8.2f} {mib(m.rss):>11}  "
                f"{m.err[:90]}"
            )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="copy of agent/cli.py before the change")
    parser.add_argument("--sections", default="wal,streams,query")
    parser.add_argument("--rate", type=float, default=1500.0, help="events/s during phase 1")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of a phase 1 run")
    parser.add_argument("--wal-streams", type=int, default=100)
    parser.add_argument("--streams", type=int, default=1_000_000)
    parser.add_argument("--query-timeout", type=float, default=300.0,
                        help="kill a section 3 process after this many seconds")  # fmt: skip
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    with tempfile.TemporaryDirectory(prefix="ironfleet-bench-") as name:
        tmp = Path(name)
        if "query" in sections:
            section_query(args, tmp)
        if "streams" in sections:
            section_streams(args, tmp)
        if "wal" in sections:
            section_wal(args)


if __name__ == "__main__":
    main()
