"""The agent side of the serial link as a steppable, sans-I/O state machine.

Feed it received bytes (`receive`), tell it what became durable (`durable`), step its
timers (`poll`), and write what `outgoing()` returns to the port. It never reads a clock:
every call takes `now` (monotonic seconds).

The promise it keeps: a controller frame is ACKed only after the caller has reported its
event durable. Retransmits of frames already durable are re-ACKed (their first ACK was
lost); retransmits of frames still being committed are ignored (the ACK is coming); gaps
in link sequence numbers are NACKed so the controller resends from its ring buffer before
its retransmit timer fires.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple

import msgpack

from firmware_bridge.frames import FrameDecoder, encode
from firmware_bridge.protocol import (
    MAX_RANGES,
    MAX_U32,
    Ack,
    Body,
    Command,
    EventBody,
    Frame,
    Heartbeat,
    Hello,
    Nack,
    Response,
    TimeQuality,
)
from firmware_bridge.ranges import to_ranges

log = logging.getLogger(__name__)

# Frames further than this past the cumulative ACK are dropped unACKed (the controller
# resends them later); it bounds the link's per-session memory whatever a peer sends.
# A controller window is at most MAX_WINDOW (256) frames, so this never bites a correct one.
RX_WINDOW: Final = 1024

# A controller rebooting in a loop (or a peer sending HELLOs with fresh session ids) must
# cost bounded log lines: one `controller_session_changed` line per this many seconds,
# the others counted and reported with the next line ("N more in the last 60 s").
SESSION_LOG_INTERVAL: Final = 60.0

Token = tuple[int, int]  # (session, link_seq): what the caller hands back to `durable`


class LinkState(StrEnum):
    """Link state as the agent sees it."""

    DOWN = "down"  # no session, or nothing heard for `missed_heartbeats` intervals
    UP = "up"


class ControllerEvent(NamedTuple):
    """One event as the controller sent it, in the form the agent stores it.

    The protocol schema validated every field; `boot_epoch` is the session's, and
    `payload` the signals map packed as msgpack. A named tuple, not the agent's `Event`:
    the bridge hands up its own body (it imports nothing from `agent`), and building it
    is a tuple allocation on the ingest hot path. Field names match `Event`'s, so the
    store reads either.
    """

    stream: str
    seq: int
    boot_epoch: int
    ts: float
    kind: str
    priority: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Received:
    """An event accepted from the link; store it, then pass `token` to `durable`."""

    token: Token
    event: ControllerEvent
    time_quality: TimeQuality
    controller_id: str


@dataclass(slots=True)
class _Session:
    boot_epoch: int
    controller_id: str
    firmware: str
    cumulative: int  # every link_seq <= this is durable (or was ACKed before we met)
    highest_seen: int  # highest link_seq the controller is known to have sent
    pending: set[int]  # handed to the caller, not yet durable
    durable_above: set[int]  # durable, above `cumulative`


def _counters() -> dict[str, int]:
    return dict.fromkeys(
        (
            "events_accepted",
            "retransmits_reacked",
            "retransmits_pending",
            "foreign_session",
            "outside_window",
            "gaps",
            "acks_sent",
            "nacks_sent",
            "hellos_sent",
            "heartbeats_sent",
            "link_downs",
            "controller_reboots",
            "unexpected_frames",
        ),
        0,
    )


class AgentLink:
    """Agent side of one serial link to one controller."""

    def __init__(
        self,
        *,
        agent_id: str = "ironfleet-agent",
        firmware: str = "0.1.0",
        session: int | None = None,
        heartbeat_interval: float = 1.0,
        missed_heartbeats: int = 3,
        nack_retry: float = 0.05,
        ack_repeat: float = 0.05,
    ) -> None:
        self.agent_id = agent_id
        self.firmware = firmware
        # The agent's own session id tells the controller when the agent restarted.
        self.agent_session = (
            session if session is not None else random.SystemRandom().randint(1, MAX_U32)
        )
        self.heartbeat_interval = heartbeat_interval
        self.missed_heartbeats = missed_heartbeats
        self.nack_retry = nack_retry
        self.ack_repeat = ack_repeat
        self.decoder = FrameDecoder()
        self.counters = _counters()
        self.responses: list[Response] = []
        self._session: _Session | None = None
        self._state = LinkState.DOWN
        self._out = bytearray()
        self._last_rx: float | None = None
        self._last_tx = float("-inf")
        self._last_hello = float("-inf")
        self._last_nack = float("-inf")
        self._ack_due = False
        self._nack_due = False
        self._last_ack: float | None = None
        self._last_event_rx = float("-inf")
        self._ack_repeated = True
        self._next_cmd = 1
        self._session_log_at = float("-inf")  # when a session change was last logged
        self._session_changes_held = 0  # changes since then, not logged yet

    # -- public --------------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        """UP once a session is established and the controller is heard from."""
        return self._state

    @property
    def boot_epoch(self) -> int | None:
        """The controller's boot epoch (its session id), once known."""
        return self._session.boot_epoch if self._session else None

    @property
    def controller_id(self) -> str | None:
        """Controller id from its HELLO, once known."""
        return self._session.controller_id if self._session else None

    @property
    def cumulative(self) -> int:
        """Highest link_seq such that it and every one below it is durable."""
        return self._session.cumulative if self._session else 0

    def missing(self) -> list[int]:
        """Link sequence numbers known to be sent but never received, lowest first."""
        s = self._session
        if s is None:
            return []
        return [
            n
            for n in range(s.cumulative + 1, s.highest_seen + 1)
            if n not in s.pending and n not in s.durable_above
        ]

    def start(self, now: float) -> None:
        """Announce ourselves; the controller answers with its HELLO and resends."""
        self._send_hello(now)

    def receive(self, data: bytes, now: float) -> list[Received]:
        """Consume bytes from the port; return the new events to make durable."""
        rejected_before = self.decoder.rejected
        out: list[Received] = []
        for frame in self.decoder.feed(data):
            self._on_frame(frame, now, out)
        if self.decoder.rejected != rejected_before:
            self._on_corrupt(now)
        self._flush(now)
        return out

    def durable(self, tokens: Iterable[Token], now: float) -> None:
        """Report events as committed; ACKs them (cumulative plus selective ranges)."""
        s = self._session
        if s is None:
            return
        changed = False
        for session, link_seq in tokens:
            if session != s.boot_epoch:
                continue  # committed, but for a session the controller has left
            s.pending.discard(link_seq)
            if link_seq > s.cumulative:
                s.durable_above.add(link_seq)
            changed = True
        if changed:
            self._advance(s)
            self._ack_due = True
        self._flush(now)

    def forget(self, tokens: Iterable[Token]) -> None:
        """The caller could not make these durable: accept their retransmits again."""
        s = self._session
        if s is None:
            return
        for session, link_seq in tokens:
            if session == s.boot_epoch:
                s.pending.discard(link_seq)

    def poll(self, now: float) -> None:
        """Step timers: link-down detection, heartbeats or HELLOs, NACK retries."""
        if (
            self._state is LinkState.UP
            and self._last_rx is not None
            and now - self._last_rx >= self.heartbeat_interval * self.missed_heartbeats
        ):
            self._set_state(LinkState.DOWN, "missed heartbeats")
        if self._state is LinkState.DOWN:
            if now - self._last_hello >= self.heartbeat_interval:
                self._send_hello(now)
        elif now - self._last_tx >= self.heartbeat_interval:
            self._emit(Heartbeat(), now)
            self.counters["heartbeats_sent"] += 1
        if self._session and now - self._last_nack >= self.nack_retry and self.missing():
            self._nack_due = True
        if self._session_changes_held and not self._within_session_log_interval(now):
            self._log_session_changes(now, "")
        if (
            not self._ack_repeated
            and self._last_ack is not None
            and now - self._last_ack >= self.ack_repeat
            and self._last_event_rx <= self._last_ack
        ):
            # Nothing arrived since our last ACK: if it was corrupted, a controller with a
            # full window is stalled until its retransmit timer fires. Say it once more.
            self._ack_due = True
        self._flush(now)

    def send_command(self, op: str, args: dict[str, int | float | bool | str | None]) -> int:
        """Queue a COMMAND; its RESPONSE appears in `responses`. Returns the command id."""
        cmd_id = self._next_cmd
        self._next_cmd = self._next_cmd % MAX_U32 + 1
        self._out += encode(Frame(self.agent_session, 1, Command(cmd_id, op, args)))
        return cmd_id

    def outgoing(self) -> bytes:
        """Bytes to write to the port now (and forget)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def port_reopened(self, now: float) -> None:
        """The port was lost and reopened: drop partial bytes and re-handshake."""
        self.decoder.reset()
        self._send_hello(now)

    # -- private -------------------------------------------------------------------------

    def _on_frame(self, frame: Frame, now: float, out: list[Received]) -> None:
        body = frame.body
        if isinstance(body, Hello):
            self._on_hello(frame, body, now)
            return
        s = self._session
        if s is None or frame.session != s.boot_epoch:
            # Events of an unknown session cannot be placed (their boot epoch and window
            # base are unknown): drop them unACKed and ask for a HELLO; they come again.
            self.counters["foreign_session"] += 1
            if now - self._last_hello >= self.nack_retry:
                self._send_hello(now)
            return
        self._heard(now)
        if isinstance(body, EventBody):
            self._on_event(s, frame.link_seq, body, out)
        elif isinstance(body, Heartbeat | Command):
            self._note_sent_up_to(s, frame.link_seq - 1)
            if isinstance(body, Command):  # the agent offers no controller-side commands yet
                self._emit(Response(body.cmd_id, False, {"error": "unsupported"}), now)
        elif isinstance(body, Response):
            self._note_sent_up_to(s, frame.link_seq - 1)
            self.responses.append(body)
        else:  # ACK or NACK: the agent sends no events, so there is nothing to acknowledge
            self.counters["unexpected_frames"] += 1

    def _on_hello(self, frame: Frame, hello: Hello, now: float) -> None:
        base = frame.link_seq  # a HELLO carries the lowest link_seq still unACKed
        old = self._session
        if old is not None and old.boot_epoch == frame.session:
            # Same session (an answer to our HELLO): everything below base is settled.
            old.cumulative = max(old.cumulative, base - 1)
            old.highest_seen = max(old.highest_seen, old.cumulative)
            # Selective ACKs the new cumulative covers are settled too: left in place,
            # the next ACK would carry a range below its own cumulative (found by fuzzing).
            old.durable_above = {n for n in old.durable_above if n > old.cumulative}
            self._advance(old)
        else:
            if old is not None:
                self.counters["controller_reboots"] += 1
                self._session_changes_held += 1
                if not self._within_session_log_interval(now):
                    self._log_session_changes(
                        now,
                        f" controller={hello.controller_id!r} old_epoch={old.boot_epoch} "
                        f"new_epoch={frame.session}",
                    )
            self._session = _Session(
                boot_epoch=frame.session,
                controller_id=hello.controller_id,
                firmware=hello.firmware,
                cumulative=max(base - 1, 0),
                highest_seen=max(base - 1, 0),
                pending=set(),
                durable_above=set(),
            )
        self._heard(now)
        self._ack_due = True  # confirms the session and tells it where we stand

    def _within_session_log_interval(self, now: float) -> bool:
        # A clock that steps back ends the interval: never silence the log for good.
        return self._session_log_at <= now < self._session_log_at + SESSION_LOG_INTERVAL

    def _log_session_changes(self, now: float, detail: str) -> None:
        """One line for the session changes held since the last (the newest's `detail`)."""
        held = self._session_changes_held - (1 if detail else 0)
        more = f" ({held} more in the last {SESSION_LOG_INTERVAL:.0f} s)" if held else ""
        log.info("controller_session_changed%s changes=%d%s", detail, held + bool(detail), more)
        self._session_changes_held = 0
        self._session_log_at = now

    def _on_event(self, s: _Session, link_seq: int, body: EventBody, out: list[Received]) -> None:
        self._last_event_rx = self._last_rx if self._last_rx is not None else float("-inf")
        if link_seq <= s.cumulative or link_seq in s.durable_above:
            self.counters["retransmits_reacked"] += 1
            self._ack_due = True
            return
        if link_seq in s.pending:
            self.counters["retransmits_pending"] += 1
            return
        if link_seq > s.cumulative + RX_WINDOW:
            self.counters["outside_window"] += 1
            return
        self._note_sent_up_to(s, link_seq - 1)
        s.highest_seen = max(s.highest_seen, link_seq)
        s.pending.add(link_seq)
        self.counters["events_accepted"] += 1
        event = ControllerEvent(
            body.stream,
            body.seq,
            s.boot_epoch,
            body.ts,
            body.kind,
            body.priority,
            msgpack.packb(body.signals, use_bin_type=True),
        )
        out.append(Received((s.boot_epoch, link_seq), event, body.time_quality, s.controller_id))

    def _note_sent_up_to(self, s: _Session, link_seq: int) -> None:
        """The controller has sent everything up to `link_seq`: a jump is a gap."""
        link_seq = min(link_seq, s.cumulative + RX_WINDOW)
        if link_seq > s.highest_seen:
            if any(
                n not in s.pending and n not in s.durable_above
                for n in range(s.highest_seen + 1, link_seq + 1)
            ):
                self.counters["gaps"] += 1
                self._nack_due = True
            s.highest_seen = link_seq

    def _on_corrupt(self, now: float) -> None:
        # The frame we expect next is the likeliest victim; NACKing it costs at most a
        # duplicate retransmit, while waiting costs a full retransmit timeout.
        s = self._session
        if s is not None and now - self._last_nack >= self.nack_retry / 4:
            self._nack_due = True

    def _advance(self, s: _Session) -> None:
        while s.cumulative + 1 in s.durable_above:
            s.cumulative += 1
            s.durable_above.discard(s.cumulative)
        s.highest_seen = max(s.highest_seen, s.cumulative)

    def _heard(self, now: float) -> None:
        self._last_rx = now
        if self._state is LinkState.DOWN:
            self._set_state(LinkState.UP, "controller heard")

    def _set_state(self, state: LinkState, why: str) -> None:
        self._state = state
        s = self._session
        if state is LinkState.DOWN:
            self.counters["link_downs"] += 1
            log.warning("link_down reason=%r controller=%s", why, s and s.controller_id)
        else:
            log.info(
                "link_up controller=%s boot_epoch=%s", s and s.controller_id, s and s.boot_epoch
            )

    def _send_hello(self, now: float) -> None:
        self._emit(Hello(self.agent_id, self.firmware), now)
        self._last_hello = now
        self.counters["hellos_sent"] += 1

    def _flush(self, now: float) -> None:
        s = self._session
        if s is None:
            self._ack_due = self._nack_due = False
            return
        if self._ack_due:
            ranges = to_ranges(s.durable_above, MAX_RANGES)
            self._emit(Ack(s.boot_epoch, s.cumulative, ranges), now)
            self.counters["acks_sent"] += 1
            self._ack_repeated = (
                self._last_ack is not None and self._last_event_rx <= self._last_ack
            )
            self._last_ack = now
            self._ack_due = False
        if self._nack_due:
            missing = self.missing()
            if not missing and self._state is LinkState.UP:
                missing = [s.highest_seen + 1]  # after a corrupt frame: the next one
            if missing and missing[0] <= MAX_U32:
                self._emit(Nack(s.boot_epoch, to_ranges(missing, MAX_RANGES)), now)
                self.counters["nacks_sent"] += 1
                self._last_nack = now
            self._nack_due = False

    def _emit(self, body: Body, now: float) -> None:
        self._out += encode(Frame(self.agent_session, 1, body))
        self._last_tx = now
