"""The serial thread's work: the port, the link, hand-over to the writer, ACKs back.

Steppable: `run_once(now)` does one read-and-react, so a test can drive it.
"""

from __future__ import annotations

import queue
import select
import time

from agent.channels import Channels
from agent.config import Config
from agent.resilience import Backoff
from firmware_bridge.link import AgentLink, Received
from firmware_bridge.serial_port import PortState, SerialPort


class SerialSide:
    """The serial thread's work, steppable: `run_once(now)` does one read-and-react."""

    def __init__(self, config: Config, channels: Channels) -> None:
        s = config.serial
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
        self.reports = channels.reports
        self.waker = channels.waker
        self.shared = channels.shared
        self._reopened = False
        self.in_flight = 0  # batches handed to the writer and not yet reported

    def _on_port_state(self, state: PortState, detail: str) -> None:
        if state is PortState.OPEN:
            self._reopened = True

    def start(self, now: float) -> None:
        self.port.open(now)
        self.link.start(now)

    def run_once(self, now: float, timeout: float = 0.05) -> None:
        """Read (or wait), apply durability reports, hand over new events, send frames."""
        self.port.poll(now)
        if self._reopened:
            self._reopened = False
            self.link.port_reopened(now)
        data = b""
        if self.shared.stop_reading.is_set():
            select.select([self.waker.read_fd], [], [], timeout)
        elif self.port.state is PortState.OPEN:
            data = self.port.read(timeout, wake_fd=self.waker.read_fd)
        else:
            select.select([self.waker.read_fd], [], [], min(timeout, 0.05))
        self.waker.drain()
        now = time.monotonic()
        self._apply_reports(now)
        if data:
            received = self.link.receive(data, now)
            if received:
                self._hand_over(received, now)
        self.link.poll(now)
        self._flush()

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

    def _hand_over(self, received: list[Received], now: float) -> None:
        while True:
            try:
                self.to_writer.put(received, timeout=0.05)
                self.in_flight += 1
                return
            except queue.Full:
                # The writer is behind (slow disk). Waiting here stops reading, so the
                # controller's window fills and it holds the events in its ring buffer.
                self._apply_reports(time.monotonic())
                self._flush()
                if self.shared.stop_reading.is_set() and self.shared.writer_done.is_set():
                    self.link.forget([r.token for r in received])
                    return

    def _flush(self) -> None:
        out = self.link.outgoing()
        if out and self.port.state is PortState.OPEN:
            self.port.write(out)

    def close(self) -> None:
        self.port.close()
