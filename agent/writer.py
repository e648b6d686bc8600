"""The writer thread's work: the store's only user.

It gathers whatever is queued (group commit), commits, reports each group durable (or
not), persists fleet acknowledgements, runs the eviction ladder and publishes live state.
A group is reported durable only after `EventStore.append` returned, i.e. after COMMIT
with synchronous=FULL; a failed commit reports it as not stored, so its events are never
ACKed and the controller resends them. Steppable: `run_once(now)` commits one group.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from agent.channels import Channels, Delivered, Handover
from agent.config import Config
from agent.errors import AgentError, CommitFailed, StoreFull
from agent.flashwear import FlashWear, process_write_bytes
from agent.identity import boot_id, host_name
from agent.livestate import (
    BreakerLive,
    DaemonLive,
    LinkLive,
    LiveState,
    UplinkLive,
    encode,
    file_id,
    write_file,
)
from agent.resilience.checkpoint import CheckpointCadence
from agent.serial_side import SerialSide
from agent.store import EventStore
from agent.uplink_side import UplinkSide
from firmware_bridge.link import Received

log = logging.getLogger("agent.daemon")

PUBLISH_INTERVAL = 1.0  # seconds between live-state writes for the CLI
SPACE_CHECK_INTERVAL = 1.0  # seconds between eviction-ladder checks
TTL_CHECK_INTERVAL = 10.0  # seconds between scans for events past their TTL


class Writer:
    """The writer thread's work, steppable: `run_once(now)` commits one group."""

    def __init__(
        self, store: EventStore, config: Config, channels: Channels, sides: list[SerialSide]
    ) -> None:
        self.store = store
        self.config = config
        self.to_writer = channels.to_writer
        self.tasks = channels.tasks
        self.ports = channels.ports
        self.shared = channels.shared
        self.sides = sides
        self.uplink: UplinkSide | None = None
        self.last_live = LiveState()
        self.flash = FlashWear()
        self._live_file_failed = False
        self._next_publish = 0.0
        self._next_space = 0.0
        self._next_ttl = 0.0
        self._failure_streak = 0
        self.retry_at = 0.0  # monotonic time before which no commit is tried (backoff)
        # What the fleet acknowledged and the store has not persisted yet (coalesced).
        self._cadence = CheckpointCadence()
        self._delivered = -1
        self._frontiers: list[int] = []
        self._positions: dict[str, tuple[int, int]] = {}

    def run_once(self, now: float, timeout: float = 0.1) -> bool:
        """Run queued tasks, then commit whatever is queued (waiting up to `timeout`).

        After a failed commit nothing is taken from the queue until `retry_at`: the
        caller's loop waits (`pause`); the writer itself never sleeps."""
        self._run_tasks(now)
        if now < self.retry_at:
            self._housekeeping(now)
            return False
        try:
            first = self.to_writer.get(timeout=timeout)
        except queue.Empty:
            self._housekeeping(now)
            return False
        groups = [first]
        count = len(first.items)
        delay = self.config.store.commit_delay_ms / 1000.0
        deadline = time.monotonic() + delay
        while count < self.config.store.commit_max_events:
            try:
                wait = deadline - time.monotonic()
                group = (
                    self.to_writer.get(timeout=wait) if wait > 0 else self.to_writer.get_nowait()
                )
            except queue.Empty:
                break
            groups.append(group)
            count += len(group.items)
        self._commit(groups)
        self._housekeeping(time.monotonic())
        return True

    def pause(self, now: float) -> float:
        """Seconds the caller's loop should wait before the next `run_once` (0: none)."""
        return max(0.0, self.retry_at - now)

    def _run_tasks(self, now: float | None = None, *, flush: bool = False) -> None:
        """Run queued tasks; persist fleet acks when the cadence says so (or `flush`)."""
        at = time.monotonic() if now is None else now
        while True:
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                break
            if isinstance(task, Delivered):
                if task.upto > self._delivered:
                    self._cadence.acked(task.upto - max(self._delivered, 0), at)
                    self._delivered = task.upto
                if task.frontiers:
                    held = self._frontiers or task.frontiers
                    ahead = [max(a, b) for a, b in zip(held, task.frontiers, strict=True)]
                    if ahead != self._frontiers:
                        # A class drained ahead of the cursor: persisted on the same
                        # cadence, so the ladder and the TTL count its rows as held.
                        self._cadence.acked(1, at)
                        self._frontiers = ahead
                positions = self._positions
                for stream, pos in task.positions.items():
                    if pos > positions.get(stream, (-1, -1)):
                        positions[stream] = pos
                continue
            try:
                task(self.store)
            except AgentError as exc:
                log.warning("writer_task_failed error=%r", str(exc))
        if self._cadence.pending and (flush or self._cadence.due(at)):
            self._persist_delivery()

    def _persist_pending(self) -> None:
        """Persist waiting fleet acks now (before the ladder prunes acked rows)."""
        if self._cadence.pending:
            self._persist_delivery()

    def _persist_delivery(self) -> None:
        """One durable commit for every fleet ack since the last (CheckpointCadence)."""
        try:
            self.store.mark_delivered(self._delivered, self._positions, frontiers=self._frontiers)
        except AgentError as exc:
            log.warning("checkpoint_persist_failed error=%r (will retry)", str(exc))
            return  # kept, and tried again at the next due time
        self._positions = {}
        self._cadence.persisted()

    def _report(self, groups: list[Handover], durable: bool) -> None:
        """Tell each group's serial thread whether its events are durable, and wake it."""
        for g in groups:
            self.ports[g.port].reports.put((durable, [r.token for r in g.items]))
        for port in {g.port for g in groups}:
            self.ports[port].waker.wake()

    def _commit(self, groups: list[Handover]) -> None:
        arrivals = [r for g in groups for r in g.items]
        try:
            self._append(arrivals)
        except (CommitFailed, StoreFull) as exc:
            self.shared.counters["commit_failures"] += 1
            self.shared.counters["batches_rejected"] += len(groups)
            self._failure_streak += 1
            level = logging.WARNING if self._failure_streak == 1 else logging.DEBUG
            log.log(level, "commit_failed events=%d error=%r (not ACKed)", len(arrivals), str(exc))
            self.shared.alarm = f"commit failed: {exc}"
            self._report(groups, False)
            # A failing disk: back off, 50 ms more per failure in a row, at most 1 s.
            self.retry_at = time.monotonic() + min(0.05 * self._failure_streak, 1.0)
            return
        if self._failure_streak:
            log.info("commit_recovered after_failures=%d", self._failure_streak)
            self._failure_streak = 0
            self.shared.alarm = ""
        self.shared.counters["batches"] += 1
        self.shared.counters["events_committed"] += len(arrivals)
        self._report(groups, True)

    def _append(self, arrivals: Sequence[Received]) -> None:
        try:
            self.store.append(arrivals)
            self.shared.store_full = False
        except StoreFull:
            # At the hard cap: run the ladder now and try once more before refusing.
            try:
                room = self.store.make_room(before=self._persist_pending)
            except (OSError, sqlite3.Error) as exc:
                raise CommitFailed(f"eviction failed: {exc}") from exc
            if not room:
                if not self.shared.store_full:  # once per episode, as the space check logs it
                    log.error("store_full: nothing left to evict; ACKs stop until room returns")
                self.shared.store_full = True
                raise
            self.store.append(arrivals)

    def _housekeeping(self, now: float) -> None:
        if now >= self._next_space:
            self._next_space = now + SPACE_CHECK_INTERVAL
            try:
                # Acked rows are the ladder's first, lossless step: persist them first.
                if self.store.needs_room() and not self.store.make_room(
                    before=self._persist_pending
                ):
                    if not self.shared.store_full:
                        log.error("store_full: nothing left to evict; ACKs stop until room returns")
                    self.shared.store_full = True
            except OSError as exc:
                log.warning("space_check_failed error=%r", str(exc))
        if now >= self._next_ttl and (
            self.store.config.ttl_seconds or self.store.config.ttl_low_seconds
        ):
            self._next_ttl = now + TTL_CHECK_INTERVAL
            try:
                self._persist_pending()  # what the fleet holds is not shed as expired
                self.store.expire(time.time())  # received_at is wall-clock time
            except (OSError, sqlite3.Error) as exc:  # tried again at the next interval
                log.warning("expire_failed error=%r", str(exc))
        if now >= self._next_publish:
            self._next_publish = now + PUBLISH_INTERVAL
            self._publish()

    def _publish(self) -> None:
        """Publish the live snapshot to the database and the runtime file, each on its own:
        while the disk is full or read-only the file still shows the daemon and its alarm."""
        try:
            live = self.snapshot()
        except (OSError, sqlite3.Error) as exc:  # a flaky disk must not kill the writer
            log.debug("publish_failed error=%r", str(exc))
            return
        self.publish(live)

    def snapshot(self) -> LiveState:
        """The live state now (link, uplink, breaker, store figures, counters)."""
        links = tuple(self._link(side) for side in self.sides)
        uplink, breaker = (
            self.uplink.live() if self.uplink is not None
            else (UplinkLive(state="disabled"), BreakerLive(state="disabled"))
        )  # fmt: skip
        live_file = self.config.live_file
        return LiveState(
            database=os.path.realpath(self.config.database),
            database_id=file_id(self.config.database),
            runtime_file=str(live_file) if live_file is not None else "",
            daemon=DaemonLive(
                pid=os.getpid(),
                host=host_name(),
                boot_id=boot_id(),
                heartbeat=round(time.time(), 3),
                alarm=self.shared.alarm or ("store full" if self.shared.store_full else ""),
                counters=dict(self.shared.counters),
            ),
            link=links[0],
            links=links,
            uplink=uplink,
            breaker=breaker,
            store=self._store_figures() | self._flash(),
        )

    @staticmethod
    def _link(side: SerialSide) -> LinkLive:
        """One controller's link (plain attribute reads of the serial thread's objects)."""
        link = side.link
        return LinkLive(
            name=side.name,
            state=str(link.state),
            controller=link.controller_id or "",
            boot_epoch=link.boot_epoch,
            port=str(side.port.state),
            device=side.port.device or "",
            frames_accepted=link.decoder.accepted,
            counters=dict(link.counters),
            rejects={str(k): v for k, v in link.decoder.rejects.items()},
        )

    def _store_figures(self) -> dict[str, float]:
        """The store's figures; the last good ones when the disk fails the read, so the
        runtime file still shows a live daemon and its alarm (the reason it exists)."""
        try:
            return dict(self.store.stats())
        except (OSError, sqlite3.Error) as exc:
            log.debug("stats_failed error=%r (last figures kept)", str(exc))
            return dict(self.last_live.store)

    def _flash(self) -> dict[str, float]:
        """Flash wear figures (agent.flashwear) from this process's I/O counters."""
        committed = self.shared.counters["events_committed"]
        self.flash.sample(time.monotonic(), process_write_bytes(), committed)
        return self.flash.figures(self.config.store.flash_endurance_bytes)

    def publish(self, live: LiveState) -> None:
        """Write `live` to the database row and the runtime file; failures are logged."""
        self.last_live = live  # metrics read this snapshot (never the writer's connection)
        text = encode(live)
        try:
            self.store.publish(text)
        except (CommitFailed, OSError, sqlite3.Error) as exc:
            log.debug("publish_failed error=%r", str(exc))
        if live.runtime_file:
            try:
                write_file(Path(live.runtime_file), text)
            except OSError as exc:  # warned once; tried again every publish
                level = logging.DEBUG if self._live_file_failed else logging.WARNING
                self._live_file_failed = True
                log.log(level, "live_file_failed path=%s error=%r (views read the database "
                        "only)", live.runtime_file, str(exc))  # fmt: skip

    def drain(self) -> None:
        """Commit everything still queued, run pending tasks (shutdown)."""
        while self.run_once(time.monotonic(), timeout=0.0):
            pass
        self._run_tasks(flush=True)  # a clean stop persists every fleet ack
