"""Helpers for the uplink tests: the reference collector in-process, the fleet-side
oracle, a sampler of checkpoints and resources, drain waits, and `ironfleet-collector` run
to its end (the export tests).

Shared by tests/agent/test_uplink.py and tests/chaos/test_uplink_faults.py. It lives at
the top of tests/ because tests/agent/ is named like the `agent` package, so modules in
it cannot be imported by other test modules.

Oracle numbering follows the chaos suite:
- O4: every event at or below the agent's delivery cursor is at the collector (the
  collector commits before it acks, so this holds at *any* moment, not only at the end),
  and, once drained, the collector's converged state per stream equals
  `agent.resilience.replay` of the ground truth;
- O5: the cursor and the per-stream checkpoints never move backwards (sampled throughout);
- O7: once the faults heal the backlog drains and the breaker closes;
- O8: agent RSS and database + WAL size stay under stated bounds (peaks sampled).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent import livestate
from agent.fleet import Batch
from agent.resilience import Event, replay
from agent.store import read_latest
from fleet.collector import Collector, CollectorStore
from fleet.subscriber import FleetSubscriber

from simharness import AgentProcess, Key, Sim, TruthReader, agent_state, live, stored_events
from support import fleet_signer, wait_for

COLLECTOR = str(Path(sys.executable).with_name("ironfleet-collector"))


def run_collector(*args: str) -> subprocess.CompletedProcess[str]:
    """`ironfleet-collector ARGS` to its end (at most 60 s), output captured as text."""
    return subprocess.run([COLLECTOR, *args], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]
VEHICLE = "test-vehicle"
SAMPLE_INTERVAL = 0.1  # seconds between FleetWatch samples (a checkpoint write is ~ms)


class CollectorHarness:
    """The reference collector in-process, recording what arrived in which order.

    `pause()` disconnects it cleanly (its persistent session stays in the broker, which
    queues the agent's batches for it); `resume()` connects again with the same client id.
    It signs its acks and commands with the test fleet key (support.fleet_keys), which the
    agents started by simharness verify.
    """

    def __init__(self, db: Path, port: int) -> None:
        self.port = port
        self.store = CollectorStore(db)
        self.collector = Collector(self.store, signer=fleet_signer())
        self.arrivals: list[tuple[str, bool, int]] = []  # (kind, historical, events)
        self.snapshots: list[dict[str, tuple[int, int]]] = []
        self.lock = threading.Lock()
        self.sub = self._subscriber()

    def _subscriber(self) -> FleetSubscriber:
        sub = FleetSubscriber("127.0.0.1", self.port, self._handle, client_id="test-collector",
                              on_session_lost=self.collector.session_lost)  # fmt: skip
        self.collector.transport = sub
        sub.start()
        return sub

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic.endswith(("/events", "/state")):
            batch = Batch.decode(payload)
            with self.lock:
                if batch.kind == "events" and batch.historical:
                    # What the fleet shows at the moment the first backlog event arrives.
                    state = self.store.state(VEHICLE)
                    self.snapshots.append({s: (e, q) for s, (e, q, _) in state.items()})
                self.arrivals.append((batch.kind, batch.historical, len(batch.events)))
        self.collector.handle(topic, payload)

    def keys(self) -> set[tuple[str, int, int]]:
        return self.store.keys(VEHICLE)

    def pause(self) -> None:
        self.sub.stop()

    def resume(self) -> None:
        self.sub = self._subscriber()

    def stop(self) -> None:
        self.sub.stop()


def uplink(port: int, **extra: object) -> dict[str, object]:
    """An [uplink] section with timers short enough for tests."""
    fast = {"keepalive": 5, "ack_timeout": 5.0, "breaker_failure_threshold": 3,
            "breaker_recovery_timeout": 1.0, "reconnect_min": 0.1, "reconnect_max": 1.0,
            "batch_max_delay_ms": 20.0}  # fmt: skip
    return {"enabled": True, "port": port, **fast, **extra}


def check_zero_loss(truth: TruthReader, harness: CollectorHarness, agent: AgentProcess) -> None:
    """O4: every ACKed event reached the collector once, and the fleet's converged state
    equals the vehicle's own replay (run after the agent stopped and the backlog drained).
    """
    truth.poll()
    keys = harness.keys()
    missing = [k for k in truth.acked if k not in keys]
    assert not missing, f"{len(missing)} ACKed events never reached the collector: {missing[:3]}"
    conn = sqlite3.connect(agent.db.absolute().as_uri() + "?mode=ro", uri=True)
    local = {e.stream: (e.boot_epoch, e.seq, e.payload) for _, e, _, _ in read_latest(conn)}
    conn.close()
    assert harness.store.state(VEHICLE) == local
    acked = [
        Event(s, q, boot_epoch=e, payload=bytes.fromhex(p)) for (s, e, q), p in truth.acked.items()
    ]
    for event in replay(acked):  # and never behind what the controller saw ACKed
        assert local[event.stream][:2] >= (event.boot_epoch, event.seq)


def read_cursor_ro(db: Path) -> int:
    """The agent's persisted delivery cursor (lowest rowid not acknowledged), read-only."""
    value = agent_state(db).get("uplink.cursor") if db.exists() else None
    return int(value) if value is not None else 1


def top_rowid(db: Path) -> int:
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])
    finally:
        conn.close()


def wait_drained(agent: AgentProcess, timeout: float) -> None:
    """Wait until the fleet has acknowledged every event the agent stored."""
    wait_for(
        lambda: read_cursor_ro(agent.db) > top_rowid(agent.db), timeout, "the backlog to drain"
    )


def wait_caught_up(agent: AgentProcess, rowid: int, timeout: float) -> float:
    """Wait until the fleet has acknowledged every row up to `rowid`; seconds it took."""
    start = time.monotonic()
    wait_for(lambda: read_cursor_ro(agent.db) > rowid, timeout, f"delivery up to row {rowid}")
    return time.monotonic() - start


def cursor_history(agent: AgentProcess, samples: list[int]) -> None:
    if agent.db.exists():
        try:
            value = agent_state(agent.db).get("uplink.cursor")
        except sqlite3.Error:
            return
        if value is not None:
            samples.append(int(value))


@dataclass
class FleetVerdict:
    """The fleet-side oracle (O4) as figures, so that a control can assert it fails."""

    cursor: int
    below_cursor: int  # agent events the fleet acknowledged (rowid < cursor)
    missing_below_cursor: list[Key]  # ... that the collector does not hold (O4)
    missing_acked: list[Key]  # ACKed to the controller, never reached the collector
    state_diff: dict[str, tuple[object, object]]  # stream -> (collector, replay of truth)

    @property
    def ok(self) -> bool:
        return not (self.missing_below_cursor or self.missing_acked or self.state_diff)

    def describe(self) -> str:
        return (
            f"cursor={self.cursor} below_cursor={self.below_cursor} "
            f"missing_below_cursor={len(self.missing_below_cursor)} "
            f"e.g. {self.missing_below_cursor[:3]} missing_acked={len(self.missing_acked)} "
            f"e.g. {self.missing_acked[:3]} state_diff={dict(list(self.state_diff.items())[:3])}"
        )


def agent_rows_below(db: Path, cursor: int) -> list[Key]:
    """Keys of the agent's events with rowid < `cursor` (what the fleet acknowledged)."""
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT s.name, e.boot_epoch, e.seq FROM events e JOIN streams s "
            "ON s.id = e.stream_id WHERE e.id < ?",
            (cursor,),
        ).fetchall()
    finally:
        conn.close()
    return [(s, e, q) for s, e, q in rows]


def checkpoint_covered(harness: CollectorHarness, agent: AgentProcess) -> list[Key]:
    """O4 at this moment: agent events below the cursor the collector does not hold.

    The cursor is read before the collector's keys: the collector only ever gains keys,
    and it commits before it acks, so any miss is an event counted delivered early.
    """
    cursor = read_cursor_ro(agent.db)
    below = agent_rows_below(agent.db, cursor)
    keys = harness.keys()
    return [k for k in below if k not in keys]


def fleet_verdict(
    truth: TruthReader, harness: CollectorHarness, agent: AgentProcess
) -> FleetVerdict:
    """O4 after the drain: checkpoint coverage, ACKed events delivered, state converged to
    `replay` of the ground truth (every event the controller saw ACKed, plus any event it
    sent that the agent stored without the controller seeing the ACK)."""
    truth.poll()
    cursor = read_cursor_ro(agent.db)
    below = agent_rows_below(agent.db, cursor)
    keys = harness.keys()
    stored = stored_events(agent.db)
    ground = dict(truth.acked)
    ground.update({k: p for k, p in truth.sent.items() if k in stored})
    expected = {
        e.stream: (e.boot_epoch, e.seq, e.payload)
        for e in replay(
            Event(s, q, boot_epoch=e, payload=bytes.fromhex(p)) for (s, e, q), p in ground.items()
        )
    }
    state = harness.store.state(VEHICLE)
    diff = {
        s: (state.get(s), expected.get(s))
        for s in set(state) | set(expected)
        if state.get(s) != expected.get(s)
    }
    return FleetVerdict(
        cursor=cursor,
        below_cursor=len(below),
        missing_below_cursor=[k for k in below if k not in keys],
        missing_acked=[k for k in truth.acked if k not in keys],
        state_diff=diff,
    )


@dataclass
class FleetWatch:
    """Samples the running agent in a thread: checkpoints (O5), breaker, RSS and disk (O8).

    Each sample is one short read-only transaction (the CLI's way), so it never holds the
    WAL back. `stop()` returns after the thread has finished.
    """

    agent: AgentProcess
    interval: float = SAMPLE_INTERVAL
    cursors: list[int] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    breaker_seen: dict[str, int] = field(default_factory=dict)  # state -> samples
    rss_peak: int = 0
    disk_peak: int = 0  # database + WAL bytes
    samples: int = 0

    def __post_init__(self) -> None:
        self._checkpoints: dict[int, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-watch", daemon=True)

    def start(self) -> FleetWatch:
        self._thread.start()
        return self

    def stop(self) -> FleetWatch:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()  # the final values, after the thread
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        db = self.agent.db
        if not db.exists():
            return
        try:
            conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True, timeout=1)
            try:
                conn.execute("BEGIN")
                state = dict(conn.execute("SELECT key, value FROM agent_state").fetchall())
                breaker = livestate.read(conn).breaker.state
                checkpoints = conn.execute(
                    "SELECT stream_id, boot_epoch, seq FROM checkpoints"
                ).fetchall()
                conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error:
            return  # the schema is not there yet, or a start-up recovery holds it
        self.samples += 1
        if "uplink.cursor" in state:
            cursor = int(state["uplink.cursor"])
            if self.cursors and cursor < self.cursors[-1]:
                self.regressions.append(f"cursor {self.cursors[-1]} -> {cursor}")
            self.cursors.append(cursor)
        for sid, epoch, seq in checkpoints:
            before = self._checkpoints.get(sid)
            if before is not None and (epoch, seq) < before:
                self.regressions.append(f"stream {sid} checkpoint {before} -> {(epoch, seq)}")
            self._checkpoints[sid] = (epoch, seq)
        self.breaker_seen[breaker] = self.breaker_seen.get(breaker, 0) + 1
        disk = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
        self.disk_peak = max(self.disk_peak, disk)
        if self.agent.alive():
            try:
                rss = psutil.Process(self.agent.agent_pid()).memory_info().rss
            except (psutil.Error, OSError, ValueError):
                return
            self.rss_peak = max(self.rss_peak, rss)


def breaker_state(agent: AgentProcess) -> str:
    return live(agent.db).breaker.state


def wait_breaker_closed(agent: AgentProcess, timeout: float) -> None:
    """O7: the breaker is closed again (published by the agent once a second)."""
    wait_for(lambda: breaker_state(agent) == "closed", timeout, "the breaker to close")
