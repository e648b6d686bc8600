"""Wall-clock jumps under the real agent and the simulated controller (injected clock).

Vehicles boot with an unset RTC (1970), get NTP corrections of milliseconds and GPS
time steps of minutes. Here the wall clock of both the agent and the controller jumps
by +-4 ms, +-262 s and to 1970 while events flow and while the uplink is down. What
must hold:
- the breaker and the reconnect backoff run on the monotonic clock: after each jump,
  taken while the broker was down and the breaker open, the agent reconnects within
  its configured recovery bounds;
- no dedup or checkpoint anomaly: every ACKed event is stored once, byte-equal, reaches
  the collector, the fleet's converged state equals the vehicle's replay, and the
  delivery cursor never moves backwards.
The control patches the agent's timers onto the wall clock; the -262 s jump must then
keep the breaker open far past its recovery timeout, and this test must see it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.resilience import Event, replay
from agent.store import read_latest
from fleet.collector import CollectorStore

from fleetharness import cursor_history, top_rowid, wait_caught_up
from simharness import AgentProcess, Broker, Sim, TruthReader, assert_zero_loss, live
from support import fleet_keys, wait_for

StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]
LONG = bool(os.environ.get("IRONFLEET_LONG"))
VEHICLE = "test-vehicle"
COLLECTOR = str(Path(sys.executable).with_name("ironfleet-collector"))
FAKECLOCK = Path(__file__).with_name("fakeclock")  # its sitecustomize.py moves time.time
# Breaker and backoff settings of these runs: recovery must come within these bounds.
UPLINK = {"enabled": True, "keepalive": 5, "ack_timeout": 5.0, "breaker_failure_threshold": 3,
          "breaker_recovery_timeout": 1.0, "reconnect_min": 0.1, "reconnect_max": 1.0,
          "batch_max_delay_ms": 20.0}  # fmt: skip
RECOVERY_BOUND = 10.0  # seconds from broker back to connected: 1 s breaker + 1 s backoff + slack
TO_1970 = "1970"
JUMPS: list[float | str] = [0.004, -0.004, 262.0, -262.0, TO_1970]
if LONG:
    JUMPS += [-0.004, 262.0, 262.0, -262.0, 0.004, TO_1970, 262.0, -262.0]


class Clock:
    """An offset file: what a process's wall clock is, relative to the real one.

    The process reads it through fakeclock/sitecustomize.py (at most 5 ms stale), so
    writing it moves the wall clock of a running process. The monotonic clock stays.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0.0
        self.write()

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(FAKECLOCK), os.environ.get("PYTHONPATH")) if p)
        return {"PYTHONPATH": path, "IRONFLEET_FAKE_CLOCK": str(self.path)}

    def jump(self, by: float | str) -> None:
        if by == TO_1970:
            self.offset = -(time.time() - 86_400.0)  # 2 January 1970
        else:
            assert isinstance(by, float)
            self.offset += by
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.offset:.6f}\n")
        tmp.replace(self.path)  # a process never reads half a line


@pytest.fixture
def collector_db(tmp_path: Path, broker: Broker) -> Iterator[Path]:
    """`ironfleet-collector run` against the broker (a real process, stopped at teardown)."""
    db = tmp_path / "collector.db"
    log = (tmp_path / "collector.log").open("ab")
    proc = subprocess.Popen(
        [COLLECTOR, "run", "--broker", f"127.0.0.1:{broker.port}", "--db", str(db),
         "--signing-key", str(fleet_keys()[0])],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for(db.exists, 15, "the collector to open its database")
    yield db
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def collector_keys(db: Path) -> set[tuple[str, int, int]]:
    try:
        return CollectorStore(db).keys(VEHICLE)
    except sqlite3.Error:
        return set()  # the collector has not created its tables yet


def uplink_up(agent: AgentProcess) -> bool:
    state = live(agent.db)
    return state.uplink.state == "connected" and state.breaker.state == "closed"


def outage_with_jump(
    broker: Broker, agent: AgentProcess, clocks: list[Clock], jump: float | str,
    timeout: float = 60.0,
) -> float:  # fmt: skip
    """Broker down until the breaker opens; the clocks jump; broker back. Seconds until
    the agent is connected with its breaker closed again."""
    broker.stop(signal.SIGKILL)
    wait_for(lambda: live(agent.db).breaker.state == "open", 30, "breaker open")
    for clock in clocks:
        clock.jump(jump)
    broker.start()
    back = time.monotonic()
    wait_for(lambda: uplink_up(agent), timeout, "reconnect after the jump")
    return time.monotonic() - back


Chain = tuple[Sim, AgentProcess, Clock, Clock]


@pytest.fixture
def chain(tmp_path: Path, start_sim: StartSim, start_agent: StartAgent, broker: Broker) -> Chain:
    """Simulator (started, on its own clock) and agent (not started) with their clocks."""
    sim_clock = Clock(tmp_path / "sim-clock")
    agent_clock = Clock(tmp_path / "agent-clock")
    # The controller's clock moves too: its event timestamps jump with it.
    saved = {k: os.environ.get(k) for k in sim_clock.env()}
    os.environ.update(sim_clock.env())
    try:
        sim = start_sim("--rate", "500", "--streams", "4")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    agent = start_agent(sim.devices["ecu0"], uplink={**UPLINK, "port": broker.port})
    return sim, agent, sim_clock, agent_clock


def test_wall_clock_jumps_change_no_timer_and_lose_nothing(
    chain: Chain, broker: Broker, collector_db: Path, chaos_report: Any
) -> None:
    sim, agent, sim_clock, agent_clock = chain
    agent.start(env=agent_clock.env())
    truth = TruthReader(sim.truth_path)
    wait_for(lambda: len(collector_keys(collector_db)) > 200, 30, "first deliveries")
    cursors: list[int] = []
    recoveries: list[float] = []
    for jump in JUMPS:
        # A jump while events flow, then one while the broker is down and the breaker open.
        for clock in (sim_clock, agent_clock):
            clock.jump(jump)
        target = len(collector_keys(collector_db)) + 100
        wait_for(lambda: len(collector_keys(collector_db)) > target, 30, "delivery")  # noqa: B023
        cursor_history(agent, cursors)
        recoveries.append(outage_with_jump(broker, agent, [sim_clock, agent_clock], jump))
        cursor_history(agent, cursors)
        print(f"jump {jump}: agent clock offset {agent_clock.offset:+.3f} s, "
              f"reconnected {recoveries[-1]:.2f} s after the broker came back")  # fmt: skip
    sim.signal(signal.SIGTERM)
    assert sim.wait(timeout=20) == 0
    truth.poll()
    wait_caught_up(agent, top_rowid(agent.db), 90)
    cursor_history(agent, cursors)
    assert agent.alive()
    assert agent.terminate() == 0
    found = assert_zero_loss(truth, agent.db, complete=True)
    check_fleet(truth, agent, collector_db)
    assert cursors == sorted(cursors), f"a checkpoint moved backwards: {cursors}"
    assert max(recoveries) < RECOVERY_BOUND, f"recovery times {recoveries}"
    chaos_report.record("wall-clock jumps (agent + controller)", injected=4 * len(JUMPS),
                        acked=found.acked, lost=len(found.lost),
                        duplicates=len(found.duplicates))  # fmt: skip
    print(f"jumps={len(JUMPS)} recoveries max {max(recoveries):.2f} s, {found.describe()}")


def check_fleet(truth: TruthReader, agent: AgentProcess, collector_db: Path) -> None:
    """O4: every ACKed event reached the collector; its converged state is the replay."""
    keys = collector_keys(collector_db)
    missing = [k for k in truth.acked if k not in keys]
    assert not missing, f"{len(missing)} ACKed events never reached the collector"
    conn = sqlite3.connect(agent.db.absolute().as_uri() + "?mode=ro", uri=True)
    local = {e.stream: (e.boot_epoch, e.seq, e.payload) for _, e, _, _ in read_latest(conn)}
    conn.close()
    assert CollectorStore(collector_db).state(VEHICLE) == local
    acked = [
        Event(s, q, boot_epoch=e, payload=bytes.fromhex(p)) for (s, e, q), p in truth.acked.items()
    ]
    for event in replay(acked):  # the vehicle's view is never behind what was ACKed
        assert local[event.stream][:2] >= (event.boot_epoch, event.seq)


def test_control_timers_on_the_wall_clock_are_caught(
    chain: Chain, broker: Broker, collector_db: Path, chaos_report: Any
) -> None:
    """An agent whose breaker reads the wall clock stays open ~262 s after a jump back."""
    _, agent, sim_clock, agent_clock = chain
    agent.start(env=agent_clock.env(), broken="wall_clock_timers")
    wait_for(lambda: len(collector_keys(collector_db)) > 100, 30, "first deliveries")
    with pytest.raises(AssertionError, match="reconnect after the jump"):
        # The bound the healthy agent meets (scaled with the load, as every deadline).
        outage_with_jump(broker, agent, [sim_clock, agent_clock], -262.0, RECOVERY_BOUND)
    assert live(agent.db).breaker.state == "open"
    chaos_report.record("control: timers on the wall clock (clock)", controls_failed=1)
