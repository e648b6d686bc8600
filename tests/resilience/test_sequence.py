"""The sequencing rule of agent/resilience/sequence.py, run as the store runs it, one
(stream, epoch) at a time, over arbitrary arrival orders with repeats (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from agent.resilience.sequence import (
    AHEAD,
    BEHIND,
    INSIDE,
    MAX_GAP_PIECES,
    NEXT,
    EpochState,
    Gap,
    assign_epoch,
    bound_gaps,
    missing_range,
    place,
    record,
    start,
    take_from_gaps,
)


@dataclass
class Track:
    """One (stream, epoch) through the rule: what it stores, what it calls missing."""

    known: bool = False  # another epoch of the stream is stored
    state: EpochState | None = None
    gaps: list[Gap] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    duplicates: int = 0

    def open(self, lo: int, hi: int) -> None:
        self.gaps.append(Gap(len(self.gaps) + 1, [[lo, hi]]))

    def arrive(self, seq: int) -> None:
        if self.state is None:
            self.state, lost = start(seq, self.known)
            if lost is not None:
                self.open(*lost)
        where = place(self.state, seq)
        if where == INSIDE:
            if take_from_gaps(self.gaps, seq) is None:
                self.duplicates += 1
                return
        elif where != NEXT:
            self.open(*missing_range(self.state, seq, where))
        record(self.state, seq, len(self.stored) + 1)
        self.stored.append(seq)

    def missing(self) -> set[int]:
        return {s for g in self.gaps for lo, hi in g.pieces for s in range(lo, hi + 1)}


arrivals = st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=120)


@given(arrivals)
def test_every_seq_is_stored_exactly_once_whatever_the_order(seqs: list[int]) -> None:
    track = Track()
    for seq in seqs:
        track.arrive(seq)
    assert sorted(track.stored) == sorted(set(seqs))
    assert track.duplicates == len(seqs) - len(set(seqs))


@given(arrivals)
def test_open_gaps_are_exactly_the_holes_between_lowest_and_highest(seqs: list[int]) -> None:
    track = Track()
    for seq in seqs:
        track.arrive(seq)
    span = set(range(min(seqs), max(seqs) + 1))
    assert track.missing() == span - set(seqs)
    assert track.state is not None
    assert (track.state.low_seq, track.state.high_seq) == (min(seqs), max(seqs))


@given(arrivals)
def test_the_latest_is_the_highest_seq_stored(seqs: list[int]) -> None:
    track = Track()
    for seq in seqs:
        track.arrive(seq)
    assert track.state is not None
    assert track.stored[track.state.latest_rowid - 1] == max(seqs)
    assert track.state.events == len(set(seqs))


@given(st.integers(min_value=1, max_value=10**6))
def test_a_new_epoch_of_a_known_stream_first_seen_late_lost_its_start(seq: int) -> None:
    state, lost = start(seq, stream_known=True)
    assert lost == ((1, seq - 1) if seq > 1 else None)
    first_sight, none = start(seq, stream_known=False)
    assert none is None
    assert place(first_sight, seq - 1) in (NEXT, BEHIND)  # nothing below is a duplicate
    assert place(state, seq) == NEXT


def test_places() -> None:
    state = EpochState(5, 9, 0, 0)
    assert [place(state, s) for s in (2, 3, 4, 5, 9, 10, 11, 12)] == [
        BEHIND, BEHIND, NEXT, INSIDE, INSIDE, NEXT, AHEAD, AHEAD,
    ]  # fmt: skip
    assert missing_range(state, 12, AHEAD) == (10, 11)
    assert missing_range(state, 2, BEHIND) == (3, 4)


def test_gaps_are_bounded_oldest_first() -> None:
    gaps = [Gap(i, [[2 * i, 2 * i]]) for i in range(MAX_GAP_PIECES + 5)]
    dropped = bound_gaps(gaps)
    assert [g.gap_id for g in dropped] == list(range(5))
    assert sum(len(g.pieces) for g in gaps) == MAX_GAP_PIECES
    assert sum(g.missing for g in dropped) == 5


@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=1, max_size=30))
def test_stored_epochs_follow_the_arrival_of_sessions(announced: list[int]) -> None:
    top, stored = -1, []
    for epoch in announced:
        value, rolled_back = assign_epoch(epoch, top)
        assert rolled_back is (epoch <= top)
        assert value == (epoch if not rolled_back else top + 1)
        stored.append(value)
        top = value
    assert stored == sorted(set(stored))  # strictly increasing: later sessions sort later
