"""Event store on real SQLite files: dedup, gaps, checkpoints, eviction, recovery."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import CommitFailed, StoreError
from agent.livestate import read_row
from agent.resilience import Event, replay
from agent.store import (
    WAL_RESERVE_BYTES,
    EventStore,
    StoreSection,
    check_integrity,
    connect,
)


@dataclass(frozen=True)
class In:
    """An arrival as the link hands it over."""

    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


def ev(stream: str, seq: int, epoch: int = 1, priority: int = 1, size: int = 8) -> In:
    payload = bytes([seq % 251]) * size
    return In(
        Event(stream, seq, boot_epoch=epoch, ts=float(seq), priority=priority, payload=payload)
    )


def keys(store: EventStore) -> list[tuple[str, int, int]]:
    return [(s.event.stream, s.event.boot_epoch, s.event.seq) for s in store.iter_events()]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


def test_pragmas_and_schema(db: Path) -> None:
    store = EventStore(db)
    conn = store.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("SELECT name FROM _migrations").fetchall() == [
        ("001_initial",), ("002_open_gaps_index",), ("003_controller_epochs",),
        ("004_live_snapshot",),
    ]  # fmt: skip
    indexes = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'"
    ).fetchall()
    assert indexes == []  # the hot table carries no secondary index


def test_duplicates_within_and_across_batches_and_reopen(db: Path) -> None:
    store = EventStore(db)
    r = store.append([ev("a", 1), ev("a", 2), ev("a", 2), ev("b", 1)])
    assert (r.stored, r.duplicates) == (3, 1)
    r = store.append([ev("a", 1), ev("a", 3)])
    assert (r.stored, r.duplicates) == (1, 1)
    store.close()
    store = EventStore(db)
    r = store.append([ev("a", 3), ev("b", 1), ev("b", 2)])
    assert (r.stored, r.duplicates) == (1, 2)
    assert sorted(keys(store)) == [
        ("a", 1, 1), ("a", 1, 2), ("a", 1, 3), ("b", 1, 1), ("b", 1, 2)
    ]  # fmt: skip


def test_stream_1_2_3_keeps_three_and_boot_epochs_are_distinct(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("s", 1), ev("s", 2), ev("s", 3)])
    store.append([ev("s", 1, epoch=2), ev("s", 2, epoch=2)])
    assert len(keys(store)) == 5
    assert [(e.boot_epoch, e.seq) for e in store.latest()] == [(2, 2)]


def test_gap_opened_filled_and_survives_reopen(db: Path) -> None:
    store = EventStore(db)
    r = store.append([ev("s", 1), ev("s", 2), ev("s", 6)])
    assert r.gaps_opened == 1
    assert store.open_gaps() == {("s", 1): [(3, 5)]}
    assert store.append([ev("s", 4)]).gaps_filled == 1
    assert store.open_gaps() == {("s", 1): [(3, 3), (5, 5)]}
    store.close()
    store = EventStore(db)
    assert store.open_gaps() == {("s", 1): [(3, 3), (5, 5)]}
    r = store.append([ev("s", 4), ev("s", 3), ev("s", 5)])
    assert (r.stored, r.duplicates, r.gaps_filled) == (2, 1, 2)
    assert store.open_gaps() == {}
    row = store.conn.execute("SELECT missing, closed_at IS NOT NULL FROM gaps").fetchone()
    assert row == (0, 1)


def test_new_epoch_starting_late_records_the_lost_start(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("s", 1), ev("s", 2)])
    store.append([ev("s", 4, epoch=2)])
    assert store.open_gaps() == {("s", 2): [(1, 3)]}


def test_first_sight_of_a_stream_is_not_a_gap(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("s", 5000)])
    assert store.open_gaps() == {}


def test_failed_commit_changes_nothing_and_retry_succeeds(db: Path) -> None:
    store = EventStore(db, busy_timeout_ms=50)
    store.append([ev("s", 1)])
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(CommitFailed):
        store.append([ev("s", 2), ev("t", 1)])
    assert not store.conn.in_transaction
    blocker.execute("ROLLBACK")
    blocker.close()
    r = store.append([ev("s", 2), ev("t", 1)])  # not mistaken for duplicates
    assert (r.stored, r.duplicates) == (2, 0)
    assert store.counters["commit_failures"] == 1


batches = st.lists(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(1, 30), st.integers(1, 3)), max_size=20
    ),
    max_size=8,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches)
def test_latest_matches_replay_and_dedup_is_exact(tmp_path: Path, plan: list) -> None:  # type: ignore[type-arg]
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "h.db"  # a fresh file per example
    store = EventStore(path)
    seen: set[tuple[str, int, int]] = set()
    stored_epoch: dict[int, int] = {}  # the rollback rule (docs/protocol.md), one controller
    for batch in plan:
        store.append([ev(s, q, epoch=e) for s, q, e in batch])
        for _, _, e in batch:
            if e not in stored_epoch:
                top = max(stored_epoch.values(), default=-1)
                stored_epoch[e] = e if e > top else top + 1
        seen |= {(s, stored_epoch[e], q) for s, q, e in batch}
    stored = keys(store)
    assert sorted(stored) == sorted(seen)  # every distinct key once
    assert store.latest() == replay(s.event for s in store.iter_events())
    store.close()


def test_delivery_cursor_and_checkpoints_monotonic_and_persisted(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("a", i) for i in range(1, 6)] + [ev("b", i) for i in range(1, 4)])
    assert store.mark_delivered(3, {"a": (1, 3)})  # rowids 1-3 are a1-a3
    assert not store.mark_delivered(2, {"a": (1, 2)})  # stale: ignored, counted
    assert not store.mark_delivered(3, {"a": (1, 3)})  # duplicate: ignored, counted
    assert store.counters["acks_stale"] == 2
    assert store.checkpoint("a") == (1, 3)
    assert store.cursor == 4
    backlog = [(s.event.stream, s.event.seq) for s in store.backlog()]
    assert backlog == [("a", 4), ("a", 5), ("b", 1), ("b", 2), ("b", 3)]
    assert store.mark_delivered(6, {"a": (1, 5), "b": (1, 1)})
    store.close()
    store = EventStore(db)
    assert store.checkpoints() == {"a": (1, 5), "b": (1, 1)}
    assert store.cursor == 7
    assert not store.mark_delivered(5, {"a": (1, 9)})
    assert store.checkpoint("a") == (1, 5)


def test_late_gap_fill_above_the_cursor_is_still_sent(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("s", 1), ev("s", 3)])
    store.mark_delivered(2, {"s": (1, 3)})
    store.append([ev("s", 2)])  # arrives after its successor was delivered
    assert [s.event.seq for s in store.backlog()] == [2]
    assert store.checkpoint("s") == (1, 3)  # never backwards


def test_backlog_reads_in_bounded_batches(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("s", i) for i in range(1, 2501)])
    first = store.backlog(limit=1000)
    assert len(first) == 1000
    rest = store.backlog(after_rowid=first[-1].rowid, limit=5000)
    assert [s.event.seq for s in rest] == list(range(1001, 2501))


def fill(store: EventStore, streams: dict[str, int], count: int, size: int) -> None:
    seqs = dict.fromkeys(streams, 0)
    for start in range(0, count, 200):
        batch = []
        for i in range(start, min(count, start + 200)):
            name = list(streams)[i % len(streams)]
            seqs[name] += 1
            batch.append(ev(name, seqs[name], priority=streams[name], size=size))
        store.append(batch)


def fill_to_high_water(store: EventStore, streams: dict[str, int]) -> int:
    """Append rounds of events until the store asks for room; return events per stream."""
    per_stream = 0
    for _ in range(500):
        if store.needs_room():
            return per_stream
        store.append(
            [ev(name, per_stream + k, priority=p, size=200) for name, p in streams.items()
             for k in range(1, 51)]
        )  # fmt: skip
        per_stream += 50
    raise AssertionError("the store never reached its high-water mark")


def test_ladder_deletes_acked_before_anything_unacked(db: Path) -> None:
    store = EventStore(db, StoreSection(max_buffer_bytes=2 * 2**20, min_free_bytes=0))
    fill_to_high_water(store, {"hi": 5, "lo": 0})
    everything = list(store.iter_events())
    upto = everything[len(everything) // 2].rowid
    store.mark_delivered(upto, {})
    assert store.make_room()
    remaining = {s.rowid for s in store.iter_events()}
    assert {s.rowid for s in everything if s.rowid > upto} <= remaining  # unacked all kept
    assert store.shed_records() == []
    assert store.counters["pruned_acked"] > 0
    assert not store.needs_room()


def test_ladder_compacts_low_priority_then_drops_oldest_and_records_it(db: Path) -> None:
    config = StoreSection(max_buffer_bytes=2 * 2**20, min_free_bytes=0, low_water=0.3)
    store = EventStore(db, config)
    n = fill_to_high_water(store, {"hi": 5, "lo": 0})
    before = set(keys(store))
    assert store.make_room()
    after = set(keys(store))
    shed = store.shed_records()
    assert [r.reason for r in shed][:1] == ["compact_low_priority"]
    assert shed[0].stream == "lo"
    assert ("lo", 1, n) in after  # the latest low-priority event stays
    assert any(r.reason == "drop_oldest" for r in shed)  # 30 % needs more than compaction
    lost = before - after
    assert sum(r.count for r in shed) == len(lost)  # every loss is on record
    dropped_hi = sorted(q for s, _, q in lost if s == "hi")
    assert dropped_hi == list(range(1, len(dropped_hi) + 1))  # oldest first
    assert ("hi", 1, n) in after


def test_store_full_is_reported_not_lost(db: Path) -> None:
    store = EventStore(db, StoreSection(max_buffer_bytes=512 * 1024, min_free_bytes=0))
    batches = [[ev("s", i, size=500) for i in range(n + 1, n + 101)] for n in range(0, 10**4, 100)]

    def fill_up() -> None:
        for batch in batches:
            store.append(batch)

    with pytest.raises(StoreError):
        fill_up()
    assert not store.conn.in_transaction
    count = store.event_count
    assert count == len(keys(store))  # the cache matches the file after the failure


def test_corrupt_file_is_quarantined_and_store_starts(db: Path) -> None:
    db.write_bytes(b"this is not a database" * 1000)
    store = EventStore(db)
    assert store.quarantined is not None
    assert store.quarantined.exists()
    assert store.append([ev("s", 1)]).stored == 1
    alarm = store.conn.execute(
        "SELECT value FROM agent_state WHERE key = 'alarm.store_quarantined'"
    ).fetchone()
    assert alarm is not None


def test_damaged_pages_are_quarantined_and_readable_rows_salvaged(db: Path) -> None:
    store = EventStore(db)
    fill(store, {"a": 1, "b": 2}, 20_000, 100)
    store.close()
    data = bytearray(db.read_bytes())
    pages = len(data) // 4096
    victim = pages // 2
    data[victim * 4096 : victim * 4096 + 4096] = b"\xa5" * 4096
    db.write_bytes(bytes(data))
    store = EventStore(db)
    assert store.quarantined is not None
    assert 0 < store.salvaged < 20_000
    assert check_integrity(store.conn, full=True) == []
    assert store.event_count == store.salvaged
    got = set(keys(store))
    r = store.append([ev("a", 1), ev("a", 10_001)])  # dedup state rebuilt from salvage
    assert r.stored == (("a", 1, 1) not in got) + (("a", 1, 10_001) not in got)


def test_reader_holding_a_snapshot_does_not_block_append(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("s", 1)])
    reader = connect(db, readonly=True)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)
    done = threading.Event()

    def write() -> None:
        store.append([ev("s", i) for i in range(2, 500)])
        done.set()

    t = threading.Thread(target=write)
    t.start()
    assert done.wait(5)
    t.join()
    assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)  # its snapshot
    reader.execute("COMMIT")
    assert reader.execute("SELECT count(*) FROM events").fetchone() == (499,)
    with pytest.raises(sqlite3.OperationalError):
        reader.execute("DELETE FROM events")


def test_bad_synchronous_mode_is_refused(db: Path) -> None:
    with pytest.raises(StoreError, match="synchronous"):
        EventStore(db, StoreSection(synchronous="SOMETIMES"))


def test_rowids_are_never_reused_after_eviction(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("a", 1), ev("a", 2), ev("a", 4)])
    store.append([ev("a", 3)])  # rowid 4, a late gap fill: the highest row, not the latest
    store.mark_delivered(4, {"a": (1, 4)})
    store._prune_acked(store._latest_rowids(), 0.0, 0.0)  # rows 1, 2 and 4 go
    store.close()
    store = EventStore(db)
    store.append([ev("a", 5)])
    assert [s.event.seq for s in store.backlog()] == [5]  # above the cursor: will be sent


def test_gap_fill_survives_restart_after_delivery_and_pruning(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("s", 1), ev("s", 2), ev("s", 6)])
    store.append([ev("s", 4)])  # fills part of the gap 3..5
    store.mark_delivered(4, {"s": (1, 6)})
    store._prune_acked("0", 0.0, 0.0)  # even the rows that filled the gap are gone
    store.close()
    store = EventStore(db)
    assert store.open_gaps() == {("s", 1): [(3, 3), (5, 5)]}
    r = store.append([ev("s", 4), ev("s", 3)])
    assert (r.stored, r.duplicates) == (1, 1)  # 4 again is a duplicate; 3 is new


def test_eviction_does_not_lower_the_free_space_cap(tmp_path: Path) -> None:
    # A model disk of known size whose free space is what our own files leave: the live
    # free space of a shared file system moves under the test (it failed 2 runs in 5).
    db = tmp_path / "a.db"
    wal = tmp_path / "a.db-wal"
    floor = 2**30
    disk = floor + 3 * 2**20 + WAL_RESERVE_BYTES  # about 3 MiB usable by the store

    def wal_size() -> int:
        return wal.stat().st_size if wal.exists() else 0

    def free(_directory: Path) -> int:
        return disk - db.stat().st_size - wal_size()

    def rule() -> int:
        # capacity = own file + free - floor - the WAL's room still to grow
        return min(
            StoreSection().max_buffer_bytes, disk - floor - max(wal_size(), WAL_RESERVE_BYTES)
        )

    store = EventStore(db, StoreSection(min_free_bytes=floor), free_bytes=free)
    fill_to_high_water(store, {"hi": 5, "lo": 0})
    before = store.capacity()
    assert before == rule()
    assert store.make_room()
    # SQLite keeps its freed pages: counting only used pages made the cap fall by what
    # was evicted, and each ladder run shed more (reviewer's reproduction).
    assert store.capacity() == rule()
    assert store.capacity() >= before - max(0, wal_size() - WAL_RESERVE_BYTES)
    assert not store.needs_room()


def test_live_snapshot_migration_drops_the_old_live_keys_and_keeps_the_cursor(db: Path) -> None:
    store = EventStore(db)
    store.close()
    conn = sqlite3.connect(db)
    old = ["daemon.heartbeat", "link.counters", "store.stats", "uplink.phase", "breaker.state"]
    kept = ["uplink.cursor", "events.max_id", "alarm.store_quarantined", "store.salvage"]
    conn.executemany("INSERT INTO agent_state VALUES (?, '1', 0)", [(k,) for k in old + kept])
    conn.execute("UPDATE agent_state SET value = ? WHERE key = 'store.stats'",
                 ('{"loss_received": 123, "top_rowid": 7}',))  # fmt: skip
    conn.execute("DELETE FROM agent_state WHERE key = 'live'")
    conn.execute("DELETE FROM _migrations WHERE name = '004_live_snapshot'")  # as before it
    conn.commit()
    conn.close()
    store = EventStore(db)
    keys = {k for (k,) in store.conn.execute("SELECT key FROM agent_state")}
    # The old figures carried into the new row: the loss ledger keeps what was received.
    assert read_row(store.conn).store == {"loss_received": 123, "top_rowid": 7}
    assert store.loss.received >= 123
    store.close()
    assert keys >= set(kept)
    assert not keys & set(old)


def test_a_locked_database_at_start_is_refused_not_quarantined(db: Path) -> None:
    """An error of the moment (here a lock held through a pending migration; a full disk
    or an I/O error alike) must not move a healthy buffer aside as if it were corrupt."""
    store = EventStore(db)
    store.append([ev("s", 1)])
    store.close()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("DELETE FROM _migrations WHERE name = '004_live_snapshot'")
    other.execute("BEGIN EXCLUSIVE")  # holds the lock the migration needs
    try:
        with pytest.raises(StoreError, match="database is locked"):
            EventStore(db, busy_timeout_ms=50)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not list(db.parent.glob("*.corrupt-*"))
    store = EventStore(db)
    assert store.quarantined is None
    assert store.event_count == 1
    store.close()


def test_a_file_that_is_not_a_database_is_quarantined(db: Path) -> None:
    db.write_bytes(b"not a database, just bytes" * 200)
    store = EventStore(db)
    assert store.quarantined is not None
    assert (
        "not a database"
        in store.conn.execute(
            "SELECT value FROM agent_state WHERE key = 'alarm.store_quarantined'"
        ).fetchone()[0]
    )
    store.close()
