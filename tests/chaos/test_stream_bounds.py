"""Hostile controllers against the real daemon: invented stream names, rolled-back epochs.

`ironfleet-sim` on a real pty -> `ironfleet-agent run` -> real SQLite file.

- 100,000 distinct stream names (the simulator's `--streams`, one event each) with
  `[store] max_cached_streams = 1000`: the agent's RSS grows by less than
  STREAM_FLOOD_GROWTH_MIB while it ingests them and after a restart with them on disk
  (the restart also answers retransmits of them as duplicates, from the database).
  Before the bounded cache the store kept every stream in dicts: about 0.45 KiB each, so
  +44 MiB here, and the restart loaded them all before it was up.
- One session announcing boot epoch 2**32-1, then the controller's real, lower one: the
  second session is stored as the next epoch, `latest` follows it, the rollback alarm is
  set, and every event of both sessions is stored. Before, replay stayed pinned on the
  first session (max boot_epoch) and nothing was alarmed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from agent.store import ROLLBACK_ALARM, read_latest

from simharness import AgentProcess, Sim, agent_state, stored_events
from support import wait_for

StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]
MiB = 2**20
STREAMS = 100_000
CACHE = 1000
# The cap's entries (~1 KiB each with their epoch state) plus SQLite's page caches;
# the unbounded store needed ~44 MiB for these streams (bench/bench_streams.py).
STREAM_FLOOD_GROWTH_MIB = 16
U32_MAX = 2**32 - 1


def rss(agent: AgentProcess) -> int:
    try:
        return int(psutil.Process(agent.agent_pid()).memory_info().rss)
    except (psutil.Error, FileNotFoundError, IndexError):
        return 0


def count_streams(db: Path) -> int:
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM streams").fetchone()[0])
    except sqlite3.Error:
        return 0  # not created yet, or locked for a moment
    finally:
        conn.close()


def run_to_end(sim: Sim, agent: AgentProcess, timeout: float) -> int:
    """Wait for the simulator to exit (everything ACKed); the agent's peak RSS meanwhile."""
    peak = rss(agent)
    deadline = time.monotonic() + timeout
    while sim.proc.poll() is None:
        assert time.monotonic() < deadline, f"the simulator did not finish in {timeout:.0f} s"
        assert agent.alive(), "the agent died"
        peak = max(peak, rss(agent))
        time.sleep(0.05)  # RSS sampling period, not a wait for a result
    assert sim.proc.returncode == 0, "the simulator did not see every event ACKed"
    return max(peak, rss(agent))


def test_100k_invented_streams_keep_the_agent_bounded_through_a_restart(
    start_sim: StartSim, start_agent: StartAgent
) -> None:
    flood = ["--streams", str(STREAMS), "--rate", "100000", "--window", "256"]
    sim = start_sim(*flood, "--events", str(STREAMS))
    agent = start_agent(sim.devices["ecu0"], store={"max_cached_streams": CACHE}).start()
    wait_for(agent.started, 30, "the agent to start")
    base = rss(agent)
    peak = run_to_end(sim, agent, timeout=240)
    assert count_streams(agent.db) == STREAMS
    assert peak - base < STREAM_FLOOD_GROWTH_MIB * MiB, (
        f"RSS grew by {(peak - base) / MiB:.1f} MiB for {STREAMS:,} streams"
    )
    assert agent.terminate() == 0

    # Restart with them on disk; the controller resends the first 5,000 (seq 1 again).
    sim = start_sim(*flood, "--events", "5000")
    agent.start()
    wait_for(agent.started, 30, "the restart to come up")
    peak = run_to_end(sim, agent, timeout=120)
    assert peak - base < STREAM_FLOOD_GROWTH_MIB * MiB, (
        f"after a restart with {STREAMS:,} streams on disk RSS is {(peak - base) / MiB:.1f}"
        " MiB above the first start"
    )
    assert agent.terminate() == 0
    events = stored_events(agent.db)
    assert len(events) == STREAMS  # the resent ones were duplicates
    assert all(len(p) == 1 for p in events.values())


def test_boot_epoch_rollback_is_alarmed_and_replay_follows_the_newer_session(
    start_sim: StartSim, start_agent: StartAgent
) -> None:
    traffic = ["--streams", "4", "--events", "200", "--rate", "2000"]
    first = start_sim(*traffic, "--boot-epoch", str(U32_MAX))
    agent = start_agent(first.devices["ecu0"]).start()
    wait_for(agent.started, 30, "the agent to start")
    run_to_end(first, agent, timeout=60)
    second = start_sim(*traffic, "--boot-epoch", "7")  # the controller's real epoch
    run_to_end(second, agent, timeout=60)
    assert agent.terminate() == 0

    state = agent_state(agent.db)
    assert state[ROLLBACK_ALARM] == (
        f"controller=ecu0 announced=7 highest={U32_MAX} stored={U32_MAX + 1}"
    )
    assert "boot_epoch_rollback controller=ecu0 announced=7" in agent.log.read_text()
    # Nothing lost: both sessions, the second under its stored epoch.
    stored = stored_events(agent.db)
    expected = {k: [p] for k, p in first.keys("acked").items()}
    expected |= {(s, U32_MAX + 1, q): [p] for (s, _, q), p in second.keys("acked").items()}
    assert stored == expected
    # Replay (what the fleet gets first) follows the newer session.
    newest: dict[str, tuple[int, str]] = {}
    for (stream, _, seq), payload in second.keys("acked").items():
        newest[stream] = max(newest.get(stream, (0, "")), (seq, payload))
    conn = sqlite3.connect(agent.db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        latest = {
            e.stream: (e.boot_epoch, e.seq, e.payload.hex()) for _, e, _, _ in read_latest(conn)
        }
    finally:
        conn.close()
    assert latest == {s: (U32_MAX + 1, seq, p) for s, (seq, p) in newest.items()}
