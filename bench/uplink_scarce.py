"""bench_uplink.py section 5: live-event latency on a scarce link, behind a large backlog.

A store pre-filled with a backlog of the simulator's vehicle profile (firmware_bridge/
telemetry.py, 16 streams, priority by family as the simulator sets it) is drained by the
agent's own uplink loop (uplink_agent.py, stepped in this process) with `[uplink]
max_bytes_per_second = 8000` (64 kbit/s) and `batch_max_delay_ms = 200`, through the
mosquitto of bench_uplink.py, to a collector child that stamps (CLOCK_MONOTONIC, shared
across processes) the commit of every live event and of every backlog batch. From the
CONNACK on, live events are appended between the loop's steps at a steady rate on streams
of their own (`live/...`), through the store's own append path, each stamped when its
transaction returned. Between the append and the uplink seeing it lies at most one step
(its MQTT poll waits up to 50 ms), as between the daemon's writer and uplink threads.

Printed per codec (zlib, the default, and columnar): live latency (store commit ->
collector commit) p50 / p99 / max and where it was spent, the payload bytes published
per second against the budget, the backlog committed during the live traffic, and the
time the whole backlog would take at that rate. The baseline, from the same run: the
backlog in arrival order (a sample of it cut into batches by Resync's rule and encoded
with the codec), which a live event would have waited behind without the live lane.

Run alone as `python uplink_scarce.py _collector ...`: the instrumented collector child.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from types import FrameType
from typing import Any

import msgpack
from benchprocs import stop_process
from uplink_agent import AgentLoop, StampedTransport, section_for
from uplink_common import BUFFER_BYTES, Arrival, Broker, copy_store

from agent.config import UplinkSection
from agent.fleet import Batch, topic
from agent.resilience import Event
from agent.resync import ResyncCounters
from agent.store import EventStore, StoreSection, connect
from agent.uplink import MqttTransport
from firmware_bridge.telemetry import FAMILIES, VehicleModel, drive
from fleet.collector import Collector, CollectorStore
from fleet.subscriber import FleetSubscriber

BUDGET = 8000  # bytes/s of payload: the 64 kbit/s link
BATCH_DELAY_MS = 200.0  # the batch_max_delay_ms
TARGET_P99 = 2.0  # seconds, live p99 at 64 kbit/s with a 1M backlog (issue 16)
CODECS = ("zlib", "columnar")
PER_FAMILY = 4  # 4 families x 4 = the 16 streams of the backlog
LIVE_PREFIX = "live/"  # the live streams: live/position0, live/speed0, ...
DRAIN_OUT = 30.0  # seconds after the live traffic for its last events to arrive
SAMPLE_WINDOWS, SAMPLE_ROWS = 10, 5_000  # arrival-order sample of the backlog
THIS = str(Path(__file__).resolve())

# -- 5. live events on a scarce link --------------------------------------------------------


@dataclass
class ScarceRun:
    codec: str
    seconds: float  # live traffic: CONNACK -> last live append
    connect_s: float  # first step -> CONNACK processed
    live_stored: int
    latency: list[float]  # store commit -> collector commit, per delivered live event
    agent_wait: list[float]  # store commit -> the publish that carried it
    wire_wait: list[float]  # that publish -> collector commit
    worst: tuple[str, float, float]  # (event, stored at +s, latency)
    published: int  # payload bytes in the window
    lane_bytes: dict[str, int]  # state / live / backlog
    framing: int  # MQTT PUBLISH header bytes on top of the payload, in the window
    publishes: int
    longest_gap: float  # longest spell without a publish in the window, seconds
    backlog_events: int  # backlog events the collector committed in the window
    backlog_sent: int  # ... and published in it
    backlog_total: int  # ... by the end (window and drain-out), new rows only
    duplicates: int
    ack_timeouts: int
    acks_stale: int
    load: tuple[float, float, float]
    steady: int  # payload bytes published after the window's first second
    arrival_bytes: float = 0.0  # the whole backlog's payload bytes, oldest first
    agent_bytes: float = 0.0  # ... highest priority first, as the agent sends it
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.published / self.seconds

    @property
    def backlog_bps(self) -> float:
        return self.lane_bytes["backlog"] / self.seconds

    @property
    def drain_s(self) -> float:
        """The whole backlog, as the agent sends it, at the window's backlog bytes/s."""
        return self.agent_bytes / self.backlog_bps if self.backlog_bps else math.inf


class PublishLog(StampedTransport):
    """The agent's transport, keeping every publish (time, kind, payload) for the report."""

    def __init__(self, inner: MqttTransport) -> None:
        super().__init__(inner)
        self.sent: list[tuple[float, str, bytes]] = []

    def publish(self, kind: str, payload: bytes) -> int | None:
        mid = self.inner.publish(kind, payload)
        if mid is not None:
            self.sent.append((time.monotonic(), kind, payload))
        return mid


class LiveSource:
    """A vehicle's live traffic: `rate` events/s round-robin over one stream per family,
    appended through the store's own path; the commit time of each is kept."""

    def __init__(self, store: EventStore, rate: float, start: float) -> None:
        self.store = store
        self.period = 1.0 / rate
        self.next_at = start
        self.model = VehicleModel(random.Random(11))
        self.seqs = dict.fromkeys(FAMILIES, 0)
        self.stored: dict[tuple[str, int], float] = {}
        self.n = 0

    def append_due(self, now: float) -> None:
        while self.next_at <= now:
            family = FAMILIES[self.n % len(FAMILIES)]
            self.model.step(self.period)
            self.seqs[family] += 1
            stream, seq = f"{LIVE_PREFIX}{family}0", self.seqs[family]
            self.store.append([_arrival(stream, seq, time.time(), self.model.sample(family))])
            self.stored[stream, seq] = time.monotonic()
            self.n += 1
            self.next_at += self.period


def _priority(stream: str) -> int:
    """As the simulator sets it (firmware_bridge/simdevice.py): the family's index."""
    return FAMILIES.index(stream.split("/", 1)[1].rstrip("0123456789"))


def _arrival(stream: str, seq: int, ts: float, signals: dict[str, Any]) -> Arrival:
    payload = msgpack.packb(signals)
    return Arrival(Event(stream, seq, boot_epoch=1, ts=ts, priority=_priority(stream),
                         payload=payload))  # fmt: skip


def fill_vehicle(tmp: Path, n: int) -> tuple[Path, float]:
    """A store of `n` events of one drive (16 streams), built on first use; (path, s)."""
    path = tmp / f"scarce-{n}.db"
    if path.exists():
        return path, 0.0
    t0 = time.perf_counter()
    events = drive(n, seed=7, per_family=PER_FAMILY)
    store = EventStore(
        path, StoreSection(synchronous="OFF", min_free_bytes=0, max_buffer_bytes=BUFFER_BYTES)
    )
    for first in range(0, n, 20_000):
        store.append(
            [_arrival(s, q, ts, signals) for s, q, ts, signals in events[first : first + 20_000]]
        )
    assert store.event_count == n
    store.close()
    return path, time.perf_counter() - t0


def backlog_bytes(db: Path, n: int, codec: str, vehicle: str) -> tuple[float, float]:
    """Payload bytes of the whole backlog sent oldest first (arrival order) and as the
    agent sends it (each priority class oldest first), estimated from samples."""
    conn = connect(db, readonly=True)
    try:
        counts = conn.execute("SELECT priority, count(*) FROM events GROUP BY priority")
        by_class = sum(k * _bytes_per_event(conn, n, codec, vehicle, p) for p, k in counts)
        return n * _bytes_per_event(conn, n, codec, vehicle, None), by_class
    finally:
        conn.close()


def _bytes_per_event(
    conn: sqlite3.Connection, n: int, codec: str, vehicle: str, priority: int | None
) -> float:
    """Payload bytes per event of SAMPLE_WINDOWS windows of rows (of one priority, or all)
    spread over the backlog, cut as agent/resync.py `Resync._batch` cuts them (at most
    batch_max_events rows, about a second's worth of the budget before compression)."""
    defaults = UplinkSection()
    cap = min(defaults.batch_max_bytes, max(1024, BUDGET))
    batch_id = (2**30 << 32) | 1  # the size of a real one: run id << 32 | number
    windows = max(1, min(SAMPLE_WINDOWS, n // SAMPLE_ROWS))
    where = "" if priority is None else f"AND e.priority = {int(priority)}"
    total_bytes = total_events = 0
    for w in range(windows):
        rows = conn.execute(
            f"""SELECT s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind, e.priority,
                       e.payload
                FROM events AS e JOIN streams AS s ON s.id = e.stream_id
                WHERE e.id > ? {where} ORDER BY e.id LIMIT ?""",
            (w * n // windows, SAMPLE_ROWS),
        ).fetchall()
        batches: list[list[tuple[Event, int]]] = [[]]
        size = 0
        for name, epoch, seq, ts, tq, kind, prio, payload in rows:
            size += len(payload) + len(name) + len(kind) + 40
            if batches[-1] and (size > cap or len(batches[-1]) >= defaults.batch_max_events):
                batches.append([])
                size = len(payload) + len(name) + len(kind) + 40
            event = Event.trusted(name, seq, epoch, ts, kind, prio, bytes(payload))
            batches[-1].append((event, tq))
        for events in batches:
            if events:
                batch = Batch(vehicle, batch_id, "events", True, tuple(events))
                total_bytes += len(batch.encode(codec=codec))
                total_events += len(events)
    return total_bytes / total_events


def _framing(vehicle: str, kind: str, payload: int) -> int:
    """Bytes of an MQTT 3.1.1 QoS 1 PUBLISH besides its payload (no TCP/IP)."""
    remaining = 2 + len(topic(vehicle, kind).encode()) + 2 + payload
    length_bytes = 1 + (remaining >= 128) + (remaining >= 2**14) + (remaining >= 2**21)
    return 1 + length_bytes + remaining - payload


def scarce_run(
    args: argparse.Namespace, broker: Broker, *, src: Path, codec: str, work: Path
) -> ScarceRun:
    """One codec: connect with the backlog stored, live traffic for args.scarce_seconds."""
    vehicle = f"scarce-{codec}"
    db = copy_store(src, work / "agent.db")
    coll = ScarceCollector(work, broker.port, vehicle)
    try:
        section = section_for(broker.port, 500, codec=codec, max_bytes_per_second=BUDGET,
                              batch_max_delay_ms=BATCH_DELAY_MS)  # fmt: skip
        agent = AgentLoop(db, vehicle, section)
        log = PublishLog(agent.transport)
        agent.stamped = log
        agent.sync.transport = log
        t0 = time.monotonic()
        agent.run_until(lambda: agent.connected_at is not None, 30.0)
        start = agent.connected_at or t0
        live = LiveSource(agent.store, args.scarce_live_rate, start)
        end = start + args.scarce_seconds
        while (now := time.monotonic()) < end:
            live.append_due(now)
            agent.step()
        end = time.monotonic()
        deadline = end + DRAIN_OUT
        next_look = 0.0
        while time.monotonic() < deadline:  # the last live events still on their way
            if time.monotonic() >= next_look:
                if coll.live_committed() >= live.n:
                    break
                next_look = time.monotonic() + 0.25
            agent.step()
        counters = agent.resync.counters
        agent.close()
        rec = coll.finish()
    finally:
        coll.kill()
    return _report(codec=codec, vehicle=vehicle, t0=t0, start=start, end=end, live=live,
                   sent=log.sent, rec=rec, counters=counters)  # fmt: skip


def _report(
    *,
    codec: str,
    vehicle: str,
    t0: float,
    start: float,
    end: float,
    live: LiveSource,
    sent: list[tuple[float, str, bytes]],
    rec: dict[str, Any],
    counters: ResyncCounters,
) -> ScarceRun:
    committed = {(s, q): t for s, q, t in rec["live"]}
    published: dict[tuple[str, int], float] = {}
    lanes = dict.fromkeys(("state", "live", "backlog"), 0)
    framing = backlog_sent = steady = 0
    times = [start]
    for at, kind, payload in sent:
        batch = Batch.decode(payload)
        for e, _ in batch.events:
            if e.stream.startswith(LIVE_PREFIX):
                published.setdefault((e.stream, e.seq), at)
        if not start <= at <= end:
            continue
        lane = "state" if kind == "state" else "backlog" if batch.historical else "live"
        lanes[lane] += len(payload)
        steady += len(payload) if at >= start + 1.0 else 0
        backlog_sent += len(batch.events) if lane == "backlog" else 0
        framing += _framing(vehicle, kind, len(payload))
        times.append(at)
    times.append(end)
    latency, agent_wait, wire_wait = [], [], []
    worst = ("-", 0.0, 0.0)
    for key, stored in live.stored.items():
        if key not in committed:
            continue
        lat = committed[key] - stored
        latency.append(lat)
        if key in published:
            agent_wait.append(published[key] - stored)
            wire_wait.append(committed[key] - published[key])
        if lat > worst[2]:
            worst = (f"{key[0]} #{key[1]}", stored - start, lat)
    backlog_events = sum(k for t, k in rec["backlog"] if start <= t <= end)
    backlog_total = sum(k for _, k in rec["backlog"])
    run = ScarceRun(
        codec=codec, seconds=end - start, connect_s=start - t0, live_stored=live.n,
        latency=latency, agent_wait=agent_wait, wire_wait=wire_wait, worst=worst,
        published=sum(lanes.values()), lane_bytes=lanes, framing=framing,
        publishes=len(times) - 2, longest_gap=max(b - a for a, b in pairwise(times)),
        backlog_events=backlog_events, backlog_sent=backlog_sent, backlog_total=backlog_total,
        duplicates=rec["duplicates"], ack_timeouts=counters.ack_timeouts,
        acks_stale=counters.acks_stale, load=os.getloadavg(), steady=steady,
    )  # fmt: skip
    if rec["bad_messages"] or rec["commit_failures"]:
        run.notes.append(f"collector: {rec['bad_messages']} bad messages, "
                         f"{rec['commit_failures']} commit failures")  # fmt: skip
    return run


def _pct(xs: Sequence[float], p: float) -> float:
    """The nearest-rank percentile `p` of `xs` (nan if empty)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def _dur(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _three(xs: Sequence[float]) -> str:
    return f"p50 {_pct(xs, 50):.3f} s, p99 {_pct(xs, 99):.3f} s, max {max(xs, default=0):.3f} s"


def section_scarce(args: argparse.Namespace, broker: Broker, tmp: Path) -> None:
    n = args.scarce_backlog
    print("== 5. Live events on a scarce link (64 kbit/s) behind a backlog ==")
    load = os.getloadavg()
    src, fill_s = fill_vehicle(tmp, n)
    print(f"backlog: {n:,} events of the vehicle profile ({4 * PER_FAMILY} streams: position "
          f"and speed 10 Hz, engine 5 Hz, status 1 Hz; priority by family, status highest), "
          f"pre-filled in {fill_s:.1f} s; live: {args.scarce_live_rate:g} events/s on "
          f"{len(FAMILIES)} streams {LIVE_PREFIX}<family>0 for {args.scarce_seconds:g} s from "
          f"the CONNACK; max_bytes_per_second {BUDGET} ({BUDGET * 8 // 1000} kbit/s), "
          f"batch_max_delay_ms {BATCH_DELAY_MS:g}; latency: the live event's store commit "
          f"(agent) -> its commit by the collector process (CLOCK_MONOTONIC); load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    runs = []
    for codec in CODECS:
        run = scarce_run(args, broker, src=src, codec=codec, work=tmp / f"scarce-{codec}")
        run.arrival_bytes, run.agent_bytes = backlog_bytes(src, n, codec, f"scarce-{codec}")
        runs.append(run)
        _print_run(run, n)
    print(f"{'codec':<9} {'live p50':>9} {'p99':>8} {'max':>8} {'B/s after 1 s':>15} "
          f"{'backlog in window':>18} {'drain whole backlog':>20} "
          f"{'before: live waited':>20}")  # fmt: skip
    for r in runs:
        drain, before = r.drain_s, r.arrival_bytes / BUDGET
        steady = r.steady / (r.seconds - 1.0)
        print(f"{r.codec:<9} {_pct(r.latency, 50):>7.3f} s {_pct(r.latency, 99):>6.3f} s "
              f"{max(r.latency, default=0):>6.3f} s {steady:>7,.0f} ({steady / BUDGET:.2f}x) "
              f"{r.backlog_events:>18,} {_dur(drain):>20} {_dur(before):>20}")  # fmt: skip
    met = [r.codec for r in runs if _pct(r.latency, 99) <= TARGET_P99]
    print(f"target: live p99 <= {TARGET_P99:g} s at 64 kbit/s with a 1,000,000 backlog; met "
          f"by: {', '.join(met) or 'none'}" + ("" if n >= 1_000_000 else
          f" (this run's backlog: {n:,})"))  # fmt: skip
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()


def _print_run(r: ScarceRun, n: int) -> None:
    missing = r.live_stored - len(r.latency)
    print(f"{r.codec}: CONNACK {r.connect_s * 1000:.0f} ms after the first step; "
          f"{r.live_stored:,} live events in {r.seconds:.1f} s, {len(r.latency):,} committed "
          f"by the collector" + (f", {missing} NOT within {DRAIN_OUT:g} s after" if missing
          else ""))  # fmt: skip
    print(f"  live latency {_three(r.latency)}; worst {r.worst[0]} stored at "
          f"+{r.worst[1]:.1f} s: {r.worst[2]:.3f} s")  # fmt: skip
    print(f"    in the agent (store commit -> publish) {_three(r.agent_wait)}")
    print(f"    publish -> collector commit {_three(r.wire_wait)}")
    lanes = ", ".join(f"{k} {v / r.seconds:,.0f}" for k, v in r.lane_bytes.items())
    print(f"  published {r.rate:,.0f} B/s of payload ({r.rate / BUDGET:.2f}x the budget; "
          f"{lanes}) in {r.publishes:,} messages, +{r.framing / r.seconds:,.0f} B/s of MQTT "
          f"PUBLISH headers (topic, id; no TCP/IP); longest spell without a publish "
          f"{r.longest_gap:.2f} s")  # fmt: skip
    rate = r.backlog_events / r.seconds
    per_event = r.lane_bytes["backlog"] / r.backlog_sent if r.backlog_sent else math.nan
    steady = r.steady / (r.seconds - 1.0)
    print(f"    after the first second (the bucket's burst spent): {steady:,.0f} B/s "
          f"({steady / BUDGET:.2f}x)")  # fmt: skip
    print(f"  backlog: {r.backlog_events:,} events committed by the collector in the window "
          f"({rate:,.1f}/s, {per_event:.1f} B/event on the wire, highest priority first), "
          f"{r.backlog_total:,} by the end (new rows; the replay's 16 come again as "
          f"duplicates)")  # fmt: skip
    windows = max(1, min(SAMPLE_WINDOWS, n // SAMPLE_ROWS))
    print(f"    the whole backlog, estimated from {windows} windows of {SAMPLE_ROWS:,} rows (per "
          f"priority class, and in arrival order) cut into batches by Resync's rule: "
          f"{r.agent_bytes / 1e6:.2f} MB by priority "
          f"({r.agent_bytes / n:.1f} B/event), {r.arrival_bytes / 1e6:.2f} MB in arrival order "
          f"({r.arrival_bytes / n:.1f} B/event)")  # fmt: skip
    print(f"    drain estimate at the window's backlog {r.backlog_bps:,.0f} B/s: "
          f"{_dur(r.drain_s)} (at its {rate:,.1f} events/s: "
          f"{_dur(n / rate) if rate else 'never'})")  # fmt: skip
    print(f"    before (arrival order, no live lane): a live event stored at the CONNACK waits "
          f"{_dur(r.arrival_bytes / BUDGET)} behind the backlog at {BUDGET:,} B/s")  # fmt: skip
    print(
        f"  collector duplicates {r.duplicates}, ack timeouts {r.ack_timeouts}, stale acks "
        f"{r.acks_stale}; load average {r.load[0]:.2f}" + "".join(f"; {x}" for x in r.notes)
    )


# -- the collector child ------------------------------------------------------------------


class ScarceCollector:
    """Starts the collector child (`python uplink_scarce.py _collector`) and reads it."""

    def __init__(self, workdir: Path, port: int, vehicle: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.db = workdir / f"collector-{vehicle}.db"
        self.out = workdir / "collector.json"
        self.vehicle = vehicle
        self.log = workdir / "collector.log"
        cmd = [sys.executable, THIS, "_collector", "--port", str(port), "--db", str(self.db),
               "--vehicle", vehicle, "--out", str(self.out)]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        ready = Path(str(self.out) + ".ready")
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"collector did not subscribe: {self.log.read_text()}")
            time.sleep(0.01)
        self._conn: sqlite3.Connection | None = None

    def live_committed(self) -> int:
        """Live events in the collector's database (read-only, alongside its writes)."""
        if self._conn is None:
            self._conn = sqlite3.connect(self.db.absolute().as_uri() + "?mode=ro", uri=True)
        row = self._conn.execute(
            "SELECT count(*) FROM events WHERE vehicle = ? AND stream >= ? AND stream < ?",
            (self.vehicle, LIVE_PREFIX, LIVE_PREFIX[:-1] + chr(ord(LIVE_PREFIX[-1]) + 1)),
        ).fetchone()
        return int(row[0])

    def finish(self) -> dict[str, Any]:
        if self._conn is not None:
            self._conn.close()
        code = stop_process(self.proc)
        if code != 0 or not self.out.exists():
            raise RuntimeError(f"collector exited {code}: {self.log.read_text()}")
        rec: dict[str, Any] = json.loads(self.out.read_text())
        return rec

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class StampingStore(CollectorStore):
    """The collector's store, stamping (CLOCK_MONOTONIC) each commit as it returns."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.live: dict[tuple[str, int], float] = {}  # first commit of each live event
        self.backlog: list[tuple[float, int]] = []  # (commit, events stored) per batch

    def ingest(self, batch: Batch, now: float | None = None) -> tuple[int, int]:
        stored, dups = super().ingest(batch, now)
        at = time.monotonic()
        for e, _ in batch.events:
            if e.stream.startswith(LIVE_PREFIX):
                self.live.setdefault((e.stream, e.seq), at)
        if batch.historical:
            self.backlog.append((at, stored))
        return stored, dups


def collector_child(argv: Sequence[str]) -> int:
    """`uplink_scarce.py _collector ...`: the reference collector (CollectorStore +
    Collector + FleetSubscriber, as `ironfleet-collector run`), its commits stamped;
    writes them as JSON to `--out` on SIGTERM."""
    p = argparse.ArgumentParser(prog="uplink_scarce.py _collector")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--vehicle", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    store = StampingStore(args.db)
    collector = Collector(store)
    subscribed = threading.Event()
    sub = FleetSubscriber("127.0.0.1", args.port, collector.handle,
                          client_id=f"bench-collector-{args.vehicle}",
                          vehicles=(args.vehicle,))  # fmt: skip
    sub.client.on_subscribe = lambda *_: subscribed.set()
    collector.transport = sub
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    sub.start()
    if not subscribed.wait(10):
        return 1
    Path(args.out + ".ready").write_text("ready\n")
    while not stop.wait(0.05):
        pass
    sub.stop()
    with store.lock:
        row = store.conn.execute(
            "SELECT duplicates FROM vehicles WHERE vehicle = ?", (args.vehicle,)
        ).fetchone()
        live = [[s, q, t] for (s, q), t in store.live.items()]
    rec = {"live": live, "backlog": store.backlog, "duplicates": int(row[0]) if row else 0,
           "bad_messages": collector.bad_messages,
           "commit_failures": collector.commit_failures}  # fmt: skip
    Path(args.out).write_text(json.dumps(rec))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_collector"]:
        raise SystemExit(collector_child(sys.argv[2:]))
    raise SystemExit("usage: run bench_uplink.py --sections 5 (this file is its section 5)")
