"""The controller side of the link, sans-I/O: the reference for firmware authors.

It keeps every EVENT frame in a ring buffer until the agent ACKs it, sends at most
`window` frames beyond the oldest unACKed one, resends a frame when the agent NACKs it or
its retransmit timer expires, answers the agent's HELLO with its own HELLO (carrying the
lowest unACKed link_seq) followed by a resend of the window, and sends heartbeats. The
simulator drives one per emulated controller; docs/protocol.md describes the same rules
for a C implementation.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from firmware_bridge.frames import FrameDecoder, encode
from firmware_bridge.protocol import (
    MAX_U32,
    MAX_WINDOW,
    Ack,
    Command,
    EventBody,
    Frame,
    Heartbeat,
    Hello,
    Nack,
    Response,
)
from firmware_bridge.ranges import expand

DEFAULT_RING: Final = 4096  # frames a controller buffers unACKed (about 300 KB at 75 B)


@dataclass(slots=True)
class _Slot:
    wire: bytes
    body: EventBody
    sent_at: float | None = None  # None: not sent yet (or to be resent after a HELLO)
    first_sent_at: float | None = None
    sends: int = 0


class ControllerLink:
    """Controller side of one link: ring buffer, window, retransmits, heartbeats."""

    def __init__(
        self,
        controller_id: str,
        firmware: str,
        boot_epoch: int,
        *,
        window: int = 64,
        ring_capacity: int = DEFAULT_RING,
        retransmit_timeout: float = 0.5,
        heartbeat_interval: float = 1.0,
        on_ack: Callable[[EventBody, float], None] | None = None,
    ) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be within [1, {MAX_WINDOW}] frames, got {window}")
        self.hello = Hello(controller_id, firmware)
        self.boot_epoch = boot_epoch
        self.window = window
        self.ring_capacity = ring_capacity
        self.retransmit_timeout = retransmit_timeout
        self.heartbeat_interval = heartbeat_interval
        self.on_ack = on_ack
        self.decoder = FrameDecoder()
        self.ring: OrderedDict[int, _Slot] = OrderedDict()
        self.next_seq = 1
        self.highest_sent = 0
        self.agent_session: int | None = None
        self.retransmits = 0
        self.frames_sent = 0  # every frame written, of any type, retransmits included
        self.stale_acks = 0
        self.acked = 0
        self.ack_latencies: deque[float] = deque(maxlen=100_000)  # newest, for benches
        self.commands: list[Command] = []
        self._out = bytearray()
        self._last_tx = float("-inf")
        self._hello_due = True

    # -- public --------------------------------------------------------------------------

    @property
    def base(self) -> int:
        """Lowest link_seq not yet ACKed (next_seq when the ring is empty)."""
        return next(iter(self.ring)) if self.ring else self.next_seq

    @property
    def free(self) -> int:
        """Frames the ring can still take."""
        return self.ring_capacity - len(self.ring)

    def offer(self, body: EventBody) -> bool:
        """Queue an event for sending; False (nothing queued) when the ring is full."""
        if len(self.ring) >= self.ring_capacity or self.next_seq > MAX_U32:
            # Full ring: the caller keeps the event. Exhausted link_seq: the firmware must
            # drain the ring and start a new session (boot epoch + 1) first.
            return False
        seq = self.next_seq
        self.next_seq += 1
        self.ring[seq] = _Slot(encode(Frame(self.boot_epoch, seq, body)), body)
        return True

    def receive(self, data: bytes, now: float) -> None:
        """Consume bytes from the agent."""
        for frame in self.decoder.feed(data):
            body = frame.body
            if isinstance(body, Ack | Nack) and body.epoch != self.boot_epoch:
                self.stale_acks += 1  # answers a session before our last reboot
            elif isinstance(body, Ack):
                self._on_ack(body, now)
            elif isinstance(body, Nack):
                self._on_nack(body, now)
            elif isinstance(body, Hello):
                self.agent_session = frame.session
                self._hello_due = True
            elif isinstance(body, Command):
                self.commands.append(body)
                self._emit(Response(body.cmd_id, True, {"ring": len(self.ring)}), now)
            elif self.agent_session is not None and frame.session != self.agent_session:
                self._hello_due = True  # the agent restarted without saying HELLO

    def poll(self, now: float) -> None:
        """Send HELLO if due, new frames within the window, retransmits, heartbeats."""
        if self._hello_due:
            self._hello_due = False
            # An exhausted session (every link_seq used and ACKed) has nothing to resend.
            base = min(self.base, MAX_U32)
            # A 0x00 first ends whatever noise the line carried before (protocol 2.1):
            # a HELLO right behind a noise burst merged with it, and a controller whose
            # noise always came just before its answers never completed the handshake.
            self._out += b"\x00" + encode(Frame(self.boot_epoch, base, self.hello))
            self.frames_sent += 1
            self._last_tx = now
            for slot in self.ring.values():
                if slot.sent_at is not None:
                    slot.sent_at = float("-inf")  # resend the window after a HELLO
        limit = self.base + self.window
        for seq, slot in self.ring.items():
            if seq >= limit:
                break
            if slot.sent_at is None:
                self._send(seq, slot, now)
            elif now - slot.sent_at >= self.retransmit_timeout:
                self.retransmits += 1
                self._send(seq, slot, now)
        if now - self._last_tx >= self.heartbeat_interval:
            self._emit(Heartbeat(), now)

    def outgoing(self) -> bytes:
        """Bytes to write to the port now."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def unacked(self) -> list[EventBody]:
        """Events still in the ring (lost if the controller reboots now)."""
        return [slot.body for slot in self.ring.values()]

    # -- private -------------------------------------------------------------------------

    def _send(self, seq: int, slot: _Slot, now: float) -> None:
        self._out += slot.wire
        self.frames_sent += 1
        slot.sent_at = now
        if slot.first_sent_at is None:
            slot.first_sent_at = now
        slot.sends += 1
        self.highest_sent = max(self.highest_sent, seq)
        self._last_tx = now

    def _emit(self, body: Heartbeat | Response, now: float) -> None:
        self._out += encode(Frame(self.boot_epoch, min(self.highest_sent + 1, MAX_U32), body))
        self.frames_sent += 1
        self._last_tx = now

    def _on_ack(self, ack: Ack, now: float) -> None:
        while self.ring:
            seq = next(iter(self.ring))
            if seq > ack.cumulative:
                break
            self._acked(seq, now)
        for seq in expand(ack.ranges, self.ring_capacity):
            if seq in self.ring:
                self._acked(seq, now)

    def _acked(self, seq: int, now: float) -> None:
        slot = self.ring.pop(seq)
        self.acked += 1
        if slot.first_sent_at is not None:
            self.ack_latencies.append(now - slot.first_sent_at)
        if self.on_ack is not None:
            self.on_ack(slot.body, now)

    def _on_nack(self, nack: Nack, now: float) -> None:
        for seq in expand(nack.missing, self.window):
            slot = self.ring.get(seq)
            # Ignore what was never sent: a guess after a corrupt frame.
            if slot is not None and slot.sent_at is not None:
                self.retransmits += 1
                self._send(seq, slot, now)
