"""Resync on scarce links, stepped with a fake clock and a fake transport (resyncharness):
live events before the backlog, the byte budget and contact windows, a shed or forgotten
backlog, and the priority classes' lanes. The store is a real SQLite file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.fleet import Batch
from agent.resilience import Event
from agent.resync import Phase, Resync
from agent.store import EventStore, StoreSection, connect, read_frontiers
from agent.storedb import EXPORTS_DIR
from agent.views import read_status

from resyncharness import (
    FakeTransport,
    In,
    ack_all,
    clock,
    events_batches,
    fill,
    fresh_store,
    make,
    step,
)


@pytest.fixture
def store(tmp_path: Path) -> EventStore:
    return fresh_store(tmp_path)


def test_live_events_go_before_the_backlog_and_the_cursor_joins_both(store: EventStore) -> None:
    """With a window of 2 and 20 backlog batches, a live event stored mid-drain goes out in
    the next step, not after the backlog; acked ahead, it waits in the cursor until the
    backlog joins it, and nothing is delivered twice or skipped."""
    fill(store, streams=2, per_stream=100)  # 200 rows: 20 backlog batches of 10
    transport = FakeTransport()
    sync, resync, _, delivered = make(store, transport, max_in_flight=2)
    step(sync, 2)
    ack_all(transport, sync, [b for b in transport.batches() if b.kind == "state"])
    backlog = events_batches(transport)
    assert len(backlog) == 2
    assert all(b.historical for b in backlog)
    store.append([In(Event("live", 1, payload=b"\x80"))])
    ack_all(transport, sync, backlog)  # frees the window: live takes the first slot
    sent = events_batches(transport)[2:]
    assert [b.historical for b in sent][:1] == [False]
    assert [(e.stream, e.seq) for e, _ in sent[0].events] == [("live", 1)]
    assert resync.phase is Phase.BACKLOG
    ack_all(transport, sync, [sent[0]])  # the live run waits for the backlog
    assert store.cursor == 21
    assert resync._cursor.pending == 1
    for _ in range(40):
        pending = [b for b in events_batches(transport) if b.batch_id in resync._sent]
        if not pending:
            break
        ack_all(transport, sync, pending)
    assert store.cursor == 202  # every row, the live one included
    assert resync.phase is Phase.LIVE
    sent_keys = [(e.stream, e.seq) for b in events_batches(transport) for e, _ in b.events]
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
            transport, sync, [b for b in events_batches(transport) if b.batch_id in resync._sent]
        )
    assert store.cursor == 36
    store.append([In(Event("s0", 36, payload=b"\x80"))])
    step(sync, 1)
    live = events_batches(transport)[-1]
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
    b1, b2, b3, b4 = events_batches(transport)
    ack_all(transport, sync, [b2])
    ack_all(transport, sync, [b4])  # disjoint from b2, whose run is dropped (max_pending 1)
    ack_all(transport, sync, [b1])
    ack_all(transport, sync, [b3])
    assert store.cursor == 11  # b1 joined; b2's rows are a hole before b3 + b4
    step(sync, 1)
    again = events_batches(transport)[4:]  # sent again from the hole on
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
    (backlog,) = events_batches(transport)
    for seq in range(11, 311):
        store.append([In(Event("s0", seq, payload=b"\x80"))])
        step(sync, 1)
        ack_all(
            transport,
            sync,
            [b for b in events_batches(transport)[1:] if b.batch_id in resync._sent],
        )
    assert resync._cursor.pending <= 8  # one joined run in each of the 8 classes
    ack_all(transport, sync, [backlog])
    assert store.cursor == 311
    seqs = [e.seq for b in events_batches(transport) for e, _ in b.events]
    assert sorted(seqs) == list(range(1, 311))  # each event sent exactly once


def three_classes(store: EventStore, now: float | None = None) -> None:
    """30 events each of streams p0, p1 and p3 (priorities 0, 1, 3), interleaved."""
    store.append([In(Event(f"p{p}", q, priority=p, payload=b"\x80"))
                  for q in range(1, 31) for p in (0, 1, 3)], now=now)  # fmt: skip


def unacked_events_batches(transport: FakeTransport, resync: Resync) -> list[Batch]:
    """The events batches published and not acknowledged yet, oldest first."""
    return [b for b in events_batches(transport) if b.batch_id in resync._sent]


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
    sent = [(e.priority, e.seq) for b in events_batches(transport) for e, _ in b.events]
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
    resent = [e.priority for b in events_batches(again) for e, _ in b.events]
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
