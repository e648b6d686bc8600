"""A serial thread's work: the port, the link, hand-over to the writer, ACKs back.

One per controller ([[serial]] entries), each on its own thread with its own port, link,
reconnect and share of the writer's queue, so a flooding, noisy or unplugged port never
stalls the others. Steppable: `run_once(now)` does one read-and-react, so a test can
drive it.
"""

from __future__ import annotations

import logging
import queue
import select
import time
from pathlib import Path

from agent.channels import Channels, Handover
from agent.config import Config
from agent.resilience import Backoff
from firmware_bridge.capture import FROM_CONTROLLER, SUFFIX, TO_CONTROLLER, CaptureWriter
from firmware_bridge.link import AgentLink, Received
from firmware_bridge.serial_port import PortState, SerialPort

log = logging.getLogger("agent.daemon")
CAPTURE_FLUSH_INTERVAL = 1.0  # seconds between flushes of a wire capture


class SerialSide:
    """A serial thread's work, steppable: `run_once(now)` does one read-and-react."""

    def __init__(self, config: Config, channels: Channels, index: int = 0) -> None:
        s = config.serials[index]
        self.index = index
        self.name = s.label
        self.link = AgentLink(
            agent_id=config.agent.vehicle_id,
            heartbeat_interval=s.heartbeat_interval,
            missed_heartbeats=s.missed_heartbeats,
        )
        self.port = SerialPort(
            s.device,
            baudrate=s.baudrate,
            backoff=Backoff(s.reconnect_min, s.reconnect_max),
            on_state=self._on_port_state,
            read_size=s.read_size,
        )
        self.to_writer = channels.to_writer
        self.reports = channels.ports[index].reports
        self.waker = channels.ports[index].waker
        self.shared = channels.shared
        ports = len(config.serials)
        # This port's share of the writer's queue: a port whose events come faster than
        # the disk takes them fills its share only, never the others' room.
        self.max_in_flight = max(1, config.store.queue_max_batches // ports)
        # With [[serial]] entries every stream is stored under its port's name, so two
        # controllers using the same stream names (or the same HELLO id) never collide.
        self.namespace = config.streams_by_port
        self.prefix = f"{s.label}/"
        self._reopened = False
        self.in_flight = 0  # batches handed to the writer and not yet reported
        self.pending: list[Received] = []  # received, waiting for room in the writer's queue
        # [serial] capture: the port's raw bytes both ways (firmware_bridge/capture.py).
        self.capture_path = Path(config.agent.state_dir) / "capture" / f"{s.label}{SUFFIX}"
        self.capture_max_bytes = s.capture_max_bytes
        self.capture: CaptureWriter | None = None
        self._capture_flush_at = 0.0
        self.want_capture = s.capture  # set by SIGHUP (main thread); applied in run_once
        self.set_capture(s.capture)

    def _on_port_state(self, state: PortState, detail: str) -> None:
        if state is PortState.OPEN:
            self._reopened = True

    def start(self, now: float) -> None:
        self.port.open(now)
        self.link.start(now)

    def run_once(self, now: float, timeout: float = 0.05) -> None:
        """Read (or wait), apply durability reports, hand over new events, send frames.

        Waits at most `timeout` in one place: for input, or, while the writer's queue is
        full, for room in it. Events that found no room stay `pending` and nothing more is
        read meanwhile, so the controller's window fills and it holds the rest in its ring
        buffer (backpressure); the thread never sleeps elsewhere."""
        self.port.poll(now)
        if self._reopened:
            self._reopened = False
            self.link.port_reopened(now)
        data = b""
        if self.pending:
            self._offer(timeout)
        elif self.shared.stopping.is_set():
            select.select([self.waker.read_fd], [], [], timeout)
        elif self.port.state is PortState.OPEN:
            data = self.port.read(timeout, wake_fd=self.waker.read_fd)
        else:
            select.select([self.waker.read_fd], [], [], min(timeout, 0.05))
        self.waker.drain()
        now = time.monotonic()
        self._apply_reports(now)
        if data and self.capture is not None:
            self.capture.record(now, FROM_CONTROLLER, data)
        if data:
            received = self.link.receive(data, now)
            if received and self.namespace:
                received = self._namespaced(received)
            if received:
                self.pending = received
                self._offer(0.0)
        self.link.poll(now)
        self._flush()
        if self.want_capture != (self.capture is not None):
            self.set_capture(self.want_capture)
        if self.capture is not None and now >= self._capture_flush_at:
            self._capture_flush_at = now + CAPTURE_FLUSH_INTERVAL
            self.capture.flush()
            if self.capture.failed:
                log.warning("capture_failed %s (capture off)", self.capture.failed)
                self.capture = None
                self.want_capture = False  # until the next SIGHUP asks again

    def _namespaced(self, received: list[Received]) -> list[Received]:
        """Each stream, and the controller's identity (its boot epochs), under this port's
        name. The name is configuration (validated: no '/', unique among the entries), so
        `<port>/<stream as sent>` is one-to-one whatever the controllers send or announce;
        a HELLO id is peer input, and two controllers may announce the same one."""
        prefix = self.prefix
        return [
            Received(r.token, r.event._replace(stream=prefix + r.event.stream),
                     r.time_quality, prefix + r.controller_id)
            for r in received
        ]  # fmt: skip

    def set_capture(self, on: bool) -> None:
        """Start or stop the wire capture (at start, and on SIGHUP)."""
        if on and self.capture is None:
            try:
                self.capture = CaptureWriter(self.capture_path, self.capture_max_bytes)
            except OSError as exc:
                # Off until the next SIGHUP asks again: never a retry (and a log line) per read.
                self.want_capture = False
                log.warning("capture_failed %s: %s (capture off)", self.capture_path, exc)
                return
            log.info("capture_on path=%s max_bytes=%d", self.capture_path, self.capture_max_bytes)
        elif not on and self.capture is not None:
            capture, self.capture = self.capture, None
            capture.close()
            log.info("capture_off path=%s records=%d", self.capture_path, capture.records)

    def _apply_reports(self, now: float) -> None:
        while True:
            try:
                durable, tokens = self.reports.get_nowait()
            except queue.Empty:
                return
            self.in_flight -= 1
            if durable:
                self.link.durable(tokens, now)
            else:
                self.link.forget(tokens)

    def _offer(self, timeout: float) -> None:
        """Hand `pending` to the writer if its queue has room within `timeout`. Once the
        serial loop has said it hands nothing more (a stop), what is still pending is
        forgotten: never ACKed, the controller resends it to the next run."""
        if self.shared.reading_done.is_set():
            self.link.forget([r.token for r in self.pending])
            self.pending = []
            return
        if self.in_flight >= self.max_in_flight:  # this port's share is used: wait for a report
            if timeout > 0:
                select.select([self.waker.read_fd], [], [], timeout)
            return
        try:
            if timeout > 0:
                self.to_writer.put(Handover(self.index, self.pending), timeout=timeout)
            else:
                self.to_writer.put_nowait(Handover(self.index, self.pending))
        except queue.Full:
            if self.shared.stopping.is_set() and self.shared.writer_done.is_set():
                self.link.forget([r.token for r in self.pending])
                self.pending = []
            return
        self.in_flight += 1
        self.pending = []

    def _flush(self) -> None:
        out = self.link.outgoing()
        if out and self.port.state is PortState.OPEN:
            self.port.write(out)
            if self.capture is not None:
                self.capture.record(time.monotonic(), TO_CONTROLLER, out)

    def close(self) -> None:
        self.set_capture(False)
        self.port.close()
