"""Shared fixtures: `ironfleet-sim` processes, agent-side pumps, agent daemons."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from simharness import AgentProcess, AgentSide, Broker, Sim
from support import SIM


@pytest.fixture
def start_sim(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    """Start `ironfleet-sim` with extra arguments; it is stopped at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, controllers: int = 1) -> Sim:
        truth = tmp_path / f"truth-{len(procs)}.jsonl"
        cmd = [SIM, "--link-dir", str(tmp_path / "dev"), "--truth", str(truth), "--seed", "1"]
        cmd += ["--controllers", str(controllers), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        devices = {}
        assert proc.stdout is not None
        for _ in range(controllers):
            line = proc.stdout.readline().split()
            assert line, "the simulator printed no DEVICE line"
            assert line[0] == "DEVICE", f"unexpected simulator output {line}"
            devices[line[1]] = line[2]
        return Sim(proc, truth, devices)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def agent_side() -> Iterator[Callable[..., AgentSide]]:
    sides: list[AgentSide] = []

    def make(path: str, **kwargs: Any) -> AgentSide:
        side = AgentSide(path, **kwargs).start()
        sides.append(side)
        return side

    yield make
    for side in sides:
        side.stop()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Make `ironfleet-agent` processes (not started); any left running are killed."""
    agents: list[AgentProcess] = []

    def make(device: str | list[str], **overrides: dict[str, object]) -> AgentProcess:
        agent = AgentProcess(tmp_path / f"agent{len(agents)}", device, overrides)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop_quietly()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A running mosquitto on a free 127.0.0.1 port; stopped by PID at teardown."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop(signal.SIGKILL)


class ChaosReport:
    """Fault-test figures of one test, summed over the run and printed at its end.

    Figures travel in the test's `user_properties`, so they reach the process that
    prints the summary whichever process ran the test (pytest-xdist workers included).
    """

    def __init__(self, node: pytest.Item) -> None:
        self.node = node

    def record(self, fault: str, **figures: int) -> None:
        self.node.user_properties.append(("chaos", (fault, figures)))


_TOTALS: dict[str, dict[str, int]] = {}
CHAOS_KEYS = ["injected", "acked", "lost", "duplicates", "integrity_failures", "controls_failed"]


@pytest.fixture
def chaos_report(request: pytest.FixtureRequest) -> ChaosReport:
    return ChaosReport(request.node)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "teardown":  # the teardown report carries every phase's records
        return
    for name, value in report.user_properties:
        if name == "chaos":
            fault, figures = value
            row = _TOTALS.setdefault(fault, {})
            for key, number in figures.items():
                row[key] = row.get(key, 0) + int(number)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _TOTALS:
        return
    tr = terminalreporter
    tr.section("chaos summary")
    tr.write_line(f"{'fault':<44}" + "".join(f"{k:>19}" for k in CHAOS_KEYS))
    total: dict[str, int] = {}
    for fault, row in sorted(_TOTALS.items()):
        tr.write_line(f"{fault:<44}" + "".join(f"{row.get(k, 0):>19,}" for k in CHAOS_KEYS))
        for key in CHAOS_KEYS:
            total[key] = total.get(key, 0) + row.get(key, 0)
    tr.write_line(f"{'total':<44}" + "".join(f"{total[k]:>19,}" for k in CHAOS_KEYS))
    controls = sum(1 for fault in _TOTALS if fault.startswith("control:"))
    tr.write_line(f"controls run: {controls}, failed as expected: {total['controls_failed']}")
