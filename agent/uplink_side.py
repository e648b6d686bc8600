"""The uplink thread's work: MQTT transport, resync, circuit breaker.

Steppable: `run_once(now)`. Fleet acknowledgements become `Delivered` tasks for the
writer, which persists them (it is the store's only writer).
"""

from __future__ import annotations

import time

from agent.channels import Channels, Delivered
from agent.config import Config
from agent.fleet_auth import load_fleet_auth
from agent.fleetsync import FleetSync
from agent.livestate import BreakerLive, UplinkLive
from agent.receipts import ReceiptInbox
from agent.resilience import Backoff, CircuitBreaker
from agent.resync import Resync
from agent.store import connect
from agent.uplink import MqttTransport


class UplinkSide:
    """The uplink thread's work, steppable: MQTT transport, resync, breaker."""

    def __init__(self, config: Config, channels: Channels) -> None:
        c = config.uplink
        auth = load_fleet_auth(config)  # first: a bad key file names itself before any I/O
        self.fleet_key = auth.fingerprint
        self.tasks = channels.tasks
        self.reader = connect(config.database, readonly=True)
        self.breaker = CircuitBreaker(c.breaker_failure_threshold, c.breaker_recovery_timeout)
        self.resync = Resync(self.reader, config.agent.vehicle_id, c, self._deliver)
        # Receipts of bundles carried home (`ironfleet import-receipt`), through the cursor.
        self.receipts = ReceiptInbox(config.database.parent, self.reader, auth, self.resync)
        self.transport = MqttTransport(c, config.agent.vehicle_id)
        self.sync = FleetSync(
            self.transport,
            self.resync,
            self.breaker,
            Backoff(c.reconnect_min, c.reconnect_max),
            auth=auth,
            ack_mode=c.ack_mode,
        )

    def _deliver(
        self, upto: int, positions: dict[str, tuple[int, int]], frontiers: tuple[int, ...]
    ) -> None:
        # Persisting the cursor is the writer's job (the store's only writer).
        self.tasks.put(Delivered(upto, positions, frontiers))

    def run_once(self, now: float) -> None:
        self.sync.run_once(now)
        self.receipts.run_once(now)

    def live(self) -> tuple[UplinkLive, BreakerLive]:
        """Live values for the snapshot (read from the writer thread: plain attribute reads)."""
        snap = self.breaker.snapshot()
        uplink = UplinkLive(
            state="connected" if self.transport.connected else "disconnected",
            phase=str(self.resync.phase),
            broker=self.transport.address,
            fleet_key=self.fleet_key,
            last_error=self.sync.last_error,
            delivered=self.resync.delivered,
            in_flight=self.resync.in_flight,
            next_attempt_in=round(self.sync.next_attempt_in(time.monotonic()), 1),
            counters=vars(self.resync.counters)
            | self.resync.budget_counters(time.monotonic())
            | {f"receipts_{k}": v for k, v in self.receipts.counters.items()},
            rejected=dict(self.sync.inbox.rejected),
        )
        breaker = BreakerLive(
            state=str(snap.state),
            failures=snap.failures,
            successes=snap.successes,
            retry_in=round(self.breaker.retry_in(), 1),
            transitions=self.breaker.transitions,
        )
        return uplink, breaker

    def close(self) -> None:
        self.transport.close()
        self.reader.close()
