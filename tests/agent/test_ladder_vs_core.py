"""The store's SQL eviction ladder against the core's definition of its victims
(agent/resilience/ladder.py): over random stores (streams, priorities, boot epochs, an
acked prefix, classes the backlog drained ahead of it: `is_held`) and random caps, what
`EventStore.make_room` removes is exactly a prefix of `victim_order` (under random
full-buffer policies per class), every stream's latest event survives, and what was lost
unacknowledged is recorded in `shed` under the step that took it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.resilience import Event
from agent.resilience.cursor import CLASSES, is_held
from agent.resilience.ladder import ACKED, POLICIES, Stored, victim_order
from agent.store import EventStore, StoreSection

LOW_PRIORITY_MAX = 1


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


@st.composite
def stores(draw: st.DrawFn) -> tuple[list[In], int, list[int], float, tuple[str, str]]:
    """Arrivals (streams with a priority each, a reboot or not), the acked prefix length,
    each priority class's acked prefix (at least that), the cap as a fraction of the
    bytes in use, and the classes' full-buffer policies."""
    count = draw(st.integers(min_value=1, max_value=8))
    priorities = draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
    reboot_at = draw(st.integers(min_value=0, max_value=3000))
    total = draw(st.integers(min_value=600, max_value=3000))
    order = draw(st.randoms(use_true_random=False))
    seqs = dict.fromkeys(range(count), 0)
    epochs = dict.fromkeys(range(count), 1)
    arrivals = []
    for i in range(total):
        s = order.randrange(count)
        if i == reboot_at:
            epochs[s], seqs[s] = epochs[s] + 1, 0
        seqs[s] += 1
        event = Event(f"ecu0/s{s}", seqs[s], boot_epoch=epochs[s], ts=float(i),
                      priority=priorities[s], payload=bytes([i % 251]) * 150)  # fmt: skip
        arrivals.append(In(event))
    acked = draw(st.integers(min_value=0, max_value=total))
    ahead = [draw(st.sampled_from([acked, draw(st.integers(acked, total))])) for _ in range(4)]
    fraction = draw(st.floats(min_value=0.05, max_value=0.95))
    policies = (draw(st.sampled_from(POLICIES)), draw(st.sampled_from(POLICIES)))
    return arrivals, acked, ahead, fraction, policies


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stores())
def test_the_ladder_removes_a_prefix_of_the_cores_victim_order(
    drawn: tuple[list[In], int, list[int], float, tuple[str, str]],
) -> None:
    arrivals, acked, ahead, fraction, (policy, policy_low) = drawn
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.db"
        big = StoreSection(max_buffer_bytes=2**30, min_free_bytes=0)
        store = EventStore(path, big, free_bytes=lambda _: 2**40)
        for lo in range(0, len(arrivals), 500):
            store.append(arrivals[lo : lo + 500], now=1.0)
        rowids = [r for (r,) in store.conn.execute("SELECT id FROM events ORDER BY id")]
        keys = [(a.event.stream, a.event.boot_epoch, a.event.seq) for a in arrivals]
        delivered = rowids[acked - 1] if acked else 0
        frontiers = [rowids[n - 1] if n else 0 for n in ahead] + [delivered] * (CLASSES - 4)
        if acked or ahead != [0] * 4:
            store.mark_delivered(delivered, {}, now=2.0, frontiers=frontiers)
        used = store.used_bytes()
        store.close()

        # The core's view, from the history alone: latest = highest (epoch, seq) per stream.
        latest: dict[str, tuple[int, int, int]] = {}
        for rowid, (stream, epoch, seq) in zip(rowids, keys, strict=True):
            latest[stream] = max(latest.get(stream, (0, 0, 0)), (epoch, seq, rowid))
        keep = {rowid for _, _, rowid in latest.values()}
        priority = {a.event.stream: a.event.priority for a in arrivals}
        stored = [
            Stored(rowid, p, is_held(rowid, p, delivered, frontiers), rowid in keep)
            for rowid, key in zip(rowids, keys, strict=True)
            for p in (priority[key[0]],)
        ]
        order = victim_order(stored, LOW_PRIORITY_MAX, policy, policy_low)

        small = StoreSection(max_buffer_bytes=max(4096, int(used * fraction)), min_free_bytes=0,
                            low_priority_max=LOW_PRIORITY_MAX, full_policy=policy,
                            full_policy_low=policy_low)  # fmt: skip
        store = EventStore(path, small, free_bytes=lambda _: 2**40)
        store.make_room(now=3.0)
        left = {r for (r,) in store.conn.execute("SELECT id FROM events")}
        shed = dict(store.conn.execute("SELECT reason, sum(count) FROM shed GROUP BY reason"))
        pruned = store.counters["pruned_acked"]
        store.close()

    removed = set(rowids) - left
    prefix = order[: len(removed)]
    assert removed == {rowid for rowid, _ in prefix}, "not a prefix of the core's order"
    assert keep <= left, "a stream's latest event was evicted"
    by_step: dict[str, int] = {}
    for _, step in prefix:
        by_step[step] = by_step.get(step, 0) + 1
    assert pruned == by_step.pop(ACKED, 0)
    assert shed == by_step  # every unacked loss recorded, under its step's name
    event(f"steps reached: {sorted(step for step in by_step)}, acked pruned: {pruned > 0}")
    event(f"policies: {policy}/{policy_low}")
