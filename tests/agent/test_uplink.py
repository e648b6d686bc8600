"""Uplink end to end: simulator -> pty -> agent -> mosquitto -> collector, with faults."""

from __future__ import annotations

import random
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.resilience import Event

from fleetharness import (
    VEHICLE,
    CollectorHarness,
    StartAgent,
    StartSim,
    check_zero_loss,
    cursor_history,
    uplink,
    wait_drained,
)
from netproxy import TcpProxy
from simharness import Broker, TruthReader, agent_state, live
from support import wait_for


@pytest.fixture
def collector(tmp_path: Path, broker: Broker) -> Iterator[CollectorHarness]:
    harness = CollectorHarness(tmp_path / "collector.db", broker.port)
    wait_for(lambda: harness.sub.connected, 10, "the collector to connect")
    yield harness
    harness.stop()


@pytest.mark.parametrize("codec", ["zlib", "columnar"])
def test_steady_state_zero_loss(
    start_sim: StartSim,
    start_agent: StartAgent,
    broker: Broker,
    collector: CollectorHarness,
    codec: str,
) -> None:
    """Every event byte for byte at the collector, whichever codec the batches travel in
    (columnar with the simulator's vehicle signals: scaled floats, strings, booleans)."""
    profile = "vehicle" if codec == "columnar" else "counter"
    sim = start_sim("--rate", "2000", "--streams", "8", "--events", "10000", "--profile", profile)
    agent = start_agent(sim.devices["ecu0"], uplink=uplink(broker.port, codec=codec)).start()
    truth = TruthReader(sim.truth_path)
    assert sim.wait(timeout=60) == 0
    wait_for(lambda: len(collector.keys()) >= 10_000, 30, "delivery")
    assert agent.terminate() == 0
    check_zero_loss(truth, collector, agent)
    report = collector.store.report()[0]
    # The only duplicates: the compacted replay's events, sent again in the backlog when
    # the agent connected after events were stored (at most one per stream).
    assert report["duplicates_received"] <= 8
    assert report["missing_in_sequence"] == 0
    state = agent_state(agent.db)
    assert int(state["uplink.cursor"]) == 10_001  # everything acknowledged by the fleet
    stored = {
        (stream, epoch, seq): bytes(payload)
        for stream, epoch, seq, payload in collector.store.conn.execute(
            "SELECT stream, boot_epoch, seq, payload FROM events"
        )
    }
    differ = [k for k, p in truth.acked.items() if stored[k] != bytes.fromhex(p)]
    assert not differ, f"{len(differ)} payloads differ at the collector, e.g. {differ[:3]}"


def test_broker_bounces_sigterm_and_sigkill(
    start_sim: StartSim, start_agent: StartAgent, broker: Broker, collector: CollectorHarness
) -> None:
    sim = start_sim("--rate", "1000", "--streams", "4")
    agent = start_agent(sim.devices["ecu0"], uplink=uplink(broker.port)).start()
    truth = TruthReader(sim.truth_path)
    cursors: list[int] = []
    saw_open = False
    wait_for(lambda: len(collector.keys()) > 500, 30, "first deliveries")
    for bounce in range(4):  # two SIGTERMs, two SIGKILLs
        sig = signal.SIGTERM if bounce % 2 == 0 else signal.SIGKILL
        broker.stop(sig)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            cursor_history(agent, cursors)
            if live(agent.db).breaker.state == "open":
                saw_open = True
            time.sleep(0.1)
        broker.start()
        wait_for(lambda: live(agent.db).uplink.state == "connected", 30, "reconnect")
    sim.signal(signal.SIGTERM)
    assert sim.wait(timeout=20) == 0
    truth.poll()
    wait_drained(agent, 60)
    cursor_history(agent, cursors)
    assert saw_open, "five broker outages never opened the breaker"
    assert cursors == sorted(cursors), "a checkpoint moved backwards"
    wait_for(lambda: live(agent.db).breaker.state == "closed", 20, "breaker closes")
    assert agent.terminate() == 0
    check_zero_loss(truth, collector, agent)


@pytest.mark.parametrize("fault", ["cut", "blackhole", "delay"])
def test_link_faults_through_a_proxy(
    fault: str,
    start_sim: StartSim,
    start_agent: StartAgent,
    broker: Broker,
    collector: CollectorHarness,
) -> None:
    proxy = TcpProxy(broker.port)
    try:
        sim = start_sim("--rate", "1000", "--streams", "4")
        agent = start_agent(sim.devices["ecu0"], uplink=uplink(proxy.port)).start()
        truth = TruthReader(sim.truth_path)
        wait_for(lambda: len(collector.keys()) > 300, 30, "first deliveries")
        if fault == "cut":
            proxy.cut()
        elif fault == "blackhole":
            proxy.blackhole()
        else:
            proxy.delay(0.3)
        time.sleep(8 if fault == "blackhole" else 3)  # blackhole: past the 5 s keepalive
        if fault != "delay":
            up = live(agent.db).uplink
            assert up.state == "disconnected" or up.in_flight > 0
        proxy.heal()
        sim.signal(signal.SIGTERM)
        assert sim.wait(timeout=20) == 0
        truth.poll()
        wait_drained(agent, 90)
        assert agent.terminate() == 0
        check_zero_loss(truth, collector, agent)
    finally:
        proxy.close()


def test_fleet_view_converges_before_the_backlog(
    start_sim: StartSim, start_agent: StartAgent, broker: Broker, collector: CollectorHarness
) -> None:
    sim = start_sim("--rate", "2000", "--streams", "16")
    agent = start_agent(sim.devices["ecu0"], uplink=uplink(broker.port)).start()
    truth = TruthReader(sim.truth_path)
    wait_for(lambda: len(collector.keys()) > 500, 30, "first deliveries")
    broker.stop(signal.SIGKILL)
    time.sleep(3)  # the vehicle buffers ~6000 events
    reader = sqlite3.connect(agent.db.absolute().as_uri() + "?mode=ro", uri=True)
    before = {
        name: (epoch, seq)
        for name, epoch, seq in reader.execute(
            "SELECT s.name, se.boot_epoch, se.high_seq FROM stream_epochs se "
            "JOIN streams s ON s.id = se.stream_id"
        )
    }
    reader.close()
    with collector.lock:
        collector.arrivals.clear()
        collector.snapshots.clear()
    broker.start()
    wait_for(lambda: collector.snapshots, 30, "the first backlog batch")
    with collector.lock:
        arrivals = list(collector.arrivals)
        snapshot = collector.snapshots[0]
    backlog_at = next(i for i, (kind, old, _) in enumerate(arrivals) if kind == "events" and old)
    # State first: the compacted replay comes before the backlog. Only live batches that were
    # in flight when the broker died may come earlier (paho resends its unacknowledged QoS 1
    # messages as the new connection opens; seen once in eight loaded CI runs), and at most
    # paho's in-flight window of them (agent/uplink.py: max(20, 4 x max_in_flight) = 32).
    ahead = [kind for kind, _, _ in arrivals[:backlog_at]]
    assert "state" in ahead, arrivals[:5]
    assert ahead.count("events") <= 32, arrivals[:40]
    # When the first historical event arrives, the fleet already shows every stream at or
    # past where it was when the link came back: the view converged within one batch.
    for stream, position in before.items():
        assert snapshot[stream] >= position, stream
    assert live(agent.db).uplink.counters["last_convergence_s"] < 1.0
    sim.signal(signal.SIGTERM)
    assert sim.wait(timeout=20) == 0
    truth.poll()
    wait_drained(agent, 60)
    assert agent.terminate() == 0
    check_zero_loss(truth, collector, agent)


def test_replay_request_is_served(
    start_sim: StartSim, start_agent: StartAgent, broker: Broker, collector: CollectorHarness
) -> None:
    sim = start_sim("--rate", "500", "--streams", "4")
    agent = start_agent(sim.devices["ecu0"], uplink=uplink(broker.port)).start()
    wait_for(lambda: len(collector.keys()) > 200, 30, "first deliveries")
    with collector.lock:
        before = sum(1 for kind, _, _ in collector.arrivals if kind == "state")
    collector.collector.request_replay(VEHICLE, 7)
    wait_for(
        lambda: sum(1 for kind, _, _ in collector.arrivals if kind == "state") > before,
        10,
        "a state batch in answer",
    )
    wait_for(
        lambda: live(agent.db).uplink.counters["replays_requested"] >= 1,
        5,
        "the agent to report the request",
    )
    assert agent.terminate() == 0


def test_a_collector_the_broker_forgot_asks_for_a_replay(
    start_sim: StartSim, start_agent: StartAgent, broker: Broker, tmp_path: Path
) -> None:
    """The broker restarts without persistence. The agent is back first (the collector is
    held off by a proxy) and sends its state and batches to topics nobody subscribes to
    any more: dropped. The collector comes back, finds its session gone and asks the
    vehicles it knows for a replay, so everything is acked well before the agent's
    ack_timeout (60 s here) would have resent it. Without the replay the drain below
    cannot finish in time and `ack_timeouts` counts."""
    proxy = TcpProxy(broker.port)
    harness = CollectorHarness(tmp_path / "collector.db", proxy.port)
    try:
        wait_for(lambda: harness.sub.connected, 10, "the collector to connect")
        sim = start_sim("--rate", "300", "--streams", "4")
        agent = start_agent(sim.devices["ecu0"], uplink=uplink(broker.port, ack_timeout=60.0))
        agent.start()
        truth = TruthReader(sim.truth_path)
        wait_for(lambda: len(harness.keys()) > 200, 30, "first deliveries")
        assert harness.collector.replays_sent == 0, "a first connect asks for nothing"
        states = live(agent.db).uplink.counters["state_batches_sent"]
        proxy.cut()  # the collector cannot reconnect until heal()
        broker.stop(signal.SIGKILL)
        broker.start()

        def state_sent_unheard() -> bool:
            up = live(agent.db).uplink
            return up.state == "connected" and up.counters["state_batches_sent"] > states

        wait_for(state_sent_unheard, 30, "the agent back, its state sent to no subscriber")
        proxy.heal()
        wait_for(lambda: harness.collector.replays_sent >= 1, 30, "the replay request")
        assert harness.sub.sessions_lost == 1
        sim.signal(signal.SIGTERM)
        assert sim.wait(timeout=20) == 0
        truth.poll()
        wait_drained(agent, 40)
        counters = live(agent.db).uplink.counters
        assert counters["replays_requested"] >= 1
        assert counters["ack_timeouts"] == 0, "recovered by the replay, not the timeout"
        assert agent.terminate() == 0
        check_zero_loss(truth, harness, agent)
    finally:
        harness.stop()
        proxy.close()


def test_agent_killed_mid_resync_loses_nothing(
    start_sim: StartSim, start_agent: StartAgent, broker: Broker, collector: CollectorHarness
) -> None:
    sim = start_sim("--rate", "3000", "--streams", "8")
    agent = start_agent(
        sim.devices["ecu0"], uplink=uplink(broker.port, batch_max_events=100, max_in_flight=2)
    ).start()
    truth = TruthReader(sim.truth_path)
    wait_for(lambda: len(collector.keys()) > 300, 30, "first deliveries")
    broker.stop(signal.SIGKILL)
    time.sleep(3)
    broker.start()
    delivered = len(collector.keys())
    wait_for(lambda: len(collector.keys()) > delivered + 500, 30, "resync under way")
    agent.kill()
    agent.start()
    wait_for(agent.started, 30, "restart")
    sim.signal(signal.SIGTERM)
    assert sim.wait(timeout=20) == 0
    truth.poll()
    wait_drained(agent, 90)
    assert agent.terminate() == 0
    check_zero_loss(truth, collector, agent)


def test_broker_ack_mode_delivers(
    start_sim: StartSim, start_agent: StartAgent, broker: Broker, collector: CollectorHarness
) -> None:
    sim = start_sim("--rate", "2000", "--events", "4000")
    agent = start_agent(sim.devices["ecu0"], uplink=uplink(broker.port, ack_mode="broker"))
    agent.start()
    truth = TruthReader(sim.truth_path)
    assert sim.wait(timeout=60) == 0
    wait_for(lambda: len(collector.keys()) >= 4000, 30, "delivery")
    wait_for(lambda: agent_state(agent.db).get("uplink.cursor") == "4001", 10, "cursor on PUBACK")
    assert agent.terminate() == 0
    check_zero_loss(truth, collector, agent)


@dataclass(frozen=True)
class Arrival:
    """An event of a controller `old`, stored before the agent under test starts."""

    event: Event
    time_quality: int = 3
    controller_id: str = "old"


BACKLOG = 30_000  # ~80 incompressible bytes each: about 5 minutes of a 64 kbit/s link


def test_live_events_overtake_a_backlog_on_a_64_kbit_link(
    start_sim: StartSim, start_agent: StartAgent, broker: Broker, collector: CollectorHarness
) -> None:
    """A scarce link (max_bytes_per_second = 8000) and a backlog it needs minutes for: the
    controller's live events reach the collector while most of the backlog is still on
    the vehicle (they do not wait behind it), the backlog that did arrive is its highest
    priority (streams old/s3 and old/s7 of priority 3, interleaved with priorities 0-2),
    and the uplink publishes no more than the budget allows."""
    from agent.store import EventStore  # noqa: PLC0415

    sim = start_sim("--rate", "20", "--streams", "2")
    agent = start_agent(sim.devices["ecu0"],
                        uplink=uplink(broker.port, max_bytes_per_second=8000))  # fmt: skip
    agent.db.parent.mkdir(parents=True, exist_ok=True)
    store = EventStore(agent.db)  # the backlog of a long outage, stored before this run
    rng = random.Random(16)
    for start in range(0, BACKLOG, 5000):
        store.append([Arrival(Event(f"old/s{k % 8}", k // 8 + 1, priority=k % 4,
                                    payload=rng.randbytes(60)))
                      for k in range(start, start + 5000)])  # fmt: skip
    store.close()
    agent.start()
    started = time.monotonic()

    def delivered() -> tuple[int, int]:
        keys = collector.keys()
        return sum(k[0].startswith("ecu0/") for k in keys), sum(
            k[0].startswith("old/") for k in keys
        )

    wait_for(lambda: delivered()[0] >= 200, 60, "200 live events at the collector")
    live_n, old_n = delivered()
    elapsed = time.monotonic() - started
    sent = live(agent.db).uplink.counters.get("bytes_sent", 0)
    print(f"after {elapsed:.1f} s: {live_n} live and {old_n} of {BACKLOG} backlog events "
          f"delivered, {sent:,} bytes published")  # fmt: skip
    assert old_n < BACKLOG // 2, "the live events waited behind the backlog"
    low = [k for k in sorted(collector.keys()) if k[0].startswith("old/") and k[0][-1] not in "37"]
    # The compacted replay (each stream's latest event) goes first; the rest is priority 3.
    assert len(low) <= 6, f"lower priorities before the highest: {sorted(low)[:8]}"
    # The budget: a second's burst and one batch (capped at a second's worth) above it.
    assert 0 < sent <= 8000 * (elapsed + 1) + 8000 + 2048, (sent, elapsed)
    assert agent.terminate() == 0


QUOTA = 12_000  # bytes a contact window may carry
QUOTA_SLACK = 2048  # one batch cut at the room left (1 KiB of events) or a 16-stream state page
WINDOW_S = 1.5


def test_a_contact_window_carries_no_more_than_its_quota(
    start_sim: StartSim, start_agent: StartAgent, broker: Broker, collector: CollectorHarness
) -> None:
    """[uplink] max_bytes_per_contact on a backlog of ~500 KB and live traffic, with no
    rate limit: every published snapshot shows the open window within its quota (plus
    one small batch), the uplink's total stays within one quota per window that could
    have opened, new windows do open (the backlog keeps moving), and `status` says how
    many more windows the backlog needs."""
    from agent.store import EventStore  # noqa: PLC0415
    from agent.views import read_status  # noqa: PLC0415

    sim = start_sim("--rate", "20", "--streams", "2")
    agent = start_agent(sim.devices["ecu0"], uplink=uplink(
        broker.port, max_bytes_per_contact=QUOTA, contact_seconds=WINDOW_S))  # fmt: skip
    agent.db.parent.mkdir(parents=True, exist_ok=True)
    store = EventStore(agent.db)
    rng = random.Random(17)
    store.append([Arrival(Event(f"old/s{k % 8}", k // 8 + 1, payload=rng.randbytes(60)))
                  for k in range(6000)])  # fmt: skip
    store.close()
    agent.start()
    started = time.monotonic()
    seen: list[tuple[float, float, float]] = []  # (elapsed, bytes_sent, contact_bytes)

    def sample() -> bool:
        c = live(agent.db).uplink.counters
        sent, window = c.get("bytes_sent", 0), c.get("contact_bytes", 0)
        if not seen or seen[-1][1:] != (sent, window):
            seen.append((time.monotonic() - started, sent, window))
        return sent >= 3 * QUOTA

    wait_for(sample, 60, "three contact windows' worth published")
    for elapsed, sent, window in seen:
        assert window <= QUOTA + QUOTA_SLACK, (elapsed, sent, window)
        windows = int(elapsed / WINDOW_S) + 1  # at most this many opened since the start
        assert sent <= windows * (QUOTA + QUOTA_SLACK), (elapsed, sent, windows)
    keys = collector.keys()
    old = sum(k[0].startswith("old/") for k in keys)
    assert 0 < old < 6000 // 2, old  # the quota, not the link, decides what went
    conn = sqlite3.connect(agent.db.absolute().as_uri() + "?mode=ro", uri=True)
    budget = read_status(conn, agent.db, time.time())["budget"]
    conn.close()
    assert budget["bytes_per_contact"] == QUOTA
    assert budget["contact_windows_needed"] >= 10, budget  # ~500 KB behind a 12 KB quota
    assert agent.terminate() == 0
