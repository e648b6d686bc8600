"""The uplink thread's work: MQTT transport, resync, circuit breaker.

Steppable: `run_once(now)`. Fleet acknowledgements become `Delivered` tasks for the
writer, which persists them (it is the store's only writer).
"""

from __future__ import annotations

import json
import time

from agent.channels import Channels, Delivered
from agent.config import Config
from agent.fleet_auth import load_fleet_auth
from agent.resilience import Backoff, CircuitBreaker
from agent.resync import FleetSync, Resync
from agent.store import connect
from agent.uplink import MqttTransport


class UplinkSide:
    """The uplink thread's work, steppable: MQTT transport, resync, breaker."""

    def __init__(self, config: Config, channels: Channels) -> None:
        c = config.uplink
        auth = load_fleet_auth(config)  # first: a bad key file names itself before any I/O
        self.tasks = channels.tasks
        self.reader = connect(config.database, readonly=True)
        self.breaker = CircuitBreaker(c.breaker_failure_threshold, c.breaker_recovery_timeout)
        self.resync = Resync(self.reader, config.agent.vehicle_id, c, self._deliver)
        self.transport = MqttTransport(c, config.agent.vehicle_id)
        self.sync = FleetSync(
            self.transport,
            self.resync,
            self.breaker,
            Backoff(c.reconnect_min, c.reconnect_max),
            auth=auth,
            ack_mode=c.ack_mode,
        )

    def _deliver(self, upto: int, positions: dict[str, tuple[int, int]]) -> None:
        # Persisting the cursor is the writer's job (the store's only writer).
        self.tasks.put(Delivered(upto, positions))

    def run_once(self, now: float) -> None:
        self.sync.run_once(now)

    def state(self) -> dict[str, str]:
        """Live values for the CLI (read from another thread: plain attribute reads)."""
        snap = self.breaker.snapshot()
        counters = vars(self.resync.counters).copy()
        return {
            "uplink.state": "connected" if self.transport.connected else "disconnected",
            "uplink.phase": str(self.resync.phase),
            "uplink.delivered": str(self.resync.delivered),
            "uplink.in_flight": str(self.resync.in_flight),
            "uplink.counters": json.dumps(counters, sort_keys=True),
            "uplink.rejected": json.dumps(self.sync.inbox.rejected, sort_keys=True),
            "uplink.last_error": self.sync.last_error,
            "uplink.broker": self.transport.address,
            "uplink.next_attempt_in": f"{self.sync.next_attempt_in(time.monotonic()):.1f}",
            "breaker.state": str(snap.state),
            "breaker.failures": str(snap.failures),
            "breaker.successes": str(snap.successes),
            "breaker.retry_in": f"{self.breaker.retry_in():.1f}",
            "breaker.transitions": str(self.breaker.transitions),
        }

    def close(self) -> None:
        self.transport.close()
        self.reader.close()
