"""The incident matrix: 7,000 seeded cases of replay and dedup against an independent oracle.

The incident (a failover replay that returned 1 event of 847) came from inputs nobody had
tried together: many streams, retransmits, controller reboots and an unusual arrival
order. Each case here is generated from `random.Random(case_index)`, so a failure names a
case that reproduces exactly. The oracle is written from DESIGN.md invariant 3 by sorting,
sharing no code with `agent.resilience.replay` except `content_key`, the documented tie
rule. Broken replays are kept as mutants to show the matrix would catch them.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import pytest

from agent.resilience import Event, content_key, dedup_key, deduplicate, replay

MATRIX_CASES: Final = 7000  # the incident matrix of issue 13
MAX_STREAMS: Final = 50  # a vehicle's controllers expose a few dozen streams
MAX_EVENTS_PER_STREAM: Final = 40
MAX_BOOT_EPOCH: Final = 3  # up to three reboots inside one outage
# Most cases are small so 7,000 of them stay fast; one in LARGE_CASE_EVERY reaches the
# full sizes above.
LARGE_CASE_EVERY: Final = 10
SMALL_STREAMS: Final = 6
SMALL_EVENTS_PER_STREAM: Final = 8
# One case in TIE_CASE_EVERY carries conflicting contents at an equal (stream, epoch, seq);
# the rest are free of ties, so a tie-rule bug cannot hide a position-rule bug.
TIE_CASE_EVERY: Final = 8
ORDERS: Final = ("shuffled", "reversed", "sorted", "as_sent", "interleaved")

Position = tuple[int, int]
Replay = Callable[[Sequence[Event]], list[Event]]


@dataclass(frozen=True, slots=True)
class Case:
    """One matrix case: the events in arrival order and what the generator knows of them."""

    index: int
    order: str
    events: list[Event]
    streams: int
    max_events_per_stream: int
    distinct_keys: int  # events the controllers produced, before retransmits and variants
    retransmits: int
    has_ties: bool
    # Per stream, the position of its latest event, known by construction.
    truth: dict[str, Position]
    # Some stream's latest event has a lower seq than an event of an earlier boot epoch.
    reboot_lowers_seq: bool


_KINDS: Final = ("telemetry", "position")
_STEPS: Final = (1, 1, 1, 1, 1, 2, 2, 7)  # seq increments: mostly consecutive, some gaps


def _stream_history(rng: random.Random, stream: str, count: int, ts0: float) -> Iterator[Event]:
    """`count` events of one stream as its controller sends them, across its boot epochs."""
    epochs = sorted(rng.sample(range(MAX_BOOT_EPOCH + 1), rng.randint(1, MAX_BOOT_EPOCH + 1)))
    epochs = epochs[-count:]  # at least one event per epoch
    cuts = sorted(rng.sample(range(1, count), len(epochs) - 1))
    sizes = [b - a for a, b in itertools.pairwise([0, *cuts, count])]
    ts = ts0
    for n, (epoch, size) in enumerate(zip(epochs, sizes, strict=True)):
        # The outage window may open anywhere in the first epoch's life, so its sequence
        # can be high (or start at the boot); a reboot restarts the sequence low.
        seq = rng.choice((0, rng.randrange(100_000))) if n == 0 else rng.randrange(3)
        for _ in range(size):
            # One draw per event, sliced into its fields: 7,000 cases must stay fast.
            r = rng.getrandbits(64)
            ts += (r >> 40) / 2**24
            yield Event(
                stream,
                seq,
                boot_epoch=epoch,
                ts=ts,
                kind=_KINDS[r & 1],
                priority=(r >> 1) % 3,
                payload=((r >> 8) & 0xFFFFFFFF).to_bytes(4, "big")[: (r >> 3) % 5],
            )
            seq += _STEPS[(r >> 5) & 7]


def _copy(event: Event) -> Event:
    """An exact copy as a retransmit delivers it: equal, but another object."""
    return Event(
        event.stream,
        event.seq,
        boot_epoch=event.boot_epoch,
        ts=event.ts,
        kind=event.kind,
        priority=event.priority,
        payload=bytes(bytearray(event.payload)),
    )


def _variant(rng: random.Random, event: Event) -> Event:
    """A different content at the same (stream, boot_epoch, seq): a conflicting resend."""
    return dataclasses.replace(
        event, ts=event.ts + rng.random() + 0.5, payload=event.payload + b"\x00variant"
    )


def _arrange(rng: random.Random, order: str, sent: list[list[Event]]) -> list[Event]:
    """Arrival order of the events each stream sent (`sent`, one list per stream)."""
    events = [e for stream_sent in sent for e in stream_sent]  # "as_sent": stream by stream
    if order == "shuffled":
        rng.shuffle(events)
    elif order == "sorted":  # oldest first: the latest of each stream arrives last
        events.sort(key=lambda e: (e.stream, e.boot_epoch, e.seq))
    elif order == "reversed":  # newest first: the latest of each stream arrives first
        events.sort(key=lambda e: (e.stream, e.boot_epoch, e.seq), reverse=True)
    elif order == "interleaved":  # round robin across streams, as a shared link delivers
        events = [e for row in itertools.zip_longest(*sent) for e in row if e is not None]
    return events


def make_case(index: int) -> Case:
    """Case `index` of the matrix, identical on every run and machine."""
    rng = random.Random(index)
    large = rng.randrange(LARGE_CASE_EVERY) == 0
    n_streams = rng.randint(1, MAX_STREAMS if large else SMALL_STREAMS)
    cap = MAX_EVENTS_PER_STREAM if large else SMALL_EVENTS_PER_STREAM
    has_ties = index % TIE_CASE_EVERY == 0
    # Names drawn from a wider range than needed, so their sorted order is not the order
    # they were generated in ("s-10" < "s-9").
    names = [f"s-{n}" for n in rng.sample(range(4 * MAX_STREAMS), n_streams)]
    histories: list[list[Event]] = []
    truth: dict[str, Position] = {}
    reboot_lowers_seq = False
    biggest = 0
    for name in names:
        history = list(_stream_history(rng, name, rng.randint(1, cap), rng.random() * 100))
        last = history[-1]
        truth[name] = last.position
        biggest = max(biggest, len(history))
        reboot_lowers_seq |= any(e.seq > last.seq for e in history)
        histories.append(history)
    distinct = sum(len(h) for h in histories)

    contested: list[Event] = []  # originals that get a conflicting resend
    if has_ties:
        for history in histories:
            if rng.random() < 0.6:  # the stream's latest event itself
                contested.append(history[-1])
            if rng.random() < 0.3:
                contested.append(rng.choice(history))

    dup_rate = rng.choice((0.0, 0.0, 0.1, 0.3, 1.0))
    sent: list[list[Event]] = []
    retransmits = 0
    for history in histories:
        stream_sent: list[Event] = []
        for event in history:
            stream_sent.append(event)
            while rng.random() < dup_rate / 2:  # 0..n exact copies, as a retransmit sends
                stream_sent.append(_copy(event))
                retransmits += 1
        sent.append(stream_sent)
    for original in contested:  # a conflicting resend is sent after the original
        stream_sent = sent[names.index(original.stream)]
        at = next(i for i, e in enumerate(stream_sent) if e is original)
        stream_sent.insert(rng.randint(at + 1, len(stream_sent)), _variant(rng, original))

    order = rng.choice(ORDERS)
    events = _arrange(rng, order, sent)
    return Case(
        index=index,
        order=order,
        events=events,
        streams=n_streams,
        max_events_per_stream=biggest,
        distinct_keys=distinct,
        retransmits=retransmits,
        has_ties=bool(contested),
        truth=truth,
        reboot_lowers_seq=reboot_lowers_seq,
    )


def matrix() -> Iterator[Case]:
    """All cases, generated one at a time (the whole matrix is never held in memory)."""
    return (make_case(i) for i in range(MATRIX_CASES))


# -- the independent definition ----------------------------------------------------------


def expected_replay(events: Sequence[Event]) -> list[Event]:
    """DESIGN.md invariant 3 by sorting: per stream the greatest (boot_epoch, seq).

    Events at that greatest position with different contents are ordered by
    `content_key`, the documented tie rule; nothing else here is shared with replay.
    """
    ranked = sorted(events, key=lambda e: (e.stream, e.boot_epoch, e.seq))
    out: list[Event] = []
    for _, group in itertools.groupby(ranked, key=lambda e: e.stream):
        members = list(group)
        top = members[-1]
        tied = [e for e in members if (e.boot_epoch, e.seq) == (top.boot_epoch, top.seq)]
        out.append(top if all(e == top for e in tied) else max(tied, key=content_key))
    return out


def expected_dedup(events: Sequence[Event]) -> list[Event]:
    """The first occurrence of every (stream, boot_epoch, seq), in arrival order."""
    first: dict[tuple[str, int, int], int] = {}
    for i in range(len(events) - 1, -1, -1):  # walking backwards, the earliest index wins
        e = events[i]
        first[(e.stream, e.boot_epoch, e.seq)] = i
    return [events[i] for i in sorted(first.values())]


# -- mutants: broken replays the matrix must catch ---------------------------------------


def _last_arrival_wins(events: Sequence[Event]) -> list[Event]:
    latest = {e.stream: e for e in events}
    return [latest[s] for s in sorted(latest)]


def _overwrite(events: Sequence[Event]) -> list[Event]:
    """The incident: one result overwritten instead of one kept per stream."""
    result: Event | None = None
    for e in events:
        if result is None or e.position > result.position:
            result = e
    return [] if result is None else [result]


def _lowest_seq_wins(events: Sequence[Event]) -> list[Event]:
    lowest: dict[str, Event] = {}
    for e in events:
        if e.stream not in lowest or e.position < lowest[e.stream].position:
            lowest[e.stream] = e
    return [lowest[s] for s in sorted(lowest)]


def _ignores_boot_epoch(events: Sequence[Event]) -> list[Event]:
    """Right in everything but the reboot: the highest seq wins whatever its epoch."""
    best: dict[str, Event] = {}
    for e in events:
        b = best.get(e.stream)
        if b is None or e.seq > b.seq or (e.seq == b.seq and content_key(e) > content_key(b)):
            best[e.stream] = e
    return [best[s] for s in sorted(best)]


def _first_arrival_breaks_ties(events: Sequence[Event]) -> list[Event]:
    """Right in everything but ties, which it leaves to arrival order."""
    best: dict[str, Event] = {}
    for e in events:
        b = best.get(e.stream)
        if b is None or e.position > b.position:
            best[e.stream] = e
    return [best[s] for s in sorted(best)]


# mutant -> the fewest of the 7,000 cases that must catch it. The floors sit well below
# the counts measured when this file was written (all of them: see the test's message),
# so the generator may change a little; a floor of one would prove little.
MUTANTS: Final[dict[str, tuple[Replay, int]]] = {
    "last_arrival_wins": (_last_arrival_wins, 2000),
    "overwrite": (_overwrite, 4000),
    "lowest_seq_wins": (_lowest_seq_wins, 4000),
    "ignores_boot_epoch": (_ignores_boot_epoch, 1000),
    "first_arrival_breaks_ties": (_first_arrival_breaks_ties, 100),
}


# -- one pass over the matrix ------------------------------------------------------------


@dataclass(slots=True)
class MatrixRun:
    """Every verdict of one pass over the 7,000 cases (each generated once, then dropped:
    the matrix holds ~600k events, too many to keep for one pass per test)."""

    replay_failures: list[str] = field(default_factory=list)
    dedup_failures: list[str] = field(default_factory=list)
    oracle_failures: list[str] = field(default_factory=list)
    caught: dict[str, list[int]] = field(default_factory=lambda: {m: [] for m in MUTANTS})
    orders: Counter[str] = field(default_factory=Counter)
    tie_cases: int = 0
    retransmit_cases: int = 0
    reboot_lowers_seq_cases: int = 0
    single_stream_cases: int = 0
    most_streams: int = 0
    most_events_per_stream: int = 0


def describe(case: Case) -> str:
    """Enough to rerun a failing case by hand: `make_case(index)`."""
    return (
        f"case {case.index}: order={case.order} streams={case.streams} "
        f"events={len(case.events)} retransmits={case.retransmits} ties={case.has_ties}"
    )


def _dedup_is_exact(case: Case) -> bool:
    kept = deduplicate(case.events)
    keys = [dedup_key(e) for e in kept]
    return (
        len(keys) == len(set(keys)) == case.distinct_keys
        and set(keys) == {dedup_key(e) for e in case.events}
        and kept == expected_dedup(case.events)
    )


def run_matrix() -> MatrixRun:
    """Replay, dedup, the oracle and every mutant, checked case by case in one pass."""
    out = MatrixRun()
    for case in matrix():
        expected = expected_replay(case.events)
        if replay(case.events) != expected:
            out.replay_failures.append(describe(case))
        if not _dedup_is_exact(case):
            out.dedup_failures.append(describe(case))
        if {e.stream: e.position for e in expected} != case.truth:
            out.oracle_failures.append(describe(case))
        for name, (mutant, _) in MUTANTS.items():
            if mutant(case.events) != expected:
                out.caught[name].append(case.index)
        out.orders[case.order] += 1
        out.tie_cases += case.has_ties
        out.retransmit_cases += case.retransmits > 0
        out.reboot_lowers_seq_cases += case.reboot_lowers_seq
        out.single_stream_cases += case.streams == 1
        out.most_streams = max(out.most_streams, case.streams)
        out.most_events_per_stream = max(out.most_events_per_stream, case.max_events_per_stream)
    return out


@pytest.fixture(scope="module")
def run() -> MatrixRun:
    """The pass is shared by every test below (~4 s on a 2-core machine)."""
    return run_matrix()


# -- the product against the definition --------------------------------------------------


def test_replay_matches_the_definition_in_all_7000_cases(run: MatrixRun) -> None:
    """The core replay agrees with the sort-based definition on every case."""
    failures = run.replay_failures
    assert failures == [], f"{len(failures)} of {MATRIX_CASES} cases fail: {failures[:5]}"


def test_dedup_keeps_exactly_one_per_key_in_all_7000_cases(run: MatrixRun) -> None:
    """Retransmits and conflicting resends collapse to the first arrival of each key;
    every distinct key the controllers produced survives."""
    failures = run.dedup_failures
    assert failures == [], f"{len(failures)} of {MATRIX_CASES} cases fail: {failures[:5]}"


def test_definition_agrees_with_what_the_generator_built(run: MatrixRun) -> None:
    """The oracle is checked against the positions the generator knows are latest, so a
    wrong oracle cannot pass the product by sharing its mistake."""
    assert run.oracle_failures == []


def test_matrix_covers_what_it_claims(run: MatrixRun) -> None:
    """Each dimension the incident review listed is exercised, up to its extremes."""
    assert sum(run.orders.values()) == MATRIX_CASES
    assert min(run.orders[o] for o in ORDERS) >= MATRIX_CASES // 10, run.orders
    # Some cases with ties, most without, so a tie-rule bug cannot hide a position bug.
    assert MATRIX_CASES // 20 <= run.tie_cases <= MATRIX_CASES // 5
    assert run.retransmit_cases >= MATRIX_CASES // 3
    assert run.reboot_lowers_seq_cases >= MATRIX_CASES // 10
    assert run.single_stream_cases >= MATRIX_CASES // 20
    # Cases without planted ties have none: the mutant that is wrong only on ties is
    # caught in tie cases alone.
    assert run.caught["first_arrival_breaks_ties"]
    assert all(i % TIE_CASE_EVERY == 0 for i in run.caught["first_arrival_breaks_ties"])
    assert (run.most_streams, run.most_events_per_stream) == (
        MAX_STREAMS,
        MAX_EVENTS_PER_STREAM,
    )


@pytest.mark.parametrize("name", list(MUTANTS))
def test_matrix_catches_mutant(name: str, run: MatrixRun) -> None:
    """A broken replay disagrees with the definition in many cases, not one lucky one."""
    floor = MUTANTS[name][1]
    counts = {m: len(c) for m, c in run.caught.items()}
    assert counts[name] >= floor, f"{name}: caught by {counts[name]} of {MATRIX_CASES}; {counts}"
