"""A load generator that speaks the fleet protocol as agents do, byte for byte, for
tests/collector, tests/chaos/test_fleet_pg.py and bench/bench_fleet.py: vehicles with
their streams, reboots, backlog and clock faults (`LoadVehicle`), and one MQTT connection
publishing their batches with a window, resends, duplicates and reorders, checking every
ack as an agent does (`FleetLoad`). The oracle that judges what reached PostgreSQL is in
pgharness.py."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.fleet import Ack, Batch, FleetMessageError, batch_digest, parse_topic, topic
from agent.fleet_auth import FleetAuth, load_public_key
from agent.resilience import Event, replay
from agent.uplink import no_delay

Key = tuple[str, int, int]  # (stream, boot_epoch, seq)


@dataclass
class SentBatch:
    vehicle: str
    batch_id: int
    kind: str
    payload: bytes
    digest: bytes
    keys: list[Key]
    sent_at: float = 0.0  # monotonic, 0 = not yet published
    sends: int = 0
    acked: bool = False


class LoadVehicle:
    """One vehicle's side: its streams, its batches, its acks and its checkpoint.

    Events go round-robin over `streams`; every `reboot_every` batches one stream's
    controller reboots (boot_epoch + 1, seq from 1). Timestamps are now, except every
    `old_every`-th event, which is 3 days old (a backlog: its own partition) and every
    `clock_fault_every`-th, which is in 1970 (a controller clock fault: DEFAULT).
    """

    def __init__(
        self,
        name: str,
        streams: int,
        rng: random.Random,
        *,
        reboot_every: int = 0,
        old_every: int = 0,
        clock_fault_every: int = 0,
    ) -> None:
        self.name = name
        self.rng = rng
        self.streams = [f"ecu{k % 4}.s{k:03d}" for k in range(streams)]
        self.position = dict.fromkeys(self.streams, (1, 0))
        self.run_id = rng.randrange(1, 2**31)
        self.n = 0
        self.k = 0
        self.reboot_every, self.old_every = reboot_every, old_every
        self.clock_fault_every = clock_fault_every
        self.batches: dict[int, SentBatch] = {}
        self.order: list[int] = []  # events batches, in generation order
        self.prebuilt: list[SentBatch] = []  # made before the run (benches)
        self.issued = 0  # events batches handed to the publisher
        self.inflight: dict[int, SentBatch] = {}  # published, not yet acked
        self.truth: dict[Key, Event] = {}

    def _batch_id(self) -> int:
        self.n += 1
        return (self.run_id << 32) | self.n

    def next_batch(self, size: int, now: float) -> SentBatch:
        events = []
        for _ in range(size):
            stream = self.streams[self.k % len(self.streams)]
            self.k += 1
            epoch, seq = self.position[stream]
            self.position[stream] = (epoch, seq + 1)
            ts = now
            if self.clock_fault_every and self.k % self.clock_fault_every == 0:
                ts = 1000.0 + self.k
            elif self.old_every and self.k % self.old_every == 0:
                ts = now - 3 * 86_400.0
            payload = msgpack.packb({"v": round(self.rng.uniform(0, 500), 2), "k": self.k})
            event = Event(
                stream,
                seq + 1,
                boot_epoch=epoch,
                ts=ts + self.k * 1e-3,
                kind="sample",
                priority=self.k % 4,
                payload=payload,
            )
            self.truth[(stream, epoch, seq + 1)] = event
            events.append(event)
        if self.reboot_every and (self.n + 1) % self.reboot_every == 0:
            stream = self.rng.choice(self.streams)
            self.position[stream] = (self.position[stream][0] + 1, 0)
        sent = self._make("events", events)
        self.order.append(sent.batch_id)
        return sent

    def state_batch(self) -> SentBatch:
        """The compacted replay (latest event per stream), as an agent sends first."""
        return self._make("state", replay(self.truth.values()))

    def _make(self, kind: str, events: Sequence[Event]) -> SentBatch:
        batch = Batch(self.name, self._batch_id(), kind, False, tuple((e, 3) for e in events))
        payload = batch.encode()
        keys = [(e.stream, e.boot_epoch, e.seq) for e in events]
        sent = SentBatch(self.name, batch.batch_id, kind, payload, batch_digest(payload), keys)
        self.batches[sent.batch_id] = sent
        return sent

    def acked_keys(self) -> set[Key]:
        """Every event of every acked batch (the collector vouched for each)."""
        return {k for b in self.batches.values() if b.acked for k in b.keys}

    def checkpoint_keys(self) -> set[Key]:
        """Events below the checkpoint: the contiguous acked prefix of events batches."""
        out: set[Key] = set()
        for batch_id in self.order:
            batch = self.batches[batch_id]
            if not batch.acked:
                break
            out.update(batch.keys)
        return out


class FleetLoad:
    """`vehicles` agents' worth of batches over one MQTT connection (QoS 1, persistent
    session): a window of batches in flight per vehicle, a resend of any batch not acked
    within `ack_timeout` (the agents' at-least-once), the compacted state first after
    every (re)connect, and, when asked, duplicates (`dup_every`-th batch published twice)
    and reorders (`reorder_every`-th batch held back behind the next one); `rate` caps
    new batches per second (so that faults land while the load runs).

    Acks are checked as an agent checks them (signature with the fleet's public key,
    digest of what was published); a forged or mismatched ack is counted, not applied.
    """

    def __init__(
        self,
        port: int,
        public_key: Path,
        *,
        vehicles: int = 12,
        streams: int = 8,
        batch_events: int = 50,
        batches: int = 40,
        window: int = 4,
        ack_timeout: float = 1.0,
        dup_every: int = 0,
        reorder_every: int = 0,
        seed: int = 1,
        client_id: str = "fleet-load",
        rate: float = 0.0,
        prebuild: bool = False,
        **vehicle_options: int,
    ) -> None:
        rng = random.Random(seed)
        self.port = port
        self.vehicles = {
            f"truck-{i:03d}": LoadVehicle(
                f"truck-{i:03d}", streams, random.Random(rng.random()), **vehicle_options
            )
            for i in range(vehicles)
        }
        self.auth = {v: FleetAuth(v, load_public_key(str(public_key))) for v in self.vehicles}
        self.batch_events, self.total, self.window = batch_events, batches, window
        self.ack_timeout, self.dup_every, self.reorder_every = ack_timeout, dup_every, reorder_every
        if prebuild:  # encode everything now, so the timed run only publishes
            for v in self.vehicles.values():
                v.prebuilt = [v.next_batch(batch_events, time.time()) for _ in range(batches)]
        self.rate = rate  # new batches per second over the fleet; 0: as fast as acks allow
        self._tokens, self._last = 1.0, time.monotonic()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.connects = 0
        self._states_sent_for = 0
        self.publishes = self.duplicates_sent = self.reordered = self.resends = 0
        self.acks = self.acks_stale = self.acks_rejected = 0
        # Counted as acks arrive: done() is polled on every ack, and a scan of every batch
        # there made the generator quadratic (the bench's bottleneck with small batches).
        self._events_acked = 0
        self._held: dict[str, SentBatch] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # floats work
        self.client.on_socket_open = no_delay  # as the agent's socket: no Nagle delay
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()  # to acks, on this connection
        self.thread = threading.Thread(target=self._run, name="fleet-load", daemon=True)

    # -- driving --

    def start(self) -> FleetLoad:
        self.client.connect_async("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=20)
        self.client.disconnect()
        self.client.loop_stop()

    def acked_batches(self) -> int:
        """Events batches acknowledged (each once)."""
        with self.lock:
            return self._events_acked

    def done(self) -> bool:
        """Every events batch generated and acknowledged."""
        return self.acked_batches() == self.total * len(self.vehicles)

    def events_acked(self) -> int:
        with self.lock:
            return sum(len(v.acked_keys()) for v in self.vehicles.values())

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(0.02)
            self.wake.clear()
            if not self.client.is_connected() or not self.subscribed.is_set():
                continue  # an ack published before our SUBACK would be lost
            now = time.monotonic()
            with self.lock:
                out = self._step(now)
            for sent in out:
                self.client.publish(topic(sent.vehicle, sent.kind), sent.payload, qos=1)

    def _step(self, now: float) -> list[SentBatch]:
        out: list[SentBatch] = []
        if self.rate:
            self._tokens = min(8.0, self._tokens + (now - self._last) * self.rate)
            self._last = now
        if self._states_sent_for < self.connects:  # state first after every connect
            self._states_sent_for = self.connects
            out += [self._mark(v.state_batch(), now) for v in self.vehicles.values()]
        for v in self.vehicles.values():
            waiting = list(v.inflight.values())
            for b in waiting:
                if now - b.sent_at > self.ack_timeout:
                    self.resends += 1
                    out.append(self._mark(b, now))
            out += self._fresh(v, self.window - len(waiting), now)
        for name in list(self._held):  # nothing more to send: let it go
            if self.vehicles[name].issued >= self.total:
                out.append(self._held.pop(name))
        self.publishes += len(out)
        return out

    def _fresh(self, v: LoadVehicle, room: int, now: float) -> list[SentBatch]:
        """New batches for `v` within its window and the rate, with the injected
        reorders (held behind the next) and duplicates (published twice)."""
        out: list[SentBatch] = []
        while room > 0 and v.issued < self.total:
            if self.rate:
                if self._tokens < 1:
                    break
                self._tokens -= 1
            room -= 1
            made = (
                v.prebuilt[v.issued] if v.prebuilt else v.next_batch(self.batch_events, time.time())
            )
            v.issued += 1
            sent = self._mark(made, now)
            held = self._held.pop(v.name, None)
            if self.reorder_every and held is None and v.issued % self.reorder_every == 0:
                self._held[v.name] = sent
                self.reordered += 1
                continue
            out.append(sent)
            if held is not None:
                out.append(held)
            if self.dup_every and v.issued % self.dup_every == 0:
                self.duplicates_sent += 1
                out.append(sent)
        return out

    def _mark(self, batch: SentBatch, now: float) -> SentBatch:
        self.vehicles[batch.vehicle].inflight[batch.batch_id] = batch
        batch.sent_at = now
        batch.sends += 1
        return batch

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        self.subscribed.clear()
        client.subscribe(topic("+", "ack"), 1)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, _codes: Any, _p: Any) -> None:
        with self.lock:
            self.connects += 1  # state first, now that its acks can reach us
        self.subscribed.set()
        self.wake.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            vehicle, _kind = parse_topic(msg.topic)
            ack = Ack.decode(bytes(msg.payload))
        except FleetMessageError:
            self.acks_rejected += 1
            return
        with self.lock:
            v = self.vehicles.get(vehicle)
            batch = v.batches.get(ack.batch_id) if v is not None else None
            if batch is None or batch.acked:
                self.acks_stale += 1
                return
            if ack.digest != batch.digest or not self.auth[vehicle].ack_ok(ack):
                self.acks_rejected += 1
                return
            batch.acked = True
            self.vehicles[vehicle].inflight.pop(batch.batch_id, None)
            self.acks += 1
            self._events_acked += batch.kind == "events"
        self.wake.set()
