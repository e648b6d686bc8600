"""Resync and the uplink control loop, stepped with a fake clock and a fake transport.

The transport is the one fake here (the real one is tested against mosquitto in
test_uplink.py); the store is a real SQLite file read through a read-only connection.
Acks and commands are signed with a real Ed25519 key, as the collector signs them.
"""

from __future__ import annotations

import random
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import UplinkSection
from agent.fleet import Ack, Batch, Command, batch_digest
from agent.fleet_auth import FleetAuth, FleetSigner
from agent.fleetsync import FleetSync
from agent.resilience import Backoff, CircuitBreaker, Event
from agent.resync import Phase, Resync
from agent.store import EventStore, StoreSection, connect, read_frontiers
from agent.storedb import EXPORTS_DIR
from agent.views import read_status


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
    payloads: dict[int, bytes] = field(default_factory=dict)  # batch id -> as published
    statuses: list[dict[str, object]] = field(default_factory=list)
    _countdown: int = -1
    _mid: int = 0
    address: str = "fake:1883"
    connect_error: str = ""

    def connect(self) -> bool:
        self.connects += 1
        if self.refuse:
            self.connect_error = f"{self.address}: Connection refused (ECONNREFUSED)"
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
        self.payloads[Batch.decode(payload).batch_id] = payload
        if self.pubacks:
            self.pending.append(("puback", self._mid))
        return self._mid

    def publish_status(self, state: str, **fields: object) -> None:
        self.statuses.append({"state": state, **fields})

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

    def deliver(
        upto: int, positions: dict[str, tuple[int, int]], frontiers: tuple[int, ...]
    ) -> None:
        if upto >= store.cursor:  # the cursor moves (not only a class frontier)
            delivered.append((upto, positions))
        store.mark_delivered(upto, positions, frontiers=frontiers)

    section = UplinkSection(**{"batch_max_events": 10, "batch_max_delay_ms": 0.0, **config})  # type: ignore[arg-type]
    resync = Resync(connect(store.path, readonly=True), "v1", section, deliver, run_id=1)
    breaker = CircuitBreaker(section.breaker_failure_threshold, section.breaker_recovery_timeout,
                             clock=lambda: clock[0])  # fmt: skip
    sync = FleetSync(transport, resync, breaker, Backoff(0.5, 4.0, rng=random.Random(1)),
                     auth=FleetAuth("v1", FLEET_KEY.public_key()))  # fmt: skip
    return sync, resync, breaker, delivered


FLEET_KEY = Ed25519PrivateKey.generate()
SIGNER = FleetSigner(FLEET_KEY)


def signed_ack(transport: FakeTransport, b: Batch, vehicle: str = "v1") -> bytes:
    """The collector's ack for `b`: digest of the bytes published, signed."""
    ack = Ack(b.batch_id, b.kind, len(b.events), 0, batch_digest(transport.payloads[b.batch_id]))
    return SIGNER.sign_ack(vehicle, ack).encode()


def signed_command(op: str, cmd_id: int) -> bytes:
    return SIGNER.sign_command("v1", Command(op, cmd_id)).encode()


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
        transport.pending.append(("ack", signed_ack(transport, b)))
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
    assert sync.last_error == "no CONNACK from fake:1883 in 10 s"
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
    transport.pending.append(("cmd", signed_command("replay", 5)))
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


# -- the broker -> agent trust boundary (issue 12) ------------------------------------------


def events_batches(transport: FakeTransport) -> list[Batch]:
    return [b for b in transport.batches() if b.kind == "events"]


def test_forged_acks_move_nothing_then_genuine_ones_do(store: EventStore) -> None:
    fill(store, streams=1, per_stream=30)
    transport = FakeTransport()
    sync, resync, _, delivered = make(store, transport)
    step(sync, 2)
    sent = events_batches(transport)
    other = FleetSigner(Ed25519PrivateKey.generate())
    ping_sig = Command.decode(signed_command("ping", 1)).signature
    for i, b in enumerate(sent):
        digest = batch_digest(transport.payloads[b.batch_id])
        plain = Ack(b.batch_id, b.kind, len(b.events), 0, digest)
        # the real signature of another batch, moved onto this one (id and digest changed)
        real = Ack.decode(signed_ack(transport, sent[(i + 1) % len(sent)]))
        moved = Ack(b.batch_id, b.kind, real.stored, 0, digest, real.issued, real.signature)
        wrong_digest = Ack(b.batch_id, b.kind, len(b.events), 0, bytes(32))
        forged = [
            plain.encode(),  # unsigned
            other.sign_ack("v1", plain).encode(),  # someone else's key
            signed_ack(transport, b, vehicle="v2"),  # the fleet's, for another vehicle
            moved.encode(),
            SIGNER.sign_ack("v1", wrong_digest).encode(),  # not the bytes we published
            # a command's signature is never an ack's (domain separation)
            Ack(b.batch_id, b.kind, len(b.events), 0, digest, 0, ping_sig).encode(),
        ]
        transport.pending += [("ack", f) for f in forged]
    step(sync)
    assert delivered == []
    assert resync.counters.acks == 0
    rejected = sync.inbox.rejected
    n = len(sent)
    assert n == 3
    assert rejected["unsigned"] == n
    assert rejected["digest_mismatch"] == n
    assert rejected["bad_signature"] == 4 * n
    ack_all(transport, sync, sent)
    assert delivered[-1][0] == 30


def test_commands_need_a_signature_and_a_fresh_counter(store: EventStore) -> None:
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport)
    step(sync, 2)
    other = FleetSigner(Ed25519PrivateKey.generate())
    transport.pending += [
        ("cmd", Command("ping", 10).encode()),  # unsigned
        ("cmd", other.sign_command("v1", Command("ping", 11)).encode()),
        ("cmd", SIGNER.sign_command("v2", Command("ping", 12)).encode()),  # other vehicle
        ("cmd", signed_command("ping", 20)),  # genuine
        ("cmd", signed_command("ping", 20)),  # the same again: a replay
        ("cmd", signed_command("replay", 19)),  # older than the last accepted
    ]
    step(sync)
    assert sync.inbox.rejected["unsigned"] == 1
    assert sync.inbox.rejected["bad_signature"] == 2
    assert sync.inbox.rejected["stale_counter"] == 2
    assert [s.get("pong") for s in transport.statuses if "pong" in s] == [20]
    assert resync.counters.replays_requested == 0


def test_retained_messages_are_counted_and_dropped(store: EventStore) -> None:
    transport = FakeTransport()
    sync, _, _, _ = make(store, transport)
    step(sync, 2)
    transport.pending += [("retained", "cmd"), ("retained", "ack")]
    step(sync)
    assert sync.inbox.rejected["retained"] == 2
    assert sync.bad_messages == 2


def test_ping_flood_costs_bounded_publishes_and_flat_memory(store: EventStore) -> None:
    transport = FakeTransport()
    sync, _, _, _ = make(store, transport)
    step(sync, 2)
    # Signed pings with fresh counters (a compromised collector, say): signature checks
    # and pongs are both rate-limited.
    transport.pending += [("cmd", signed_command("ping", n)) for n in range(1, 2001)]
    step(sync)
    pongs = [s for s in transport.statuses if "pong" in s]
    assert 1 <= len(pongs) <= 5  # PING_BURST
    assert sync.inbox.rejected["rate_limited"] == 2000 - len(pongs)
    unsigned = Command("ping", 1).encode()
    tracemalloc.start()
    try:
        for _ in range(40):
            transport.pending += [("cmd", unsigned)] * 5000
            step(sync)
            if _ == 1:
                base = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert sync.inbox.rejected["unsigned"] == 200_000
    assert len([s for s in transport.statuses if "pong" in s]) == len(pongs)
    assert grown < 256 * 1024, f"memory grew by {grown} bytes over 190,000 commands"


def test_replay_requests_coalesce(store: EventStore) -> None:
    fill(store, streams=3, per_stream=2)
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport)
    step(sync, 3)
    for n in range(1, 1001):
        transport.pending.append(("cmd", signed_command("replay", n)))
        if n % 100 == 0:
            step(sync)  # 10 steps of 10 ms: 0.1 s
    step(sync, 2)
    assert 1 <= resync.counters.replays_requested <= 2  # REPLAY_BURST
    step(sync, 1, dt=6.0)  # one coalesced request still pending is served once
    assert resync.counters.replays_requested <= 3


def test_a_handler_bug_is_counted_not_fatal(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store, streams=1, per_stream=10)
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport)
    step(sync, 2)

    def broken(batch_id: int, now: float) -> bool:
        raise IndexError("a deliberate bug")

    monkeypatch.setattr(resync, "on_ack", broken)
    ack_all(transport, sync, events_batches(transport))  # the guard holds: no raise
    assert sync.inbox.rejected["bug"] == len(events_batches(transport))
    step(sync, 3)  # and the loop goes on


def test_unsigned_lab_mode_accepts_unsigned_acks(store: EventStore) -> None:
    fill(store, streams=1, per_stream=10)
    transport = FakeTransport()
    sync, _, _, delivered = make(store, transport)
    sync.inbox.auth = FleetAuth("v1", None)
    step(sync, 2)
    for b in events_batches(transport):
        wrong = Ack(b.batch_id, b.kind, len(b.events), 0, bytes(32))  # digest still checked
        transport.pending.append(("ack", wrong.encode()))
        transport.pending.append(("ack", Ack(b.batch_id, b.kind, len(b.events), 0).encode()))
    step(sync)
    assert delivered[-1][0] == 10
    assert sync.inbox.rejected["digest_mismatch"] == 1


def test_state_replay_is_paged_and_windowed_then_the_backlog_follows(store: EventStore) -> None:
    from agent.resync import STATE_BATCH_EVENTS  # noqa: PLC0415

    streams = 2 * STATE_BATCH_EVENTS + 3  # three pages: full, full, 3
    fill(store, streams, 1)
    transport = FakeTransport(pubacks=False)
    sync, resync, _, _ = make(store, transport, max_in_flight=2, ack_mode="fleet")
    step(sync, 3)
    # A window of state pages, nothing of the backlog yet: memory is two pages, not all.
    assert [b.kind for b in transport.batches()] == ["state", "state"]
    assert resync.phase is Phase.STATE
    first = transport.batches()[0]
    transport.pending.append(("ack", signed_ack(transport, first)))
    step(sync)
    kinds = [b.kind for b in transport.batches()]
    assert kinds[:3] == ["state"] * 3  # the last page went out; the backlog may follow
    assert resync.counters.last_convergence_s < 0  # not every page acknowledged yet
    for b in transport.batches()[1:3]:
        transport.pending.append(("ack", signed_ack(transport, b)))
    step(sync, 2)
    assert resync.counters.last_convergence_s >= 0
    state = [e.stream for b in transport.batches() if b.kind == "state" for e, _ in b.events]
    assert sorted(state) == sorted(f"s{k}" for k in range(streams))  # each stream once
    assert resync.counters.state_streams_sent == resync.counters.state_streams_known == streams
    assert "events" in {b.kind for b in transport.batches()}


# -- scarce links: live before the backlog, the byte budget -----------------------------------


def _events_batches(transport: FakeTransport) -> list[Batch]:
    return [b for b in transport.batches() if b.kind == "events"]


def test_live_events_go_before_the_backlog_and_the_cursor_joins_both(store: EventStore) -> None:
    """With a window of 2 and 20 backlog batches, a live event stored mid-drain goes out in
    the next step, not after the backlog; acked ahead, it waits in the cursor until the
    backlog joins it, and nothing is delivered twice or skipped."""
    fill(store, streams=2, per_stream=100)  # 200 rows: 20 backlog batches of 10
    transport = FakeTransport()
    sync, resync, _, delivered = make(store, transport, max_in_flight=2)
    step(sync, 2)
    ack_all(transport, sync, [b for b in transport.batches() if b.kind == "state"])
    backlog = _events_batches(transport)
    assert len(backlog) == 2
    assert all(b.historical for b in backlog)
    store.append([In(Event("live", 1, payload=b"\x80"))])
    ack_all(transport, sync, backlog)  # frees the window: live takes the first slot
    sent = _events_batches(transport)[2:]
    assert [b.historical for b in sent][:1] == [False]
    assert [(e.stream, e.seq) for e, _ in sent[0].events] == [("live", 1)]
    assert resync.phase is Phase.BACKLOG
    ack_all(transport, sync, [sent[0]])  # the live run waits for the backlog
    assert store.cursor == 21
    assert resync._cursor.pending == 1
    for _ in range(40):
        pending = [b for b in _events_batches(transport) if b.batch_id in resync._sent]
        if not pending:
            break
        ack_all(transport, sync, pending)
    assert store.cursor == 202  # every row, the live one included
    assert resync.phase is Phase.LIVE
    sent_keys = [(e.stream, e.seq) for b in _events_batches(transport) for e, _ in b.events]
    assert len(sent_keys) == len(set(sent_keys)) == 201
    assert delivered[-1][0] == 201


def test_the_byte_budget_paces_what_is_published(store: EventStore) -> None:
    """At 2,000 bytes/s over 30 simulated seconds the uplink publishes at most the budget
    plus one second's burst and one batch, and keeps publishing (no stall on batches
    larger than the budget's content)."""
    store.append([In(Event(f"s{k % 4}", k // 4 + 1, payload=bytes(60))) for k in range(4000)])
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport, max_bytes_per_second=2000, codec="raw",
                              batch_max_events=50, max_in_flight=1000)  # fmt: skip
    start = clock[0]
    for _ in range(300):
        step(sync, 1, dt=0.1)
        ack_all(transport, sync, [b for b in transport.batches() if b.batch_id in resync._sent])
    header = len("ironfleet/v1/v1/events") + 9  # MQTT PUBLISH header, counted too
    sent = sum(len(p) + header for _, p in transport.published)
    biggest = max(len(p) + header for _, p in transport.published)
    elapsed = clock[0] - start  # 30 s of steps, plus the acks' own steps
    assert sent <= 2000 * elapsed + 2000 + biggest, (sent, elapsed)
    assert sent >= 2000 * elapsed - 2 * biggest, (sent, elapsed)  # it used the budget too
    assert resync.budget.spent == sent == resync.counters.bytes_sent


def test_a_shed_tail_of_the_backlog_is_passed_over(store: EventStore) -> None:
    """Rows the ladder shed at the end of the backlog leave no hole the cursor waits on."""
    fill(store, streams=1, per_stream=35)
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport, max_in_flight=1)
    step(sync, 2)
    ack_all(transport, sync, [b for b in transport.batches() if b.kind == "state"])
    conn = connect(store.path)
    conn.execute("DELETE FROM events WHERE id > 20 AND id <= 35")
    conn.close()
    for _ in range(10):
        ack_all(
            transport, sync, [b for b in _events_batches(transport) if b.batch_id in resync._sent]
        )
    assert store.cursor == 36
    store.append([In(Event("s0", 36, payload=b"\x80"))])
    step(sync, 1)
    live = _events_batches(transport)[-1]
    assert not live.historical
    assert [e.seq for e, _ in live.events] == [36]


def test_a_forgotten_acked_run_is_sent_again(store: EventStore) -> None:
    """More disjoint acked runs waiting than the cursor keeps: the oldest is dropped, the
    cursor stops at its start, and once nothing is in flight the gap is sent again."""
    fill(store, streams=1, per_stream=40)  # four backlog batches of 10
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport, max_in_flight=4)
    for cursor in resync._cursor.cursors:
        cursor.max_pending = 1
    step(sync, 2)
    ack_all(transport, sync, [b for b in transport.batches() if b.kind == "state"])
    b1, b2, b3, b4 = _events_batches(transport)
    ack_all(transport, sync, [b2])
    ack_all(transport, sync, [b4])  # disjoint from b2, whose run is dropped (max_pending 1)
    ack_all(transport, sync, [b1])
    ack_all(transport, sync, [b3])
    assert store.cursor == 11  # b1 joined; b2's rows are a hole before b3 + b4
    step(sync, 1)
    again = _events_batches(transport)[4:]  # sent again from the hole on
    assert again[0].events[0][0].seq == 11
    ack_all(transport, sync, again)
    assert store.cursor == 41


def test_live_runs_acked_ahead_of_a_long_backlog_wait_as_one(store: EventStore) -> None:
    """Hundreds of live batches acked while the backlog is still in flight join into one
    waiting run per class, so no cap drops them and nothing is sent twice."""
    fill(store, streams=1, per_stream=10)  # one backlog batch, never acked until the end
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport, max_in_flight=4, ack_timeout=3600.0)
    step(sync, 2)
    ack_all(transport, sync, [b for b in transport.batches() if b.kind == "state"])
    (backlog,) = _events_batches(transport)
    for seq in range(11, 311):
        store.append([In(Event("s0", seq, payload=b"\x80"))])
        step(sync, 1)
        ack_all(
            transport,
            sync,
            [b for b in _events_batches(transport)[1:] if b.batch_id in resync._sent],
        )
    assert resync._cursor.pending <= 8  # one joined run in each of the 8 classes
    ack_all(transport, sync, [backlog])
    assert store.cursor == 311
    seqs = [e.seq for b in _events_batches(transport) for e, _ in b.events]
    assert sorted(seqs) == list(range(1, 311))  # each event sent exactly once


def three_classes(store: EventStore, now: float | None = None) -> None:
    """30 events each of streams p0, p1 and p3 (priorities 0, 1, 3), interleaved."""
    store.append([In(Event(f"p{p}", q, priority=p, payload=b"\x80"))
                  for q in range(1, 31) for p in (0, 1, 3)], now=now)  # fmt: skip


def unacked_events_batches(transport: FakeTransport, resync: Resync) -> list[Batch]:
    """The events batches published and not acknowledged yet, oldest first."""
    return [b for b in _events_batches(transport) if b.batch_id in resync._sent]


def test_the_backlog_drains_highest_priority_first(store: EventStore) -> None:
    """Interleaved streams of priorities 0, 1 and 3: every priority-3 event goes before any
    of priority 1, and those before priority 0, oldest first within each; the cursor
    reaches the top only when every class is acknowledged, each event sent once."""
    three_classes(store)
    transport = FakeTransport()
    sync, resync, _, delivered = make(store, transport, max_in_flight=2)
    step(sync, 2)
    ack_all(transport, sync, [b for b in transport.batches() if b.kind == "state"])
    for _ in range(20):
        pending = unacked_events_batches(transport, resync)
        if not pending:
            break
        ack_all(transport, sync, pending[::-1])  # acks in reverse order, too
    sent = [(e.priority, e.seq) for b in _events_batches(transport) for e, _ in b.events]
    assert [p for p, _ in sent] == [3] * 30 + [1] * 30 + [0] * 30
    assert [q for _, q in sent] == list(range(1, 31)) * 3
    assert store.cursor == 91
    assert delivered[-1][0] == 90
    assert store.conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 3


def test_a_class_drained_ahead_stays_delivered_after_a_restart(store: EventStore) -> None:
    """Priority 3 acknowledged, priorities 0 and 1 not yet: the class frontiers are
    persisted with the cursor, so after a restart priority 3 is not sent again, the TTL
    never counts it lost, and the ladder prunes it as acknowledged (not shed)."""
    t0 = 1_800_000_000.0
    three_classes(store, now=t0)
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport, max_in_flight=1)
    step(sync, 2)
    ack_all(transport, sync, [b for b in transport.batches() if b.kind == "state"])
    for _ in range(10):
        pending = unacked_events_batches(transport, resync)
        if not pending or any(e.priority != 3 for e, _ in pending[0].events):
            break
        ack_all(transport, sync, pending)
    assert store.cursor == 1  # priorities 0 and 1 are not acknowledged
    assert store.frontiers[3] == 90
    assert read_frontiers(connect(store.path, readonly=True))[3] == 90
    view = read_status(connect(store.path, readonly=True), store.path, t0)
    assert view["backlog"]["unacked_events"] == 60  # what status shows: p0 and p1 only

    again = FakeTransport()
    sync, _, _, _ = make(store, again, max_in_flight=8)  # a new Resync: the agent restarted
    step(sync, 4)
    resent = [e.priority for b in _events_batches(again) for e, _ in b.events]
    assert len(resent) == 60
    assert 3 not in resent

    config = StoreSection(ttl_seconds=10.0, ttl_low_seconds=10.0, max_buffer_bytes=4096,
                         min_free_bytes=0)  # fmt: skip
    reopened = EventStore(store.path, config, free_bytes=lambda _: 2**40)
    assert reopened.expire(t0 + 1000.0) == 58  # p0 and p1 but each stream's latest
    assert reopened.loss.shed == {"ttl": 58}
    # An export awaiting its receipt: its runs are rebuilt from every row to check the
    # fleet's digests (agent/receipts.py), so rows held only by a frontier stay meanwhile.
    ledgers = store.path.parent / EXPORTS_DIR
    ledgers.mkdir()
    (ledgers / "7.json").write_text("{}")
    reopened.make_room(now=t0 + 1000.0)
    assert reopened.counters["pruned_acked"] == 0
    (ledgers / "7.json").unlink()
    reopened.make_room(now=t0 + 1000.0)
    assert reopened.counters["pruned_acked"] == 29  # p3 but its latest
    assert reopened.conn.execute(
        "SELECT count(*) FROM shed AS sh JOIN streams AS s "
        "ON s.id = sh.stream_id WHERE s.name = 'p3'"
    ).fetchone() == (0,)


def test_unreadable_frontiers_read_as_the_cursor(store: EventStore) -> None:
    """agent_state is a file on disk, not trusted: a malformed frontier list costs
    resends (every class back at the cursor), never a row counted as held."""
    fill(store, streams=1, per_stream=10)
    store.mark_delivered(4, {}, frontiers=[4, 4, 4, 9, 4, 4, 4, 4])
    assert read_frontiers(store.conn) == (4, 4, 4, 9, 4, 4, 4, 4)
    for bad in ("9,9", "x,1,2,3,4,5,6,7", "", "1e9,1,1,1,1,1,1,1"):
        store.conn.execute("UPDATE agent_state SET value = ? WHERE key = 'uplink.frontiers'",
                           (bad,))  # fmt: skip
        assert read_frontiers(store.conn) == (4,) * 8


def test_a_replay_larger_than_a_contact_window_goes_on_where_it_stopped(
    store: EventStore,
) -> None:
    """[uplink] max_bytes_per_contact smaller than the compacted replay, the link up for
    one window a pass: state pages are cut to the window's room by bytes (a window ends
    at most QUOTA_MIN_BATCH over), the replay takes half of each window and the backlog
    the rest, and each pass goes on from the first page not acknowledged. Before, each
    pass sent the same first pages and nothing else, for ever."""
    from agent.resilience.budget import QUOTA_MIN_BATCH  # noqa: PLC0415

    streams, quota, window = 120, 8192, 60.0
    store.append([In(Event(f"s{k:03d}", q, payload=bytes(400)))
                  for q in (1, 2) for k in range(streams)])  # fmt: skip
    transport = FakeTransport()
    sync, resync, _, _ = make(store, transport, codec="raw", max_bytes_per_contact=quota,
                              contact_seconds=window, max_in_flight=1000)  # fmt: skip
    header = len("ironfleet/v1/v1/events") + 9
    sent_state: list[str] = []
    backlog = 0
    for _ in range(60):  # passes; bounded
        step(sync, 3, dt=0.01)  # (re)connected: send what the window allows
        batches = transport.batches()
        assert sum(len(p) + header for _, p in transport.published) <= quota + QUOTA_MIN_BATCH
        ack_all(transport, sync, batches)
        state = [e.stream for b in batches if b.kind == "state" for e, _ in b.events]
        events = sum(len(b.events) for b in batches if b.kind == "events")
        sent_state += state
        backlog += events
        if len(set(sent_state)) == streams:
            break
        assert state, "a window without the replay"
        assert events, "a window without the backlog"
        transport.drop()  # the pass ends with the link
        step(sync)  # the disconnect is noticed; a retry is scheduled within the backoff
        transport.published.clear()
        step(sync, 1, dt=window)  # the next window, and the backoff, have elapsed
    assert sorted(set(sent_state)) == [f"s{k:03d}" for k in range(streams)]
    assert len(sent_state) < 1.2 * streams  # each page about once, not the first ones again
    assert backlog > streams // 2  # the backlog moved alongside, window after window
    assert resync.counters.event_bytes_sent < resync.counters.bytes_sent
