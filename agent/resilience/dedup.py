"""Deduplication by event identity `(stream, boot_epoch, seq)`."""

from __future__ import annotations

from collections.abc import Iterable

from agent.resilience.event import Event

DedupKey = tuple[str, int, int]


def dedup_key(event: Event) -> DedupKey:
    """Identity of an event: `(stream, boot_epoch, seq)`; retransmits share it."""
    return (event.stream, event.boot_epoch, event.seq)


def deduplicate(events: Iterable[Event]) -> list[Event]:
    """Keep the first occurrence of each `dedup_key`, in input order.

    Distinct sequences of one stream are distinct keys and are all kept: dedup removes
    retransmits, never history.
    """
    seen: set[DedupKey] = set()
    out: list[Event] = []
    for event in events:
        key = (event.stream, event.boot_epoch, event.seq)
        if key not in seen:
            seen.add(key)
            out.append(event)
    return out
