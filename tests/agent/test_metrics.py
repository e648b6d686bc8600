"""Metrics scraped from a running daemon's endpoint, and the node_exporter textfile."""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fleetharness import CollectorHarness, uplink
from simharness import AgentProcess, Broker, Sim, free_port
from support import wait_for

REQUIRED = {
    "ironfleet_replay_event_loss_ratio",
    "ironfleet_replay_convergence_failures",
    "ironfleet_telemetry_gaps",
    "ironfleet_mission_state_inconsistency",
    "ironfleet_buffer_events",
    "ironfleet_buffer_bytes",
    "ironfleet_oldest_unacked_age_seconds",
    "ironfleet_estimated_drain_seconds",
    "ironfleet_uplink_breaker_state",
    "ironfleet_serial_frames",
    "ironfleet_uplink_batches",
    "ironfleet_uplink_lag_events",
    "ironfleet_checkpoint_lag_events",
    "ironfleet_shed_events",
    "ironfleet_events_lost",
    "ironfleet_uplink_duplicate_acks",
}
SEED_ZERO_WHEN_CLEAN = (
    ("ironfleet_replay_event_loss_ratio", ()),
    ("ironfleet_replay_convergence_failures", ()),
    ("ironfleet_telemetry_gaps", (("type", "replay"),)),
    ("ironfleet_mission_state_inconsistency", ()),
)


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(family.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_scrape_a_running_daemon(
    start_sim: Callable[..., Sim],
    start_agent: Callable[..., AgentProcess],
    broker: Broker,
    tmp_path: Path,
) -> None:
    port = free_port()
    textfile = tmp_path / "ironfleet.prom"
    collector = CollectorHarness(tmp_path / "collector.db", broker.port)
    wait_for(lambda: collector.sub.connected, 10, "the collector to connect")
    sim = start_sim("--rate", "500", "--streams", "4", "--ber", "1e-4")
    agent = start_agent(
        sim.devices["ecu0"],
        uplink=uplink(broker.port),
        metrics={"enabled": True, "port": port, "textfile": str(textfile),
                 "textfile_interval": 1.0},
    ).start()  # fmt: skip
    wait_for(agent.started, 30, "start")

    def ready() -> bool:
        try:
            m = scrape(port)
        except OSError:
            return False
        return m.get("ironfleet_buffer_events", {}).get((), 0) > 200

    wait_for(ready, 30, "metrics with events")
    wait_for(lambda: len(collector.keys()) > 200, 30, "the fleet to acknowledge events")
    metrics = scrape(port)
    assert set(metrics) >= REQUIRED, REQUIRED - set(metrics)
    # A clean run: the seed metrics stay at 0 (tests/agent/test_seed_metrics.py provokes
    # each failure and sees it rise).
    assert {(n, lbl): metrics[n][lbl] for n, lbl in SEED_ZERO_WHEN_CLEAN} == dict.fromkeys(
        SEED_ZERO_WHEN_CLEAN, 0.0
    )
    breaker = metrics["ironfleet_uplink_breaker_state"]
    assert breaker[(("state", "closed"),)] == 1.0
    assert sum(breaker.values()) == 1.0
    frames = metrics["ironfleet_serial_frames"]
    port_name = (("controller", Path(sim.devices["ecu0"]).name),)
    assert frames[(*port_name, ("outcome", "accepted"))] > 200
    assert metrics["ironfleet_serial_link_up"][port_name] == 1.0
    assert metrics["ironfleet_buffer_bytes"][()] > 0
    wait_for(textfile.exists, 10, "the textfile")
    assert "ironfleet_buffer_events" in textfile.read_text()
    # Link loss: the breaker shows it, the lag grows.
    broker.stop(signal.SIGKILL)
    wait_for(
        lambda: scrape(port)["ironfleet_uplink_breaker_state"][(("state", "closed"),)] == 0.0,
        30,
        "the breaker to leave closed",
    )
    wait_for(lambda: scrape(port)["ironfleet_uplink_lag_events"][()] > 100, 10, "lag")
    assert agent.terminate() == 0
    collector.stop()
