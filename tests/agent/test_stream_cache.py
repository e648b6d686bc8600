"""Bounded per-stream cache and boot-epoch rollbacks, on real SQLite files.

The cache is an optimisation only: a store whose cache holds 2 streams must decide
exactly like one that holds them all (same rows, duplicates, gaps, latest, checkpoints),
across evictions and restarts. A controller's lower boot epoch after a higher one is
stored as its next epoch, alarmed, and never pins replay.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.resilience import Event
from agent.store import ROLLBACK_ALARM, EventStore, StoreSection, read_latest
from agent.streamcache import LOAD_CHUNK, MAX_CACHED_EPOCHS_PER_STREAM, load_stream

BIG = StoreSection(max_cached_streams=1_000_000)
TINY = StoreSection(max_cached_streams=2)
U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


def ev(stream: str, seq: int, epoch: int = 1, controller: str = "ecu0") -> In:
    payload = bytes([seq % 251, epoch % 251]) * 4
    event = Event(stream, seq, boot_epoch=epoch, ts=float(seq), payload=payload)
    return In(event, controller_id=controller)


def snapshot(store: EventStore) -> dict[str, object]:
    stats = store.stats()
    return {
        "rows": [(s.rowid, s.event) for s in store.iter_events()],
        "latest": store.latest(),
        "gaps": store.open_gaps(),
        "checkpoints": store.checkpoints(),
        "stats": {k: stats[k] for k in ("events", "streams", "open_gaps", "top_rowid")},
        "counters": dict(store.counters),
    }


# A history: batches of (stream, seq, announced epoch, controller), with restarts and
# acknowledgements in between. Few names so that streams are evicted and come back.
arrivals = st.tuples(
    st.sampled_from(["a", "b", "c", "d", "e", "f"]),
    st.integers(1, 12),  # small: gaps open and are filled late, often after an eviction
    st.integers(1, 4),
    st.sampled_from(["ecu0", "ecu1"]),
)
steps = st.lists(
    st.one_of(
        st.lists(arrivals, max_size=12).map(lambda b: ("append", b)),
        st.just(("restart", [])),
        st.integers(0, 200).map(lambda n: ("ack", n)),
    ),
    max_size=16,
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps)
def test_tiny_cache_decides_exactly_like_a_big_one(tmp_path: Path, history: list) -> None:  # type: ignore[type-arg]
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    paths = {"tiny": work / "tiny.db", "big": work / "big.db"}
    configs = {"tiny": TINY, "big": BIG}
    stores = {k: EventStore(p, configs[k]) for k, p in paths.items()}
    for step, arg in history:
        if step == "append":
            batch = [ev(s, q, e, c) for s, q, e, c in arg]
            results = {k: s.append(batch, now=1.0) for k, s in stores.items()}
            assert results["tiny"] == results["big"]
        elif step == "restart":
            for k, s in stores.items():
                s.close()
                stores[k] = EventStore(paths[k], configs[k])
        else:
            for s in stores.values():
                positions = {e.stream: e.position for e in s.latest() if e.seq % 3 != arg % 3}
                s.mark_delivered(arg, positions, now=1.0)
        assert len(stores["tiny"]._state.streams) <= TINY.max_cached_streams
        assert snapshot(stores["tiny"]) == snapshot(stores["big"])
    for s in stores.values():
        s.close()


def test_many_streams_keep_the_cache_bounded_and_dedup_exact(tmp_path: Path) -> None:
    config = StoreSection(max_cached_streams=16)
    store = EventStore(tmp_path / "a.db", config)
    names = [f"ecu0/s{k}" for k in range(3000)]
    for start in range(0, len(names), 500):
        store.append([ev(n, 1) for n in names[start : start + 500]])
    assert len(store._state.streams) <= 16
    assert len(store._last_seen) <= 16 + 500  # flushed with the next append past the cap
    r = store.append([ev(n, 1) for n in names[:1000]] + [ev(names[0], 3)])
    assert (r.stored, r.duplicates, r.gaps_opened) == (1, 1000, 1)  # evicted, still dups
    assert store.stats()["streams"] == 3000
    assert store.stats()["open_gaps"] == 1
    store.close()
    store = EventStore(tmp_path / "a.db", config)
    assert len(store._state.streams) == 0  # nothing loaded at start
    assert store.stats()["streams"] == 3000
    assert store.stats()["open_gaps"] == 1
    r = store.append([ev(names[0], 2), ev(names[1], 1), ev(names[2], 2)])
    assert (r.stored, r.duplicates, r.gaps_filled) == (2, 1, 1)
    assert store.stats()["open_gaps"] == 0
    assert len(read_latest(store.conn, limit=10)) == 10
    page = read_latest(store.conn, after=names[1], limit=2)
    assert [e.stream for _, e, _, _ in page] == sorted(names)[sorted(names).index(names[1]) + 1 :][
        :2
    ]
    store.close()


def test_eviction_keeps_the_latest_of_streams_not_in_the_cache(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "a.db", StoreSection(max_cached_streams=2))
    for seq in (1, 2, 3):
        store.append([ev(f"s{k}", seq) for k in range(10)])
    store.append([ev("s0", 1, epoch=2)])  # s0's latest is now in epoch 2
    store.mark_delivered(store.stats()["top_rowid"], {})
    store._prune_acked(store._latest_rowids(), 0.0, 0.0)
    left = sorted((s.event.stream, s.event.boot_epoch, s.event.seq) for s in store.iter_events())
    assert left == [("s0", 2, 1)] + [(f"s{k}", 1, 3) for k in range(1, 10)]
    store.close()


def test_boot_epoch_rollback_is_alarmed_and_never_pins_replay(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    store = EventStore(db, StoreSection(max_cached_streams=16))
    store.append([ev("ecu0/s", 1, 3), ev("ecu0/s", 2, 3)])
    store.append([ev("ecu0/s", 1, U32_MAX)])  # a bogus (or bit-flipped) HELLO
    store.mark_delivered(store.stats()["top_rowid"], {"ecu0/s": (U32_MAX, 1)})
    assert store.counters["epoch_rollbacks"] == 0
    r = store.append([ev("ecu0/s", 1, 4), ev("ecu0/s", 2, 4)])  # the real next session
    assert (r.stored, r.duplicates) == (2, 0)
    assert store.counters["epoch_rollbacks"] == 1
    [latest] = store.latest()
    expected = (U32_MAX + 1, 2, ev("x", 2, 4).event.payload)
    assert (latest.boot_epoch, latest.seq, latest.payload) == expected
    alarm = store.conn.execute(
        "SELECT value FROM agent_state WHERE key = ?", (ROLLBACK_ALARM,)
    ).fetchone()[0]
    assert alarm == f"controller=ecu0 announced=4 highest={U32_MAX} stored={U32_MAX + 1}"
    # The checkpoint follows the newer session, as the fleet acknowledges it.
    assert store.mark_delivered(store.stats()["top_rowid"], {"ecu0/s": (U32_MAX + 1, 2)})
    assert store.checkpoint("ecu0/s") == (U32_MAX + 1, 2)
    store.close()
    # Retransmits of that session after a restart are still duplicates (same mapping),
    # and another controller is not affected.
    store = EventStore(db, StoreSection(max_cached_streams=16))
    r = store.append([ev("ecu0/s", 2, 4), ev("ecu0/s", 3, 4), ev("ecu1/t", 1, 2, "ecu1")])
    assert (r.stored, r.duplicates) == (2, 1)
    assert store.counters["epoch_rollbacks"] == 0
    assert {(e.stream, e.boot_epoch, e.seq) for e in store.latest()} == {
        ("ecu0/s", U32_MAX + 1, 3), ("ecu1/t", 2, 1)
    }  # fmt: skip
    stored = sorted((s.event.boot_epoch, s.event.seq) for s in store.iter_events())
    assert stored == [(2, 1), (3, 1), (3, 2), (U32_MAX, 1), (U32_MAX + 1, 1), (U32_MAX + 1, 2),
                      (U32_MAX + 1, 3)]  # nothing lost  # fmt: skip
    # A second rollback (the controller's next real boot) is the next stored epoch again.
    r = store.append([ev("ecu0/s", 1, 5)])
    assert store.counters["epoch_rollbacks"] == 1
    assert store.latest()[0].boot_epoch == U32_MAX + 2
    store.close()


def test_rollback_rule_is_seeded_from_a_database_written_before_it(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    store = EventStore(db)
    store.append([ev("ecu0/s", 1, U32_MAX)])
    # As if written by the code before migration 003: no recorded sessions.
    store.conn.execute("DELETE FROM controller_epochs")
    store.conn.execute("DELETE FROM _migrations WHERE name = '003_controller_epochs'")
    store.conn.execute("DROP TABLE controller_epochs")
    store.close()
    store = EventStore(db)
    store.append([ev("ecu0/s", 1, 2)])
    assert store.counters["epoch_rollbacks"] == 1
    assert store.latest()[0].boot_epoch == U32_MAX + 1
    store.close()


def test_cache_caps_at_max_and_max_plus_one(tmp_path: Path) -> None:
    cap = 16
    store = EventStore(tmp_path / "a.db", StoreSection(max_cached_streams=cap))
    store.append([ev(f"s{k}", 1) for k in range(cap)])
    assert len(store._state.streams) == cap
    assert store._state.streams.get("s0") is not None
    store.append([ev(f"s{cap}", 1)])  # max + 1: the least recently used goes
    assert len(store._state.streams) == cap
    assert store._state.streams.get("s0") is None
    assert store._state.streams.get("s1") is not None
    # One stream through many boot epochs: its entry keeps at most the cap of epochs.
    epochs = MAX_CACHED_EPOCHS_PER_STREAM
    for e in range(1, epochs + 1):
        store.append([ev("s1", 1, epoch=1 + e)])
    entry = store._state.streams.get("s1")
    assert entry is not None
    assert len(entry.epochs) == epochs
    store.append([ev("s1", 1, epoch=epochs + 2)])
    assert len(entry.epochs) == epochs
    assert 1 not in entry.epochs  # the oldest went; it is read back when needed
    r = store.append([ev("s1", 1, epoch=1)])
    assert (r.stored, r.duplicates) == (0, 1)
    store.close()


def test_entries_read_in_bulk_equal_point_reads_and_stay_bounded(tmp_path: Path) -> None:
    # mark_delivered asks for every stream a fleet ack passed at once (StreamState.entries):
    # more names than one read takes, unknown names among them, on a cold cache.
    names = [f"ecu0/s{k}" for k in range(LOAD_CHUNK * 2 + 7)]
    store = EventStore(tmp_path / "a.db", BIG)
    store.append([ev(n, 1) for n in names] + [ev(names[3], 2)])
    store.mark_delivered(store.stats()["top_rowid"], {names[3]: (1, 2), names[5]: (1, 1)})
    store.close()
    cap = StoreSection(max_cached_streams=LOAD_CHUNK)
    store = EventStore(tmp_path / "a.db", cap)
    asked = [*names, "never-seen", names[0]]
    got = store._state.entries(asked)
    assert set(got) == set(names)  # the unknown name is left out, a repeated one kept once
    for name in names:
        point = load_stream(store.conn, name)
        assert point is not None
        assert (got[name].sid, got[name].known, got[name].checkpoint) == (
            point.sid, point.known, point.checkpoint,
        )  # fmt: skip
    assert got[names[3]].checkpoint == (1, 2)
    assert got[names[5]].checkpoint == (1, 1)
    assert len(store._state.streams) == LOAD_CHUNK  # cached, within the cap
    # What was cached is committed truth: appending after it decides as a fresh store does.
    r = store.append([ev(names[-1], 1), ev(names[-1], 3)])
    assert (r.stored, r.duplicates, r.gaps_opened) == (1, 1, 1)
    store.close()
