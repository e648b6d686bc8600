"""Resync and the uplink control loop, stepped with a fake clock and a fake transport.

The transport is the one fake here (the real one is tested against mosquitto in
test_uplink.py); the store is a real SQLite file read through a read-only connection.
Acks and commands are signed with a real Ed25519 key, as the collector signs them.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet import Ack, Command, batch_digest
from agent.fleet_auth import FleetAuth, FleetSigner
from agent.resync import Phase
from agent.store import EventStore

from resyncharness import (
    SIGNER,
    FakeTransport,
    ack_all,
    events_batches,
    fill,
    fresh_store,
    make,
    signed_ack,
    signed_command,
    step,
)


@pytest.fixture
def store(tmp_path: Path) -> EventStore:
    return fresh_store(tmp_path)


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
