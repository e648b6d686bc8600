"""The uplink's control loop: connection, circuit breaker, resync, acks and commands.

`FleetSync` drives a transport (MQTT in production: `agent.uplink.MqttTransport`) through
`run_once(now)`: reconnects with capped, jittered backoff, feeds connection, publish and
ack outcomes to the circuit breaker, sends nothing while it is open, and publishes what
`agent.resync.Resync` decides. Acks and commands pass `agent.fleet_inbox.FleetInbox`
(signature, digest of the batch as published, counters, rate limits) before they act; no
message can raise out of it. Steppable: no thread, no clock of its own.
"""

from __future__ import annotations

import logging
from typing import Protocol

from agent.fleet_auth import FleetAuth
from agent.fleet_inbox import FleetInbox
from agent.resilience import Backoff, CircuitBreaker
from agent.resilience.ratelimit import TokenBucket
from agent.resync import Resync

log = logging.getLogger(__name__)

CONNACK_TIMEOUT = 10.0  # seconds from sending CONNECT to giving the attempt up
# A replay request rebuilds the compacted state (one read per stream): however many
# arrive, they coalesce into one pending flag, served at most this often.
REPLAY_RATE = 0.2  # per second
REPLAY_BURST = 2.0


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
