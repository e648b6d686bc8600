"""Serial faults against the whole agent: simulator on a pty -> real daemon -> SQLite.

The bridge tests prove the link layer with a dictionary for a store; here the same
faults hit the shipped daemon (serial thread, writer, real database), with the store
oracle checked once the simulator has exited: every event the controller saw ACKed is
stored exactly once, byte-equal, nothing is stored that was never sent (a corrupt frame
taken for an event), and `PRAGMA integrity_check` is ok. The agent's memory stays
bounded through a 10 MB flood. The control runs the agent with the CRC check removed,
and the same oracle must catch the corrupt frames it stores.

CI tier: a bit error rate sweep 1e-6..1e-3 and one run per other fault; the long tier
(IRONFLEET_LONG=1) sends 5x the events and repeats the combined run with more kills.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from simharness import AgentProcess, Sim, TruthReader, Verdict, live, verdict
from support import scaled, wait_for

StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]
LONG = bool(os.environ.get("IRONFLEET_LONG"))
SCALE = 5 if LONG else 1
MiB = 2**20


@dataclass
class Run:
    """What one scenario produced: the oracle's verdict and what the fault injection did."""

    verdict: Verdict
    summary: dict[str, Any]
    link: dict[str, Any]
    rss_start: int
    rss_peak: int
    kills: int


def rss(agent: AgentProcess) -> int:
    try:
        return int(psutil.Process(agent.agent_pid()).memory_info().rss)
    except (psutil.Error, FileNotFoundError, IndexError):
        return 0


def run_scenario(
    start_sim: StartSim,
    start_agent: StartAgent,
    sim_args: list[str],
    *,
    device: str | None = None,
    kills: int = 0,
    broken: str | None = None,
    timeout: float = 120.0,
    seed: int = 1,
) -> Run:
    """Run the simulator to completion against the real agent, then apply the oracle.

    `kills`: SIGKILL the agent this many times at random instants (restarting it each
    time) while the faults go on: recovery itself runs under serial noise.
    """
    sim = start_sim(*sim_args)
    agent = start_agent(device or sim.devices["ecu0"]).start(broken=broken)
    truth = TruthReader(sim.truth_path)
    wait_for(agent.started, 30, "the agent to start")
    rss_start = rss_peak = rss(agent)
    done_kills = 0
    rng = random.Random(seed)
    next_kill = time.monotonic() + rng.uniform(0.3, 1.5) if kills else float("inf")
    deadline = time.monotonic() + scaled(timeout)
    while sim.proc.poll() is None:
        assert time.monotonic() < deadline, f"the simulator did not finish in {timeout:.0f} s"
        rss_peak = max(rss_peak, rss(agent))
        if time.monotonic() >= next_kill:
            agent.kill()
            done_kills += 1
            agent.start(broken=broken)
            next_kill = (
                time.monotonic() + rng.uniform(0.3, 1.5) if done_kills < kills else float("inf")
            )
        time.sleep(0.05)  # sampling period for RSS and kill instants, not a wait for a result
    assert sim.proc.returncode == 0
    # A restart may be in its first milliseconds: let it install its handlers (and so
    # run recovery to the end) before the SIGTERM.
    wait_for(agent.started, 30, "the last restart to come up")
    state = live(agent.db)
    link: dict[str, Any] = dict(state.link.counters)
    link["rejects"] = dict(state.link.rejects)
    assert agent.alive(), "the agent died under serial faults"
    assert agent.terminate() == 0
    return Run(verdict(truth, agent.db, complete=True), sim.summary(), link, rss_start,
               rss_peak, done_kills)  # fmt: skip


def record(chaos_report: Any, fault: str, run: Run, injected: int) -> None:
    v = run.verdict
    chaos_report.record(fault, injected=injected, acked=v.acked, lost=len(v.lost),
                        duplicates=len(v.duplicates),
                        integrity_failures=int(v.integrity != "ok"))  # fmt: skip


# (bit error rate, events, events/s): fewer and slower where most frames are hit.
SWEEP = [(1e-6, 20_000, 4000), (1e-5, 10_000, 3000), (1e-4, 10_000, 2000), (1e-3, 3_000, 800)]


@pytest.mark.parametrize("point", SWEEP, ids=[f"{p[0]:.0e}" for p in SWEEP])
def test_bit_error_rate_sweep(
    point: tuple[float, int, int], start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    ber, events, rate = point
    run = run_scenario(start_sim, start_agent, [
        "--events", str(events * SCALE), "--rate", str(rate), "--streams", "8", "--ber", str(ber),
    ])  # fmt: skip
    corruptions = run.summary["faults"]["corruption_events"]
    record(chaos_report, f"serial BER {ber:.0e}", run, corruptions)
    assert run.verdict.ok, run.verdict.describe()
    assert run.summary["acked"] == run.verdict.acked == events * SCALE  # all delivered
    if ber >= 1e-5:
        assert corruptions > 0, "the sweep point injected nothing"
        assert run.link["rejects"]["crc"] > 0  # the CRC, not luck, stopped them
    print(f"BER {ber:.0e}: {corruptions} corruption events, rejects {run.link['rejects']}, "
          f"retransmits {run.summary['retransmits']}, {run.verdict.describe()}")  # fmt: skip


def test_garbage_drops_inserts_truncation(
    start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    run = run_scenario(start_sim, start_agent, [
        "--events", str(8000 * SCALE), "--rate", "3000", "--garbage-every", "0.2",
        "--drop-rate", "2e-4", "--insert-rate", "2e-4", "--truncate-rate", "0.01",
    ])  # fmt: skip
    faults = run.summary["faults"]
    assert min(faults["garbage_bytes"], faults["bytes_dropped"], faults["frames_truncated"]) > 0
    injected = faults["corruption_events"] + faults["frames_truncated"]
    record(chaos_report, "serial garbage/drops/inserts/truncation", run, injected)
    assert run.verdict.ok, run.verdict.describe()
    assert run.verdict.acked == 8000 * SCALE


def test_unplug_replug_under_new_names_and_reboots(
    start_sim: StartSim, start_agent: StartAgent, tmp_path: Path, chaos_report: Any
) -> None:
    run = run_scenario(start_sim, start_agent, [
        "--events", str(5000 * SCALE), "--rate", "800", "--unplug-every", "1.0",
        "--unplug-for", "0.3", "--replug-rename", "--link-name", "ttyIF{index}-{gen}",
        "--reboot-every", "2.5",
    ], device=str(tmp_path / "dev" / "ttyIF0-*"))  # fmt: skip
    assert run.summary["unplugs"] >= 3
    assert run.summary["reboots"] >= 1
    record(chaos_report, "serial unplug/replug renamed + reboots", run,
           run.summary["unplugs"] + run.summary["reboots"])  # fmt: skip
    assert run.verdict.ok, run.verdict.describe()
    # A reboot while the cable is out is seen as one session change with the next one.
    assert 1 <= run.link["controller_reboots"] <= run.summary["reboots"]
    # Events the controller lost in its own RAM at a reboot were never ACKed; the rest are.
    assert run.verdict.acked + run.summary["lost_at_reboot"] >= 5000 * SCALE


def test_truncation_then_silence_brings_the_link_down_and_the_agent_stays(
    start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    # 3 s of traffic, then nothing: how much of it the agent saw depends on how fast it
    # started (on a loaded machine, possibly none), so no lower bound is asserted.
    sim = start_sim("--rate", "100", "--silence-after", "300", "--truncate-rate", "0.05")
    agent = start_agent(sim.devices["ecu0"]).start()
    truth = TruthReader(sim.truth_path)
    wait_for(lambda: agent.started() and live(agent.db).link.state == "down",
             30, "the agent to see the link go down")  # fmt: skip
    assert agent.alive()
    sim.signal(signal.SIGTERM)
    assert sim.wait(timeout=10) == 0
    assert agent.terminate() == 0
    v = verdict(truth, agent.db, complete=True)
    counters = dict(live(agent.db).link.counters)
    chaos_report.record("serial truncation then silence", injected=1, acked=v.acked,
                        lost=len(v.lost), duplicates=len(v.duplicates))  # fmt: skip
    assert v.ok, v.describe()
    assert counters["link_downs"] >= 1
    assert v.acked <= 300
    print(f"silence: {v.acked} of 300 events ACKed before the line went quiet")


def test_flood_of_10_mb_random_bytes_keeps_memory_bounded(
    start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    run = run_scenario(start_sim, start_agent, [
        "--flood-bytes", "10000000", "--events", str(2000 * SCALE), "--rate", "1000",
    ])  # fmt: skip
    assert run.summary["faults"]["garbage_bytes"] == 10_000_000
    record(chaos_report, "serial 10 MB flood", run, 1)
    assert run.verdict.ok, run.verdict.describe()
    assert run.verdict.acked == 2000 * SCALE
    assert sum(run.link["rejects"].values()) > 1000
    growth = run.rss_peak - run.rss_start
    print(f"flood: agent RSS {run.rss_start / MiB:.1f} -> peak {run.rss_peak / MiB:.1f} MiB")
    assert growth < 16 * MiB, f"agent RSS grew {growth / MiB:.1f} MiB during the flood"


def test_every_fault_at_once_with_agent_kills(
    start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    """Noise, garbage, drops, truncation, unplugs and reboots together, and the agent
    SIGKILLed and restarted in the middle of it: recovery itself runs under noise."""
    kills = 6 * SCALE
    run = run_scenario(start_sim, start_agent, [
        "--events", str(8000 * SCALE), "--rate", "1000", "--streams", "6", "--ber", "1e-4",
        "--garbage-every", "0.5", "--drop-rate", "1e-4", "--insert-rate", "1e-4",
        "--truncate-rate", "0.005", "--unplug-every", "2.0", "--unplug-for", "0.3",
        "--reboot-every", "3.0", "--ring", "8192",
    ], kills=kills, timeout=240, seed=77)  # fmt: skip
    s = run.summary
    injected = s["faults"]["corruption_events"] + s["unplugs"] + s["reboots"] + run.kills
    record(chaos_report, "serial all faults + SIGKILL", run, injected)
    assert run.kills == kills
    assert run.verdict.ok, run.verdict.describe()
    assert run.verdict.acked + s["lost_at_reboot"] >= 8000 * SCALE


def test_control_without_crc_check_stores_corrupt_frames(
    start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    """The oracle must catch a decoder that skips the CRC: corrupt frames get stored."""
    run = run_scenario(start_sim, start_agent, [
        "--events", "3000", "--rate", "800", "--streams", "4", "--ber", "1e-3",
    ], broken="accept_corrupt")  # fmt: skip
    v = run.verdict
    print(f"control (no CRC): {v.describe()}")
    assert not v.ok, "the oracle missed corrupt frames stored by a decoder without CRC"
    assert v.foreign or v.altered
    chaos_report.record("control: no CRC check (serial)", controls_failed=1)
