"""Power cuts: the store on a FUSE file system that drops every unsynced write.

The agent runs with its state directory on `powercut.py`; a cut is SIGKILL of the agent
followed by unmounting, which discards whatever was written but not fsynced. With
synchronous=FULL (the default) every ACKed event survives every cut. The control run
with synchronous=NORMAL must be shown to lose ACKed events: a harness that cannot fail
proves nothing.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from simharness import AgentProcess, Sim, TruthReader, integrity, stored_events
from support import wait_for

StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]
LONG = bool(os.environ.get("IRONFLEET_LONG"))
POWERCUT = Path(__file__).with_name("powercut.py")
FUSERMOUNT = shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"


class PowerCutMount:
    """The FUSE mount and its backing directory; `cut()` is the power going out."""

    def __init__(self, root: Path) -> None:
        self.backing = root / "backing"
        self.mountpoint = root / "mnt"
        self.backing.mkdir(parents=True)
        self.mountpoint.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts = 0

    def mount(self) -> None:
        log = (self.backing.parent / "fuse.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(POWERCUT), str(self.backing), str(self.mountpoint)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: os.path.ismount(self.mountpoint), 10, "the FUSE mount")

    def cut(self) -> None:
        """Unmount without syncing: unsynced writes are gone."""
        subprocess.run([FUSERMOUNT, "-u", str(self.mountpoint)], check=True)
        assert self.proc is not None
        self.proc.wait(timeout=10)
        self.cuts += 1

    def close(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run([FUSERMOUNT, "-uz", str(self.mountpoint)], check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def powercut(tmp_path: Path) -> Iterator[PowerCutMount]:
    assert Path("/dev/fuse").exists(), "FUSE is needed for the power-cut tests"
    m = PowerCutMount(tmp_path / "pc")
    m.mount()
    yield m
    m.close()


def run_cuts(
    start_sim: StartSim,
    start_agent: StartAgent,
    powercut: PowerCutMount,
    synchronous: str,
    cuts: int,
) -> tuple[int, int]:
    """Cycles of ingest then power cut; returns (ACKed events lost, ACKed events)."""
    sim = start_sim("--rate", "400", "--streams", "4")
    agent = start_agent(
        sim.devices["ecu0"], agent={"state_dir": str(powercut.mountpoint / "state")},
        store={"synchronous": synchronous, "min_free_bytes": 0},
    )  # fmt: skip
    truth = TruthReader(sim.truth_path)
    rng = random.Random(11)
    durable_db = powercut.backing / "state" / "agent.db"
    lost_total = 0
    for _ in range(cuts):
        agent.start()
        wait_for(agent.started, 30, "the agent on the FUSE mount")
        time.sleep(rng.uniform(0.3, 1.5))
        agent.kill()
        powercut.cut()
        truth.poll()
        stored = stored_events(durable_db)
        lost = [k for k in truth.acked if k not in stored]
        lost_total = max(lost_total, len(lost))
        if synchronous != "NORMAL":
            assert not lost, f"power cut {powercut.cuts}: {len(lost)} ACKed events lost"
            assert all(len(v) == 1 for v in stored.values())
            assert integrity(durable_db) == "ok"
        powercut.mount()
    return lost_total, len(truth.acked)


def test_power_cuts_lose_nothing_with_synchronous_full(
    start_sim: StartSim, start_agent: StartAgent, powercut: PowerCutMount, chaos_report: Any
) -> None:
    lost, acked = run_cuts(start_sim, start_agent, powercut, "FULL", 20 if LONG else 4)
    chaos_report.record("power cut (FUSE), FULL", injected=powercut.cuts, acked=acked, lost=lost)
    assert lost == 0
    assert acked > 300
    print(f"power cuts={powercut.cuts} synchronous=FULL acked={acked} lost=0")


def test_control_synchronous_normal_is_shown_to_lose_acked_events(
    start_sim: StartSim, start_agent: StartAgent, powercut: PowerCutMount, chaos_report: Any
) -> None:
    lost, acked = run_cuts(start_sim, start_agent, powercut, "NORMAL", 3)
    chaos_report.record("control: power cut, NORMAL", injected=powercut.cuts,
                        controls_failed=int(lost > 0))  # fmt: skip
    assert lost > 0, "the NORMAL control lost nothing: the power-cut harness proves nothing"
    print(f"control: synchronous=NORMAL lost {lost} of {acked} ACKed events across 3 cuts")
