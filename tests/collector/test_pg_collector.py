"""The collector's PostgreSQL store against a real server (tests/pgharness.py), and
collectors sharing the load through a real mosquitto.

Unit level: dedup by (vehicle, stream, boot_epoch, seq) whichever store instance gets the
resend, a state that only moves forward so any order of batches across any number of
collectors converges to `replay` of what is stored, day partitions and retention, a
server restart (no ack while it is down, reconnect after), a value PostgreSQL cannot hold.
Integration: three `ironfleet-collector run --group` processes split twelve vehicles.
The chaos scenario (SIGKILL, PostgreSQL restart, broker bounce) and its control are in
tests/chaos/test_fleet_pg.py.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import psycopg
import pytest

from agent.errors import CommitFailed
from agent.fleet import Batch
from agent.resilience import Event, replay
from fleet.collector import Collector, CollectorStore, main
from fleet.pgstore import (
    AHEAD_DAYS,
    DAY,
    InsertMethod,
    PgCollectorStore,
    day_of,
    partition_name,
)

from fleetload import FleetLoad
from pgharness import CollectorProc, PgCluster, pg_verdict
from simharness import Broker
from support import fleet_keys, wait_for

NOW = 1_796_000_000.0  # a fixed "now" (2026-11-30): partitions are days of it


def event(stream: str, seq: int, epoch: int = 1, ts: float = NOW, n: int = 0) -> Event:
    return Event(stream, seq, boot_epoch=epoch, ts=ts, kind="sample", priority=1,
                 payload=msgpack.packb({"n": n or seq}))  # fmt: skip


def batch(vehicle: str, events: list[Event], batch_id: int = 1, kind: str = "events",
          historical: bool = False) -> Batch:  # fmt: skip
    return Batch(vehicle, batch_id, kind, historical, tuple((e, 3) for e in events))


@pytest.fixture
def url(pg: PgCluster, request: pytest.FixtureRequest) -> str:
    return pg.create_database("t_" + request.node.name[:40].lower())


@pytest.fixture
def store(url: str) -> Iterator[PgCollectorStore]:
    s = PgCollectorStore(url, now=NOW)
    yield s
    s.close()


def state_is_replay(s: PgCollectorStore, vehicle: str) -> None:
    """The state table equals `replay` of every event stored for `vehicle`."""
    with psycopg.connect(s.url) as conn:
        rows = conn.execute(
            "SELECT stream, boot_epoch, seq, ts, kind, priority, payload FROM events "
            "WHERE vehicle = %s", (vehicle,)
        ).fetchall()  # fmt: skip
    stored = [Event(st, q, boot_epoch=e, ts=ts, kind=k, priority=p, payload=bytes(b))
              for st, e, q, ts, k, p, b in rows]  # fmt: skip
    assert s.state(vehicle) == {e.stream: (e.boot_epoch, e.seq, e.payload) for e in replay(stored)}


def test_ingest_stores_once_and_counts_duplicates(store: PgCollectorStore) -> None:
    b = batch("v1", [event("a", 1), event("a", 2), event("b", 1)])
    assert store.ingest(b, now=NOW) == (3, 0)
    assert store.ingest(b, now=NOW) == (0, 3)  # a resend stores nothing new
    mixed = batch("v1", [event("a", 2), event("a", 3)], batch_id=2)
    assert store.ingest(mixed, now=NOW) == (1, 1)
    assert store.keys("v1") == {("a", 1, 1), ("a", 1, 2), ("a", 1, 3), ("b", 1, 1)}
    assert store.ingest(batch("v1", []), now=NOW) == (0, 0)
    row = store.report()[0]
    assert (row["events"], row["duplicates_received"], row["batches"]) == (4, 4, 4)
    assert row["missing_in_sequence"] == 0
    assert row["reused_keys"] == 0
    state_is_replay(store, "v1")


@pytest.mark.parametrize("method", ["auto", "unnest", "copy", "values"])
def test_every_insert_method_stores_the_same(url: str, method: InsertMethod) -> None:
    """COPY (large batches), one unnest statement (small ones), multi-row VALUES: the same
    rows, counts, fast path and ON CONFLICT path, and state."""
    s = PgCollectorStore(url, method=method, now=NOW)
    big = batch("v1", [event(f"s{k % 7}", k) for k in range(1, 201)])  # COPY under auto
    assert s.ingest(big, now=NOW) == (200, 0)
    overlap = batch("v1", [event(f"s{k % 7}", k) for k in range(195, 206)], batch_id=2)
    assert s.ingest(overlap, now=NOW) == (5, 6)
    assert s.ingest(batch("v1", [], batch_id=3), now=NOW) == (0, 0)
    assert len(s.keys("v1")) == 205
    state_is_replay(s, "v1")
    s.close()


def test_vehicles_heard_from_in_name_order_up_to_a_limit(url: str, tmp_path: Path) -> None:
    """What a collector whose broker forgot its session asks for a replay: every vehicle
    either store has a row for (a batch or a status), in name order, at most `limit`."""
    stores = [PgCollectorStore(url, now=NOW), CollectorStore(tmp_path / "c.db")]
    for s in stores:
        assert s.vehicles(10) == []
        for i, name in enumerate(("v3", "v1", "v2")):
            s.ingest(batch(name, [event("s0", 1)], batch_id=i + 1), now=NOW)
        s.set_status("v0", "online", NOW)
        assert s.vehicles(10) == ["v0", "v1", "v2", "v3"]
        assert s.vehicles(2) == ["v0", "v1"]
    stores[0].close()


def test_one_collector_of_the_group_claims_the_replay(url: str) -> None:
    """After a broker restart every member of a group finds its session gone at once;
    the first to claim sends the fleet-wide replay request, the others do not, until the
    interval has passed."""
    a, b = PgCollectorStore(url, now=NOW), PgCollectorStore(url, now=NOW)
    assert a.claim_replay(30.0)
    assert not b.claim_replay(30.0)
    assert not a.claim_replay(30.0)
    assert b.claim_replay(0.0)  # once the interval has passed, the next loss is served
    a.close()
    b.close()


def test_state_only_moves_forward_across_collectors(url: str) -> None:
    """Batches of one vehicle, shuffled, duplicated and spread over three store
    instances (three collectors), some historical: every order converges to `replay`."""
    rng = random.Random(7)
    events = [event(f"s{k}", seq, epoch, n=k * 1000 + seq)
              for k in range(6) for epoch in (1, 2) for seq in range(1, 30)]  # fmt: skip
    rng.shuffle(events)
    batches = [batch("v9", events[i : i + 25], batch_id=i + 1, historical=rng.random() < 0.3)
               for i in range(0, len(events), 25)]  # fmt: skip
    batches += rng.sample(batches, 5)  # resends
    stores = [PgCollectorStore(url, now=NOW) for _ in range(3)]
    for i, b in enumerate(batches):
        stores[i % 3].ingest(b, now=NOW)
    expect = {e.stream: (e.boot_epoch, e.seq, e.payload) for e in replay(events)}
    assert stores[0].state("v9") == expect
    state_is_replay(stores[0], "v9")
    # an older event arriving last (historical or not) never moves the state back
    stores[1].ingest(batch("v9", [event("s0", 99, epoch=1)], batch_id=999), now=NOW)
    assert stores[2].state("v9")["s0"][:2] == (2, 29)
    for s in stores:
        s.close()


def test_concurrent_collectors_overlapping_batches(url: str) -> None:
    """Three collectors ingest the same overlapping batches at once (lock order and
    deadlock retries): every key stored once, state equal to replay."""
    events = [event(f"s{k}", seq, n=seq) for k in range(20) for seq in range(1, 40)]
    batches = [batch("v3", events[i : i + 60], batch_id=i) for i in range(0, len(events), 30)]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        s = PgCollectorStore(url, now=NOW)
        order = list(batches)
        random.Random(seed).shuffle(order)
        try:
            for b in order:
                s.ingest(b, now=NOW)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    check = PgCollectorStore(url, now=NOW)
    assert check.keys("v3") == {(e.stream, 1, e.seq) for e in events}
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (len(events),)
    state_is_replay(check, "v3")
    check.close()


def test_partitions_by_event_day_and_retention(store: PgCollectorStore, url: str) -> None:
    today = day_of(NOW)
    made = store.partitions()
    assert [partition_name(d) for d in range(today - 1, today + AHEAD_DAYS + 1)] == made
    old = NOW - 10 * DAY  # a backlog from 10 days ago gets its own day
    clock_fault = 1000.0  # a controller clock in 1970: DEFAULT
    store.ingest(batch("v1", [event("a", 1, ts=old), event("a", 2, ts=clock_fault),
                              event("a", 3)]), now=NOW)  # fmt: skip
    assert store.ingest(batch("v1", [event("a", 1, ts=old)]), now=NOW) == (0, 1)
    where = dict(
        psycopg.connect(url)
        .execute("SELECT seq, tableoid::regclass::text FROM events ORDER BY seq")
        .fetchall()
    )
    assert where == {1: partition_name(today - 10), 2: "events_default", 3: partition_name(today)}
    # a day past the window lands in DEFAULT, and moves when its partition is made
    future = NOW + (AHEAD_DAYS + 3) * DAY
    store.ingest(batch("v1", [event("a", 4, ts=future)]), now=NOW)
    later = NOW + 4 * DAY
    store.ensure_partitions(now=later)
    assert partition_name(day_of(future)) in store.partitions()
    moved = (
        psycopg.connect(url)
        .execute("SELECT tableoid::regclass::text FROM events WHERE seq = 4")
        .fetchone()
    )
    assert moved == (partition_name(day_of(future)),)
    # retention: keep 2 full days before `later`'s day
    dropped, deleted = store.retention(2, now=later)
    assert partition_name(today - 10) in dropped
    assert partition_name(today) in dropped
    assert deleted == 1  # the 1970 row, received "6 days" before
    assert store.keys("v1") == {("a", 1, 4)}
    assert store.partitions()[0] == partition_name(day_of(later) - 2)
    with pytest.raises(ValueError, match="keep_days"):
        store.retention(0)


def test_server_restart_means_no_ack_then_recovery(pg: PgCluster, url: str) -> None:
    """While PostgreSQL is down a batch is refused (CommitFailed: the collector does not
    ack it, the vehicle resends); after the restart the next batch reconnects."""
    s = PgCollectorStore(url, now=NOW)
    collector = Collector(s)  # no transport: acks would be published after ingest returns
    s.ingest(batch("v1", [event("a", 1)]), now=NOW)
    pg.stop("immediate")
    try:
        with pytest.raises(CommitFailed):
            s.ingest(batch("v1", [event("a", 2)]), now=NOW)
        collector.handle("ironfleet/v1/v1/events", batch("v1", [event("a", 2)], 2).encode())
        assert collector.commit_failures == 1
    finally:
        pg.start()
    assert s.ingest(batch("v1", [event("a", 2)]), now=NOW) == (1, 0)
    assert s.keys("v1") == {("a", 1, 1), ("a", 1, 2)}
    s.close()


def test_nul_in_a_name_is_kept_aside_and_the_batch_acked(store: PgCollectorStore) -> None:
    """PostgreSQL text cannot hold U+0000, which the serial protocol allows in names: those
    events go to events_nul (names as bytes) in the batch's transaction, so the batch is
    stored and acked and the vehicle's backlog never stalls behind it (it did when such a
    batch was refused); a resend stores nothing twice."""
    mixed = batch("v1", [event("a\x00b", 1), event("ok", 1), event("k\x00", 2)])
    assert store.ingest(mixed, now=NOW) == (3, 0)
    assert store.ingest(mixed, now=NOW) == (0, 3)
    assert store.keys("v1") == {("a\x00b", 1, 1), ("ok", 1, 1), ("k\x00", 1, 2)}
    assert store.ingest(batch("v1", [event("\x00", 5)], 2), now=NOW) == (1, 0)  # alone
    assert set(store.state("v1")) == {"ok"}  # the state table holds text names only


def test_cli_report_and_retention(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    PgCollectorStore(url).ingest(batch("v7", [event("a", 1, ts=time.time())]))
    assert main(["report", "--db", url, "--json"]) == 0
    assert '"vehicle": "v7"' in capsys.readouterr().out
    assert main(["retention", "--db", url, "--keep-days", "30"]) == 0
    assert "dropped 0 partitions" in capsys.readouterr().out
    assert main(["retention", "--db", "file.db", "--keep-days", "3"]) == 2
    assert main(["report", "--db", "postgresql://nobody@127.0.0.1:1/none"]) == 1
    assert main(["retention", "--help"]) == 0  # returned, not raised as SystemExit


@pytest.mark.timeout(120)
def test_three_collectors_share_the_vehicles(pg: PgCluster, tmp_path: Path,
                                             broker: Broker) -> None:  # fmt: skip
    """`ironfleet-collector run --group` x3 against mosquitto: every collector takes a
    share, every batch is acked once stored, the oracle holds."""
    url = pg.create_database("t_share")
    PgCollectorStore(url).close()
    private, public = fleet_keys()
    cols = [CollectorProc(tmp_path, url, broker.port, f"c{i}", private).start() for i in range(3)]
    try:
        wait_for(lambda: all(c.connected() for c in cols), 20, "three collectors")
        load = FleetLoad(broker.port, public, vehicles=12, batches=20, dup_every=5).start()
        try:
            wait_for(load.done, 30, "every batch acked")
        finally:
            load.stop()
        verdict = pg_verdict(url, load)
        assert verdict.ok, verdict.describe()
        assert verdict.acked == 12 * 20 * 50
        for c in cols:
            assert c.kill(signal.SIGTERM) == 0
        shares = [c.acks() for c in cols]
        assert all(n > 0 for n in shares), f"a collector got no share: {shares}"
        assert load.acks_rejected == 0
    finally:
        for c in cols:
            c.kill()
