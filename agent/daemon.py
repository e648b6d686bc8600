"""`ironfleet-agent`: the daemon. Serial ingest, group commit, ACK after commit.

Threads (joined by bounded queues, DESIGN.md "Process"):
- serial: owns the port and the link; hands received events to the writer, and ACKs
  what the writer reports durable;
- writer: the store's only user; gathers whatever is queued (group commit), commits,
  reports the batch durable (or not), runs the eviction ladder and publishes live state;
- main: signals (handlers only set flags), reload, shutdown.

A batch is reported durable only after `EventStore.append` returned, i.e. after COMMIT
with synchronous=FULL; a failed commit reports the batch as not stored, so its events
are never ACKed and the controller resends them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import queue
import select
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from agent import config as config_mod
from agent import filecheck
from agent.config import Config
from agent.errors import AgentError, CommitFailed, ConfigError, StoreFull
from agent.fleet_auth import load_fleet_auth
from agent.metrics import Metrics
from agent.notify import Notifier
from agent.resilience import Backoff, CircuitBreaker
from agent.resync import FleetSync, Resync
from agent.store import EventStore, StoreConfig, connect
from agent.uplink import MqttTransport
from firmware_bridge.link import AgentLink, Received, Token
from firmware_bridge.serial_port import PortState, SerialPort

log = logging.getLogger("agent.daemon")

PUBLISH_INTERVAL = 1.0  # seconds between live-state writes for the CLI
SPACE_CHECK_INTERVAL = 1.0  # seconds between eviction-ladder checks
STOP_TIMEOUT = 5.0  # seconds to commit and ACK what is pending at shutdown


def store_config(config: Config) -> StoreConfig:
    """The store's knobs from the [store] section."""
    s = config.store
    return StoreConfig(
        synchronous=s.synchronous.upper(),
        max_buffer_bytes=s.max_buffer_bytes,
        min_free_bytes=s.min_free_bytes,
        high_water=s.high_water,
        low_water=s.low_water,
        low_priority_max=s.low_priority_max,
        max_cached_streams=s.max_cached_streams,
    )


@dataclass
class Shared:
    """State both threads read: flags and counters (single writers, GIL-atomic updates)."""

    stop_reading: threading.Event = field(default_factory=threading.Event)
    writer_done: threading.Event = field(default_factory=threading.Event)
    alarm: str = ""
    store_full: bool = False
    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("batches", "events_committed", "commit_failures", "batches_rejected"), 0
        )
    )


class Waker:
    """A self-pipe: the writer wakes the serial thread the moment a batch is durable."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.write_fd, b"x")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read_fd, 4096):
                pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


Task = Callable[[EventStore], None]  # work for the writer thread (the store's only user)


@dataclass(frozen=True)
class Delivered:
    """The fleet holds every row up to `upto`; the writer persists it (coalesced)."""

    upto: int
    positions: dict[str, tuple[int, int]]


@dataclass
class Channels:
    """What joins the threads: the bounded hand-over queue, reports, wake-up, flags."""

    to_writer: queue.Queue[list[Received]]
    reports: queue.Queue[tuple[bool, list[Token]]]
    waker: Waker
    shared: Shared
    # Small, rare writes from other threads (uplink checkpoints). Unbounded on purpose:
    # at most one per acknowledged batch, and the uplink thread must never block on it.
    tasks: queue.Queue[Task | Delivered] = field(default_factory=queue.Queue)


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


class Writer:
    """The writer thread's work, steppable: `run_once(now)` commits one group."""

    def __init__(
        self, store: EventStore, config: Config, channels: Channels, serial: SerialSide
    ) -> None:
        self.store = store
        self.config = config
        self.to_writer = channels.to_writer
        self.tasks = channels.tasks
        self.reports = channels.reports
        self.waker = channels.waker
        self.shared = channels.shared
        self.serial = serial
        self.uplink: UplinkSide | None = None
        self.last_state: dict[str, str] = {}
        self._next_publish = 0.0
        self._next_space = 0.0
        self._failure_streak = 0

    def run_once(self, now: float, timeout: float = 0.1) -> bool:
        """Run queued tasks, then commit whatever is queued (waiting up to `timeout`)."""
        self._run_tasks()
        try:
            first = self.to_writer.get(timeout=timeout)
        except queue.Empty:
            self._housekeeping(now)
            return False
        groups = [first]
        count = len(first)
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
            count += len(group)
        self._commit(groups)
        self._housekeeping(time.monotonic())
        return True

    def _run_tasks(self) -> None:
        # Deliveries are coalesced: one durable commit for all acks that arrived since
        # the last one (a full-sync commit per ack cost 0.9 s per 100k events).
        upto = -1
        positions: dict[str, tuple[int, int]] = {}
        while True:
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                break
            if isinstance(task, Delivered):
                upto = max(upto, task.upto)
                for stream, pos in task.positions.items():
                    if pos > positions.get(stream, (-1, -1)):
                        positions[stream] = pos
                continue
            try:
                task(self.store)
            except AgentError as exc:
                log.warning("writer_task_failed error=%r", str(exc))
        if upto >= 0:
            try:
                self.store.mark_delivered(upto, positions)
            except AgentError as exc:
                log.warning("checkpoint_persist_failed error=%r (will retry)", str(exc))
                self.tasks.put(Delivered(upto, positions))

    def _commit(self, groups: list[list[Received]]) -> None:
        arrivals = [r for g in groups for r in g]
        try:
            self._append(arrivals)
        except (CommitFailed, StoreFull) as exc:
            self.shared.counters["commit_failures"] += 1
            self.shared.counters["batches_rejected"] += len(groups)
            self._failure_streak += 1
            level = logging.WARNING if self._failure_streak == 1 else logging.DEBUG
            log.log(level, "commit_failed events=%d error=%r (not ACKed)", len(arrivals), str(exc))
            self.shared.alarm = f"commit failed: {exc}"
            for g in groups:
                self.reports.put((False, [r.token for r in g]))
            self.waker.wake()
            time.sleep(min(0.05 * self._failure_streak, 1.0))  # a failing disk: back off
            return
        if self._failure_streak:
            log.info("commit_recovered after_failures=%d", self._failure_streak)
            self._failure_streak = 0
            self.shared.alarm = ""
        self.shared.counters["batches"] += 1
        self.shared.counters["events_committed"] += len(arrivals)
        for g in groups:
            self.reports.put((True, [r.token for r in g]))
        self.waker.wake()

    def _append(self, arrivals: Sequence[Received]) -> None:
        try:
            self.store.append(arrivals)
            self.shared.store_full = False
        except StoreFull:
            # At the hard cap: run the ladder now and try once more before refusing.
            try:
                room = self.store.make_room()
            except (OSError, sqlite3.Error) as exc:
                raise CommitFailed(f"eviction failed: {exc}") from exc
            if not room:
                self.shared.store_full = True
                raise
            self.store.append(arrivals)

    def _housekeeping(self, now: float) -> None:
        if now >= self._next_space:
            self._next_space = now + SPACE_CHECK_INTERVAL
            try:
                if self.store.needs_room() and not self.store.make_room():
                    if not self.shared.store_full:
                        log.error(
                            "store_full: nothing left to evict; ACKs stop until space returns"
                        )
                    self.shared.store_full = True
            except OSError as exc:
                log.warning("space_check_failed error=%r", str(exc))
        if now >= self._next_publish:
            self._next_publish = now + PUBLISH_INTERVAL
            self._publish()

    def _publish(self) -> None:
        try:
            self._publish_state()
        except (OSError, sqlite3.Error) as exc:  # a flaky disk must not kill the writer
            log.debug("publish_failed error=%r", str(exc))

    def _publish_state(self) -> None:
        link = self.serial.link
        state = {
            "link.state": str(link.state),
            "link.controller": link.controller_id or "",
            "link.boot_epoch": str(link.boot_epoch if link.boot_epoch is not None else ""),
            "link.port": str(self.serial.port.state),
            "link.device": self.serial.port.device or "",
            "link.counters": json.dumps(link.counters, sort_keys=True),
            "link.rejects": json.dumps(link.decoder.rejects, sort_keys=True),
            "link.frames_accepted": str(link.decoder.accepted),
            "store.stats": json.dumps(self.store.stats(), sort_keys=True),
            "daemon.counters": json.dumps(self.shared.counters, sort_keys=True),
            "daemon.alarm": self.shared.alarm or ("store full" if self.shared.store_full else ""),
            **(self.uplink.state() if self.uplink is not None else {"uplink.state": "disabled"}),
            "daemon.pid": str(os.getpid()),
            "daemon.stopped_at": "",
            "daemon.heartbeat": f"{time.time():.3f}",
        }
        self.last_state = state  # metrics read this snapshot (never the writer's connection)
        try:
            self.store.publish(state)
        except CommitFailed as exc:
            log.debug("publish_failed error=%r", str(exc))

    def drain(self) -> None:
        """Commit everything still queued, run pending tasks (shutdown)."""
        while self.run_once(time.monotonic(), timeout=0.0):
            pass
        self._run_tasks()


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


class Daemon:
    """The agent process: wires store, serial side and writer; runs until stopped."""

    def __init__(self, config: Config, flags: dict[str, bool] | None = None) -> None:
        self.config = config
        self.shared = Shared()
        self.waker = Waker()
        channels = Channels(
            queue.Queue(config.store.queue_max_batches), queue.Queue(), self.waker, self.shared
        )
        self.channels = channels
        os.makedirs(config.agent.state_dir, exist_ok=True)
        # SQLite follows symlinks: lstat right before the open, and check after it that
        # the file this process holds is the one at the path (docs/operations.md).
        before = filecheck.stat_before_open(config.database)
        self.store = EventStore(config.database, store_config(config))
        # (A quarantine renamed the checked file away: the fresh one is new, not swapped.)
        filecheck.verify_opened(config.database, None if self.store.quarantined else before)
        if self.store.quarantined:
            self.shared.alarm = f"database quarantined to {self.store.quarantined}"
        self.serial = SerialSide(config, channels)
        self.writer = Writer(self.store, config, channels, self.serial)
        self.uplink = UplinkSide(config, channels) if config.uplink.enabled else None
        self.writer.uplink = self.uplink
        self._uplink_stop = threading.Event()
        self.flags = flags if flags is not None else {"stop": False, "reload": False}
        self.notifier = Notifier()
        m = config.metrics
        self.metrics = (
            Metrics(
                lambda: self.writer.last_state,
                host=m.host,
                port=m.port if m.enabled else None,
                textfile=m.textfile,
            )
            if m.enabled or m.textfile
            else None
        )
        now = time.monotonic()
        # When each loop last finished an iteration: the watchdog pings only while all
        # of them make progress (a free-running ping thread would hide a stuck loop).
        self.progress: dict[str, float] = {"serial": now, "writer": now}
        if self.uplink is not None:
            self.progress["uplink"] = now
        self._threads: list[threading.Thread] = []
        self._serial_stop = threading.Event()
        self._reading_stopped = threading.Event()
        self._writer_stop = threading.Event()

    def _serial_loop(self) -> None:
        self.serial.start(time.monotonic())
        while not self._serial_stop.is_set():
            self.serial.run_once(time.monotonic())
            self.progress["serial"] = time.monotonic()
        # Nothing more is handed to the writer after this point (its drain waits for it).
        self._reading_stopped.set()
        # Shutdown: wait for the writer's last reports and send their ACKs.
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and (
            not self.shared.writer_done.is_set() or self.serial.in_flight > 0
        ):
            self.serial.run_once(time.monotonic(), timeout=0.01)
            if self.shared.writer_done.is_set() and self.reports_drained():
                break  # what is still queued will never commit: unACKed, resent later
        self.serial.run_once(time.monotonic(), timeout=0.0)
        self.serial.close()

    def reports_drained(self) -> bool:
        return self.channels.reports.empty()

    def _uplink_loop(self) -> None:
        assert self.uplink is not None
        while not self._uplink_stop.is_set():
            self.uplink.run_once(time.monotonic())
            self.progress["uplink"] = time.monotonic()
        self.uplink.close()

    def _writer_loop(self) -> None:
        while not self._writer_stop.is_set():
            self.writer.run_once(time.monotonic())
            self.progress["writer"] = time.monotonic()
        # Keep committing until the serial side has stopped handing over (a batch it read
        # just before the stop must be committed and ACKed, not stranded).
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and not self._reading_stopped.is_set():
            self.writer.run_once(time.monotonic(), timeout=0.01)
        self.writer.drain()
        self.writer._publish()
        self.shared.writer_done.set()
        self.waker.wake()

    def start(self) -> None:
        loops = [("serial", self._serial_loop), ("writer", self._writer_loop)]
        if self.uplink is not None:
            loops.append(("uplink", self._uplink_loop))
        for name, target in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "agent_started vehicle=%s database=%s device=%s synchronous=%s events=%d",
            self.config.agent.vehicle_id,
            self.config.database,
            self.config.serial.device,
            self.config.store.synchronous,
            self.store.event_count,
        )

    def stop(self) -> None:
        """Stop reading, commit and ACK what is pending, close cleanly."""
        log.info("agent_stopping")
        self.shared.stop_reading.set()
        self._serial_stop.set()
        # The uplink stops first, so the checkpoints it reported reach the writer's drain.
        self._uplink_stop.set()
        for t in self._threads:
            if t.name == "uplink":
                t.join(timeout=STOP_TIMEOUT + 1)
        self._writer_stop.set()
        for t in self._threads:
            t.join(timeout=STOP_TIMEOUT + 1)
        # The loops are gone: say so, or the CLI would show the last live values forever.
        with contextlib.suppress(AgentError):
            self.store.publish(
                {
                    "daemon.stopped_at": f"{time.time():.3f}",
                    "link.state": "down",
                    "link.port": "closed",
                    "uplink.state": "disconnected" if self.uplink is not None else "disabled",
                }
            )
        self.store.close()
        self.waker.close()
        log.info("agent_stopped")

    def reload(self) -> None:
        """SIGHUP: re-read the file; apply what can change live (log level)."""
        try:
            fresh = config_mod.load(self.config.source)
        except ConfigError as exc:
            log.error("reload_failed %s (keeping the running configuration)", exc)
            return
        logging.getLogger().setLevel(fresh.agent.log_level.upper())
        log.info("reloaded log_level=%s", fresh.agent.log_level.upper())
        # Everything but log_level needs a restart: say so rather than ignore it silently.
        live = dataclasses.replace(fresh.agent, log_level=self.config.agent.log_level)
        if dataclasses.replace(fresh, agent=live, source=self.config.source) != self.config:
            log.warning("reload_needs_restart: only log_level applies live; restart for the rest")

    def run(self) -> int:
        """Main loop: react to flags set by signal handlers; talk to systemd."""
        self.start()
        # READY only now: the database is open, recovery done, the loops running.
        self.notifier.ready(self.status_text())
        next_status = 0.0
        next_ping = 0.0
        next_textfile = time.monotonic() + 2.0  # after the first publish
        interval = self.notifier.watchdog_interval
        while not self.flags["stop"]:
            now = time.monotonic()
            if self.flags["reload"]:
                self.flags["reload"] = False
                self.reload()
            if not all(t.is_alive() for t in self._threads):
                log.error("thread_died; stopping so systemd restarts us")
                self.stop()
                return 1
            if interval is not None and now >= next_ping:
                next_ping = now + interval / 4
                stalled = self.stalled_loops(now, interval / 2)
                if stalled:
                    # No ping: if the loop stays stuck, systemd kills and restarts us.
                    log.warning("watchdog_withheld stalled=%s", ",".join(stalled))
                else:
                    self.notifier.watchdog()
            if now >= next_status:
                next_status = now + 5.0
                self.notifier.status(self.status_text())
            if self.metrics is not None and now >= next_textfile:
                next_textfile = now + self.config.metrics.textfile_interval
                self.metrics.write_textfile()
            time.sleep(0.05)
        self.notifier.stopping()
        self.stop()
        if self.metrics is not None:
            self.metrics.write_textfile()
            self.metrics.close()
        return 0

    def stalled_loops(self, now: float, limit: float) -> list[str]:
        """Loops that have not completed an iteration within `limit` seconds."""
        return [name for name, at in self.progress.items() if now - at > limit]

    def status_text(self) -> str:
        """One line for `systemctl status`: link, backlog, breaker."""
        link = self.serial.link
        # From the published snapshot: the uplink's connection belongs to its thread.
        snap = self.writer.last_state
        stats = json.loads(snap.get("store.stats", "{}") or "{}")
        backlog = max(0, int(stats.get("top_rowid", 0)) - int(stats.get("cursor", 1)) + 1)
        breaker = snap.get("breaker.state", "disabled" if self.uplink is None else "-")
        text = (
            f"link={link.state} controller={link.controller_id or '-'} "
            f"events={self.store.event_count} backlog={backlog} breaker={breaker}"
        )
        # The alarm also goes here: while the disk is full the database cannot show it.
        alarm = self.shared.alarm
        return f"{text} ALARM: {alarm}" if alarm else text


def setup_logging(level: str) -> None:
    """key=value lines on stdout, for journald."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ironfleet-agent",
        description="IronFleet edge agent: serial ingest, durable buffer, fleet uplink.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="TOML configuration file")
    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("--config", required=True, help="TOML configuration file")
    return parser


def check_config(path: str, config: Config) -> int:
    """`check-config` after the file loaded: every file problem on stderr, then ok (0) or 2."""
    findings = filecheck.check_all(config)
    for finding in findings:
        print(f"ironfleet-agent: {finding}", file=sys.stderr)
    if filecheck.refusals(findings):
        return 2
    print(f"{path}: ok (database {config.database}, device {config.serial.device})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `ironfleet-agent`."""
    args = build_parser().parse_args(argv)
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"ironfleet-agent: {exc}", file=sys.stderr)
        if args.command == "check-config":  # all problems in one run: the file's own too
            for finding in filecheck.check_config_file(Path(args.config), euid=os.geteuid()):
                print(f"ironfleet-agent: {finding}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        return check_config(args.config, config)
    setup_logging(config.agent.log_level)
    flags = {"stop": False, "reload": False}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only set flags: the main loop acts on them (installed before recovery starts,
        # so a SIGTERM during a long start-up is still a clean stop).
        if signum in (signal.SIGTERM, signal.SIGINT):
            flags["stop"] = True
        elif signum == signal.SIGHUP:
            flags["reload"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        # Files first: a refused file is left untouched (nothing created or opened).
        for finding in filecheck.refuse_unsafe(config):
            log.warning("file_check %s", finding)
        daemon = Daemon(config, flags)
    except filecheck.UnsafeFile as exc:
        log.error("start_refused %s", exc)
        return 2
    except AgentError as exc:
        log.error("start_failed error=%r", str(exc))
        return 1
    return daemon.run()


if __name__ == "__main__":
    raise SystemExit(main())
