"""Prometheus metrics, computed at scrape time from the daemon's published snapshot.

The writer thread publishes a snapshot of every live value about once a second (the
same `agent.livestate.LiveState` the CLI reads); metrics are derived from that snapshot, so
a scrape never touches the writer's SQLite connection or the serial link's state.
Served on 127.0.0.1 only (off by default) and/or written as a node_exporter textfile.
docs/operations.md lists every metric.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from agent.livestate import Counters, LiveState
from agent.resilience.ladder import COMPACT_LOW_PRIORITY, DROP_OLDEST

log = logging.getLogger(__name__)

Snapshot = Callable[[], LiveState]
BREAKER_STATES = ("closed", "open", "half_open")
FRAME_OUTCOMES = ("cobs", "crc", "too_long", "msgpack", "schema")


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class AgentCollector(Collector):
    """Turns the published snapshot into metric families."""

    def __init__(self, snapshot: Snapshot, clock: Callable[[], float] = time.time) -> None:
        self.snapshot = snapshot
        self.clock = clock
        self._last_delivered: tuple[float, int] | None = None
        self._rate = 0.0  # events/s acknowledged by the fleet, smoothed

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        if not snap.published:
            return
        now = self.clock()
        store, uplink, daemon = snap.store, snap.uplink.counters, snap.daemon.counters
        # Frame gaps over every controller's link.
        link = {"gaps": sum(k.counters.get("gaps", 0) for k in snap.controllers)}

        yield from self._replay(store, link, uplink)
        yield from self._buffer(snap, store, uplink, now)
        yield from _serial(snap)
        yield from self._transport(snap, uplink, daemon, store)

    def _replay(self, store: Counters, link: Counters, uplink: Counters) -> Iterator[Metric]:
        yield gauge(
            "ironfleet_replay_event_loss_ratio",
            "Events that can no longer reach the fleet (shed before their ack, lost to a "
            "salvage, skipped sequence numbers given up) over events received.",
            store.get("loss_ratio", 0.0),
        )
        lost = CounterMetricFamily(
            "ironfleet_events_lost",
            "Events that can no longer reach the fleet, by reason (the loss ratio's numerator).",
            labels=["reason"],
        )
        for key, value in sorted(store.items()):
            if key.startswith("loss_shed_"):
                lost.add_metric([key.removeprefix("loss_shed_")], value)
        lost.add_metric(["gap_given_up"], store.get("loss_gap_lost", 0))
        yield lost
        yield counter(
            "ironfleet_replay_convergence_failures",
            "Compacted replays the fleet did not acknowledge in time (resent).",
            uplink.get("convergence_failures", 0),
        )
        gaps = CounterMetricFamily(
            "ironfleet_telemetry_gaps",
            "Gaps by type: stream (a controller skipped sequence numbers), link (frames), "
            "replay (compacted-replay batches the fleet never acknowledged).",
            labels=["type"],
        )
        gaps.add_metric(["stream"], store.get("gaps_opened", 0))
        gaps.add_metric(["link"], link.get("gaps", 0))
        gaps.add_metric(["replay"], uplink.get("replay_batches_unacked", 0))
        yield gaps
        yield counter(
            "ironfleet_mission_state_inconsistency",
            "Streams whose replayed state was older than what the fleet had acknowledged "
            "(the state would have moved backwards).",
            uplink.get("state_backwards", 0),
        )
        yield counter(
            "ironfleet_uplink_duplicate_acks",
            "Fleet acks for a batch already acknowledged or no longer awaited (two collectors, "
            "a redelivery), ignored.",
            store.get("acks_stale", 0) + uplink.get("acks_stale", 0),
        )

    def _buffer(
        self, snap: LiveState, store: Counters, uplink: Counters, now: float
    ) -> Iterator[Metric]:
        events = store.get("events", 0)
        yield gauge("ironfleet_buffer_events", "Events held in the local store.", events)
        yield gauge("ironfleet_buffer_bytes", "Bytes of database pages in use.",
                    store.get("used_bytes", 0))  # fmt: skip
        oldest = store.get("oldest_unacked_received_at", 0.0)
        yield gauge(
            "ironfleet_oldest_unacked_age_seconds",
            "Age of the oldest event the fleet has not acknowledged (0 when none).",
            max(0.0, now - oldest) if oldest else 0.0,
        )
        delivered = snap.uplink.delivered
        cursor = int(store.get("cursor", 1))
        top = int(store.get("top_rowid", 0))
        lag = max(0, top - max(delivered, cursor - 1))
        if self._last_delivered is not None and now > self._last_delivered[0]:
            rate = (delivered - self._last_delivered[1]) / (now - self._last_delivered[0])
            self._rate = rate if self._rate == 0 else 0.7 * self._rate + 0.3 * rate
        self._last_delivered = (now, delivered)
        yield gauge("ironfleet_uplink_lag_events", "Stored events not yet acknowledged.", lag)
        yield gauge(
            "ironfleet_checkpoint_lag_events",
            "Events between the persisted checkpoint cursor and the newest stored event.",
            max(0, top - (cursor - 1)),
        )
        yield gauge(
            "ironfleet_estimated_drain_seconds",
            "Backlog divided by the recent delivery rate (+Inf while nothing is delivered).",
            0.0 if lag == 0 else (lag / self._rate if self._rate > 0 else math.inf),
        )
        yield gauge(
            "ironfleet_uplink_contact_bytes",
            "Bytes published in the current contact window ([uplink] max_bytes_per_contact; "
            "0 without a quota or an open window).",
            uplink.get("contact_bytes", 0),
        )
        rate, sent = uplink.get("budget_bytes_per_second", 0), uplink.get("events_sent", 0)
        if rate and sent >= 1000:  # bytes an event takes, as the uplink counted them
            yield gauge(
                "ironfleet_estimated_drain_seconds_at_budget",
                "Backlog bytes (events not acknowledged x bytes an event took on the wire) "
                "divided by [uplink] max_bytes_per_second.",
                lag * uplink.get("event_bytes_sent", 0) / sent / rate,
            )

    def _transport(
        self,
        snap: LiveState,
        uplink: Counters,
        daemon: Counters,
        store: Counters,
    ) -> Iterator[Metric]:
        breaker = GaugeMetricFamily(
            "ironfleet_uplink_breaker_state", "Circuit breaker state (1 = current).",
            labels=["state"],
        )  # fmt: skip
        current = snap.breaker.state
        for state in BREAKER_STATES:
            breaker.add_metric([state], 1.0 if current == state else 0.0)
        yield breaker
        yield gauge("ironfleet_uplink_connected", "1 while connected to the broker.",
                    1.0 if snap.uplink.state == "connected" else 0.0)  # fmt: skip
        batches = uplink.get("batches_sent", 0) + uplink.get("state_batches_sent", 0)
        yield counter("ironfleet_uplink_batches", "Batches published (state, events).", batches)
        yield counter("ironfleet_uplink_events", "Events published (resends included).",
                      uplink.get("events_sent", 0))  # fmt: skip
        yield counter("ironfleet_uplink_ack_timeouts", "Batches whose fleet ack was overdue.",
                      uplink.get("ack_timeouts", 0))  # fmt: skip
        shed = CounterMetricFamily(
            "ironfleet_shed_events", "Events removed by the buffer policy before the fleet "
            "acknowledged them, by reason.", labels=["reason"],
        )  # fmt: skip
        for reason in (COMPACT_LOW_PRIORITY, DROP_OLDEST):
            shed.add_metric([reason], store.get(f"shed_{reason}", 0))
        yield shed
        yield counter("ironfleet_events_committed", "Events committed by this process.",
                      daemon.get("events_committed", 0))  # fmt: skip
        yield counter("ironfleet_commit_failures", "Commits that failed (nothing ACKed).",
                      daemon.get("commit_failures", 0))  # fmt: skip
        yield counter("ironfleet_store_duplicates", "Events the store skipped as already stored.",
                      store.get("duplicates", 0))  # fmt: skip
        yield from _flash(store)


def _serial(snap: LiveState) -> Iterator[Metric]:
    """Each controller's link, labelled by its [[serial]] entry's name (from the
    configuration, at most MAX_LINKS: never by what a controller announces)."""
    up = GaugeMetricFamily("ironfleet_serial_link_up", "1 while the controller link is up.",
                           labels=["controller"])  # fmt: skip
    frames = CounterMetricFamily("ironfleet_serial_frames", "Serial frames by outcome.",
                                 labels=["controller", "outcome"])  # fmt: skip
    for k in snap.controllers:
        up.add_metric([k.name], 1.0 if k.state == "up" else 0.0)
        frames.add_metric([k.name, "accepted"], k.frames_accepted)
        for outcome in FRAME_OUTCOMES:
            frames.add_metric([k.name, outcome], k.rejects.get(outcome, 0))
    yield up
    yield frames


def _flash(store: Counters) -> Iterator[Metric]:
    """Flash wear (agent/flashwear.py); a figure not known yet is left out, not 0."""
    if "flash_write_bytes" in store:
        yield counter("ironfleet_flash_write_bytes", "Bytes this process sent to storage "
                      "(/proc/self/io write_bytes) since it started.",
                      store["flash_write_bytes"])  # fmt: skip
    if "flash_bytes_per_event" in store:
        yield gauge("ironfleet_flash_bytes_per_event", "Bytes written per committed event "
                    "over the last 10 minutes (WAL and checkpoints included).",
                    store["flash_bytes_per_event"])  # fmt: skip
    if "flash_years_left" in store:
        yield gauge("ironfleet_flash_years_left", "Years until [store] flash_endurance_bytes "
                    "at the write rate of the last 10 minutes.",
                    store["flash_years_left"])  # fmt: skip


class Metrics:
    """Owns the registry, the optional HTTP endpoint and the optional textfile."""

    def __init__(self, snapshot: Snapshot, *, host: str, port: int | None, textfile: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(snapshot))
        self.textfile = textfile
        self.server: Any = None
        if port is not None:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
            log.info("metrics_listening address=%s:%d", host, port)

    def write_textfile(self) -> None:
        """Atomically (re)write the node_exporter textfile."""
        if self.textfile:
            try:
                write_to_textfile(self.textfile, self.registry)
            except OSError as exc:
                log.warning("metrics_textfile_failed path=%s error=%r", self.textfile, str(exc))

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
