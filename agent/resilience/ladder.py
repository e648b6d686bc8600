"""The eviction ladder's choice of victims, as one definition: who goes first when the
buffer is full.

1. `acked`: events the fleet has acknowledged, oldest first; nothing is lost.
2. `compact_low_priority`: unacknowledged events of low-priority streams (priority at or
   below `low_priority_max`), oldest first: lost, and recorded as shed.
3. `drop_oldest`: the remaining unacknowledged events, lowest priority first, oldest
   first within a priority: lost, and recorded as shed.

A priority class whose full-buffer policy is `refuse_new` (`[store] full_policy`,
`full_policy_low`) is never a victim of steps 2 and 3: its unacknowledged events stay,
and when nothing else can go the store refuses new events (the agent stops ACKing and
the controller keeps them in its ring).

Never a victim: each stream's latest event (replay's answer; the fleet's view of the
vehicle must survive any disk pressure). The store runs this order as SQL on rowid
windows (agent/eviction.py) and stops once under its low-water mark, so what it removes
is always a prefix of `victim_order`: tests/agent/test_ladder_vs_core.py checks exactly
that over random stores. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple

ACKED: Final = "acked"
COMPACT_LOW_PRIORITY: Final = "compact_low_priority"
DROP_OLDEST: Final = "drop_oldest"
STEPS: Final = (ACKED, COMPACT_LOW_PRIORITY, DROP_OLDEST)  # in the order they run
# Full-buffer policies of a priority class: shed its oldest unacknowledged events, or keep
# them and refuse what comes next.
DROP: Final = "drop_oldest"
REFUSE: Final = "refuse_new"
POLICIES: Final = (DROP, REFUSE)
# Not a step of the ladder (it runs on time, not on space): events past their class's TTL.
EXPIRED: Final = "ttl"
# Wall-clock times before this are a clock that was never set (a controller board that
# booted without an RTC stamps 1970): an event stored then is never taken for expired.
SANE_WALL_CLOCK: Final = 1_577_836_800.0  # 2020-01-01T00:00:00Z


class Stored(NamedTuple):
    """What the ladder needs to know of one stored event."""

    rowid: int  # arrival order: lower is older
    priority: int
    acked: bool  # the fleet holds it (agent/resilience/cursor.py `is_held`)
    latest: bool  # its stream's latest event (newest stored boot epoch)


def step_of(
    event: Stored, low_priority_max: int, policy: str = DROP, policy_low: str = DROP
) -> str | None:
    """The ladder step that may remove `event`, or None if none ever may (`policy` is the
    full-buffer policy of priorities above `low_priority_max`, `policy_low` of the rest)."""
    if event.latest:
        return None
    if event.acked:
        return ACKED
    if event.priority <= low_priority_max:
        return COMPACT_LOW_PRIORITY if policy_low == DROP else None
    return DROP_OLDEST if policy == DROP else None


def victim_order(
    events: Iterable[Stored], low_priority_max: int, policy: str = DROP, policy_low: str = DROP
) -> list[tuple[int, str]]:
    """Every removable event as (rowid, step), in the order the ladder may remove them."""
    rank = {step: i for i, step in enumerate(STEPS)}
    keyed = []
    for event in events:
        step = step_of(event, low_priority_max, policy, policy_low)
        if step is None:
            continue
        within = (event.priority, event.rowid) if step == DROP_OLDEST else (0, event.rowid)
        keyed.append(((rank[step], *within), event.rowid, step))
    keyed.sort()
    return [(rowid, step) for _, rowid, step in keyed]


def is_expired(
    event: Stored, received_at: float, now: float, *, ttl: float, ttl_low: float,
    low_priority_max: int,
) -> bool:  # fmt: skip
    """Whether `event`, stored at wall time `received_at`, is past its TTL at `now`: the
    low-priority class (priority <= low_priority_max) has `ttl_low`, the rest `ttl`, 0 is
    never. Acknowledged events are not expired (the fleet has them) and a stream's latest
    event never is (replay's answer). A clock that was not set never expires anything."""
    limit = ttl_low if event.priority <= low_priority_max else ttl
    return (
        limit > 0
        and not event.acked
        and not event.latest
        and received_at >= SANE_WALL_CLOCK
        and received_at < now - limit
    )
