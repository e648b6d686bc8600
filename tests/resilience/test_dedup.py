"""Dedup: retransmits collapse, history never does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.resilience import Event, dedup_key, deduplicate


def test_one_stream_seq_1_2_3_keeps_three() -> None:
    events = [Event("convoy-1", 1), Event("convoy-1", 2), Event("convoy-1", 3)]
    assert deduplicate(events) == events


def test_retransmit_is_dropped_first_kept() -> None:
    first = Event("s", 1, payload=b"first")
    again = Event("s", 1, payload=b"again")
    assert deduplicate([first, again, Event("s", 2)]) == [first, Event("s", 2)]


def test_key_is_stream_epoch_seq() -> None:
    assert dedup_key(Event("s", 4, boot_epoch=2)) == ("s", 2, 4)


def test_same_seq_other_boot_epoch_is_distinct() -> None:
    events = [Event("s", 1, boot_epoch=1), Event("s", 1, boot_epoch=2)]
    assert deduplicate(events) == events


events_st = st.lists(
    st.builds(
        Event,
        stream=st.sampled_from(["a", "b", "c"]),
        seq=st.integers(0, 10),
        boot_epoch=st.integers(0, 2),
        payload=st.binary(max_size=4),
    ),
    max_size=50,
)


@given(events_st)
def test_idempotent(events: list[Event]) -> None:
    assert deduplicate(deduplicate(events)) == deduplicate(events)


@given(events_st)
def test_never_drops_a_distinct_key_and_keeps_order(events: list[Event]) -> None:
    result = deduplicate(events)
    assert {dedup_key(e) for e in result} == {dedup_key(e) for e in events}
    assert len(result) == len({dedup_key(e) for e in events})
    positions = [events.index(e) for e in result]
    assert positions == sorted(positions)
