"""bench_uplink.py: the agent's uplink loop, stepped in the bench process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uplink_common import BUFFER_BYTES, Positions, set_nodelay

from agent.config import UplinkSection
from agent.fleet_auth import FleetAuth
from agent.fleetsync import FleetSync
from agent.resilience import Backoff, CircuitBreaker
from agent.resilience.checkpoint import CheckpointCadence
from agent.resync import Resync
from agent.store import EventStore, StoreSection, connect, read_latest
from agent.uplink import MqttTransport

# -- the agent side, in this process -----------------------------------------------------------


class StampedTransport:
    """`MqttTransport` as FleetSync sees it, noting the first connect attempt and CONNACK."""

    def __init__(self, inner: MqttTransport) -> None:
        self.inner = inner
        self.attempt_at: float | None = None
        self.connected_at: float | None = None

    @property
    def connected(self) -> bool:
        return self.inner.connected

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def connect_error(self) -> str:
        return self.inner.connect_error

    def connect(self) -> bool:
        if self.attempt_at is None:
            self.attempt_at = time.monotonic()
        return self.inner.connect()

    def poll(self, timeout: float) -> list[tuple[str, object]]:
        events = self.inner.poll(timeout)
        if self.connected_at is None and any(kind == "connected" for kind, _ in events):
            self.connected_at = time.monotonic()
        return events

    def publish(self, kind: str, payload: bytes) -> int | None:
        return self.inner.publish(kind, payload)

    def publish_status(self, state: str, **fields: object) -> None:
        self.inner.publish_status(state, **fields)

    def drop(self) -> None:
        self.inner.drop()


class AgentLoop:
    """The agent's uplink exactly as the daemon wires it, stepped from this thread.

    Differences from the daemon: the checkpoint is written by `mark_delivered` inline on
    this thread, on the writer's cadence (`CheckpointCadence`: every 5,000 acknowledged
    rows or 1 s, and at once when the last row is acknowledged; the daemon hands it to its
    writer thread), and no serial or writer thread competes for the interpreter.
    """

    def __init__(
        self, db: Path, vehicle: str, section: UplinkSection, *, nodelay: bool = False
    ) -> None:
        self.store = EventStore(db, StoreSection(min_free_bytes=0, max_buffer_bytes=BUFFER_BYTES))
        self.top = int(self.store.conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0)
        self.reader = connect(db, readonly=True)
        self.resync = Resync(self.reader, vehicle, section, self._deliver)
        self.transport = MqttTransport(section, vehicle)
        if nodelay:
            self.transport.client.on_socket_open = set_nodelay
        self.stamped = StampedTransport(self.transport)
        self.breaker = CircuitBreaker(
            section.breaker_failure_threshold, section.breaker_recovery_timeout
        )
        self.sync = FleetSync(
            self.stamped,
            self.resync,
            self.breaker,
            Backoff(section.reconnect_min, section.reconnect_max),
            auth=FleetAuth(vehicle, None),  # the bench's collector does not sign (lab mode)
            ack_mode=section.ack_mode,
        )
        self.checkpoints = 0
        self._cadence = CheckpointCadence()
        self._upto = -1
        self._positions: Positions = {}
        self._frontiers: tuple[int, ...] = ()

    def _deliver(self, upto: int, positions: Positions, frontiers: tuple[int, ...]) -> None:
        # As the writer coalesces `Delivered` tasks (agent/writer.py).
        if upto > self._upto:
            self._cadence.acked(upto - max(self._upto, 0), time.monotonic())
            self._upto = upto
        for stream, pos in positions.items():
            if pos > self._positions.get(stream, (-1, -1)):
                self._positions[stream] = pos
        self._frontiers = frontiers or self._frontiers

    def _persist(self, now: float) -> None:
        last = self._upto >= self.top
        if self._cadence.pending and (last or self._cadence.due(now)):
            if self.store.mark_delivered(self._upto, self._positions, frontiers=self._frontiers):
                self.checkpoints += 1
            self._positions = {}
            self._cadence.persisted()

    def latest(self) -> Positions:
        return {e.stream: e.position for _, e, _, _ in read_latest(self.reader)}

    @property
    def drained(self) -> bool:
        return self.store.cursor > self.top

    @property
    def connected_at(self) -> float | None:
        return self.stamped.connected_at

    def step(self) -> None:
        self.sync.run_once(time.monotonic())
        self._persist(time.monotonic())

    def run_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timed out: cursor={self.store.cursor} top={self.top} "
                    f"counters={self.resync.counters} breaker={self.breaker.state}"
                )
            self.step()

    def close(self) -> None:
        self.transport.close()
        self.reader.close()
        self.store.close()


def section_for(port: int, batch_events: int, **extra: Any) -> UplinkSection:
    return UplinkSection(port=port, batch_max_events=batch_events, reconnect_min=0.1,
                         reconnect_max=1.0, **extra)  # fmt: skip
