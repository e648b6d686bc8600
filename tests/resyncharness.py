"""The fake side of the uplink's control-loop tests (tests/agent/test_resync*.py): a
transport that records what is published and replays what a test queues (acks, commands,
disconnects), the stepped clock, and a real Ed25519 key that signs acks and commands as
the collector does. Only the transport is fake; the store is a real SQLite file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import UplinkSection
from agent.fleet import Ack, Batch, Command, batch_digest
from agent.fleet_auth import FleetAuth, FleetSigner
from agent.fleetsync import FleetSync
from agent.resilience import Backoff, CircuitBreaker, Event
from agent.resync import Resync
from agent.store import EventStore, connect


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


@dataclass
class FakeTransport:
    """Connects after `connack_after` polls; records what is published."""

    connack_after: int = 1
    refuse: bool = False
    pubacks: bool = True  # the broker acknowledges every publish (False: they get lost)
    connected: bool = False
    connects: int = 0
    published: list[tuple[str, bytes]] = field(default_factory=list)
    pending: list[tuple[str, object]] = field(default_factory=list)
    payloads: dict[int, bytes] = field(default_factory=dict)  # batch id -> as published
    statuses: list[dict[str, object]] = field(default_factory=list)
    _countdown: int = -1
    _mid: int = 0
    address: str = "fake:1883"
    connect_error: str = ""

    def connect(self) -> bool:
        self.connects += 1
        if self.refuse:
            self.connect_error = f"{self.address}: Connection refused (ECONNREFUSED)"
            return False
        self._countdown = self.connack_after
        return True

    def poll(self, timeout: float) -> list[tuple[str, object]]:
        if self._countdown > 0:
            self._countdown -= 1
        if self._countdown == 0:
            self._countdown = -1
            self.connected = True
            self.pending.append(("connected", None))
        out, self.pending = self.pending, []
        return out

    def publish(self, kind: str, payload: bytes) -> int | None:
        self._mid += 1
        self.published.append((kind, payload))
        self.payloads[Batch.decode(payload).batch_id] = payload
        if self.pubacks:
            self.pending.append(("puback", self._mid))
        return self._mid

    def publish_status(self, state: str, **fields: object) -> None:
        self.statuses.append({"state": state, **fields})

    def drop(self) -> None:
        self.connected = False
        self.pending.append(("disconnected", "test"))

    def batches(self) -> list[Batch]:
        return [Batch.decode(p) for _, p in self.published]


def fill(store: EventStore, streams: int, per_stream: int, start: int = 1) -> None:
    store.append(
        [In(Event(f"s{k}", q, payload=b"\x80")) for q in range(start, start + per_stream)
         for k in range(streams)]
    )  # fmt: skip


def make(
    store: EventStore, transport: FakeTransport, **config: object
) -> tuple[FleetSync, Resync, CircuitBreaker, list[tuple[int, dict[str, tuple[int, int]]]]]:
    delivered: list[tuple[int, dict[str, tuple[int, int]]]] = []

    def deliver(
        upto: int, positions: dict[str, tuple[int, int]], frontiers: tuple[int, ...]
    ) -> None:
        if upto >= store.cursor:  # the cursor moves (not only a class frontier)
            delivered.append((upto, positions))
        store.mark_delivered(upto, positions, frontiers=frontiers)

    section = UplinkSection(**{"batch_max_events": 10, "batch_max_delay_ms": 0.0, **config})  # type: ignore[arg-type]
    resync = Resync(connect(store.path, readonly=True), "v1", section, deliver, run_id=1)
    breaker = CircuitBreaker(section.breaker_failure_threshold, section.breaker_recovery_timeout,
                             clock=lambda: clock[0])  # fmt: skip
    sync = FleetSync(transport, resync, breaker, Backoff(0.5, 4.0, rng=random.Random(1)),
                     auth=FleetAuth("v1", FLEET_KEY.public_key()))  # fmt: skip
    return sync, resync, breaker, delivered


FLEET_KEY = Ed25519PrivateKey.generate()
SIGNER = FleetSigner(FLEET_KEY)


def signed_ack(transport: FakeTransport, b: Batch, vehicle: str = "v1") -> bytes:
    """The collector's ack for `b`: digest of the bytes published, signed."""
    ack = Ack(b.batch_id, b.kind, len(b.events), 0, batch_digest(transport.payloads[b.batch_id]))
    return SIGNER.sign_ack(vehicle, ack).encode()


def signed_command(op: str, cmd_id: int) -> bytes:
    return SIGNER.sign_command("v1", Command(op, cmd_id)).encode()


clock = [0.0]  # the fake clock every test steps


def fresh_store(tmp_path: Path) -> EventStore:
    """A new store in `tmp_path`, and the fake clock back at its start: every test's
    `store` fixture, so no test sees the time another one left."""
    clock[0] = 1000.0
    return EventStore(tmp_path / "a.db")


def step(sync: FleetSync, n: int = 1, dt: float = 0.01) -> None:
    for _ in range(n):
        clock[0] += dt
        sync.run_once(clock[0], timeout=0)


def ack_all(transport: FakeTransport, sync: FleetSync, batches: list[Batch]) -> None:
    for b in batches:
        transport.pending.append(("ack", signed_ack(transport, b)))
    step(sync)


def events_batches(transport: FakeTransport) -> list[Batch]:
    return [b for b in transport.batches() if b.kind == "events"]
