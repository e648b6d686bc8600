"""Resync after link loss, and the uplink's control loop; steppable, no MQTT inside.

`Resync` decides what to send: after every (re)connect first the compacted replay
(latest event per stream) on `state`, then the backlog above the fleet's cursor, oldest
first, on `events` (flagged historical when it was stored before the connection), then
live events as they are committed. Batches are bounded by count, bytes and time.
Acknowledgements advance the delivery cursor only over a contiguous prefix of acked
batches, so a lost or reordered ack can never mark an unsent event as delivered.

`FleetSync` drives a transport (MQTT in production: `agent.uplink.MqttTransport`)
through `run_once(now)`: reconnects with capped, jittered backoff, feeds connection,
publish and ack outcomes to the circuit breaker, and sends nothing while it is open.
Acks and commands pass `agent.fleet_inbox.FleetInbox` (signature, digest of the batch as
published, counters, rate limits) before they act; no message can raise out of it.
"""

from __future__ import annotations

import logging
import random
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from agent.config import UplinkSection
from agent.fleet import Batch, batch_digest
from agent.fleet_auth import FleetAuth
from agent.fleet_inbox import FleetInbox
from agent.resilience import Backoff, CircuitBreaker, Event
from agent.resilience.cursor import AckedRun, DeliveryCursor
from agent.resilience.ratelimit import TokenBucket
from agent.store import read_cursor, read_latest

log = logging.getLogger(__name__)

STATE_BATCH_EVENTS = 5000  # the compacted replay goes in as few messages as possible
CONNACK_TIMEOUT = 10.0  # seconds from sending CONNECT to giving the attempt up
MAX_TRACKED_BATCHES = 4096  # sent batches whose late ack is still honoured
# A replay request rebuilds the compacted state (one read per stream): however many
# arrive, they coalesce into one pending flag, served at most this often.
REPLAY_RATE = 0.2  # per second
REPLAY_BURST = 2.0

Deliver = Callable[[int, dict[str, tuple[int, int]]], None]


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


@dataclass
class ResyncCounters:
    """Figures for status and metrics."""

    batches_sent: int = 0
    events_sent: int = 0
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
        self._state_pending: dict[int, tuple[float, bytes]] = {}  # id -> (sent at, digest)
        # Highest rowid the fleet holds, from acks in any order (agent/resilience/cursor.py).
        self._cursor = DeliveryCursor(read_cursor(reader) - 1, max_pending=MAX_TRACKED_BATCHES)
        self._send_after = self._cursor.delivered
        self._connect_high = 0
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
        self._cursor.restore(read_cursor(self.reader) - 1)
        self._send_after = self._cursor.delivered
        self._inflight.clear()
        self._forget_state_pending()
        self._resend_state = False
        self._state_after = None
        row = self.reader.execute("SELECT max(id) FROM events").fetchone()
        self._connect_high = int(row[0] or 0)
        self._connected_at = now
        self._partial_since = None
        self.phase = Phase.STATE

    def on_disconnected(self) -> None:
        """Whatever is in flight is forgotten; it is resent after the next connect."""
        self.phase = Phase.OFFLINE
        self._inflight.clear()
        self._forget_state_pending()
        self._state_after = None

    def _forget_state_pending(self) -> None:
        """Replay batches still awaiting an ack will never get one that counts."""
        self.counters.replay_batches_unacked += len(self._state_pending)
        self._state_pending.clear()

    def request_replay(self, now: float) -> None:
        """The fleet asked for everything again (state, then all unacknowledged)."""
        self.counters.replays_requested += 1
        if self.phase is not Phase.OFFLINE:
            self.on_connected(now)

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
        self.apply_run(AckedRun(entry.from_rowid, entry.upto_rowid, entry.positions))
        return True

    def apply_run(self, run: AckedRun) -> bool:
        """Feed an acked run to the cursor (an MQTT ack's, or a receipt's checked by
        agent/receipts.py); persist what it passes. True if the cursor moved."""
        moved = self._cursor.ack(run)
        if moved is None:
            return False
        upto, positions = moved
        self._send_after = max(self._send_after, upto)  # never resend what is held
        self.deliver(upto, positions)
        return True

    # -- sending -------------------------------------------------------------------------

    def run_once(self, now: float) -> list[Outgoing]:
        """Batches to publish now. Sets `timed_out` when an ack is overdue."""
        self.timed_out = False
        if self.phase is Phase.OFFLINE:
            return []
        if self._inflight:
            oldest = next(iter(self._inflight.values()))
            if now - oldest.sent_at > self.config.ack_timeout:
                # Go back to the last acknowledged point; the collector drops duplicates.
                self.counters.ack_timeouts += 1
                self.timed_out = True
                self._inflight.clear()
                self._send_after = self._cursor.delivered
        if (
            self._state_pending
            and now - min(at for at, _ in self._state_pending.values()) > self.config.ack_timeout
        ):
            # The compacted replay was lost (e.g. the collector was not subscribed yet):
            # send it again, or the fleet view would stay behind until the next connect.
            self.counters.ack_timeouts += 1
            self.counters.convergence_failures += 1
            self.timed_out = True
            self._forget_state_pending()
            self._resend_state = True
        out: list[Outgoing] = []
        if (self.phase is Phase.STATE and self._state_after is None) or self._resend_state:
            self._start_state()
        if self._state_after is not None:
            out += self._state_batches(now)
            if self._state_after is not None or self.phase is Phase.STATE:
                # The compacted replay goes out alone, before any backlog: building the
                # first backlog batches in the same step delayed it by ~55 ms (measured).
                if self._state_after is None:
                    self.phase = Phase.BACKLOG
                return out
        while len(self._inflight) < self.config.max_in_flight:
            batch = self._next_events_batch(now)
            if batch is None:
                break
            out.append(batch)
        return out

    def _new_id(self) -> int:
        batch_id = (self.run_id << 32) | self._next_batch
        self._next_batch += 1
        return batch_id

    def _start_state(self) -> None:
        """Begin sending the compacted replay from the first stream."""
        self._resend_state = False
        self._state_after = ""
        known = self.reader.execute("SELECT count(DISTINCT stream_id) FROM stream_epochs")
        self.counters.state_streams_known = int(known.fetchone()[0])
        self.counters.state_streams_sent = 0

    def _state_batches(self, now: float) -> list[Outgoing]:
        """The next pages of the compacted replay, while fewer than max_in_flight of its
        batches are unacknowledged; `_state_after` becomes None after the last page."""
        out = []
        while self._state_after is not None and (
            len(self._state_pending) < self.config.max_in_flight
        ):
            page = read_latest(self.reader, after=self._state_after, limit=STATE_BATCH_EVENTS)
            if page:
                self._check_forward(page[0][1].stream, page)
                batch_id = self._new_id()
                batch = Batch(
                    self.vehicle, batch_id, "state", False, tuple((e, tq) for _, e, tq, _ in page)
                )
                payload = batch.encode(codec=self.config.wire_codec)
                out.append(Outgoing("state", batch_id, payload, len(page)))
                self._state_pending[batch_id] = (now, batch_digest(payload))
                self.counters.state_batches_sent += 1
                self.counters.state_streams_sent += len(page)
            if len(page) < STATE_BATCH_EVENTS:
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

    def _next_events_batch(self, now: float) -> Outgoing | None:
        c = self.config
        rows = self.reader.execute(
            """SELECT e.id, s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind, e.priority,
                      e.payload
               FROM events AS e JOIN streams AS s ON s.id = e.stream_id
               WHERE e.id > ? ORDER BY e.id LIMIT ?""",
            (self._send_after, c.batch_max_events),
        ).fetchall()
        if not rows:
            if self.phase is Phase.BACKLOG:
                self.phase = Phase.LIVE
            return None
        if len(rows) < c.batch_max_events and rows[0][0] > self._connect_high:
            # Live and not a full batch yet: wait a little to send fewer, fuller messages.
            if self._partial_since is None:
                self._partial_since = now
            if now - self._partial_since < c.batch_max_delay_ms / 1000.0:
                return None
        self._partial_since = None
        events: list[tuple[Event, int]] = []
        positions: dict[str, tuple[int, int]] = {}
        size = 0
        upto = self._send_after
        for rowid, name, epoch, seq, ts, tq, kind, priority, payload in rows:
            size += len(payload) + len(name) + len(kind) + 40
            if events and size > c.batch_max_bytes:
                break
            event = Event.trusted(name, seq, epoch, ts, kind, priority, bytes(payload))
            events.append((event, tq))
            if (epoch, seq) > positions.get(name, (-1, -1)):
                positions[name] = (epoch, seq)
            upto = rowid
        historical = upto <= self._connect_high
        batch_id = self._new_id()
        payload = Batch(self.vehicle, batch_id, "events", historical, tuple(events)).encode(
            codec=c.wire_codec
        )
        entry = _InFlight(
            batch_id, self._send_after + 1, upto, positions, now, batch_digest(payload)
        )
        self._inflight[batch_id] = entry
        self._sent[batch_id] = entry
        while len(self._sent) > MAX_TRACKED_BATCHES:
            self._sent.popitem(last=False)
        self._send_after = upto
        self.counters.batches_sent += 1
        self.counters.events_sent += len(events)
        return Outgoing("events", batch_id, payload, len(events))


class Transport(Protocol):
    """What FleetSync needs from the MQTT side (see agent.uplink.MqttTransport)."""

    @property
    def connected(self) -> bool: ...

    @property
    def address(self) -> str:
        """Where it connects ("host:port"), for the failure reasons the views show."""
        ...

    @property
    def connect_error(self) -> str:
        """Why the last `connect()` returned False (address, errno)."""
        ...

    def connect(self) -> bool: ...

    def poll(self, timeout: float) -> list[tuple[str, object]]: ...

    def publish(self, kind: str, payload: bytes) -> int | None: ...

    def publish_status(self, state: str, **fields: object) -> None: ...

    def drop(self) -> None: ...


class FleetSync:
    """The uplink control loop: connection, breaker, resync, acks and commands."""

    def __init__(
        self,
        transport: Transport,
        resync: Resync,
        breaker: CircuitBreaker,
        backoff: Backoff,
        *,
        auth: FleetAuth,
        ack_mode: str = "fleet",
    ) -> None:
        self.transport = transport
        self.resync = resync
        self.breaker = breaker
        self.backoff = backoff
        self.ack_mode = ack_mode
        self.inbox = FleetInbox(auth, resync.digest_of)
        self._replay_pending = False  # coalesced: any number of requests, one flag
        self._replays = TokenBucket(REPLAY_RATE, REPLAY_BURST)
        self._next_attempt = 0.0
        # MQTT message id -> (batch id, sent at), oldest first: the broker's PUBACKs.
        self._mids: dict[int, tuple[int, float]] = {}
        self._failure_streak = 0
        self._connecting_until: float | None = None
        self.last_error = ""
        self.pings = 0

    @property
    def bad_messages(self) -> int:
        """Acks and commands refused (by reason: `inbox.rejected`)."""
        return self.inbox.refused

    def run_once(self, now: float, timeout: float = 0.05) -> None:
        """One step: network I/O, events, reconnect if due, send what is due."""
        if not self.transport.connected and self._connecting_until is None:
            self._maybe_connect(now)  # before polling: poll waits while unconnected
        for kind, value in self.transport.poll(timeout):
            self._on_event(kind, value, now)
        if not self.transport.connected:
            self._maybe_connect(now)
            return
        if self._puback_overdue(now):
            return
        if not self.breaker.allow():
            return  # open: nothing is sent; the store keeps buffering
        if self._replay_pending and self._replays.allow(now):
            self._replay_pending = False
            self.resync.request_replay(now)
        for out in self.resync.run_once(now):
            mid = self.transport.publish(out.kind, out.payload)
            if mid is None:
                self.breaker.record_failure()
                self.resync.on_disconnected()
                return
            self._mids[mid] = (out.batch_id, now)
        if self.resync.timed_out:
            self.breaker.record_failure()
            log.warning("uplink_ack_timeout resend_from=%d", self.resync.delivered + 1)

    def _puback_overdue(self, now: float) -> bool:
        """The broker left a publish unacknowledged past ack_timeout: replace the
        connection (resends happen only on a new one; found by swallowing PUBACKs)."""
        if not self._mids:
            return False
        _batch, sent_at = next(iter(self._mids.values()))
        if now - sent_at <= self.resync.config.ack_timeout:
            return False
        log.warning("uplink_puback_overdue after=%.1fs in_flight=%d; reconnecting",
                    now - sent_at, len(self._mids))  # fmt: skip
        self._mids.clear()
        self.transport.drop()
        for kind, value in self.transport.poll(0.0):  # its "disconnected", handled now
            self._on_event(kind, value, now)
        return True

    def _maybe_connect(self, now: float) -> None:
        if self._connecting_until is not None:
            if now < self._connecting_until:
                return  # waiting for CONNACK (it arrives through poll())
            self._connecting_until = None
            self._failed(now, f"no CONNACK from {self.transport.address} in {CONNACK_TIMEOUT:g} s")
            return
        if now < self._next_attempt or not self.breaker.allow():
            return
        if self.transport.connect():
            self._connecting_until = now + CONNACK_TIMEOUT
            return
        self._failed(now, f"connect failed: {self.transport.connect_error}")

    def next_attempt_in(self, now: float) -> float:
        """Seconds until the next connection attempt (0 when connected or due)."""
        if self.transport.connected:
            return 0.0
        return max(0.0, self._next_attempt - now, self.breaker.retry_in())

    def _failed(self, now: float, why: str) -> None:
        self.last_error = why
        self.breaker.record_failure()
        self._failure_streak += 1
        self._next_attempt = now + self.backoff.next_delay()
        level = logging.WARNING if self._failure_streak == 1 else logging.DEBUG
        log.log(
            level,
            "uplink_down reason=%r streak=%d breaker=%s retry_in=%.2f",
            why,
            self._failure_streak,
            self.breaker.state,
            self._next_attempt - now,
        )

    def _on_event(self, kind: str, value: object, now: float) -> None:
        if kind in ("connected", "refused", "disconnected"):
            self._connecting_until = None
        if kind == "connected":
            self.breaker.record_success()
            self.backoff.reset()
            backlog = self.resync.backlog_rows
            if self._failure_streak:
                log.info("uplink_recovered after_failures=%d backlog=%d", self._failure_streak,
                         backlog)  # fmt: skip
            else:
                log.info("uplink_connected backlog=%d", backlog)
            self._failure_streak = 0
            self._mids.clear()
            self.resync.on_connected(now)
            self.transport.publish_status("online", backlog=backlog)
        elif kind == "refused":
            self._failed(now, f"broker refused: {value}")
        elif kind == "disconnected":
            self.resync.on_disconnected()
            self._mids.clear()
            self._failed(now, f"disconnected: {value}")
        elif kind == "puback":
            self.breaker.record_success()
            sent = self._mids.pop(int(value), None)  # type: ignore[call-overload]
            if sent is not None and self.ack_mode == "broker":
                self.resync.on_ack(sent[0], now)
        elif kind in ("ack", "cmd", "retained"):
            try:
                self._on_message(kind, value, now)
            except Exception as exc:  # last resort: one message must never kill the thread
                # The decoders are total (tests/chaos/fuzz_fleet.py proves it without this
                # guard); anything landing here is a bug, counted and logged with its trace.
                self.inbox.bug(kind, now, exc)

    def _on_message(self, kind: str, value: object, now: float) -> None:
        """A message from the fleet: only what passes the inbox acts."""
        if kind == "retained":
            self.inbox.retained(str(value), now)
        elif kind == "ack":
            ack = self.inbox.ack(value, now)  # type: ignore[arg-type]
            if ack is not None and self.ack_mode == "fleet":
                self.resync.on_ack(ack.batch_id, now)
        else:
            cmd = self.inbox.command(value, now)  # type: ignore[arg-type]
            if cmd is None:
                return
            if cmd.op == "replay":
                self._replay_pending = True
            else:
                self.pings += 1
                self.transport.publish_status("online", pong=cmd.cmd_id)
