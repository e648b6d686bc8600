"""Resync after link loss: what the uplink sends next; steppable, no MQTT inside.

`Resync` decides what to send: after every (re)connect first the compacted replay
(latest event per stream) on `state`; then two lanes on `events`: live events (stored
after the connection) as they are committed, and the backlog above the fleet's cursor
(stored before it, flagged historical), highest priority first and oldest first within
a priority (one lane per priority class, each with its own cursor: agent/resilience/
cursor.py `ClassedCursor`). Live goes first: at every step a
live batch that is due (full, or `batch_max_delay_ms` old) is sent before the next
backlog batch, so fresh data never waits behind an hour of backlog on a slow link; the
backlog takes the rest of the window and of the byte budget (`[uplink]
max_bytes_per_second`, agent/resilience/budget.py). Batches are bounded by count, bytes
and time. Acknowledgements advance the delivery cursor only over a contiguous prefix of
acked batches (live runs acked ahead of the backlog wait in the cursor), so a lost or
reordered ack can never mark an unsent event as delivered.

`agent.fleetsync.FleetSync` drives it over a transport (the uplink's control loop).
"""

from __future__ import annotations

import logging
import math
import random
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from agent.config import UplinkSection
from agent.fleet import ROW_OVERHEAD, Batch, WireRow, batch_digest, encode_rows, topic
from agent.resilience import Event
from agent.resilience.budget import QUOTA_MIN_BATCH, ByteBudget
from agent.resilience.cursor import CLASSES, AckedRun, ClassedCursor, class_of
from agent.store import read_cursor, read_frontiers, read_latest

log = logging.getLogger(__name__)

STATE_BATCH_EVENTS = 5000  # the compacted replay goes in as few messages as possible
MAX_TRACKED_BATCHES = 4096  # sent batches whose late ack is still honoured

# What the fleet holds, to persist: (every row up to this rowid, checkpoint positions
# passed, each priority class's frontier).
Deliver = Callable[[int, dict[str, tuple[int, int]], tuple[int, ...]], None]
# A stored event as the lanes read it: rowid, stream, boot_epoch, seq, ts, time quality,
# kind, priority, payload.
Row = tuple[int, str, int, int, float, int, str, int, bytes]


class Phase(StrEnum):
    """Where the resync is after the last (re)connect."""

    OFFLINE = "offline"
    STATE = "state"  # about to send the compacted replay
    BACKLOG = "backlog"  # sending what was stored before this connection
    LIVE = "live"  # caught up: sending events as they are committed


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A batch to publish on `kind` (state or events)."""

    kind: str
    batch_id: int
    payload: bytes
    events: int


@dataclass(slots=True)
class _InFlight:
    batch_id: int
    from_rowid: int  # the batch covers every stored row in [from_rowid, upto_rowid]
    upto_rowid: int
    positions: dict[str, tuple[int, int]]
    sent_at: float
    digest: bytes  # SHA-256 of the payload as published: a signed ack must name it
    cls: int | None = None  # the backlog's priority class it covers; None: every class (live)


@dataclass
class ResyncCounters:
    """Figures for status and metrics."""

    batches_sent: int = 0
    events_sent: int = 0
    bytes_sent: int = 0  # every batch published (state and events), MQTT header included
    state_batches_sent: int = 0
    acks: int = 0
    acks_stale: int = 0  # acks for no batch awaited: duplicates (two collectors) or late
    ack_timeouts: int = 0
    replays_requested: int = 0
    last_convergence_s: float = -1.0  # connect -> every state batch acked
    convergence_failures: int = 0  # state batches whose ack never came (resent)
    state_streams_known: int = 0  # streams in the store when the last replay was built
    state_streams_sent: int = 0  # ... and how many the replay carried
    # Compacted-replay batches the fleet never acknowledged (timed out, or in flight when
    # the connection dropped or the fleet asked for a new replay): telemetry gaps of type
    # "replay" until a resend is acked.
    replay_batches_unacked: int = 0
    # Streams whose latest stored event is older than the position the fleet already
    # acknowledged for them: a replay that would move the fleet's state backwards (the
    # newest rows were lost locally, e.g. by a salvage). The fleet refuses the older state.
    state_backwards: int = 0
    event_bytes_sent: int = 0  # bytes_sent of events batches only: what an event costs


def _fits(page: list[tuple[int, Event, int, float]], cap: int) -> int:
    """How many of the page's first events fit `cap` bytes (at least one), counted as
    `Resync._batch` counts a row before compression."""
    size = 0
    for i, (_, e, _, _) in enumerate(page):
        size += len(e.payload) + len(e.stream) + len(e.kind) + ROW_OVERHEAD
        if i and size > cap:
            return i
    return len(page)


class Resync:
    """What to send next, and what the fleet's acks mean for the delivery cursor."""

    def __init__(
        self,
        reader: sqlite3.Connection,
        vehicle: str,
        config: UplinkSection,
        deliver: Deliver,
        *,
        run_id: int | None = None,
    ) -> None:
        self.reader = reader
        self.vehicle = vehicle
        self.config = config
        self.deliver = deliver
        # Batch ids are unique across agent restarts, so a late ack for a batch of a
        # previous run can never be mistaken for one of this run.
        self.run_id = run_id if run_id is not None else random.SystemRandom().randrange(1, 2**31)
        self._next_batch = 1
        self.phase = Phase.OFFLINE
        self.counters = ResyncCounters()
        self._inflight: OrderedDict[int, _InFlight] = OrderedDict()  # the window, unacked
        # Every batch sent and not yet acked, including those a timeout or a reconnect
        # took out of the window: their late acks still count (a slow collector would
        # otherwise have every ack thrown away as stale while the resends queue up).
        self._sent: OrderedDict[int, _InFlight] = OrderedDict()
        # id -> (sent at, digest, the stream name its page was read after)
        self._state_pending: dict[int, tuple[float, bytes, str]] = {}
        # Where an unfinished replay goes on from at the next connect (None: from the
        # start): on a link that drops, or a contact window's quota that ends, before a
        # replay of many streams is through, starting over each time never got past its
        # first pages, and the backlog never began.
        self._state_resume: str | None = None
        # (contact window opened at, replay bytes in it): the replay's share of a quota
        self._state_window: tuple[float | None, int] = (None, 0)
        # Highest rowid the fleet holds, from acks in any order, per priority class
        # (agent/resilience/cursor.py): the backlog drains highest priority first.
        self._cursor = ClassedCursor(max_pending=MAX_TRACKED_BATCHES)
        self._restore_cursor()
        # The backlog lanes (rows up to _connect_high), one per priority class, and the
        # live lane (rows above it): the last rowid each has sent.
        self._after = [self._cursor.delivered] * CLASSES
        self._live_after = self._cursor.delivered
        self._connect_high = 0
        self._empty: set[int] = set()  # priority classes with no backlog at the connect
        self.budget = ByteBudget(
            config.max_bytes_per_second,
            per_contact=config.max_bytes_per_contact,
            contact_seconds=config.contact_seconds,
        )
        # An MQTT PUBLISH's header around the payload: fixed header (up to 5 bytes), the
        # topic with its length (2 + len), the packet id (2).
        self._publish_overhead = 9 + len(topic(vehicle, "events").encode())
        self._connected_at = 0.0
        self._partial_since: float | None = None
        self._resend_state = False
        # The compacted replay is read and sent a page at a time (by stream name), at most
        # max_in_flight pages unacknowledged: with a million streams, loading it whole
        # took hundreds of MiB. None: no replay being sent; "": from the first stream.
        self._state_after: str | None = None
        self.timed_out = False

    # -- connection events ---------------------------------------------------------------

    def on_connected(self, now: float) -> None:
        """Start over from what the fleet acknowledged: state first, then the backlog."""
        self._restore_cursor()
        self._after = [self._cursor.frontier(cls) for cls in range(CLASSES)]
        self._inflight.clear()
        self._forget_state_pending()
        self._resend_state = False
        self._state_after = None
        row = self.reader.execute("SELECT max(id) FROM events").fetchone()
        self._connect_high = int(row[0] or 0)
        self._live_after = max(self._connect_high, self._cursor.delivered)
        # One scan for the classes the backlog holds, not one per empty class (0.1 s per
        # million rows each, in the uplink's thread).
        self._empty = set(range(CLASSES)) - {
            class_of(int(p))
            for (p,) in self.reader.execute(
                "SELECT DISTINCT priority FROM events WHERE id > ? AND id <= ?",
                (self._cursor.delivered, self._connect_high),
            )
        }
        self._connected_at = now
        self._partial_since = None
        self.phase = Phase.STATE

    def _restore_cursor(self) -> None:
        """Raise the cursor and every class frontier to what the store persisted."""
        cursor = read_cursor(self.reader)
        self._cursor.restore(cursor - 1, read_frontiers(self.reader, cursor))

    def on_disconnected(self) -> None:
        """Whatever is in flight is forgotten; it is resent after the next connect."""
        self.phase = Phase.OFFLINE
        self._inflight.clear()
        self._forget_state_pending()
        self._state_after = None

    def _forget_state_pending(self) -> None:
        """Replay batches still awaiting an ack will never get one that counts; an
        unfinished replay goes on from its first page not acknowledged."""
        places = [after for _, _, after in self._state_pending.values()]
        if self._state_after is not None:
            places.append(self._state_after)
        if places:
            self._state_resume = min(places)
        self.counters.replay_batches_unacked += len(self._state_pending)
        self._state_pending.clear()

    def request_replay(self, now: float) -> None:
        """The fleet asked for everything again (state, then all unacknowledged)."""
        self.counters.replays_requested += 1
        if self.phase is not Phase.OFFLINE:
            self.on_connected(now)
        self._state_resume = None  # everything again: from the first stream

    @property
    def backlog_rows(self) -> int:
        """Rows stored and not yet acknowledged by the fleet (an upper bound)."""
        row = self.reader.execute("SELECT max(id) FROM events").fetchone()
        return max(0, int(row[0] or 0) - self._cursor.delivered)

    @property
    def delivered(self) -> int:
        """Highest rowid the fleet is known to hold (every row at or below it)."""
        return self._cursor.delivered

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- acknowledgements ----------------------------------------------------------------

    def digest_of(self, batch_id: int) -> bytes | None:
        """Digest of the payload of batch `batch_id` if its ack is still awaited."""
        pending = self._state_pending.get(batch_id)
        if pending is not None:
            return pending[1]
        entry = self._sent.get(batch_id)
        return entry.digest if entry is not None else None

    def on_ack(self, batch_id: int, now: float) -> bool:
        """Apply an ack; returns False for an unknown (stale or duplicate) batch."""
        if batch_id in self._state_pending:
            del self._state_pending[batch_id]
            self.counters.acks += 1
            if not self._state_pending and self._state_after is None:
                self.counters.last_convergence_s = now - self._connected_at
            return True
        entry = self._sent.pop(batch_id, None)
        if entry is None:
            self.counters.acks_stale += 1
            return False
        self._inflight.pop(batch_id, None)
        self.counters.acks += 1
        self.apply_run(AckedRun(entry.from_rowid, entry.upto_rowid, entry.positions), entry.cls)
        return True

    def apply_run(self, run: AckedRun, cls: int | None = None) -> bool:
        """Feed an acked run to the cursor (an MQTT ack's, or a receipt's checked by
        agent/receipts.py; `cls`: the priority class of a backlog batch, None for every
        class); persist what it passes. True if the cursor moved."""
        before = self._cursor.frontiers
        moved = self._cursor.ack(run, cls)
        if moved is None:
            if self._cursor.frontiers != before:  # a class drained ahead: persisted too
                self.deliver(self._cursor.delivered, {}, self._cursor.frontiers)
            return False
        upto, positions = moved
        self._after = [max(a, upto) for a in self._after]  # never resend what is held
        self._live_after = max(self._live_after, upto)
        self.deliver(upto, positions, self._cursor.frontiers)
        return True

    # -- sending -------------------------------------------------------------------------

    def run_once(self, now: float) -> list[Outgoing]:
        """Batches to publish now. Sets `timed_out` when an ack is overdue."""
        self.timed_out = False
        if self.phase is Phase.OFFLINE:
            return []
        self._check_timeouts(now)
        out: list[Outgoing] = []
        if (self.phase is Phase.STATE and self._state_after is None) or self._resend_state:
            self._start_state()
        if self._state_after is not None:
            out += self._state_batches(now)
            # A replay that took its share of the contact window waits for the next one;
            # the rest of this window goes to live events and the backlog.
            held = self._state_after is not None and self._state_share(now) <= 0
            if not held and (self._state_after is not None or self.phase is Phase.STATE):
                # The compacted replay goes out alone, before any backlog: building the
                # first backlog batches in the same step delayed it by ~55 ms (measured).
                if self._state_after is None:
                    self.phase = Phase.BACKLOG
                return out
        if not self._inflight:
            self._repair_holes()
        while len(self._inflight) < self.config.max_in_flight and self.budget.ready(now):
            batch = self._next_live_batch(now) or self._next_backlog_batch(now)
            if batch is None:
                break
            self._spend(batch.payload, now)
            out.append(batch)
        self.phase = Phase.BACKLOG if self._backlog_open() else Phase.LIVE
        return out

    def budget_counters(self, now: float) -> dict[str, float]:
        """The byte budget for status and metrics (read-only: safe from another thread)."""
        b = self.budget
        left = b.window_left(now)
        return {
            "budget_bytes_per_second": b.rate,
            "budget_bytes_per_contact": b.per_contact,
            "contact_bytes": b.contact_spent(now),
            "contact_window_left_s": round(left, 1),
        }

    def _spend(self, payload: bytes, now: float, *, events: bool = True) -> None:
        """Count a message against the byte budget: its payload and its MQTT PUBLISH
        header (fixed header, topic, packet id); TCP/IP headers are not counted."""
        size = len(payload) + self._publish_overhead
        self.budget.spend(size, now)
        self.counters.bytes_sent += size
        if events:  # what an event costs on the wire, without the replay's pages
            self.counters.event_bytes_sent += size
        elif self.budget.per_contact:
            opened, spent = self._state_window
            now_opened = self.budget.window_opened(now)
            self._state_window = (now_opened, (spent if opened == now_opened else 0) + size)

    def _state_share(self, now: float) -> float:
        """Bytes the replay may still take in the open contact window: half the quota
        (inf without one). A replay larger than a window then leaves the other half to
        live events and the backlog, and goes on in the next window; taking it all, it
        held them back for as many windows as it needed, and again at each connect."""
        b = self.budget
        if not b.per_contact:
            return math.inf
        opened, spent = self._state_window
        if opened is None or opened != b.window_opened(now):
            spent = 0
        return b.per_contact / 2 - spent

    def _backlog_open(self) -> bool:
        return any(a < self._connect_high for a in self._after)

    def _repair_holes(self) -> None:
        """Nothing in flight, yet a cursor waits below what its lane has sent: an acked
        run it needed was forgotten (more than MAX_TRACKED_BATCHES waited). Resend."""
        for cls in range(CLASSES):
            self._after[cls] = min(self._after[cls], self._cursor.frontier(cls))
        if not self._backlog_open() and self._cursor.delivered < self._live_after:
            self._live_after = max(self._cursor.delivered, self._connect_high)

    def _check_timeouts(self, now: float) -> None:
        """Go back to the first unacknowledged batch of each lane, and resend a compacted
        replay that was not acknowledged in time."""
        if self._inflight:
            oldest = next(iter(self._inflight.values()))
            if now - oldest.sent_at > self.config.ack_timeout:
                # Go back to the last acknowledged point; the collector drops duplicates.
                self.counters.ack_timeouts += 1
                self.timed_out = True
                live = [e.from_rowid for e in self._inflight.values() if e.cls is None]
                self._inflight.clear()
                self._after = [self._cursor.frontier(cls) for cls in range(CLASSES)]
                if live:  # the live lane goes back to its own first unacked batch
                    self._live_after = max(min(live) - 1, self._cursor.delivered)
        if (
            self._state_pending
            and now - min(p[0] for p in self._state_pending.values()) > self.config.ack_timeout
        ):
            # The compacted replay was lost (e.g. the collector was not subscribed yet):
            # send it again, or the fleet view would stay behind until the next connect.
            self.counters.ack_timeouts += 1
            self.counters.convergence_failures += 1
            self.timed_out = True
            self._forget_state_pending()
            self._resend_state = True

    def _new_id(self) -> int:
        batch_id = (self.run_id << 32) | self._next_batch
        self._next_batch += 1
        return batch_id

    def _start_state(self) -> None:
        """Begin sending the compacted replay: from the first stream, or from where an
        unfinished one stopped."""
        self._resend_state = False
        self._state_after = self._state_resume if self._state_resume is not None else ""
        self._state_resume = None
        known = self.reader.execute("SELECT count(DISTINCT stream_id) FROM stream_epochs")
        self.counters.state_streams_known = int(known.fetchone()[0])
        self.counters.state_streams_sent = 0

    def _state_batches(self, now: float) -> list[Outgoing]:
        """The next pages of the compacted replay, while fewer than max_in_flight of its
        batches are unacknowledged; `_state_after` becomes None after the last page."""
        out = []
        # Under a byte budget a page holds about a second's worth (~64 B an event before
        # compression): a 5,000-stream page took longer than the ack timeout at 64 kbit/s.
        limit = STATE_BATCH_EVENTS
        if not self.budget.unlimited:
            limit = max(16, min(STATE_BATCH_EVENTS, int(self.budget.rate) // 64))
        while (
            self._state_after is not None
            and len(self._state_pending) < self.config.max_in_flight
            and self.budget.ready(now)
            and self._state_share(now) > 0
        ):
            after = self._state_after
            page = read_latest(self.reader, after=after, limit=limit)
            more = len(page) == limit  # streams may follow this page
            room = min(self.budget.room(now), self._state_share(now))
            if room < math.inf:  # cut to the contact window's room, as an events batch is
                kept = _fits(page, max(QUOTA_MIN_BATCH, int(room)))
                more = more or kept < len(page)
                page = page[:kept]
            if page:
                self._check_forward(page[0][1].stream, page)
                batch_id = self._new_id()
                batch = Batch(
                    self.vehicle, batch_id, "state", False, tuple((e, tq) for _, e, tq, _ in page)
                )
                # One event per stream gives columns nothing to gain: zlib (measured:
                # 3,750 streams, 37.0 KB and 169 ms columnar against 32.6 KB and 3 ms).
                codec = "zlib" if self.config.wire_codec == "columnar" else self.config.wire_codec
                payload = batch.encode(codec=codec)
                out.append(Outgoing("state", batch_id, payload, len(page)))
                self._spend(payload, now, events=False)
                self._state_pending[batch_id] = (now, batch_digest(payload), after)
                self.counters.state_batches_sent += 1
                self.counters.state_streams_sent += len(page)
            if not more:
                self._state_after = None
                if not self._state_pending:
                    self.counters.last_convergence_s = 0.0  # nothing to converge on
            else:
                self._state_after = page[-1][1].stream
        return out

    def _check_forward(self, first: str, page: list[tuple[int, Event, int, float]]) -> None:
        """Count the page's streams whose latest event is below the fleet's checkpoint."""
        acked = {
            name: (epoch, seq)
            for name, epoch, seq in self.reader.execute(
                "SELECT s.name, c.boot_epoch, c.seq FROM checkpoints AS c "
                "JOIN streams AS s ON s.id = c.stream_id WHERE s.name >= ? AND s.name <= ?",
                (first, page[-1][1].stream),
            )
        }
        behind = [
            e.stream for _, e, _, _ in page if (e.boot_epoch, e.seq) < acked.get(e.stream, (-1, -1))
        ]
        if behind:
            self.counters.state_backwards += len(behind)
            log.warning(
                "replay_behind_checkpoint streams=%d first=%r: the fleet acknowledged newer "
                "events than the store still holds (local loss?)",
                len(behind),
                behind[0][:64],
            )

    def _next_backlog_batch(self, now: float) -> Outgoing | None:
        """The next batch of rows stored before the connection: the highest priority class
        with rows left, oldest first within it."""
        for cls in reversed(range(CLASSES)):
            after = self._after[cls]
            if after >= self._connect_high:
                continue
            rows = [] if cls in self._empty else self._read(after, self._connect_high, cls)
            if not rows:  # none of this class left (or shed): nothing more to deliver
                self._after[cls] = self._connect_high
                self.apply_run(AckedRun(after + 1, self._connect_high, {}), cls)
                continue
            # The class's last batch covers up to the connection's top.
            end = self._connect_high if len(rows) < self.config.batch_max_events else 0
            batch, self._after[cls] = self._batch(rows, after, now, cls=cls, end=end)
            return batch
        return None

    def _next_live_batch(self, now: float) -> Outgoing | None:
        """The next batch of rows stored after the connection, once it is due."""
        c = self.config
        rows = self._read(self._live_after, None)
        if not rows:
            return None
        if len(rows) < c.batch_max_events:
            # Not a full batch yet: wait a little to send fewer, fuller messages.
            if self._partial_since is None:
                self._partial_since = now
            if now - self._partial_since < c.batch_max_delay_ms / 1000.0:
                return None
        self._partial_since = None
        batch, self._live_after = self._batch(rows, self._live_after, now, cls=None, end=0)
        return batch

    def _read(self, after: int, upto: int | None, cls: int | None = None) -> list[Row]:
        """Rows in (after, upto], oldest first, of priority class `cls` (the top class
        takes every priority above it) or of every class."""
        where = ""
        if cls is not None:
            # The end classes take what lies beyond them, as `class_of` does.
            where = (
                f"AND e.priority >= {cls}" if cls == CLASSES - 1
                else "AND e.priority <= 0" if cls == 0
                else f"AND e.priority = {cls}"
            )  # fmt: skip
        return self.reader.execute(
            f"""SELECT e.id, s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind,
                       e.priority, e.payload
                FROM events AS e JOIN streams AS s ON s.id = e.stream_id
                WHERE e.id > ? AND e.id <= ? {where} ORDER BY e.id LIMIT ?""",
            (after, upto if upto is not None else 2**63 - 1, self.config.batch_max_events),
        ).fetchall()

    def _batch(
        self, rows: list[Row], after: int, now: float, *, cls: int | None, end: int
    ) -> tuple[Outgoing, int]:
        """One events batch of `rows` (up to batch_max_bytes of them), covering every rowid
        from `after` + 1 to its last row, or to `end` when it takes every row; and that
        last rowid covered (where the lane goes on from)."""
        c = self.config
        wire: list[WireRow] = []  # the rows in wire order, no Event per row (fleet.py)
        positions: dict[str, tuple[int, int]] = {}
        size = 0
        upto = after
        # Under a byte budget a batch holds at most a second's worth (before compression):
        # a live batch then never waits more than about a second behind a backlog batch.
        cap = c.batch_max_bytes
        if c.max_bytes_per_second:
            cap = min(cap, max(1024, c.max_bytes_per_second))
        room = self.budget.room(now)
        if room < math.inf:  # the contact window's quota is overrun by one small batch at most
            cap = min(cap, max(QUOTA_MIN_BATCH, int(room)))
        for row in rows:
            rowid, name, epoch, seq, _ts, _tq, kind, _priority, payload = row
            size += len(payload) + len(name) + len(kind) + ROW_OVERHEAD
            if wire and size > cap:
                end = 0
                break
            wire.append(row[1:])  # (name, epoch, seq, ts, tq, kind, priority, payload)
            if (epoch, seq) > positions.get(name, (-1, -1)):
                positions[name] = (epoch, seq)
            upto = rowid
        upto = max(upto, end)
        batch_id = self._new_id()
        payload = encode_rows(self.vehicle, batch_id, "events", cls is not None, wire,
                              codec=c.wire_codec)  # fmt: skip
        entry = _InFlight(batch_id, after + 1, upto, positions, now, batch_digest(payload), cls)
        self._inflight[batch_id] = entry
        self._sent[batch_id] = entry
        while len(self._sent) > MAX_TRACKED_BATCHES:
            self._sent.popitem(last=False)
        self.counters.batches_sent += 1
        self.counters.events_sent += len(wire)
        return Outgoing("events", batch_id, payload, len(wire)), upto
