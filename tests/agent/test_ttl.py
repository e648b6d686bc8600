"""TTL ([store] ttl_seconds, ttl_low_seconds): the store's SQL against the core's
definition (agent/resilience/ladder.py `is_expired`) over random stores, every expired
event recorded in `shed` as `ttl` and counted as lost; and the running daemon shedding
what outlived its TTL while it cannot reach the fleet."""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.resilience import Event
from agent.resilience.cursor import CLASSES, is_held
from agent.resilience.ladder import SANE_WALL_CLOCK, Stored, is_expired
from agent.store import EventStore, StoreSection

from fleetharness import StartAgent, StartSim
from simharness import live
from support import wait_for

LOW = 1
T0 = 1_800_000_000.0  # a wall clock in 2027


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


@st.composite
def histories(
    draw: st.DrawFn,
) -> tuple[list[tuple[float, list[In]]], int, list[int], float, float, float]:
    """Commits (wall time, arrivals) of streams with a priority each, some before the
    clock was set; the acked prefix and each class's (the backlog drains by priority);
    both TTLs; the time the TTL runs."""
    count = draw(st.integers(1, 6))
    priorities = draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
    rng = draw(st.randoms(use_true_random=False))
    seqs = dict.fromkeys(range(count), 0)
    commits = []
    clock = 1000.0 if draw(st.booleans()) else T0  # a board that booted at 1970
    for _ in range(draw(st.integers(1, 30))):
        clock = T0 + (clock - T0 if clock >= T0 else 0) + rng.uniform(0, 100)
        batch = []
        for _ in range(rng.randrange(1, 40)):
            s = rng.randrange(count)
            seqs[s] += 1
            batch.append(In(Event(f"ecu0/s{s}", seqs[s], priority=priorities[s], payload=b"\x80")))
        commits.append((clock, batch))
    if draw(st.booleans()):
        commits[0] = (500.0, commits[0][1])  # stored before the clock was set
    total = sum(len(b) for _, b in commits)
    acked = draw(st.integers(0, total))
    ahead = [draw(st.sampled_from([acked, draw(st.integers(acked, total))])) for _ in range(4)]
    ttl = draw(st.sampled_from([0.0, 50.0, 500.0, 5000.0]))
    ttl_low = draw(st.sampled_from([0.0, 20.0, 300.0]))
    return commits, acked, ahead, ttl, ttl_low, commits[-1][0] + draw(st.floats(0, 1000))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_the_store_expires_exactly_what_the_core_says(
    drawn: tuple[list[tuple[float, list[In]]], int, list[int], float, float, float],
) -> None:
    commits, acked, ahead, ttl, ttl_low, now = drawn
    with tempfile.TemporaryDirectory() as tmp:
        config = StoreSection(max_buffer_bytes=2**30, min_free_bytes=0, low_priority_max=LOW,
                             ttl_seconds=ttl, ttl_low_seconds=ttl_low)  # fmt: skip
        store = EventStore(Path(tmp) / "agent.db", config, free_bytes=lambda _: 2**40)
        for at, batch in commits:
            store.append(batch, now=at)
        rows = store.conn.execute(
            "SELECT e.id, s.name, e.seq, e.priority, e.received_at FROM events AS e "
            "JOIN streams AS s ON s.id = e.stream_id ORDER BY e.id"
        ).fetchall()
        delivered = rows[acked - 1][0] if acked else 0
        frontiers = [rows[n - 1][0] if n else 0 for n in ahead] + [delivered] * (CLASSES - 4)
        store.mark_delivered(delivered, {}, now=now, frontiers=frontiers)
        latest = {name: rowid for rowid, name, *_ in rows}  # one boot epoch: highest seq
        expected = {
            rowid
            for rowid, name, _, priority, received_at in rows
            if is_expired(Stored(rowid, priority, is_held(rowid, priority, delivered, frontiers),
                                 latest[name] == rowid),
                          received_at, now, ttl=ttl, ttl_low=ttl_low, low_priority_max=LOW)
        }  # fmt: skip
        shed = store.expire(now)
        left = {r for (r,) in store.conn.execute("SELECT id FROM events")}
        recorded = store.conn.execute(
            "SELECT coalesce(sum(count), 0) FROM shed WHERE reason = 'ttl'"
        ).fetchone()[0]
        lost = store.loss.shed.get("ttl", 0)
        store.close()
    assert {r for r, *_ in rows} - left == expected
    assert shed == recorded == lost == len(expected)
    assert all(r[4] >= SANE_WALL_CLOCK for r in rows if r[0] in expected)


def test_the_daemon_sheds_what_outlived_its_ttl(
    start_sim: StartSim, start_agent: StartAgent, tmp_path: Path
) -> None:
    """No fleet (uplink off): with a 2 s TTL the running agent sheds what is older,
    records it, keeps each stream's latest event, and its loss ratio shows it."""
    sim = start_sim("--rate", "200", "--streams", "4")
    agent = start_agent(sim.devices["ecu0"],
                        store={"ttl_seconds": 2.0, "ttl_low_seconds": 2.0}).start()  # fmt: skip

    def shed_ttl() -> int:
        if not agent.db.exists():
            return 0
        conn = sqlite3.connect(agent.db.absolute().as_uri() + "?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT coalesce(sum(count), 0) FROM shed "
                                    "WHERE reason = 'ttl'").fetchone()[0])  # fmt: skip
        except sqlite3.OperationalError:
            return 0
        finally:
            conn.close()

    wait_for(lambda: shed_ttl() >= 500, 60, "events past their TTL shed")
    wait_for(lambda: live(agent.db).store.get("loss_shed_ttl", 0) > 0, 20, "the loss ledger")
    assert agent.terminate() == 0
    conn = sqlite3.connect(agent.db)
    streams = conn.execute("SELECT count(DISTINCT stream_id) FROM events").fetchone()[0]
    conn.close()
    assert streams == 4  # each stream's latest event stays
    assert b"expire step=ttl" in agent.log.read_bytes()
