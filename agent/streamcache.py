"""The store writer's bounded caches of per-stream and per-controller state, and their rules.

A controller chooses its stream names and boot epochs, so the number of streams, epochs
and sessions the agent sees is peer controlled. The database is the truth; these caches
hold the committed state of recently active streams (least recently used first out;
while an append runs, its planned state, which `forget` drops if the append fails), and
a miss is a point read on a primary key or unique index (`streams.name`,
`stream_epochs`, the open-gaps index, `checkpoints`, `controller_epochs`). Evicting an
entry can therefore never change a dedup decision, only cost a read.

The rules themselves (dedup with gaps, the boot-epoch rule) are the core's:
agent/resilience/sequence.py. This module caches their state and calls them.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

from agent.resilience.sequence import (
    INSIDE,
    NEXT,
    EpochState,
    Gap,
    assign_epoch,
    bound_gaps,
    copy_gaps,
    missing_range,
    place,
    record,
    start,
    take_from_gaps,
)

log = logging.getLogger(__name__)

# Boot epochs kept per cached stream: a stream normally writes one (its controller's
# session); a controller that cycles epochs must not grow one entry without bound.
MAX_CACHED_EPOCHS_PER_STREAM: Final = 4
# (controller, announced boot epoch) mappings and per-controller tops kept in memory: a
# vehicle has a handful of controllers; HELLO floods with new epochs fall back to reads.
MAX_CACHED_CONTROLLER_EPOCHS: Final = 1024
LOAD_CHUNK: Final = 500  # stream names per read in `entries` (SQLite allows 32,766 parameters)
NO_EPOCH: Final = -1  # "no stored epoch for this controller yet" (stored epochs are >= 0)

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A dict with a size cap; `put` makes an entry the most recent and evicts the oldest."""

    def __init__(self, cap: int) -> None:
        self.cap = max(1, cap)
        self.data: OrderedDict[K, V] = OrderedDict()  # read directly on hot paths
        self.evictions = 0

    def get(self, key: K) -> V | None:
        """The cached value or None; does not change the order."""
        return self.data.get(key)

    def put(self, key: K, value: V) -> None:
        """Insert or refresh `key` as the most recent; evict past the cap."""
        self.put_all(((key, value),))

    def put_all(self, items: Iterable[tuple[K, V]]) -> None:
        """`put` each item in order (one call per batch, not per item)."""
        d = self.data
        for key, value in items:
            d[key] = value
            d.move_to_end(key)
        while len(d) > self.cap:
            d.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self.data)


_UNLOADED: Final = EpochState(-1, -1, -1, -1)  # sentinel: epoch not in the cache


@dataclass(slots=True)
class StreamEntry:
    """Committed state of one stream, as far as it was needed (loaded epoch by epoch)."""

    name: str
    sid: int
    known: bool  # some boot epoch of it is committed (a new epoch past seq 1 lost events)
    checkpoint: tuple[int, int] | None
    # Loaded epochs; None: no row for that epoch in the database.
    epochs: dict[int, EpochState | None] = field(default_factory=dict)
    gaps: dict[int, list[Gap]] = field(default_factory=dict)  # open gaps of loaded epochs
    new: bool = False  # created by the batch being planned: nothing of it in the database

    def remember(self, epoch: int, state: EpochState | None) -> None:
        """Cache an epoch's committed state, forgetting the oldest past the cap."""
        self.epochs[epoch] = state
        self.trim_epochs()

    def trim_epochs(self) -> None:
        epochs = self.epochs
        while len(epochs) > MAX_CACHED_EPOCHS_PER_STREAM:
            old = next(iter(epochs))
            del epochs[old]
            self.gaps.pop(old, None)

    def remember_gaps(self, epoch: int, gaps: list[Gap]) -> None:
        """Cache an epoch's open gaps (only while its state is cached)."""
        if epoch in self.epochs:
            self.gaps[epoch] = gaps


class EventFields(Protocol):
    """The fields `append` stores: `Event` has them, and so has the bridge's
    `ControllerEvent` (firmware_bridge imports nothing from agent)."""

    @property
    def stream(self) -> str: ...

    @property
    def seq(self) -> int: ...

    @property
    def boot_epoch(self) -> int: ...

    @property
    def ts(self) -> float: ...

    @property
    def kind(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def payload(self) -> Any: ...


class Arrival(Protocol):
    """What `append` needs of an incoming event (the link's `Received` fits)."""

    @property
    def event(self) -> EventFields: ...

    @property
    def time_quality(self) -> int: ...

    @property
    def controller_id(self) -> str: ...


@dataclass(slots=True)
class Batch:
    """One append, planned against staged copies of the cache before it is written."""

    received_at: float
    next_id: int
    next_gap: int
    next_stream: int
    rows: list[tuple[object, ...]] = field(default_factory=list)
    by_name: dict[str, StreamEntry] = field(default_factory=dict)  # read or new this batch
    by_sid: dict[int, StreamEntry] = field(default_factory=dict)  # every stream of the batch
    new_streams: list[tuple[int, str, str, int, float]] = field(default_factory=list)
    staged: dict[tuple[int, int], EpochState] = field(default_factory=dict)
    staged_gaps: dict[tuple[int, int], list[Gap]] = field(default_factory=dict)
    gap_inserts: list[tuple[object, ...]] = field(default_factory=list)
    gap_updates: dict[int, Gap] = field(default_factory=dict)
    gap_dropped: list[int] = field(default_factory=list)
    gap_lost: int = 0  # sequence numbers of the dropped gaps, lost for good
    # (controller, announced epoch) -> stored epoch, for sessions first seen now
    new_epochs: dict[tuple[str, int], int] = field(default_factory=dict)
    tops: dict[str, int] = field(default_factory=dict)  # staged highest stored epochs
    rollbacks: list[tuple[str, int, int, int]] = field(default_factory=list)
    flush_last_seen: bool = False
    duplicates: int = 0
    opened: int = 0
    filled: int = 0


class StreamState:
    """Committed per-stream and per-controller state, bounded, and append planning on it.

    `plan` decides, event by event, what a batch stores (dedup, gaps, stored epochs).
    Epoch states are updated in place (a copy per stream and batch cost more than the
    rest of the cache); the caller writes the batch in one transaction, then calls
    `apply` once it committed, or `forget` if anything failed: that drops every stream
    the batch touched from the cache, so their next use reads the committed state.
    """

    def __init__(self, conn: sqlite3.Connection, max_cached_streams: int) -> None:
        self.conn = conn
        self.streams: Lru[str, StreamEntry] = Lru(max_cached_streams)
        # (controller, announced boot epoch) -> stored epoch; controller -> highest stored.
        self.epoch_map: Lru[tuple[str, int], int] = Lru(MAX_CACHED_CONTROLLER_EPOCHS)
        self.tops: Lru[str, int] = Lru(MAX_CACHED_CONTROLLER_EPOCHS)

    def entry(self, name: str) -> StreamEntry | None:
        """The committed entry of a stream (cached, else a point read), or None."""
        return self.streams.get(name) or load_stream(self.conn, name)

    def entries(self, names: Iterable[str]) -> dict[str, StreamEntry]:
        """The committed entries of those of `names` that exist: cached ones, the others
        read LOAD_CHUNK names a query and cached (what is read is committed truth).

        A fleet ack passes up to every stream at once; read one by one and not kept, a
        cold drain's checkpoints were 7% of its time (bench_uplink.py section 1, 1,000
        streams, every persist reading them all again).
        """
        cached = self.streams.data
        out: dict[str, StreamEntry] = {}
        missing: list[str] = []
        for name in names:
            entry = cached.get(name)
            if entry is None:
                missing.append(name)
            else:
                out[name] = entry
        for i in range(0, len(missing), LOAD_CHUNK):
            loaded = load_streams(self.conn, missing[i : i + LOAD_CHUNK])
            self.streams.put_all(loaded.items())
            out.update(loaded)
        return out

    def plan(
        self,
        arrivals: Sequence[Arrival],
        received_at: float,
        next_id: int,
        next_gap: int,
        next_stream: int,
    ) -> Batch:
        """Decide row by row what to insert; on any error, forget what was touched."""
        b = Batch(received_at, next_id, next_gap, next_stream)
        try:
            return self._plan(b, arrivals)
        except BaseException:
            self.forget(b)
            raise

    def _plan(self, b: Batch, arrivals: Sequence[Arrival]) -> Batch:
        received_at = b.received_at
        by_name, by_sid, staged = b.by_name, b.by_sid, b.staged
        # Bound once: active streams cost a dict hit per event, no attribute lookups.
        cached, staged_get = self.streams.data.get, staged.get
        last_controller: str | None = None
        last_announced = -1
        epoch = 0
        for arrival in arrivals:
            event = arrival.event
            controller = arrival.controller_id
            if event.boot_epoch != last_announced or (
                controller is not last_controller and controller != last_controller
            ):
                last_controller, last_announced = controller, event.boot_epoch
                epoch = self._stored_epoch(b, controller, last_announced)
            name = event.stream
            entry = cached(name) or by_name.get(name)
            if entry is None:  # not active: a point read, or a new stream
                entry = by_name[name] = self._entry(b, name, controller, event.priority)
            sid = entry.sid
            key = (sid, epoch)
            seq = event.seq
            state = staged_get(key)
            if state is None:
                by_sid[sid] = entry
                state = entry.epochs.get(epoch)
                if state is None:  # not cached, or no row yet
                    state = self._stage(b, entry, key, seq)
                staged[key] = state
            where = place(state, seq)
            if where == INSIDE:
                gap = take_from_gaps(self._staged_gaps(b, key), seq)
                if gap is None:
                    b.duplicates += 1
                    continue
                b.gap_updates[gap.gap_id] = gap
                b.filled += 1
            elif where != NEXT:
                self._open_gap(b, key, *missing_range(state, seq, where))
            b.rows.append(
                (b.next_id, sid, epoch, seq, event.ts, int(arrival.time_quality),
                 event.kind, event.priority, event.payload, received_at)
            )  # fmt: skip
            record(state, seq, b.next_id)
            b.next_id += 1
        return b

    def apply(self, b: Batch) -> None:
        """The batch committed: its streams become the most recent cache entries."""
        lru = self.streams.data
        for entry in b.by_sid.values():  # every stream of the batch: keep this loop lean
            try:
                lru.move_to_end(entry.name)
            except KeyError:  # read or created by this batch
                lru[entry.name] = entry
            entry.known = True
            entry.new = False
        self.streams.put_all(())  # trims to the cap: the least recently used fall out
        for (sid, epoch), gaps in b.staged_gaps.items():
            b.by_sid[sid].remember_gaps(epoch, [g for g in gaps if g.pieces])
        for key, stored in b.new_epochs.items():
            self.epoch_map.put(key, stored)
        for controller, top in b.tops.items():
            self.tops.put(controller, top)

    def forget(self, b: Batch) -> None:
        """The batch failed: drop the streams it touched (their state may be uncommitted)."""
        lru = self.streams.data
        for entry in b.by_sid.values():
            lru.pop(entry.name, None)

    def set_checkpoint(self, name: str, position: tuple[int, int]) -> None:
        """A checkpoint committed: update the cached entry, if any."""
        entry = self.streams.get(name)
        if entry is not None:
            entry.checkpoint = position

    # -- private ---------------------------------------------------------------------------

    def _stage(self, b: Batch, entry: StreamEntry, key: tuple[int, int], seq: int) -> EpochState:
        """(stream, epoch)'s state not in the cache: read it, or start it as `seq` meets it."""
        epoch = key[1]
        state = entry.epochs.get(epoch, _UNLOADED)
        if state is _UNLOADED:
            state = self._epoch_state(entry, epoch)
        if state is not None:
            return state
        state, lost = start(seq, entry.known)
        if lost is not None:
            self._open_gap(b, key, *lost)
        entry.remember(epoch, state)
        return state

    def _entry(self, b: Batch, name: str, controller: str, priority: int) -> StreamEntry:
        """A stream missing from the cache: a point read, or a new stream of this batch."""
        entry = load_stream(self.conn, name)
        if entry is None:
            sid = b.next_stream + len(b.new_streams)
            entry = StreamEntry(name, sid, known=False, checkpoint=None, new=True)
            b.new_streams.append((sid, name, controller, priority, b.received_at))
        return entry

    def _epoch_state(self, entry: StreamEntry, epoch: int) -> EpochState | None:
        """Committed state of (stream, stored epoch) not cached: a primary-key read."""
        if entry.new or not entry.known:
            return None
        state = load_epoch(self.conn, entry.sid, epoch)
        entry.remember(epoch, state)  # committed truth, so it may be cached right away
        return state

    def _stored_epoch(self, b: Batch, controller: str, announced: int) -> int:
        """The epoch events of this controller session are stored under (assign_epoch)."""
        key = (controller, announced)
        stored = b.new_epochs.get(key)
        if stored is None:
            stored = self.epoch_map.get(key)
        if stored is None:
            stored = load_controller_epoch(self.conn, controller, announced)
            if stored is not None:
                self.epoch_map.put(key, stored)
        if stored is not None:
            return stored
        top = b.tops.get(controller)
        if top is None:
            top = self.tops.get(controller)
            if top is None:
                top = load_controller_top(self.conn, controller)
                self.tops.put(controller, top)
        stored, rolled_back = assign_epoch(announced, top)
        b.new_epochs[key] = b.tops[controller] = stored
        if rolled_back:
            b.rollbacks.append((controller, announced, top, stored))
        return stored

    def _staged_gaps(self, b: Batch, key: tuple[int, int]) -> list[Gap]:
        gaps = b.staged_gaps.get(key)
        if gaps is None:
            sid, epoch = key
            entry = b.by_sid[sid]
            committed = entry.gaps.get(epoch)
            if committed is None:
                if entry.new or entry.epochs.get(epoch, True) is None:
                    committed = []  # no row for this epoch yet: no gap either
                else:
                    committed = load_gaps(self.conn, sid, epoch)
                    entry.remember_gaps(epoch, committed)
            gaps = b.staged_gaps[key] = copy_gaps(committed)
        return gaps

    def _open_gap(self, b: Batch, key: tuple[int, int], lo: int, hi: int) -> None:
        gaps = self._staged_gaps(b, key)
        gap = Gap(b.next_gap, [[lo, hi]])
        b.next_gap += 1
        gaps.append(gap)
        for dropped in bound_gaps(gaps):
            log.warning("gap_tracking_dropped gap_id=%d pieces=%d", dropped.gap_id,
                        len(dropped.pieces))  # fmt: skip
            b.gap_dropped.append(dropped.gap_id)
            b.gap_lost += dropped.missing
        b.gap_inserts.append(
            (gap.gap_id, key[0], key[1], lo, hi, hi - lo + 1, json.dumps([[lo, hi]]),
             b.received_at)
        )  # fmt: skip
        b.opened += 1


# -- point reads (the database is the truth) ---------------------------------------------


def load_stream(conn: sqlite3.Connection, name: str) -> StreamEntry | None:
    """The committed entry of stream `name` (without its epochs), or None if unknown."""
    row = conn.execute(
        """SELECT s.id, c.boot_epoch, c.seq,
                  EXISTS (SELECT 1 FROM stream_epochs WHERE stream_id = s.id)
           FROM streams AS s LEFT JOIN checkpoints AS c ON c.stream_id = s.id
           WHERE s.name = ?""",
        (name,),
    ).fetchone()
    if row is None:
        return None
    sid, epoch, seq, known = row
    return StreamEntry(name, sid, bool(known), None if epoch is None else (epoch, seq))


def load_streams(conn: sqlite3.Connection, names: Sequence[str]) -> dict[str, StreamEntry]:
    """`load_stream` of several names in one query (the unknown ones are left out)."""
    marks = ",".join("?" * len(names))
    return {
        name: StreamEntry(name, sid, bool(known), None if epoch is None else (epoch, seq))
        for name, sid, epoch, seq, known in conn.execute(
            f"""SELECT s.name, s.id, c.boot_epoch, c.seq,
                       EXISTS (SELECT 1 FROM stream_epochs WHERE stream_id = s.id)
                FROM streams AS s LEFT JOIN checkpoints AS c ON c.stream_id = s.id
                WHERE s.name IN ({marks})""",
            list(names),
        )
    }


def load_epoch(conn: sqlite3.Connection, sid: int, epoch: int) -> EpochState | None:
    """The committed state of (stream id, stored epoch), or None."""
    row = conn.execute(
        "SELECT low_seq, high_seq, latest_rowid, events FROM stream_epochs "
        "WHERE stream_id = ? AND boot_epoch = ?",
        (sid, epoch),
    ).fetchone()
    return None if row is None else EpochState(*row)


def load_gaps(conn: sqlite3.Connection, sid: int, epoch: int) -> list[Gap]:
    """Open gaps of (stream id, stored epoch), oldest first, as last committed."""
    # Their remaining pieces are persisted with every fill: no scan of events.
    return [
        Gap(gid, json.loads(pieces))
        for gid, pieces in conn.execute(
            "SELECT id, pieces FROM gaps WHERE stream_id = ? AND boot_epoch = ? "
            "AND closed_at IS NULL ORDER BY id",
            (sid, epoch),
        )
    ]


def load_controller_epoch(conn: sqlite3.Connection, controller: str, announced: int) -> int | None:
    """The stored epoch recorded for a controller's announced boot epoch, or None."""
    row = conn.execute(
        "SELECT epoch FROM controller_epochs WHERE controller = ? AND boot_epoch = ?",
        (controller, announced),
    ).fetchone()
    return None if row is None else int(row[0])


def load_controller_top(conn: sqlite3.Connection, controller: str) -> int:
    """The highest stored epoch of a controller, or NO_EPOCH."""
    row = conn.execute(
        "SELECT max(epoch) FROM controller_epochs WHERE controller = ?", (controller,)
    ).fetchone()
    return NO_EPOCH if row[0] is None else int(row[0])
