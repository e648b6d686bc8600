"""Sequencing with gaps: is an arriving event new, a duplicate, or the fill of a hole?

The rule the store runs for every event it is handed, per (stream, stored boot epoch):

- `EpochState` holds the dedup range [low_seq, high_seq] of what is stored and the
  rowid of the latest event. A seq inside the range is new only if an open gap holds it
  (`take_from_gaps`); otherwise it is a duplicate, and never stored twice.
- A seq past `high_seq + 1` shows the seqs in between missing: a gap opens above. A seq
  below `low_seq - 1` (a late, older event) opens one below. Adjacent seqs open nothing.
- The first event of a stream sets the range's low end: nothing is known below it, so
  nothing below it can be a duplicate. A new boot epoch of a stream already known, first
  seen past seq 1, lost its first events: a gap [1, seq - 1] opens (`start`).
- Open gaps are bounded (`MAX_GAP_PIECES` pieces per stream and epoch): past it the
  oldest are forgotten (`bound_gaps`; the store records their events as lost), so a
  hostile controller cannot grow memory.
- Stored boot epochs follow the arrival order of a controller's sessions
  (`assign_epoch`): no announced value can pin replay or checkpoints.

Pure: no I/O, no clock. The store (agent/streamcache.py) caches these states for active
streams, reads missing ones from SQLite, and writes what the rule decided; its tests and
tests/resilience/test_sequence.py check the rule, and tests/agent/test_store_vs_core.py
that the store stores exactly `deduplicate(history)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

# Open gap pieces tracked per (stream, boot epoch). Each late fill can split a piece in
# two; past this a hostile or broken controller could grow memory without bound.
MAX_GAP_PIECES: Final = 10_000

# Where an arriving seq falls against a state (`place`).
INSIDE: Final = 0  # within [low_seq, high_seq]: new only if an open gap holds it
NEXT: Final = 1  # adjacent to the range (or its first event): stored, no gap
AHEAD: Final = 2  # past high_seq + 1: [high_seq + 1, seq - 1] goes missing
BEHIND: Final = 3  # below low_seq - 1: [seq + 1, low_seq - 1] goes missing


@dataclass(slots=True)
class EpochState:
    """One (stream, stored boot epoch): dedup range and the rowid of its latest event."""

    low_seq: int
    high_seq: int
    latest_rowid: int
    events: int


@dataclass(slots=True)
class Gap:
    """An open gap: the pieces [lo, hi] still missing."""

    gap_id: int
    pieces: list[list[int]] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.pieces)


def start(seq: int, stream_known: bool) -> tuple[EpochState, tuple[int, int] | None]:
    """The state of a (stream, epoch) first met at `seq`, and the range it shows missing.

    `stream_known`: another epoch of the stream is stored, so this one (a controller
    reboot) should have started at 1; its events below `seq` were lost.
    """
    if seq > 1 and stream_known:
        return EpochState(1, seq - 1, 0, 0), (1, seq - 1)
    return EpochState(seq, seq - 1, 0, 0), None


def place(state: EpochState, seq: int) -> int:
    """INSIDE, NEXT, AHEAD or BEHIND: where `seq` falls against what is stored."""
    if state.low_seq <= seq <= state.high_seq:
        return INSIDE
    if seq > state.high_seq + 1:
        return AHEAD
    if seq < state.low_seq - 1:
        return BEHIND
    return NEXT


def missing_range(state: EpochState, seq: int, where: int) -> tuple[int, int]:
    """The seqs an AHEAD or BEHIND `seq` shows missing."""
    if where == AHEAD:
        return state.high_seq + 1, seq - 1
    return seq + 1, state.low_seq - 1


def record(state: EpochState, seq: int, rowid: int) -> None:
    """`seq` is stored as `rowid`: widen the range; the highest seq is the latest."""
    state.low_seq = min(state.low_seq, seq)
    if seq > state.high_seq:
        state.high_seq = seq
        state.latest_rowid = rowid
    state.events += 1


def take_from_gaps(gaps: list[Gap], seq: int) -> Gap | None:
    """An INSIDE seq is new only if an open gap holds it: remove it from that gap's pieces
    and return the gap; None means it is a duplicate."""
    for gap in gaps:
        pieces = gap.pieces
        for i, (lo, hi) in enumerate(pieces):
            if lo <= seq <= hi:
                pieces[i : i + 1] = [r for r in ([lo, seq - 1], [seq + 1, hi]) if r[0] <= r[1]]
                return gap
    return None


def bound_gaps(gaps: list[Gap]) -> list[Gap]:
    """Forget the oldest gaps past MAX_GAP_PIECES (their late fills become duplicates);
    returns them so the caller records their events as lost."""
    dropped = []
    total = sum(len(g.pieces) for g in gaps)
    while total > MAX_GAP_PIECES and gaps:
        oldest = gaps.pop(0)
        total -= len(oldest.pieces)
        dropped.append(oldest)
    return dropped


def copy_gaps(gaps: Sequence[Gap]) -> list[Gap]:
    """A deep copy: a batch plans on copies, so a failed commit leaves the committed ones."""
    return [Gap(g.gap_id, [p[:] for p in g.pieces]) for g in gaps]


def assign_epoch(announced: int, top: int) -> tuple[int, bool]:
    """Stored epoch for a controller session not seen before, and whether it rolled back.

    `top` is the highest stored epoch of that controller (-1 if none). An epoch above it
    is stored as announced; one at or below it (a rollback: reflash, bad RTC, a bogus
    2**32-1 earlier) becomes `top + 1`, so stored epochs follow the arrival order of
    sessions and no announced value can pin replay or checkpoints.
    """
    if announced > top:
        return announced, False
    return top + 1, True
