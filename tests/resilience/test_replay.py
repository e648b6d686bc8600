"""Replay: the incident's cases and the algebra that makes it order-independent."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from agent.resilience import Event, content_key, dedup_key, replay

# -- the incident's named cases -----------------------------------------------------------


def test_latest_sequence_wins() -> None:
    events = [Event("convoy-1", 1), Event("convoy-1", 3), Event("convoy-1", 2)]
    assert replay(events) == [Event("convoy-1", 3)]


def test_ordered_and_shuffled_converge() -> None:
    events = [Event(f"s-{i % 5}", i) for i in range(100)]
    shuffled = events[:]
    random.Random(7).shuffle(shuffled)
    assert replay(shuffled) == replay(events)
    assert [e.seq for e in replay(events)] == [95, 96, 97, 98, 99]


def test_convoy_example_gives_two_events() -> None:
    events = [
        Event("convoy-1", 1),
        Event("convoy-2", 1),
        Event("convoy-1", 2),
        Event("convoy-2", 2),
        Event("convoy-1", 3),
    ]
    result = replay(events)
    assert len(result) == 2
    assert result == [Event("convoy-1", 3), Event("convoy-2", 2)]


def test_847_events_give_one_per_distinct_stream() -> None:
    rng = random.Random(847)
    events = [Event(f"vehicle-{rng.randrange(60)}", rng.randrange(10_000)) for _ in range(847)]
    streams = {e.stream for e in events}
    result = replay(events)
    assert len(result) == len(streams)
    for latest in result:
        assert latest.seq == max(e.seq for e in events if e.stream == latest.stream)


def test_boot_epoch_orders_across_reboots() -> None:
    before = Event("s", 9000, boot_epoch=1)
    after = Event("s", 3, boot_epoch=2)
    assert replay([after, before]) == [after]


def test_ties_break_on_content_not_arrival() -> None:
    a = Event("s", 5, payload=b"\x81\xa1x\x01")
    b = Event("s", 5, payload=b"\x81\xa1x\x02")
    assert replay([a, b]) == replay([b, a])
    winner = max(a, b, key=content_key)
    assert replay([a, b]) == [winner]


def test_dict_payloads_tie_break_independent_of_key_order() -> None:
    a = Event("s", 1, payload={"speed": 3, "heading": 90})
    b = Event("s", 1, payload={"heading": 90, "speed": 3})
    assert content_key(a) == content_key(b)


def test_empty_input() -> None:
    assert replay([]) == []


def test_consumes_a_generator_once() -> None:
    assert replay(Event("s", i) for i in range(10)) == [Event("s", 9)]


# -- properties -------------------------------------------------------------------------

events_st = st.builds(
    Event,
    stream=st.sampled_from(["a", "b", "c", "convoy-1", "convoy-2"]),
    seq=st.integers(0, 20),
    boot_epoch=st.integers(0, 2),
    ts=st.floats(allow_nan=False, allow_infinity=False),
    kind=st.sampled_from(["telemetry", "position", "mission"]),
    priority=st.integers(0, 3),
    payload=st.binary(max_size=8),
)
event_lists = st.lists(events_st, max_size=40)


@given(event_lists, st.randoms())
def test_invariant_under_shuffle(events: list[Event], rnd: random.Random) -> None:
    shuffled = events[:]
    rnd.shuffle(shuffled)
    assert replay(shuffled) == replay(events)


@given(event_lists)
def test_invariant_under_duplication(events: list[Event]) -> None:
    assert replay(events + events) == replay(events)


@given(event_lists, event_lists)
def test_regrouping(a: list[Event], b: list[Event]) -> None:
    assert replay(a + b) == replay(replay(a) + replay(b))


@given(event_lists)
def test_idempotent(events: list[Event]) -> None:
    assert replay(replay(events)) == replay(events)


@given(event_lists)
def test_sorted_one_per_stream_and_maximal(events: list[Event]) -> None:
    result = replay(events)
    streams = [e.stream for e in result]
    assert streams == sorted({e.stream for e in events})
    for latest in result:
        same = [e for e in events if e.stream == latest.stream]
        assert latest in same
        assert latest.position == max(e.position for e in same)


@given(event_lists)
def test_every_winner_is_an_input_key(events: list[Event]) -> None:
    keys = {dedup_key(e) for e in events}
    assert all(dedup_key(e) in keys for e in replay(events))
