"""The four seed metrics move when the thing they name happens, and only then.

Each test provokes one failure on the real parts (a SQLite store filled past its cap, a
damaged file salvaged, a controller skipping more sequence numbers than the store tracks,
a compacted replay the fleet never acknowledges, a duplicate ack) and reads the metric
through `AgentCollector`, fed the same snapshot the daemon publishes. A clean run of the
whole chain keeps them at 0 (tests/agent/test_metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import UplinkSection
from agent.livestate import DaemonLive, LiveState, UplinkLive
from agent.metrics import AgentCollector
from agent.resilience import Event
from agent.resilience.loss import LossLedger
from agent.resilience.sequence import MAX_GAP_PIECES
from agent.resync import Resync
from agent.store import EventStore, StoreSection, connect

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


def ev(stream: str, seq: int, priority: int = 1, size: int = 8) -> In:
    return In(Event(stream, seq, boot_epoch=1, ts=float(seq), priority=priority,
                    payload=bytes([seq % 251]) * size))  # fmt: skip


def scrape(store: EventStore | None = None, resync: Resync | None = None) -> Samples:
    snap = LiveState(
        daemon=DaemonLive(heartbeat=1000.0),
        store=store.stats() if store else {},
        uplink=UplinkLive(counters=vars(resync.counters) if resync else {}),
    )
    out: Samples = {}
    for family in AgentCollector(lambda: snap, clock=lambda: 1000.0).collect():
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            out.setdefault(name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def seed(m: Samples) -> dict[str, float]:
    """The four seed figures, and duplicate acks."""
    return {
        "loss_ratio": m["ironfleet_replay_event_loss_ratio"][()],
        "convergence_failures": m["ironfleet_replay_convergence_failures"][()],
        "replay_gaps": m["ironfleet_telemetry_gaps"][(("type", "replay"),)],
        "inconsistency": m["ironfleet_mission_state_inconsistency"][()],
        "duplicate_acks": m["ironfleet_uplink_duplicate_acks"][()],
    }


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


# -- loss ratio ------------------------------------------------------------------------


def test_ledger_arithmetic() -> None:
    ledger = LossLedger()
    assert ledger.ratio == 0.0
    ledger.on_stored(90)
    ledger.on_shed("drop_oldest", 9)
    assert (ledger.lost, ledger.ratio) == (9, 0.1)
    ledger.on_shed("salvage_lost", 10)  # never counted as received: joins the total
    assert ledger.ratio == 19 / 100
    ledger.on_gap_lost(2**63)  # a hostile controller's skip: exact, and capped at 1
    assert 0.99 < ledger.ratio <= 1.0


def test_loss_ratio_rises_when_unacked_events_are_shed_and_survives_restart(db: Path) -> None:
    config = StoreSection(max_buffer_bytes=2 * 2**20, min_free_bytes=0, low_water=0.3)
    store = EventStore(db, config)
    assert seed(scrape(store))["loss_ratio"] == 0.0
    per_stream = 0
    while not store.needs_room():
        store.append([ev(n, per_stream + k, p, 200) for n, p in (("hi", 5), ("lo", 0))
                      for k in range(1, 51)])  # fmt: skip
        per_stream += 50
        assert per_stream < 50_000, "the store never reached its high-water mark"
    received = 2 * per_stream
    assert store.make_room()
    shed = sum(r.count for r in store.shed_records())
    assert shed > 0
    m = scrape(store)
    assert seed(m)["loss_ratio"] == pytest.approx(shed / received)
    lost = m["ironfleet_events_lost"]
    assert lost[(("reason", "drop_oldest"),)] + lost[(("reason", "compact_low_priority"),)] == shed
    store.close()
    reopened = EventStore(db, config)  # the ledger is rebuilt from the tables
    assert reopened.loss.received == received
    assert seed(scrape(reopened))["loss_ratio"] == pytest.approx(shed / received)


def test_acked_events_pruned_are_not_loss(db: Path) -> None:
    store = EventStore(db, StoreSection(max_buffer_bytes=2 * 2**20, min_free_bytes=0))
    for start in range(0, 20_000, 500):
        store.append([ev("s", start + k, size=200) for k in range(1, 501)])
        store.mark_delivered(store.stats()["top_rowid"], {})  # type: ignore[arg-type]
        if store.needs_room():
            store.make_room()
    assert store.counters["pruned_acked"] > 0
    assert seed(scrape(store))["loss_ratio"] == 0.0


def test_loss_ratio_counts_sequence_numbers_whose_gap_was_given_up(db: Path) -> None:
    store = EventStore(db)
    seqs = range(1, 2 * (MAX_GAP_PIECES + 2), 2)  # 1, 3, 5, ...: one missing number each
    batch: list[In] = []
    for q in seqs:
        batch.append(ev("s", q))
        if len(batch) == 1000:
            store.append(batch)
            batch = []
    store.append(batch)
    assert store.loss.gap_lost == 1  # the oldest single-number gap left the tracking
    m = scrape(store)
    assert m["ironfleet_events_lost"][(("reason", "gap_given_up"),)] == 1
    assert seed(m)["loss_ratio"] == pytest.approx(1 / (len(seqs) + 1))
    store.close()
    assert EventStore(db).loss.gap_lost == 1


def test_loss_ratio_counts_rows_a_salvage_could_not_read(db: Path) -> None:
    store = EventStore(db)
    for start in range(0, 20_000, 1000):
        store.append([ev(n, start // 2 + k, size=100) for k in range(1, 501) for n in "ab"])
    store.close()
    data = bytearray(db.read_bytes())
    victim = len(data) // 4096 // 2
    data[victim * 4096 : victim * 4096 + 4096] = b"\xa5" * 4096
    db.write_bytes(bytes(data))
    salvaged = EventStore(db)
    assert salvaged.quarantined is not None
    lost = 20_000 - salvaged.salvaged
    assert lost > 0
    assert salvaged.loss.shed == {"salvage_lost": lost}
    assert seed(scrape(salvaged))["loss_ratio"] == pytest.approx(lost / 20_000)


# -- the fleet side: replay gaps, convergence, backwards state, duplicate acks -----------


def resync_on(store: EventStore, **config: object) -> tuple[Resync, list[int]]:
    delivered: list[int] = []

    def deliver(
        upto: int, positions: dict[str, tuple[int, int]], frontiers: tuple[int, ...]
    ) -> None:
        if upto >= store.cursor:  # the cursor moves (not only a class frontier)
            delivered.append(upto)
        store.mark_delivered(upto, positions, frontiers=frontiers)

    section = UplinkSection(**{"batch_max_events": 10, "batch_max_delay_ms": 0.0, **config})  # type: ignore[arg-type]
    return Resync(connect(store.path, readonly=True), "v1", section, deliver, run_id=1), delivered


def test_a_replay_the_fleet_never_acks_is_a_replay_gap_and_a_convergence_failure(
    db: Path,
) -> None:
    store = EventStore(db)
    store.append([ev(f"s{k}", q) for q in range(1, 4) for k in range(3)])
    resync, _ = resync_on(store, ack_timeout=2.0)
    resync.on_connected(0.0)
    state = resync.run_once(0.0)
    assert [o.kind for o in state] == ["state"]
    backlog = resync.run_once(0.1)
    for out in backlog:
        assert resync.on_ack(out.batch_id, 0.2)
    assert seed(scrape(store, resync)) == dict.fromkeys(seed(scrape(store, resync)), 0.0)
    resent = resync.run_once(2.5)  # the state batch's ack is overdue
    assert [o.kind for o in resent] == ["state"]
    m = seed(scrape(store, resync))
    assert (m["replay_gaps"], m["convergence_failures"]) == (1, 1)
    resync.on_disconnected()  # the resend is lost with the connection
    m = seed(scrape(store, resync))
    assert (m["replay_gaps"], m["convergence_failures"]) == (2, 1)
    assert m["inconsistency"] == 0


def test_duplicate_acks_have_their_own_counter_not_the_inconsistency(db: Path) -> None:
    store = EventStore(db)
    store.append([ev("s", q) for q in range(1, 31)])
    resync, delivered = resync_on(store)
    resync.on_connected(0.0)
    state = resync.run_once(0.0)
    batches = resync.run_once(0.1)
    for out in state + batches:
        assert resync.on_ack(out.batch_id, 0.2)
    for out in batches:  # a second collector acks the same batches
        assert not resync.on_ack(out.batch_id, 0.3)
    assert delivered
    m = seed(scrape(store, resync))
    assert m["duplicate_acks"] == len(batches)
    assert m["inconsistency"] == 0


def test_a_replay_older_than_the_fleets_checkpoint_is_an_inconsistency(db: Path) -> None:
    """The fleet acknowledged seq 30 of `s`; the store lost the rows above 10 (here by a
    damaged file's rows removed by hand): its replay would move the fleet's state back."""
    store = EventStore(db)
    store.append([ev("s", q) for q in range(1, 31)] + [ev("t", q) for q in range(1, 4)])
    top = store.stats()["top_rowid"]
    assert store.mark_delivered(int(top), {"s": (1, 30), "t": (1, 3)})
    store.close()
    with connect(db) as conn:
        conn.execute("DELETE FROM events WHERE seq > 10 AND stream_id = 1")
        conn.execute(
            "UPDATE stream_epochs SET high_seq = 10, latest_rowid = "
            "(SELECT max(id) FROM events WHERE stream_id = 1) WHERE stream_id = 1"
        )
    store = EventStore(db)
    resync, _ = resync_on(store)
    resync.on_connected(0.0)
    assert [o.kind for o in resync.run_once(0.0)] == ["state"]
    m = seed(scrape(store, resync))
    assert m["inconsistency"] == 1  # `s` only: `t` is where the fleet left it
    assert m["duplicate_acks"] == 0
