"""Harness for bridge tests: a running `ironfleet-sim` and a real agent-side pump.

The agent side is the real `SerialPort` + `AgentLink` with a dictionary standing in for
the store (the store is tested on its own, with real SQLite): an event counts as durable
when it is in the dictionary, and only then is it reported to the link.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.resilience import Backoff
from firmware_bridge.link import AgentLink
from firmware_bridge.serial_port import PortState, SerialPort

Key = tuple[str, int, int]


@dataclass
class Sim:
    """A running `ironfleet-sim` process and its ground truth."""

    proc: subprocess.Popen[str]
    truth_path: Path
    devices: dict[str, str]

    def records(self, op: str | None = None) -> list[dict[str, Any]]:
        out = []
        with self.truth_path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # a line still being written
                record = json.loads(line)
                if op is None or record["op"] == op:
                    out.append(record)
        return out

    def keys(self, op: str) -> dict[Key, str]:
        return {(r["stream"], r["boot_epoch"], r["seq"]): r["payload"] for r in self.records(op)}

    def summary(self) -> dict[str, Any]:
        found = self.records("summary")
        assert found, "the simulator wrote no summary"
        return found[-1]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


@dataclass
class AgentSide:
    """SerialPort + AgentLink pumped in a thread; durable = stored in `stored`."""

    path: str
    heartbeat: float = 0.2
    stored: dict[Key, bytes] = field(default_factory=dict)
    duplicates: int = 0
    max_buffered: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.link = AgentLink(session=4242, heartbeat_interval=self.heartbeat)
        self._reopened = False
        self.port = SerialPort(
            self.path, backoff=Backoff(0.02, 0.1), on_state=self._on_state, write_timeout=1.0
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-side", daemon=True)

    def _on_state(self, state: PortState, _detail: str) -> None:
        if state is PortState.OPEN:
            self._reopened = True

    def start(self) -> AgentSide:
        self.port.open(time.monotonic())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.port.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self.port.poll(now)
                if self._reopened:
                    self._reopened = False
                    self.link.port_reopened(now)
                data = self.port.read(0.01) if self.port.state is PortState.OPEN else b""
                if not data and self.port.state is not PortState.OPEN:
                    time.sleep(0.01)
                now = time.monotonic()
                received = self.link.receive(data, now)
                self.max_buffered = max(self.max_buffered, self.link.decoder.buffered)
                for r in received:
                    key = (r.event.stream, r.event.boot_epoch, r.event.seq)
                    if key in self.stored:
                        self.duplicates += 1
                    self.stored[key] = r.event.payload
                self.link.durable([r.token for r in received], now)
                self.link.poll(now)
                out = self.link.outgoing()
                if out and self.port.state is PortState.OPEN:
                    self.port.write(out)
        except Exception as exc:  # surfaced by the test, not lost in a thread
            self.errors.append(repr(exc))
            raise
