"""Fleet ingest: the PostgreSQL collector (1, 2, 3 in one share group) against the SQLite
collector, in one run on this machine.

Run as `.venv/bin/python bench/bench_fleet.py` (about 4 minutes; `--quick` for a smoke
test). Everything is started here: a throwaway PostgreSQL cluster (tests/pgharness.py:
initdb + pg_ctl, fsync and synchronous_commit on, shared_buffers 128 MB), mosquitto on a
free 127.0.0.1 port (bench/uplink_common.py), and real `ironfleet-collector run`
processes. The SQLite file and the PostgreSQL data directory are on the same file system.

1. Store only, in this process: the same batches (`--batch-events`, 500 by default)
   through `CollectorStore.ingest` (SQLite, synchronous=FULL) and
   `PgCollectorStore.ingest` with each insert method (`unnest`: one INSERT ... SELECT
   FROM unnest(arrays) ON CONFLICT DO NOTHING; `copy`: binary COPY into a temp table,
   then the same INSERT ... SELECT; `values`: one multi-row VALUES statement), each
   batch one committed transaction. CPU is this process's: the whole store for SQLite,
   the client's side for PostgreSQL (the server's is in its own processes); with
   `--batch-events 40` or `128` it shows where `auto` switches to COPY.
2. End to end: a load generator publishes prebuilt batches of 50 vehicles (the fleet
   protocol, QoS 1, a window of 2 batches per vehicle) through mosquitto to the
   collectors, which store each batch, commit, sign and publish the ack; the generator
   verifies every ack as an agent does. Rate = events acked / wall time from the first
   publish to the last ack. With small batches (`--batch-events 5`) the generator, one
   Python process at ~1 ms of CPU a batch, sets the rate on this machine: read the
   collectors' CPU per event (printed) rather than the rate there.
3. The agent's drain: the agent's own uplink (`AgentLoop` of bench_uplink.py) drains a
   stored backlog (`--drain-events`, 1M by default) into one SQLite collector and 1, 2
   and 3 PostgreSQL collectors; time to the checkpoint past the last event persisted.

Bytes written per event: for PostgreSQL the WAL generated (pg_current_wal_lsn diff) and
what every server process wrote to storage (/proc/<pid>/io, with a CHECKPOINT before the
end so data pages are counted); for SQLite what the collector process wrote (file + WAL).
The load average is printed with every figure: compare ratios within one run.

Targets (DESIGN.md): one PostgreSQL collector >= 50k events/s and >= 5x the SQLite
collector; adding a collector never lowers the total.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
from uplink_agent import AgentLoop, section_for
from uplink_common import Broker, copy_store, cpu_seconds, load_fill, write_bytes

from agent.fleet import Batch
from fleet.collector import CollectorStore
from fleet.pgstore import PgCollectorStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fleetload import FleetLoad, LoadVehicle
from pgharness import CollectorProc, PgCluster
from support import fleet_keys

# Each run has fresh MQTT sessions, batch ids (the seed) and files: nothing queued or
# redelivered from an earlier run can be taken for this run's (its acks would not verify).
_RUNS = itertools.count(1)
TARGET_RATE = 50_000  # events/s, one PostgreSQL collector (DESIGN.md)
TARGET_RATIO = 5.0  # x the SQLite collector


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}"


def server_written(cluster: PgCluster) -> int:
    """Bytes every process of the cluster caused to be written to storage so far."""
    pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
    total = 0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        total += write_bytes(p.pid)
    return total


def wal_lsn(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(row[0]) if row else 0


def checkpoint(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def workload(vehicles: int, batches: int, size: int, streams: int) -> list[Batch]:
    """Batches of `vehicles` vehicles interleaved as they would arrive."""
    import random  # noqa: PLC0415

    rng = random.Random(1)
    fleet = [LoadVehicle(f"truck-{i:04d}", streams, random.Random(rng.random()))
             for i in range(vehicles)]  # fmt: skip
    out = []
    for _ in range(batches):
        for v in fleet:
            sent = v.next_batch(size, time.time())
            out.append(Batch.decode(sent.payload))
    return out


# -- 1. store only ---------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    events: int
    seconds: float
    wal: int = 0  # bytes
    written: int = 0  # bytes to storage
    cpu: float = 0.0  # collector CPU seconds
    where: str = ""
    size: int = 0  # bytes the events take on disk, indexes included
    lock_waits: float = -1.0  # share of samples with a collector backend waiting on a lock

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        per = f"{self.written / self.events:8,.0f} B/ev written" if self.written else " " * 23
        wal = f"{self.wal / self.events:6,.0f} B/ev WAL" if self.wal else " " * 15
        cpu = f"{self.cpu / self.events * 1e6:6.1f} us CPU/ev" if self.cpu else ""
        cpu += f" {self.size / self.events:5,.0f} B/ev on disk" if self.size else ""
        cpu += f"  lock waits {self.lock_waits:4.0%}" if self.lock_waits >= 0 else ""
        return (f"  {self.name:<34} {self.rate:>10,.0f} ev/s  {per}  {wal}  {cpu}  "
                f"({self.where})")  # fmt: skip


def section_store(cluster: PgCluster, work: Path, batches: list[Batch]) -> list[Row]:
    rows = []
    events = sum(len(b.events) for b in batches)
    db = work / "store-only.db"
    store = CollectorStore(db)
    w0, c0, t0 = write_bytes(), time.process_time(), time.perf_counter()
    for b in batches:
        store.ingest(b)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    files = (db, db.with_name(db.name + "-wal"))
    size = sum(f.stat().st_size for f in files if f.exists())
    rows.append(Row("sqlite CollectorStore", events, seconds, written=write_bytes() - w0,
                    cpu=cpu, where=load(), size=size))  # fmt: skip
    store.conn.close()
    for method in ("auto", "unnest", "copy", "values"):
        url = cluster.create_database(f"bench_store_{method}")
        pg = PgCollectorStore(url, method=method)
        checkpoint(url)
        wal0, w0 = wal_lsn(url), server_written(cluster)
        c0, t0 = time.process_time(), time.perf_counter()
        for b in batches:
            pg.ingest(b)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        checkpoint(url)
        size = cluster.query(
            url.rsplit("/", 1)[1],
            "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
            "WHERE inhparent = 'events'::regclass",
        )[0][0]
        rows.append(Row(f"postgres PgCollectorStore {method}", events, seconds,
                        wal=wal_lsn(url) - wal0, written=server_written(cluster) - w0,
                        cpu=cpu, where=load(), size=int(size)))  # fmt: skip
        pg.close()
    return rows


# -- 2. end to end ---------------------------------------------------------------------------


class LockWaits:
    """Samples pg_stat_activity every 20 ms during a run: how often a collector's backend
    waits on a lock (row locks of the same vehicle's `vehicles` and `state` rows)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples = self.waiting = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LockWaits:
        self.thread.start()
        return self

    def stop(self) -> float:
        self.stopping.set()
        self.thread.join(timeout=10)
        return self.waiting / self.samples if self.samples else 0.0

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stopping.wait(0.02):
                busy, locked = conn.execute(
                    "SELECT count(*) FILTER (WHERE state = 'active'), "
                    "count(*) FILTER (WHERE wait_event_type = 'Lock') FROM pg_stat_activity "
                    "WHERE application_name = 'ironfleet-collector'"
                ).fetchone() or (0, 0)
                self.samples += busy > 0
                self.waiting += locked > 0


def start_collectors(cluster: PgCluster | None, work: Path, broker: Broker, n: int,
                     *, writers: int, run: int) -> tuple[str, list[CollectorProc]]:  # fmt: skip
    """A fresh database and `n` connected collectors (PostgreSQL when `cluster`, else one
    SQLite collector, no share group)."""
    private, _ = fleet_keys()
    if cluster is not None:
        url = cluster.create_database(f"bench_fleet_{run}")
        PgCollectorStore(url).close()
    else:
        url = str(work / f"collector-{run}.db")
    # A group per run: the members of the last run stay in theirs until their sessions
    # expire (docs/fleet-deployment.md 3), and would be dealt a share of this run.
    group = f"bench{run}" if cluster is not None else ""
    cols = [CollectorProc(work / f"run{run}", url, broker.port, f"bench-{run}-{i}",
                          private, group=group, writers=writers).start()
            for i in range(n)]  # fmt: skip
    deadline = time.monotonic() + 30
    while not all(c.connected() for c in cols):
        if time.monotonic() > deadline:
            raise RuntimeError("collectors did not connect: " + cols[0].text()[-2000:])
        time.sleep(0.05)
    time.sleep(0.5)  # SUBACK: a batch published before it would wait for a resend
    return url, cols


def run_fleet(cluster: PgCluster | None, work: Path, broker: Broker, n: int,
              args: argparse.Namespace, *, writers: int = 0) -> Row:  # fmt: skip
    """Time the prebuilt load through `n` collectors; check every event was stored."""
    run = next(_RUNS)
    url, cols = start_collectors(cluster, work, broker, n, writers=writers, run=run)
    waits = LockWaits(url).start() if cluster is not None else None
    fleet = FleetLoad(broker.port, fleet_keys()[1], vehicles=args.vehicles,
                      batches=args.batches, batch_events=args.batch_events, window=2,
                      ack_timeout=30.0, streams=args.streams, prebuild=True,
                      client_id=f"bench-load-{run}", seed=run)  # fmt: skip
    wal0 = w0 = 0
    if cluster is not None:
        checkpoint(url)
        wal0, w0 = wal_lsn(url), server_written(cluster)
    cpu0 = sum(cpu_seconds(c.proc.pid) for c in cols if c.proc)
    t0 = time.monotonic()
    fleet.start()
    while not fleet.done():
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"not done after 600 s: {fleet.acked_batches()} batches acked")
        fleet.wake.wait(0.01)
    row = Row("", args.vehicles * args.batches * args.batch_events, time.monotonic() - t0,
              cpu=sum(cpu_seconds(c.proc.pid) for c in cols if c.proc) - cpu0,
              where=load())  # fmt: skip
    fleet.stop()
    if waits is not None:
        row.lock_waits = waits.stop()
    if cluster is not None:
        checkpoint(url)
        row.wal, row.written = wal_lsn(url) - wal0, server_written(cluster) - w0
        stored = cluster.query(url.rsplit("/", 1)[1], "SELECT count(*) FROM events")[0][0]
        row.name = f"postgres, {n} collector{'s' if n > 1 else ''}"
        row.name += f", {writers} writer{'s' if writers > 1 else ''}" if writers else ""
    else:
        row.written = sum(write_bytes(c.proc.pid) for c in cols if c.proc)
        with sqlite3.connect(url) as conn:
            stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        row.name = "sqlite, 1 collector"
    for c in cols:
        c.kill(signal.SIGTERM)
    if stored != row.events or fleet.acks_rejected:
        raise RuntimeError(f"stored {stored} of {row.events}, {fleet.acks_rejected} rejected")
    return row


def drain_into(cluster: PgCluster | None, work: Path, broker: Broker, n_col: int, *,
               src: Path, n: int, args: argparse.Namespace) -> Row:  # fmt: skip
    """Section 3: the agent's own uplink (bench/uplink_agent.py `AgentLoop`: Resync,
    FleetSync, MqttTransport and checkpoints on the writer's cadence, ack_mode fleet,
    500 events a batch) drains a copy of a stored backlog of `n` events into `n_col`
    collectors. Time: first step to the checkpoint past the last event persisted."""
    run = next(_RUNS)
    url, cols = start_collectors(cluster, work, broker, n_col, writers=args.writers, run=run)
    vehicle = f"drain-{run}"
    agent = AgentLoop(copy_store(src, work / f"drain-{run}.db"), vehicle,
                      section_for(broker.port, 500), nodelay=args.nodelay)  # fmt: skip
    cpu0 = sum(cpu_seconds(c.proc.pid) for c in cols if c.proc)
    t0 = time.monotonic()
    try:
        agent.run_until(lambda: agent.drained, 1800)
        seconds = time.monotonic() - t0
    finally:
        agent.close()
    cpu = sum(cpu_seconds(c.proc.pid) for c in cols if c.proc) - cpu0
    count = "SELECT count(*) FROM events WHERE vehicle = %s"
    if cluster is not None:
        stored = cluster.query(url.rsplit("/", 1)[1], count, vehicle)[0][0]
        name = f"postgres, {n_col} collector{'s' if n_col > 1 else ''}"
    else:
        with sqlite3.connect(url) as conn:
            stored = conn.execute(count.replace("%s", "?"), (vehicle,)).fetchone()[0]
        name = "sqlite, 1 collector"
    for c in cols:
        c.kill(signal.SIGTERM)
    if stored != n:
        raise RuntimeError(f"{name}: stored {stored} of {n}")
    return Row(name, n, seconds, cpu=cpu, where=load())


def verdict(rows: list[Row]) -> str:
    sqlite, pg1 = rows[0].rate, rows[1].rate
    monotone = all(b.rate >= a.rate * 0.95 for a, b in itertools.pairwise(rows[1:]))
    return (
        f"one PostgreSQL collector: {pg1:,.0f} ev/s (target >= {TARGET_RATE:,}: "
        f"{'met' if pg1 >= TARGET_RATE else 'NOT met'}), {pg1 / sqlite:.1f}x the SQLite "
        f"collector (target >= {TARGET_RATIO:.0f}x: "
        f"{'met' if pg1 / sqlite >= TARGET_RATIO else 'NOT met'}); 2 and 3 collectors: "
        f"{rows[2].rate / pg1:.2f}x and {rows[3].rate / pg1:.2f}x one "
        f"({'never lower' if monotone else 'LOWER'}, 5 % noise allowed); {load()}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    p.add_argument("--vehicles", type=int, default=50)
    p.add_argument("--batches", type=int, default=16, help="per vehicle, end to end")
    p.add_argument("--batch-events", type=int, default=500)
    p.add_argument("--streams", type=int, default=200, help="per vehicle")
    p.add_argument("--sections", default="123", help="which sections to run: any of 1, 2, 3")
    p.add_argument("--store-batches", type=int, default=8, help="per vehicle, store only")
    p.add_argument("--repeat", type=int, default=2, help="rounds of section 2 (best kept)")
    p.add_argument("--writers", type=int, default=0, help="--writers of the PostgreSQL "
                   "collectors (0: the CLI's default)")  # fmt: skip
    p.add_argument("--drain-events", type=int, default=1_000_000,
                   help="section 3: the agent's stored backlog")  # fmt: skip
    p.add_argument("--nodelay", action="store_true", help="mosquitto set_tcp_nodelay true "
                   "(default false: Nagle's algorithm on the broker's sockets)")  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.vehicles, args.batches, args.store_batches, args.repeat = 10, 4, 2, 1
        args.drain_events = 20_000
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir="/var/tmp"))
    cluster = PgCluster()
    broker = Broker(work / "broker", nodelay=args.nodelay)
    try:
        cluster.start()
        broker.start()
        settings = cluster.query("postgres", "SELECT name, setting FROM pg_settings WHERE name "
                                 "IN ('fsync', 'synchronous_commit', 'shared_buffers', "
                                 "'full_page_writes')")  # fmt: skip
        print(f"bench_fleet: {os.cpu_count()} cores, {load()}, PostgreSQL "
              f"{cluster.bindir.parent.name}: {dict(settings)}; {args.vehicles} vehicles x "
              f"{args.streams} streams, {args.batch_events} events per batch; mosquitto "
              f"set_tcp_nodelay {str(args.nodelay).lower()}")  # fmt: skip
        if "1" in args.sections:
            batches = workload(args.vehicles, args.store_batches, args.batch_events,
                               args.streams)  # fmt: skip
            n = sum(len(b.events) for b in batches)
            print(f"\n1. store only: {len(batches)} batches, {n:,} events, one transaction "
                  "per batch")  # fmt: skip
            for row in section_store(cluster, work, batches):
                print(row.line())
        if "2" in args.sections:
            total = args.vehicles * args.batches * args.batch_events
            print(f"\n2. end to end through mosquitto: {total:,} events per run, signed "
                  f"acks verified by the generator; {args.repeat} rounds, best kept")  # fmt: skip
            w = args.writers
            configs = [(None, 1, 0), (cluster, 1, w), (cluster, 2, w), (cluster, 3, w),
                       (cluster, 1, 1)]  # fmt: skip
            best: dict[int, Row] = {}
            for r in range(args.repeat):
                for k, (where, n_col, writers) in enumerate(configs):
                    row = run_fleet(where, work, broker, n_col, args, writers=writers)
                    note = "  <- one connection, as before --writers" if writers == 1 else ""
                    print(row.line() + f"  [round {r + 1}]{note}")
                    if k not in best or row.rate > best[k].rate:
                        best[k] = row
            print("\nbest of each:")
            for k in sorted(best):
                print(best[k].line())
            print("\n" + verdict([best[k] for k in range(4)]))
        if "3" in args.sections:
            src, _ = load_fill(work, args.drain_events, args.streams)
            print(f"\n3. the agent's drain of a {args.drain_events:,}-event backlog "
                  f"({args.streams} streams, 500 events a batch, ack_mode fleet, signed "
                  f"acks) into each store; time to the last checkpoint")  # fmt: skip
            for where, n_col in ((None, 1), (cluster, 1), (cluster, 2), (cluster, 3)):
                row = drain_into(where, work, broker, n_col, src=src, n=args.drain_events,
                                 args=args)  # fmt: skip
                print(f"{row.line()}  drain {row.seconds:.1f} s")
        return 0
    finally:
        broker.stop()
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
