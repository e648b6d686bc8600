"""Resync and the uplink control loop, stepped with a fake clock and a fake transport.

The transport is the one fake here (the real one is tested against mosquitto in
test_uplink.py); the store is a real SQLite file read through a read-only connection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.config import UplinkSection
from agent.fleet import Ack, Batch, Command
from agent.resilience import Backoff, CircuitBreaker, Event
from agent.resync import FleetSync, Phase, Resync
from agent.store import EventStore, connect


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


@dataclass
class FakeTransport:
    """Connects after `connack_after` polls; records what is published."""

    connack_after: int = 1
    refuse: bool = False
    pubacks: bool = True  # the broker acknowledges every publish (False: they get lost)
    connected: bool = False
    connects: int = 0
    published: list[tuple[str, bytes]] = field(default_factory=list)
    pending: list[tuple[str, object]] = field(default_factory=list)
    _countdown: int = -1
    _mid: int = 0

    def connect(self) -> bool:
        self.connects += 1
        if self.refuse:
            return False
        self._countdown = self.connack_after
        return True

    def poll(self, timeout: float) -> list[tuple[str, object]]:
        if self._countdown > 0:
            self._countdown -= 1
        if self._countdown == 0:
            self._countdown = -1
            self.connected = True
            self.pending.append(("connected", None))
        out, self.pending = self.pending, []
        return out

    def publish(self, kind: str, payload: bytes) -> int | None:
        self._mid += 1
        self.published.append((kind, payload))
        if self.pubacks:
            self.pending.append(("puback", self._mid))
        return self._mid

    def publish_status(self, state: str, **fields: object) -> None:
        pass

    def drop(self) -> None:
        self.connected = False
        self.pending.append(("disconnected", "test"))

    def batches(self) -> list[Batch]:
        return [Batch.decode(p) for _, p in self.published]


@pytest.fixture
def store(tmp_path: Path) -> EventStore:
    return EventStore(tmp_path / "a.db")


def fill(store: EventStore, streams: int, per_stream: int, start: int = 1) -> None:
    store.append(
        [In(Event(f"s{k}", q, payload=b"\x80")) for q in range(start, start + per_stream)
         for k in range(streams)]
    )  # fmt: skip


def make(
    store: EventStore, transport: FakeTransport, **config: object
) -> tuple[FleetSync, Resync, CircuitBreaker, list[tuple[int, dict[str, tuple[int, int]]]]]:
    delivered: list[tuple[int, dict[str, tuple[int, int]]]] = []

    def deliver(upto: int, positions: dict[str, tuple[int, int]]) -> None:
        delivered.append((upto, positions))
        store.mark_delivered(upto, positions)

    section = UplinkSection(**{"batch_max_events": 10, "batch_max_delay_ms": 0.0, **config})  # type: ignore[arg-type]
    resync = Resync(connect(store.path, readonly=True), "v1", section, deliver, run_id=1)
    breaker = CircuitBreaker(section.breaker_failure_threshold, section.breaker_recovery_timeout,
                             clock=lambda: clock[0])  # fmt: skip
    sync = FleetSync(transport, resync, breaker, Backoff(0.5, 4.0, rng=random.Random(1)))
    return sync, resync, breaker, delivered


clock = [0.0]


@pytest.fixture(autouse=True)
def reset_clock() -> None:
    clock[0] = 1000.0


def step(sync: FleetSync, n: int = 1, dt: float = 0.01) -> None:
    for _ in range(n):
        clock[0] += dt
        sync.run_once(clock[0], timeout=0)


def ack_all(transport: FakeTransport, sync: FleetSync, batches: list[Batch]) -> None:
    for b in batches:
        transport.pending.append(("ack", Ack(b.batch_id, b.kind, len(b.events), 0).encode()))
    step(sync)


def test_one_connect_attempt_while_connack_is_pending(store: EventStore) -> None:
    transport = FakeTransport(connack_after=50)
    sync, resync, _, _ = make(store, transport)
    step(sync, 40)
    assert transport.connects == 1  # a slow CONNACK must not open a new connection per step
    step(sync, 20)
    assert transport.connected
    assert resync.phase is not Phase.OFFLINE


def test_missing_connack_times_out_then_backs_off(store: EventStore) -> None:
    transport = FakeTransport(connack_after=10**9)
    sync, _, breaker, _ = make(store, transport)
    step(sync)
    step(sync, 1, dt=10.5)  # past CONNACK_TIMEOUT
    assert breaker.snapshot().failures == 1
    assert transport.connects == 1
    step(sync, 1, dt=4.1)  # backoff (capped at 4 s) elapsed
    assert transport.connects == 2


def test_state_first_then_backlog_oldest_first_historical_then_live(store: EventStore) -> None:
    fill(store, streams=3, per_stream=10)  # 30 events before the connection
    transport = FakeTransport()
    sync, _, _, _ = make(store, transport)
    step(sync, 3)
    batches = transport.batches()
    assert batches[0].kind == "state"
    assert sorted((e.stream, e.seq) for e, _ in batches[0].events) == [
        ("s0", 10), ("s1", 10), ("s2", 10)
    ]  # fmt: skip
    backlog = [e for b in batches[1:] for e, _ in b.events]
    assert [(e.stream, e.seq) for e in backlog][:4] == [("s0", 1), ("s1", 1), ("s2", 1), ("s0", 2)]
    assert all(b.kind == "events" and b.historical for b in batches[1:])
    assert len(backlog) == 30
    ack_all(transport, sync, batches)
    fill(store, streams=1, per_stream=5, start=11)
    transport.published.clear()
    step(sync, 2)
    live = transport.batches()
    assert [b.historical for b in live] == [False]


def test_cursor_advances_over_acked_prefix_only(store: EventStore) -> None:
    fill(store, streams=1, per_stream=30)
    transport = FakeTransport()
    sync, resync, _, delivered = make(store, transport)
    step(sync, 2)
    events = [b for b in transport.batches() if b.kind == "events"]
    assert len(events) == 3
    ack_all(transport, sync, [events[2], events[1]])  # out of order: nothing moves
    assert delivered == []
    ack_all(transport, sync, [events[0]])
    assert delivered == [(30, {"s0": (0, 30)})]
    ack_all(transport, sync, [events[0]])  # a duplicate ack
    assert resync.counters.acks_stale == 1
    assert store.cursor == 31


def test_ack_timeout_resends_from_the_acknowledged_point(store: EventStore) -> None:
    fill(store, streams=1, per_stream=20)
    transport = FakeTransport()
    sync, resync, breaker, _ = make(store, transport, ack_timeout=2.0)
    step(sync, 2)
    first = [b for b in transport.batches() if b.kind == "events"]
    ack_all(transport, sync, first[:1])
    transport.published.clear()
    step(sync, 1, dt=2.5)
    again = [b for b in transport.batches() if b.kind == "events"]
    assert next(e.seq for e, _ in again[0].events) == 11  # from the first unacknowledged
    assert resync.counters.ack_timeouts >= 1
    assert breaker.snapshot().failures >= 1


def test_missing_pubacks_replace_the_connection(store: EventStore) -> None:
    """PUBACKs lost on a live connection: paho resends only on a new connection, so one
    whose PUBACKs are overdue past ack_timeout is dropped, and the batches go out again."""
    fill(store, streams=1, per_stream=20)
    transport = FakeTransport(pubacks=False)
    sync, _, breaker, _ = make(store, transport, ack_timeout=2.0)
    step(sync, 2)
    assert transport.connects == 1
    sent = len(transport.published)
    step(sync, 1, dt=1.0)
    assert transport.connected, "dropped before the PUBACKs were overdue"
    transport.pubacks = True
    step(sync, 1, dt=1.5)  # now 2.5 s since the first publish
    assert not transport.connected
    assert breaker.snapshot().failures >= 1
    assert sync.last_error.startswith("disconnected: ")
    step(sync, 10, dt=0.5)
    assert transport.connects == 2
    assert len(transport.published) > sent  # sent again on the new connection


def test_nothing_is_sent_while_the_breaker_is_open(store: EventStore) -> None:
    fill(store, streams=1, per_stream=5)
    transport = FakeTransport()
    sync, _, breaker, _ = make(store, transport, breaker_failure_threshold=1,
                               breaker_recovery_timeout=5.0)  # fmt: skip
    step(sync)
    breaker.record_failure()
    assert breaker.state == "open"
    transport.published.clear()
    step(sync, 1)  # (the CONNACK arrives, but the breaker still says no)
    step(sync, 10)
    assert transport.published == []
    step(sync, 1, dt=5.0)
    assert transport.published  # half-open: probing


def test_replay_command_resends_state(store: EventStore) -> None:
    fill(store, streams=2, per_stream=3)
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport)
    step(sync, 2)
    ack_all(transport, sync, transport.batches())
    transport.published.clear()
    transport.pending.append(("cmd", Command("replay", 5).encode()))
    step(sync, 2)
    assert next(b.kind for b in transport.batches()) == "state"
    assert resync.counters.replays_requested == 1


def test_lost_state_batch_is_sent_again(store: EventStore) -> None:
    fill(store, streams=2, per_stream=3)
    transport = FakeTransport()
    sync, _, _, _ = make(store, transport, ack_timeout=2.0)
    step(sync, 2)
    events = [b for b in transport.batches() if b.kind == "events"]
    ack_all(transport, sync, events)  # the state batch's ack never comes
    transport.published.clear()
    step(sync, 1, dt=2.5)
    assert [b.kind for b in transport.batches()] == ["state"]


def test_disconnect_forgets_in_flight_and_reconnect_resends(store: EventStore) -> None:
    fill(store, streams=1, per_stream=20)
    transport = FakeTransport()
    sync, _, _, _ = make(store, transport)
    step(sync, 2)
    transport.drop()
    transport.published.clear()
    step(sync)  # the disconnect is noticed; a retry is scheduled within the backoff
    step(sync, 1, dt=5.0)  # backoff elapsed: reconnect
    step(sync, 3)
    resent = [e.seq for b in transport.batches() if b.kind == "events" for e, _ in b.events]
    assert resent[:1] == [1]  # nothing was acknowledged: everything again


def test_late_acks_after_a_timeout_still_advance_the_cursor(store: EventStore) -> None:
    fill(store, streams=1, per_stream=30)
    transport = FakeTransport()
    sync, resync, _, delivered = make(store, transport, ack_timeout=2.0)
    step(sync, 2)
    first = [b for b in transport.batches() if b.kind == "events"]
    step(sync, 1, dt=2.5)  # timeout: the window is resent under new batch ids
    assert resync.counters.ack_timeouts >= 1  # (the state batch times out too)
    ack_all(transport, sync, first)  # the slow collector's acks for the originals arrive
    assert delivered[-1][0] == 30  # honoured, not thrown away as stale
    assert resync.counters.acks_stale == 0
