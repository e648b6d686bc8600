"""Uplink chaos tier, fleet side: three collectors in one MQTT share group writing to one
PostgreSQL, against a real mosquitto and a real PostgreSQL (tests/pgharness.py), fed by
twelve vehicles' worth of batches from a load generator that speaks the fleet protocol
as agents do (signed acks verified, resends after the ack timeout, the compacted state
first after every connect, duplicates and reorders injected, controller reboots, a
backlog from 3 days ago and a clock at 1970).

Faults, while the load runs: SIGKILL a collector (restarted with its client id, so it
resumes its MQTT session), an immediate (crash) restart of PostgreSQL, a SIGKILL of the
broker (persistence off: every session and queued message gone) and its restart.

Oracle (pgharness.pg_verdict), once every batch is acked: for every vehicle every event
of every acked batch, and so every event below its checkpoint, is in PostgreSQL exactly
once; nothing is stored that was never sent; the state table equals `replay` of every
event stored. The control runs the collectors with the ack sent before the PostgreSQL
commit, and must be caught (acked batches missing after the server's restart).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.pgstore import PgCollectorStore

from fleetload import FleetLoad
from pgharness import CollectorProc, PgCluster, pg_verdict, shared_cluster
from simharness import Broker
from support import fleet_keys, wait_for

VEHICLES = 12
BATCHES = 80  # per vehicle, of BATCH_EVENTS: 48,000 events
BATCH_EVENTS = 50
RATE = 150.0  # batches/s over the fleet: the load lasts ~6.5 s, so the faults land in it
LOAD = {"vehicles": VEHICLES, "batches": BATCHES, "batch_events": BATCH_EVENTS, "rate": RATE,
        "dup_every": 7, "reorder_every": 5, "reboot_every": 9, "old_every": 97,
        "clock_fault_every": 331}  # fmt: skip


@pytest.fixture(scope="session")
def pg(request: pytest.FixtureRequest) -> PgCluster:
    return shared_cluster(request)


@pytest.fixture
def fleet(pg: PgCluster, broker: Broker, tmp_path: Path, request: pytest.FixtureRequest
          ) -> Iterator[tuple[str, list[CollectorProc]]]:  # fmt: skip
    """A fresh fleet database and three collectors (broken ones for the control)."""
    url = pg.create_database("chaos_" + request.node.name[5:35])
    PgCollectorStore(url).close()  # schema first, so the three do not race for it
    broken = getattr(request, "param", None)
    private, _ = fleet_keys()
    cols = [CollectorProc(tmp_path, url, broker.port, f"c{i}", private, broken=broken).start()
            for i in range(3)]  # fmt: skip
    wait_for(lambda: all(c.connected() for c in cols), 30, "three collectors to subscribe")
    yield url, cols
    for c in cols:
        c.kill()


def progress(load: FleetLoad, fraction: float) -> None:
    target = int(fraction * VEHICLES * BATCHES)
    wait_for(lambda: load.acked_batches() >= target, 60, f"{target} batches acked")


def commit_failures(cols: list[CollectorProc]) -> int:
    return sum(c.text().count("collector_commit_failed") for c in cols)


@pytest.mark.timeout(180)
def test_three_pg_collectors_under_faults_lose_nothing(
    pg: PgCluster, broker: Broker, fleet: tuple[str, list[CollectorProc]], chaos_report: Any
) -> None:
    url, cols = fleet
    load = FleetLoad(broker.port, fleet_keys()[1], **LOAD).start()  # type: ignore[arg-type]
    try:
        progress(load, 0.2)
        wait_for(lambda: cols[1].in_transaction(pg), 30, "c1 inside a batch's transaction")
        cols[1].kill(signal.SIGKILL)  # mid-batch: its transaction is open (or just was)
        cols[1].start()
        progress(load, 0.4)
        pg.stop("immediate")  # a crash: the server replays its WAL at start
        try:
            wait_for(lambda: commit_failures(cols) > 0, 30, "a batch to hit the outage")
        finally:
            pg.start()
        progress(load, 0.6)
        broker.stop(signal.SIGKILL)
        broker.start()
        wait_for(load.done, 90, "every batch acked after the faults")
    finally:
        load.stop()
    verdict = pg_verdict(url, load)
    print(f"fleet pg: {verdict.describe()} resends={load.resends} dups={load.duplicates_sent} "
          f"reordered={load.reordered} connects={load.connects} "
          f"commit_failures={commit_failures(cols)}")  # fmt: skip
    assert verdict.ok, verdict.describe()
    assert verdict.acked == VEHICLES * BATCHES * BATCH_EVENTS
    assert load.acks_rejected == 0
    assert all("collector_handler_bug" not in c.text() for c in cols)
    # The broker's restart forgot all three sessions at once: one collector of the group
    # asked every vehicle for a replay, the other two saw it claimed.
    sent = sorted(
        int(n)
        for c in cols
        for n in re.findall(r"collector_session_lost replays_sent=(\d+)", c.text())
    )
    assert sent == [0, 0, VEHICLES], sent
    for c in cols:
        assert c.kill(signal.SIGTERM) == 0
    assert all(c.acks() > 0 for c in cols), [c.acks() for c in cols]
    chaos_report.record("fleet pg: 3 collectors, kill/pg restart/broker", acked=verdict.acked,
                        injected=3 + load.duplicates_sent + load.reordered,
                        lost=len(verdict.missing_acked),
                        duplicates=len(verdict.stored_twice),
                        integrity_failures=len(verdict.state_diff))  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fleet", ["ack_before_commit"], indirect=True)
def test_control_ack_before_pg_commit_is_caught(
    pg: PgCluster, broker: Broker, fleet: tuple[str, list[CollectorProc]], chaos_report: Any
) -> None:
    """The collectors ack a batch before committing it. PostgreSQL stops while the load
    runs: batches acked during the outage were never stored, and the vehicle will not
    send them again; the oracle must report them."""
    url, cols = fleet
    assert all("broken_variant name=ack_before_commit" in c.text() for c in cols)
    load = FleetLoad(broker.port, fleet_keys()[1], **LOAD).start()  # type: ignore[arg-type]
    try:
        progress(load, 0.2)
        pg.stop("immediate")
        try:
            before = load.acks
            wait_for(lambda: load.acks >= before + 5, 30, "acks during the outage")
        finally:
            pg.start()
        wait_for(load.done, 60, "every batch acked")
    finally:
        load.stop()
    verdict = pg_verdict(url, load)
    print(f"control ack_before_commit: {verdict.describe()}")
    assert verdict.missing_acked, "the oracle missed acked batches that were never stored"
    assert not verdict.ok
    chaos_report.record("control: collector acks before pg commit", controls_failed=1,
                        acked=verdict.acked)  # fmt: skip
