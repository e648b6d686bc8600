"""Faults at system-call boundaries, injected into the real daemon with strace.

- SIGKILL exactly at the N-th fsync / fdatasync / pwrite64 (so inside a commit, between
  WAL frames, during checkpoints, during start-up recovery);
- EIO and ENOSPC returned by pwrite64 / fdatasync, once and for a window of calls: the
  agent must not ACK what did not commit, must stay up, and must recover.
Oracle after each: every event the controller saw ACKed is stored exactly once,
byte-equal, and `PRAGMA integrity_check` is ok.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simharness import (
    AgentProcess,
    Sim,
    TruthReader,
    assert_zero_loss,
    live,
    verdict,
)
from support import wait_for

StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]
STRACE = shutil.which("strace") or "/usr/bin/strace"
LONG = bool(os.environ.get("IRONFLEET_LONG"))
DURABLE_CALLS = "fsync,fdatasync,pwrite64"


def strace(inject: str) -> list[str]:
    return [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={DURABLE_CALLS}",
            "-e", f"inject={inject}"]  # fmt: skip


def test_sigkill_at_syscall_boundaries(
    start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    assert Path(STRACE).exists(), "strace is needed: make test installs it"
    sim = start_sim("--rate", "1500", "--streams", "8")
    agent = start_agent(sim.devices["ecu0"])
    truth = TruthReader(sim.truth_path)
    rng = random.Random(7)
    kills = 60 if LONG else 12
    points = [rng.randint(1, 12) for _ in range(kills // 4)]  # start-up and recovery
    points += [rng.randint(13, 1500) for _ in range(kills - len(points))]
    injected = 0
    for n in points:
        agent.start(wrapper=strace(f"{DURABLE_CALLS}:signal=SIGKILL:when={n}"))
        assert agent.proc is not None
        try:
            agent.proc.wait(timeout=8)
            injected += 1
        except subprocess.TimeoutExpired:
            agent.kill()  # the N-th call never came: a plain SIGKILL then
        assert_zero_loss(truth, agent.db)
    agent.start()
    wait_for(agent.started, 30, "a clean start after the kills")
    truth.poll()
    target = len(truth.acked) + 1000
    wait_for(lambda: truth.poll() or len(truth.acked) > target, 60, "ingest to resume")
    assert agent.terminate() == 0
    stored = assert_zero_loss(truth, agent.db).stored
    chaos_report.record("SIGKILL at fsync/pwrite64 (strace)", injected=injected,
                        acked=len(truth.acked))  # fmt: skip
    assert injected >= len(points) // 2, f"only {injected} kills landed on a system call"
    print(f"syscall SIGKILLs={injected}/{len(points)} acked={len(truth.acked)} stored={stored}")


def published_counters(agent: AgentProcess) -> dict[str, int]:
    """The daemon's counters as last published to its database (about once a second)."""
    return {k: int(v) for k, v in live(agent.db).daemon.counters.items()}


def run_with_errors(
    start_sim: StartSim, start_agent: StartAgent, inject: str, broken: str | None = None
) -> tuple[TruthReader, AgentProcess, dict[str, int]]:
    sim = start_sim("--rate", "1000", "--streams", "4")
    agent = start_agent(sim.devices["ecu0"])
    truth = TruthReader(sim.truth_path)
    agent.start(wrapper=strace(inject), broken=broken)
    wait_for(agent.started, 30, "start under strace")
    # The N-th call comes after a number of commits, not of seconds (a loaded machine
    # groups more events per commit): wait until a failed commit has been published.
    wait_for(lambda: published_counters(agent).get("commit_failures", 0) > 0, 120,
             f"the injected fault ({inject}) to fail a commit")  # fmt: skip
    # Past the error window, ingest resumes on the same process (it stayed up).
    truth.poll()
    target = len(truth.sent) + 3000
    wait_for(lambda: truth.poll() or len(truth.acked) > target, 90, "ingest after the errors")
    assert agent.alive(), "the agent died on an I/O error"
    counters = published_counters(agent)
    sim.signal(signal.SIGTERM)
    assert sim.wait(timeout=20) == 0
    assert agent.terminate() == 0
    if broken is None:
        assert_zero_loss(truth, agent.db)
    return truth, agent, counters


def test_eio_on_writes_for_a_window_then_recovery(
    start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    truth, agent, counters = run_with_errors(
        start_sim, start_agent, "pwrite64:error=EIO:when=300..340"
    )
    chaos_report.record("EIO on pwrite64 x41 (strace)", injected=41, acked=len(truth.acked))
    assert counters["commit_failures"] > 0, "the injected errors never hit a commit"
    assert b"commit_failed" in agent.log.read_bytes()
    assert b"commit_recovered" in agent.log.read_bytes()


def test_enospc_on_fdatasync_once(
    start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    truth, agent, counters = run_with_errors(
        start_sim, start_agent, "fdatasync,fsync:error=ENOSPC:when=150"
    )
    chaos_report.record("ENOSPC on fdatasync x1 (strace)", injected=1, acked=len(truth.acked))
    assert counters["commit_failures"] >= 1
    assert b"commit_failed" in agent.log.read_bytes()


def test_control_ack_after_failed_commit_is_caught(
    start_sim: StartSim, start_agent: StartAgent, chaos_report: Any
) -> None:
    """The EIO harness against an agent that ACKs failed commits must report the loss."""
    truth, agent, counters = run_with_errors(
        start_sim, start_agent, "pwrite64:error=EIO:when=300..340", "ack_after_failed_commit"
    )
    found = verdict(truth, agent.db)
    print(f"control (ACK after failed commit): {found.describe()}")
    assert counters["commit_failures"] > 0
    assert found.lost, "the oracle missed events ACKed after a failed commit"
    chaos_report.record("control: ACK after failed commit (EIO)", controls_failed=1)
