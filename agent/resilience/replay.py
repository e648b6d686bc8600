"""Replay: the latest event of every stream, identical whatever the arrival order.

The incident this guards against: after a failover the old replay overwrote one result
instead of accumulating per stream and returned 1 event of 847. Here the result is a pure
function of the *set* of input events, so shuffles, duplicates and regrouping converge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import msgpack

from agent.resilience.event import Event


def _canonical(value: Any) -> Any:
    """Rewrite maps with sorted keys so equal contents encode to equal bytes."""
    if isinstance(value, dict):
        return [[_canonical(k), _canonical(v)] for k, v in sorted(value.items(), key=repr)]
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def content_key(event: Event) -> tuple[bytes, bytes]:
    """Total order between events of equal `(stream, boot_epoch, seq)`.

    The SHA-256 of a canonical encoding of every field, then the encoding itself (so two
    different contents never compare equal even on a hash collision). Arrival order never
    enters, which is what makes replay independent of it.
    """
    encoded = msgpack.packb(
        [
            event.stream,
            event.boot_epoch,
            event.seq,
            event.ts,
            event.kind,
            event.priority,
            _canonical(event.payload),
        ],
        use_bin_type=True,
    )
    return hashlib.sha256(encoded).digest(), encoded


def _wins(candidate: Event, incumbent: Event) -> bool:
    if candidate.boot_epoch != incumbent.boot_epoch:
        return candidate.boot_epoch > incumbent.boot_epoch
    if candidate.seq != incumbent.seq:
        return candidate.seq > incumbent.seq
    if candidate == incumbent:
        return False
    return content_key(candidate) > content_key(incumbent)


def replay(events: Iterable[Event]) -> list[Event]:
    """Return, for every stream, its event with the highest `(boot_epoch, seq)`.

    One event per distinct stream, sorted by stream id. Ties on equal position break on
    `content_key`. One pass, memory proportional to the number of streams, not events, so
    it can consume a cursor over a million-event backlog.
    """
    latest: dict[str, Event] = {}
    get = latest.get
    for event in events:
        best = get(event.stream)
        if best is None or _wins(event, best):
            latest[event.stream] = event
    return [latest[stream] for stream in sorted(latest)]
