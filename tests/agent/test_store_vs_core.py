"""The store's SQL fast path against the pure core, over random histories.

`EventStore.append` deduplicates with its `stream_epochs` high-water marks and gaps, and
`read_latest` answers replay with point reads through `latest_rowid`: neither calls
`deduplicate` or `replay`. These properties feed the same random history (retransmits,
conflicting resends, reboots, any order, any batching, restarts of the store, a tiny
stream cache) to a real store on a real SQLite file and to the core, and require the
same answer.

Where the two may differ, by design:

- Boot epochs. The store records, per controller, the epoch each announced boot_epoch is
  stored under (`controller_epochs`, docs/protocol.md 5.1): a session first seen after a
  higher one is a rollback and is stored as the highest epoch + 1. The core takes epochs
  as given. `test_store_agrees_with_core` keeps to histories where each controller's
  sessions are first seen in increasing order, where stored = announced; the rollback
  test maps the announced epochs through a model of the documented rule first.
- Contents at one (stream, boot_epoch, seq). The store keeps the first arrival and drops
  the rest as duplicates (as `deduplicate` does); `replay` alone breaks such ties on
  `content_key`. So the store equals `replay(deduplicate(history))`, and equals
  `replay(history)` in positions; the last test pins the difference down.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.resilience import Event, content_key, dedup_key, deduplicate, replay
from agent.store import ROLLBACK_ALARM, EventStore, StoreSection, read_latest

STREAMS = ("a", "b", "c", "d")
# Which controller sends each stream: one for all, one per stream, or a shared pair. The
# boot-epoch rule is per controller, so this changes which sessions are rollbacks.
CONTROLLER_LAYOUTS = (
    {"a": "ecu0", "b": "ecu0", "c": "ecu0", "d": "ecu0"},
    {"a": "ecu-a", "b": "ecu-b", "c": "ecu-c", "d": "ecu-d"},
    {"a": "ecu0", "b": "ecu0", "c": "ecu1", "d": "ecu1"},
)
MAX_SEQ = 20
MAX_EPOCH = 2
# The rollback test goes higher: rollbacks stack stored epochs past announced ones, and
# five epochs of one stream exceed MAX_CACHED_EPOCHS_PER_STREAM (4), so cached epoch
# states are dropped and read back.
MAX_EPOCH_ROLLBACK = 4
# 1 and 2 keep the writer's stream cache smaller than the streams in play, so dedup
# decisions are also made from point reads of committed state, not only from the cache.
CACHE_SIZES = (1, 2, 1024)


@dataclass(frozen=True, slots=True)
class In:
    """An arrival as the link hands it to the store (the `Arrival` protocol)."""

    event: Event
    time_quality: int
    controller_id: str


@dataclass(frozen=True, slots=True)
class History:
    """Events in arrival order, and how they reach the store."""

    events: list[Event]
    controllers: dict[str, str]  # stream -> controller id
    batches: list[int]  # sizes of the successive `append` calls
    reopen_after: frozenset[int]  # batch indices after which the store is closed, reopened
    cache: int  # StoreSection.max_cached_streams


def _event(stream: str, seq: int, epoch: int, variant: int) -> Event:
    # `variant` gives one (stream, boot_epoch, seq) several contents: a conflicting resend.
    return Event(
        stream,
        seq,
        boot_epoch=epoch,
        ts=seq + variant / 4,
        priority=variant % 2,
        payload=bytes([seq, epoch, variant]),
    )


@st.composite
def histories(draw: st.DrawFn, max_epoch: int = MAX_EPOCH) -> History:
    """Up to ~30 events over a few streams with retransmits, in any order and batching."""
    sent = draw(
        st.lists(
            st.builds(
                _event,
                st.sampled_from(STREAMS),
                st.integers(0, MAX_SEQ),
                st.integers(0, max_epoch),
                st.sampled_from((0, 0, 0, 1)),
            ),
            max_size=20,
        )
    )
    events = list(sent)
    # Resends, each arriving somewhere after its original: mostly exact retransmits, some
    # with another content under the same (stream, boot_epoch, seq).
    for _ in range(draw(st.integers(0, 10)) if sent else 0):
        at = draw(st.integers(0, len(events) - 1))
        o = events[at]
        exact = draw(st.sampled_from((True, True, False)))
        resend = dataclasses.replace(o) if exact else _event(o.stream, o.seq, o.boot_epoch, 2)
        events.insert(draw(st.integers(at + 1, len(events))), resend)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(events) - 1)), max_size=4)))
    edges = [0, *(c for c in cuts if c < len(events)), len(events)]
    batches = [b - a for a, b in itertools.pairwise(edges) if b > a]
    reopen = draw(st.frozensets(st.integers(0, max(0, len(batches) - 2)), max_size=2))
    return History(
        events=events,
        controllers=draw(st.sampled_from(CONTROLLER_LAYOUTS)),
        batches=batches,
        reopen_after=reopen,
        cache=draw(st.sampled_from(CACHE_SIZES)),
    )


def sessions_in_order(history: History) -> History:
    """The same history with each controller's boot epochs renamed so that they are first
    seen in increasing order: the domain where the store stores epochs as announced.

    A bijection per controller (k-th epoch first seen -> k-th smallest), so duplicates,
    conflicts and the number of distinct epochs are unchanged.
    """
    first_seen: dict[str, list[int]] = {}
    for e in history.events:
        seen = first_seen.setdefault(history.controllers[e.stream], [])
        if e.boot_epoch not in seen:
            seen.append(e.boot_epoch)
    rename = {
        (controller, old): new
        for controller, seen in first_seen.items()
        for old, new in zip(seen, sorted(seen), strict=True)
    }
    events = [
        dataclasses.replace(e, boot_epoch=rename[(history.controllers[e.stream], e.boot_epoch)])
        for e in history.events
    ]
    return dataclasses.replace(history, events=events)


def stored_epochs(history: History) -> tuple[dict[tuple[str, int], int], int]:
    """docs/protocol.md 5.1 as a model: (controller, announced) -> stored epoch, rollbacks.

    Sessions are taken in the order they are first seen; one above the controller's
    highest stored epoch is stored as announced, any other as that highest + 1.
    """
    stored: dict[tuple[str, int], int] = {}
    top: dict[str, int] = {}
    rollbacks = 0
    for e in history.events:
        controller = history.controllers[e.stream]
        if (controller, e.boot_epoch) in stored:
            continue
        highest = top.get(controller, -1)
        epoch = e.boot_epoch if e.boot_epoch > highest else highest + 1
        rollbacks += epoch != e.boot_epoch
        stored[(controller, e.boot_epoch)] = top[controller] = epoch
    return stored, rollbacks


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a real store made of a history."""

    stored: list[Event]  # every stored event, in rowid (arrival) order
    latest: list[Event]  # read_latest over the whole store
    paged: list[Event]  # read_latest one stream per page (another query: the CLI's)
    rollbacks: int  # epoch_rollbacks counted, over every reopening
    alarm: bool  # alarm.boot_epoch_rollback is set


@pytest.fixture(scope="module")
def empty_store() -> Iterator[Path]:
    """A freshly created and migrated store file, for the module's tests to copy.

    Creating a store runs the migrations (~30 ms); each example starts from a copy of
    this file instead (~1 ms), so 1,000 examples fit in seconds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "empty.db"
        EventStore(path).close()  # checkpoints the WAL: the file alone is the store
        yield path


def run_store(history: History, empty: Path) -> Outcome:
    """Append `history` batch by batch to a real store on its own file, then read it."""
    # synchronous=OFF: this checks what is stored, not what survives a power cut (that is
    # tests/chaos/test_powercut.py); FULL adds an fsync per commit, ~3 ms per example.
    config = StoreSection(synchronous="OFF", max_cached_streams=history.cache)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.db"
        shutil.copyfile(empty, path)
        store = EventStore(path, config)
        rollbacks = 0
        start = 0
        try:
            for i, size in enumerate(history.batches):
                batch = history.events[start : start + size]
                start += size
                store.append([In(e, 3, history.controllers[e.stream]) for e in batch], now=float(i))
                if i in history.reopen_after:  # later decisions start from the file alone
                    rollbacks += store.counters["epoch_rollbacks"]
                    store.close()
                    store = EventStore(path, config)
            assert start == len(history.events)
            rollbacks += store.counters["epoch_rollbacks"]
            alarm = store.conn.execute(
                "SELECT 1 FROM agent_state WHERE key = ?", (ROLLBACK_ALARM,)
            ).fetchone()
            return Outcome(
                stored=[s.event for s in store.iter_events()],
                latest=[event for _, event, _, _ in read_latest(store.conn)],
                paged=read_paged(store),
                rollbacks=rollbacks,
                alarm=alarm is not None,
            )
        finally:
            store.close()


def read_paged(store: EventStore) -> list[Event]:
    """`read_latest` page by page, one stream per page, as the technician CLI pages it."""
    out: list[Event] = []
    for _ in range(len(STREAMS) + 1):  # bounded: a paging bug must fail, not hang
        page = read_latest(store.conn, after=out[-1].stream if out else None, limit=1)
        if not page:
            return out
        out.extend(event for _, event, _, _ in page)
    raise AssertionError(f"read_latest pages past {len(STREAMS)} streams: {out}")


def positions(events: Sequence[Event]) -> list[tuple[str, int, int]]:
    """The (stream, boot_epoch, seq) of each event, in order."""
    return [dedup_key(e) for e in events]


@settings(max_examples=1000, deadline=None)
@given(drawn=histories())
def test_store_agrees_with_core(drawn: History, empty_store: Path) -> None:
    """In the domain where stored epochs are the announced ones, the store's dedup is
    `deduplicate` and its latest state is `replay`'s, stream by stream."""
    history = sessions_in_order(drawn)
    out = run_store(history, empty_store)
    kept = deduplicate(history.events)
    # (a) the store's dedup agrees with the core's: same keys, each stored once ...
    assert sorted(positions(out.stored)) == sorted(positions(kept))
    # ... and the very events the core keeps (first arrival of each key), in arrival order.
    assert out.stored == kept
    # (b) per stream the same (stream, boot_epoch, seq) as replay over everything received.
    assert positions(out.latest) == positions(replay(history.events))
    # ... with the content of the first arrival at that position, paged or not.
    assert out.latest == replay(kept)
    assert out.paged == out.latest
    assert (out.rollbacks, out.alarm) == (0, False)


@settings(max_examples=300, deadline=None)
@given(history=histories(max_epoch=MAX_EPOCH_ROLLBACK))
def test_store_agrees_with_core_through_the_rollback_rule(
    history: History, empty_store: Path
) -> None:
    """With sessions in any order, the store equals the core run on the epochs the
    documented rollback rule assigns: every event kept, and the newest session wins."""
    mapping, rollbacks = stored_epochs(history)
    as_stored = [
        dataclasses.replace(e, boot_epoch=mapping[(history.controllers[e.stream], e.boot_epoch)])
        for e in history.events
    ]
    out = run_store(history, empty_store)
    kept = deduplicate(as_stored)
    assert out.stored == kept
    assert positions(out.latest) == positions(replay(as_stored))
    assert out.latest == out.paged == replay(kept)
    assert (out.rollbacks, out.alarm) == (rollbacks, rollbacks > 0)


def test_conflicting_resend_at_the_latest_position_keeps_the_first_arrival() -> None:
    """The one place the store and `replay(history)` differ in content, by design.

    Two contents for one (stream, boot_epoch, seq): `replay` of everything received picks
    the greater `content_key`; the store already dropped the later arrival as a duplicate
    (and ACKed it), so its latest state is the first arrival's, as the fleet collector's
    ON CONFLICT DO NOTHING also keeps. Positions agree; contents follow arrival here.
    """
    low, high = sorted((_event("a", 5, 1, 0), _event("a", 5, 1, 1)), key=content_key)
    with tempfile.TemporaryDirectory() as tmp:
        store = EventStore(Path(tmp) / "agent.db", StoreSection(synchronous="OFF"))
        try:
            store.append([In(low, 3, "ecu0"), In(high, 3, "ecu0")], now=0.0)
            assert store.latest() == [low]
        finally:
            store.close()
    assert replay([low, high]) == [high]  # the core's tie rule, arrival order aside
    assert replay(deduplicate([low, high])) == [low]  # what the store implements
