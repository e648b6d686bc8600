"""`ironfleet-agent`: the daemon. Serial ingest, group commit, ACK after commit.

Threads (joined by bounded queues, agent/channels.py; DESIGN.md "Process"):
- serial (agent/serial_side.py): owns the port and the link; hands received events to
  the writer, and ACKs what the writer reports durable;
- writer (agent/writer.py): the store's only user; gathers whatever is queued (group
  commit), commits, reports the batch durable (or not), runs the eviction ladder and
  publishes live state;
- uplink (agent/uplink_side.py): MQTT, resync, breaker;
- main (here): signals (handlers only set flags), reload, shutdown, watchdog.

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
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from agent import config as config_mod
from agent import filecheck
from agent.channels import Channels, Shared, Waker
from agent.config import Config
from agent.errors import AgentError, ConfigError
from agent.metrics import Metrics
from agent.notify import Notifier
from agent.serial_side import SerialSide
from agent.store import EventStore
from agent.uplink_side import UplinkSide
from agent.version import agent_version
from agent.writer import Writer, store_config

log = logging.getLogger("agent.daemon")

STOP_TIMEOUT = 5.0  # seconds to commit and ACK what is pending at shutdown


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
            "agent_started version=%s vehicle=%s database=%s device=%s synchronous=%s events=%d",
            agent_version(),
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {agent_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="TOML configuration file")
    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("--config", required=True, help="TOML configuration file")
    return parser


def check_config(path: str, config: Config) -> int:
    """`check-config` after the file loaded: every file problem on stderr, then ok (0) or 2."""
    findings = filecheck.check_all(config) + filecheck.check_present(config)
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
