"""Deterministic simulation of the whole core, single-threaded, under every fault at once.

Controller -> serial bytes -> agent link -> store (a real SQLite file) -> resync ->
broker -> collector -> acks, all stepped on one fake clock by a hypothesis state machine
whose rules inject the faults: corrupt bytes, agent crash (SIGKILL: nothing in memory
survives, the file does), controller reboot, link down and up, broker restart (messages
in flight lost), acks duplicated and reordered, the disk filling up (SQLite refuses to
grow the file) and freed, wall-clock jumps, technician queries.
The invariants are the chaos oracle; a failure prints the example (and with
`print_blob` a blob that replays it exactly).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from agent.config import UplinkSection
from agent.errors import StoreError
from agent.fleet_auth import FleetAuth
from agent.fleetsync import FleetSync
from agent.resilience import Backoff, CircuitBreaker, replay
from agent.resync import Resync
from agent.store import EventStore, connect, read_latest
from firmware_bridge.controller import ControllerLink
from firmware_bridge.link import AgentLink, Received
from firmware_bridge.protocol import EventBody, TimeQuality
from fleet.collector import Collector, CollectorStore

from support import fleet_signer

Key = tuple[str, int, int]
VEHICLE = "sim-vehicle"
TOTALS: Counter[str] = Counter()  # faults injected over every example, for the summary


@dataclass
class Broker:
    """The network between agent and collector: queues that faults can drop or shuffle."""

    up: bool = True
    to_collector: list[tuple[str, bytes]] = field(default_factory=list)
    to_agent: list[tuple[str, object]] = field(default_factory=list)


@dataclass
class LoopTransport:
    """FleetSync's transport over the simulated broker."""

    broker: Broker
    connected: bool = False
    _events: list[tuple[str, object]] = field(default_factory=list)
    _mid: int = 0
    address: str = "simulated:1883"
    connect_error: str = ""

    def connect(self) -> bool:
        if not self.broker.up:
            self.connect_error = f"{self.address}: broker down"
            return False
        self.connected = True
        self._events.append(("connected", None))
        return True

    def poll(self, timeout: float) -> list[tuple[str, object]]:
        if self.connected and not self.broker.up:
            self.connected = False
            self._events.append(("disconnected", "broker down"))
        if self.connected:
            self._events += self.broker.to_agent
            self.broker.to_agent = []
        out, self._events = self._events, []
        return out

    def publish(self, kind: str, payload: bytes) -> int | None:
        if not self.connected:
            return None
        self._mid += 1
        self.broker.to_collector.append((f"ironfleet/v1/{VEHICLE}/{kind}", payload))
        self._events.append(("puback", self._mid))
        return self._mid

    def publish_status(self, state: str, **fields: object) -> None:
        pass

    def drop(self) -> None:
        self.connected = False
        self._events.append(("disconnected", "dropped"))


class AckSink:
    """What the collector answers through: acks go back into the simulated broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def ack(self, vehicle: str, payload: bytes) -> None:
        self.broker.to_agent.append(("ack", payload))


class DiskFullConnection:
    """The store's real SQLite connection, on a disk that can fill up.

    While the simulation's disk is full, COMMIT fails with SQLITE_FULL, as it does when
    the WAL cannot be written: the transaction is left open for the store to roll back.
    (The real file system filling up is tests/chaos/test_disk_faults.py.)
    """

    def __init__(self, conn: sqlite3.Connection, sim: CoreSimulation) -> None:
        self._conn = conn
        self._sim = sim

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if self._sim.disk_is_full and sql.lstrip().upper().startswith("COMMIT"):
            self._sim.failed_commits += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)


class CoreSimulation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ironfleet-sim-"))
        self.db = self.dir / "agent.db"
        self.now = 1000.0
        self.wall = 1_764_000_000.0
        self.rng = random.Random(0)
        self.epoch = 1
        self.sent: dict[Key, bytes] = {}
        self.acked: dict[Key, bytes] = {}
        self.seqs: dict[str, int] = {}
        self.corrupt_next = False
        self.pending: list[Received] = []
        self.autocommit = True
        self.cursors: list[int] = []
        self.disk_is_full = False
        self.failed_commits = 0
        self.unsaved_checkpoint: tuple[int, dict[str, tuple[int, int]], tuple[int, ...]] | None = (
            None
        )
        self.broker = Broker()
        self.signer = fleet_signer()  # acks signed as in production
        self.collector = Collector(CollectorStore(":memory:"), AckSink(self.broker), self.signer)
        self.ctl = self._controller()
        self._start_agent()

    # -- plumbing ----------------------------------------------------------------------------

    def _controller(self) -> ControllerLink:
        def on_ack(body: EventBody, _now: float) -> None:
            key = (body.stream, self.epoch, body.seq)
            self.acked[key] = self.sent[key]

        return ControllerLink("ecu0", "fw", self.epoch, window=16, retransmit_timeout=0.3,
                              heartbeat_interval=0.5, on_ack=on_ack)  # fmt: skip

    def _start_agent(self) -> None:
        self.store = EventStore(self.db)
        self.store.conn = DiskFullConnection(self.store.conn, self)  # type: ignore[assignment]
        self.link = AgentLink(session=self.rng.randrange(1, 2**31), heartbeat_interval=0.5)
        self.link.start(self.now)
        self.reader = connect(self.db, readonly=True)
        config = UplinkSection(batch_max_events=7, batch_max_delay_ms=0.0, max_in_flight=3,
                               ack_timeout=2.0)  # fmt: skip
        self.resync = Resync(self.reader, VEHICLE, config, self._deliver,
                             run_id=self.rng.randrange(1, 2**31))  # fmt: skip
        self.breaker = CircuitBreaker(3, 1.0, clock=lambda: self.now)
        self.transport = LoopTransport(self.broker)
        self.sync = FleetSync(self.transport, self.resync, self.breaker,
                              Backoff(0.05, 0.5, rng=random.Random(1)),
                              auth=FleetAuth(VEHICLE, self.signer.key.public_key()))  # fmt: skip

    def _deliver(
        self, upto: int, positions: dict[str, tuple[int, int]], frontiers: tuple[int, ...]
    ) -> None:
        # As the daemon's writer: a checkpoint that cannot be saved is retried later.
        try:
            self.store.mark_delivered(upto, positions, frontiers=frontiers)
        except StoreError:
            self.unsaved_checkpoint = (upto, positions, frontiers)
            return
        self.unsaved_checkpoint = None
        self.cursors.append(self.store.cursor)

    def _step(self, dt: float) -> None:
        self.now += dt
        self.ctl.poll(self.now)
        data = self.ctl.outgoing()
        if self.corrupt_next and data:
            self.corrupt_next = False
            damaged = bytearray(data)
            damaged[self.rng.randrange(len(damaged))] ^= 1 << self.rng.randrange(8)
            data = bytes(damaged)
        # Received events wait for a `commit` step, so a crash can fall between the two.
        self.pending += self.link.receive(data, self.now)
        if self.autocommit:
            self.commit()
        self.link.poll(self.now)
        self.ctl.receive(self.link.outgoing(), self.now)
        self.sync.run_once(self.now, timeout=0)
        if self.unsaved_checkpoint is not None:
            self._deliver(*self.unsaved_checkpoint)

    @rule()
    def commit(self) -> None:
        """The writer's group commit: store what was received, then let the link ACK it;
        a failed commit is never ACKed (the controller keeps the events and resends)."""
        if self.pending:
            tokens = [r.token for r in self.pending]
            try:
                self.store.append(self.pending, now=self.wall)
            except StoreError:
                self.link.forget(tokens)
            else:
                self.link.durable(tokens, self.now)
            self.pending = []

    @rule()
    def disk_full(self) -> None:
        TOTALS["disk_full"] += 1
        self.disk_is_full = True

    @rule()
    def disk_freed(self) -> None:
        self.disk_is_full = False

    @rule(on=st.booleans())
    def set_autocommit(self, on: bool) -> None:
        self.autocommit = on

    def _stored(self) -> dict[Key, list[bytes]]:
        out: dict[Key, list[bytes]] = {}
        for s in self.store.iter_events():
            key = (s.event.stream, s.event.boot_epoch, s.event.seq)
            out.setdefault(key, []).append(s.event.payload)
        return out

    # -- rules ---------------------------------------------------------------------------------

    @rule(count=st.integers(1, 12), streams=st.integers(1, 4))
    def produce(self, count: int, streams: int) -> None:
        for i in range(count):
            stream = f"ecu0/s{i % streams}"
            seq = self.seqs.get(stream, 0) + 1
            body = EventBody(stream, seq, self.wall, TimeQuality.SYNCED, "telemetry", i % 3,
                             {"v": len(self.sent), "r": self.rng.random()})  # fmt: skip
            if not self.ctl.offer(body):
                return
            self.seqs[stream] = seq
            self.sent[(stream, self.epoch, seq)] = msgpack.packb(body.signals, use_bin_type=True)

    @rule(steps=st.integers(1, 20), dt=st.sampled_from([0.001, 0.02, 0.1, 0.6]))
    def run(self, steps: int, dt: float) -> None:
        for _ in range(steps):
            self._step(dt)

    @rule()
    def corrupt_bytes(self) -> None:
        TOTALS["corrupt_bytes"] += 1
        self.corrupt_next = True

    @rule()
    def crash_agent(self) -> None:
        TOTALS["crash_agent"] += 1
        # SIGKILL: nothing in memory survives (received, uncommitted events are gone);
        # the database file does.
        self.pending = []
        self.reader.close()
        self.store.conn.close()
        self.broker.to_collector.clear()  # its TCP connection dies with it
        self._start_agent()

    @rule(dt=st.sampled_from([0.001, 0.05]))
    def crash_between_receive_and_commit(self, dt: float) -> None:
        """SIGKILL after frames arrived, before their transaction committed."""
        self.autocommit = False
        self._step(dt)
        self.crash_agent()
        self.autocommit = True

    @rule(dt=st.sampled_from([0.001, 0.05]))
    def crash_between_commit_and_ack(self, dt: float) -> None:
        """SIGKILL after COMMIT, before the ACK left: the controller will resend."""
        self.autocommit = False
        self._step(dt)
        self.commit()  # the ACK now waits in the link's output, never written
        self.crash_agent()
        self.autocommit = True

    @rule()
    def controller_reboot(self) -> None:
        TOTALS["controller_reboot"] += 1
        self.epoch += 1
        self.seqs.clear()
        self.ctl = self._controller()

    @rule()
    def broker_down(self) -> None:
        TOTALS["broker_down"] += 1
        self.broker.up = False
        self.broker.to_collector.clear()
        self.broker.to_agent.clear()

    @rule()
    def broker_up(self) -> None:
        self.broker.up = True

    @rule(data=st.data())
    def deliver_to_collector(self, data: st.DataObject) -> None:
        messages = self.broker.to_collector
        self.broker.to_collector = []
        if data.draw(st.booleans(), label="reorder"):
            self.rng.shuffle(messages)
        TOTALS["deliveries mangled"] += 1
        if messages and data.draw(st.booleans(), label="duplicate"):
            messages.append(messages[0])
        for topic, payload in messages:
            self.collector.handle(topic, payload)
        if data.draw(st.booleans(), label="reorder acks"):
            self.rng.shuffle(self.broker.to_agent)
        if self.broker.to_agent and data.draw(st.booleans(), label="duplicate acks"):
            self.broker.to_agent.append(self.broker.to_agent[0])

    @rule(jump=st.sampled_from([0.004, -0.004, 262.0, -262.0, -1_764_000_000.0 + 1.0]))
    def wall_clock_jump(self, jump: float) -> None:
        TOTALS["wall_clock_jump"] += 1
        self.wall += jump  # event timestamps only; nothing may depend on them

    @rule()
    def technician_query(self) -> None:
        ro = sqlite3.connect(self.db.absolute().as_uri() + "?mode=ro", uri=True)
        try:
            latest = [e for _, e, _, _ in read_latest(ro)]
        finally:
            ro.close()
        assert latest == self.store.latest()

    # -- invariants (the chaos oracle) -----------------------------------------------------------

    @invariant()
    def acked_events_are_stored_once_byte_equal(self) -> None:
        stored = self._stored()
        for key, payload in self.acked.items():
            assert stored.get(key) == [payload], f"ACKed {key} stored as {stored.get(key)}"
        dups = [k for k, v in stored.items() if len(v) > 1]
        assert not dups, f"stored twice: {dups[:3]}"

    @invariant()
    def checkpoints_never_regress(self) -> None:
        assert self.cursors == sorted(self.cursors)

    @invariant()
    def collector_holds_only_what_was_sent(self) -> None:
        for key in self.collector.store.keys(VEHICLE):
            assert key in self.sent, f"collector holds {key}, never sent"

    @precondition(lambda self: True)
    @rule()
    def heal_and_drain(self) -> None:
        """Faults heal: everything ACKed reaches the fleet; the fleet converges."""
        self.broker.up = True
        self.autocommit = True
        self.disk_freed()
        for i in range(3000):
            if i % 20 == 0:
                self.produce(2, 2)  # traffic goes on: the breaker closes on successes
            self.now += 0.05
            self._step(0.0)
            self.deliver_all()
            if (
                i > 100
                and not self.ctl.ring
                and self.store.cursor > self.store.stats()["top_rowid"]
                and self.breaker.state == "closed"
            ):
                break
        self.deliver_all()
        stored = self._stored()
        assert not self.ctl.ring, "the controller still holds unACKed events after healing"
        assert self.store.cursor > self.store.stats()["top_rowid"], "backlog not drained"
        assert set(stored) <= self.collector.store.keys(VEHICLE)
        for _ in range(200):  # the compacted replay may be waiting for its ack timeout
            if self._fleet_state() == self._local_state():
                break
            self.now += 0.05
            self._step(0.0)
            self.deliver_all()
        assert self._fleet_state() == self._local_state()
        events = [s.event for s in self.store.iter_events()]
        assert {e.stream: (e.boot_epoch, e.seq) for e in replay(events)} == {
            s: (e, q) for s, (e, q, _) in self._fleet_state().items()
        }
        assert self.breaker.state == "closed"

    def deliver_all(self) -> None:
        for topic, payload in self.broker.to_collector:
            self.collector.handle(topic, payload)
        self.broker.to_collector = []
        self.sync.run_once(self.now, timeout=0)

    def _fleet_state(self) -> dict[str, tuple[int, int, bytes]]:
        return self.collector.store.state(VEHICLE)

    def _local_state(self) -> dict[str, tuple[int, int, bytes]]:
        return {e.stream: (e.boot_epoch, e.seq, e.payload) for e in self.store.latest()}

    def teardown(self) -> None:
        TOTALS["examples"] += 1
        TOTALS["acked"] += len(self.acked)
        self.reader.close()
        self.store.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)


LONG = bool(os.environ.get("IRONFLEET_LONG"))  # make chaos: the long tier

TestCoreSimulation = CoreSimulation.TestCase
TestCoreSimulation.settings = settings(
    max_examples=3000 if LONG else 60,
    stateful_step_count=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


class AckOnFailedCommit(CoreSimulation):
    """Control: a writer that ACKs a batch even when its commit failed (disk full)."""

    @rule()
    def commit(self) -> None:
        if self.pending:
            with contextlib.suppress(StoreError):
                self.store.append(self.pending, now=self.wall)
            self.link.durable([r.token for r in self.pending], self.now)
            self.pending = []


def test_control_ack_on_failed_commit_is_found(chaos_report: Any) -> None:
    """The simulation must find the bug (no shrinking: finding it is what counts here)."""
    control = settings(max_examples=500, stateful_step_count=30, deadline=None, database=None,
                       derandomize=True,
                       phases=[Phase.generate],
                       suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    with pytest.raises(AssertionError):
        run_state_machine_as_test(AckOnFailedCommit, settings=control)
    chaos_report.record("control: ACK on failed commit (simulation)", controls_failed=1)


@pytest.fixture(autouse=True)
def _summary(chaos_report: Any, request: pytest.FixtureRequest) -> Iterator[None]:
    """Add this module's totals to the chaos summary (and print what each rule injected)."""
    TOTALS.clear()
    yield
    if "control" in request.node.name:
        return
    faults = {k: v for k, v in TOTALS.items() if k not in ("examples", "acked")}
    print(f"simulation: {TOTALS['examples']} examples, faults {dict(faults)}")
    chaos_report.record("deterministic simulation (hypothesis)", injected=sum(faults.values()),
                        acked=TOTALS["acked"])  # fmt: skip
