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

import contextlib
import dataclasses
import functools
import logging
import os
import pwd
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Final

import click

from agent import config as config_mod
from agent import filecheck
from agent.channels import Channels, Port, Shared
from agent.config import Config
from agent.errors import AgentError, ConfigError
from agent.fleet_auth import key_fingerprint, keygen
from agent.metrics import Metrics
from agent.notify import Notifier
from agent.serial_side import SerialSide
from agent.store import EventStore
from agent.uplink_side import UplinkSide
from agent.version import DISTRIBUTION, agent_version
from agent.writer import Writer
from firmware_bridge.clickrun import run_click

log = logging.getLogger("agent.daemon")

STOP_TIMEOUT = 5.0  # seconds to commit and ACK what is pending at shutdown


class Daemon:
    """The agent process: wires store, serial side and writer; runs until stopped."""

    def __init__(self, config: Config, flags: dict[str, bool] | None = None) -> None:
        self.config = config
        self.pinned_level: str | None = None  # --log-level / -v: wins over the file
        self.shared = Shared()
        channels = Channels(
            queue.Queue(config.store.queue_max_batches),
            [Port() for _ in config.serials],
            self.shared,
        )
        self.channels = channels
        os.makedirs(config.agent.state_dir, exist_ok=True)
        if config.agent.runtime_dir:  # systemd makes it (RuntimeDirectory=); a shell may not
            try:
                os.makedirs(config.agent.runtime_dir, mode=0o750, exist_ok=True)
            except OSError as exc:
                log.warning("runtime_dir_unusable path=%s error=%r (the live snapshot goes to "
                            "the database only)", config.agent.runtime_dir, str(exc))  # fmt: skip
        # SQLite follows symlinks: lstat right before the open, and check after it that
        # the file this process holds is the one at the path (docs/operations.md).
        before = filecheck.stat_before_open(config.database)
        self.store = EventStore(config.database, config.store)
        # (A quarantine renamed the checked file away: the fresh one is new, not swapped.)
        filecheck.verify_opened(config.database, None if self.store.quarantined else before)
        if self.store.quarantined:
            self.shared.alarm = f"database quarantined to {self.store.quarantined}"
        self.sides = [SerialSide(config, channels, i) for i in range(len(config.serials))]
        self.serial = self.sides[0]
        self.writer = Writer(self.store, config, channels, self.sides)
        self.uplink = UplinkSide(config, channels) if config.uplink.enabled else None
        self.writer.uplink = self.uplink
        self.flags = flags if flags is not None else {"stop": False, "reload": False}
        self.notifier = Notifier()
        m = config.metrics
        self.metrics = (
            Metrics(
                lambda: self.writer.last_live,
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
        self.progress: dict[str, float] = {self._thread(s): now for s in self.sides}
        self.progress["writer"] = now
        if self.uplink is not None:
            self.progress["uplink"] = now
        self._threads: list[threading.Thread] = []
        self._handing = len(self.sides)  # serial loops still handing over (a stop)
        self._handing_lock = threading.Lock()

    def _thread(self, side: SerialSide) -> str:
        """A serial thread's name: `serial`, or `serial:<name>` with several controllers."""
        return "serial" if len(self.sides) == 1 else f"serial:{side.name}"

    def _serial_loop(self, side: SerialSide) -> None:
        shared = self.shared
        name = self._thread(side)
        try:
            side.start(time.monotonic())
            while not shared.stopping.is_set():
                side.run_once(time.monotonic())
                self.progress[name] = time.monotonic()
            # What was read but found no room yet goes to the writer (which still
            # commits); then nothing more is handed over (the writer's drain waits for
            # this point, when every serial loop has reached it).
            deadline = time.monotonic() + STOP_TIMEOUT
            while side.pending and time.monotonic() < deadline:
                side.run_once(time.monotonic(), timeout=0.05)
        finally:  # a loop that died counts as done handing over: the stop does not wait
            with self._handing_lock:
                self._handing -= 1
                if self._handing == 0:
                    shared.reading_done.set()
        # Shutdown: wait for the writer's last reports and send their ACKs.
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and (
            not self.shared.writer_done.is_set() or side.in_flight > 0
        ):
            side.run_once(time.monotonic(), timeout=0.01)
            if self.shared.writer_done.is_set() and side.reports.empty():
                break  # what is still queued will never commit: unACKed, resent later
        side.run_once(time.monotonic(), timeout=0.0)
        side.close()

    def _uplink_loop(self) -> None:
        assert self.uplink is not None
        while not self.shared.stopping.is_set():
            self.uplink.run_once(time.monotonic())
            self.progress["uplink"] = time.monotonic()
        self.uplink.close()

    def _writer_loop(self) -> None:
        # Past the stop, until the uplink thread is gone (STOP_TIMEOUT at most): the
        # checkpoints it reported on its way out must reach the drain below.
        asked: float | None = None
        while True:
            now = time.monotonic()
            if self.shared.stopping.is_set():
                asked = asked or now
                if not self._alive("uplink") or now - asked > STOP_TIMEOUT:
                    break
            self.writer.run_once(now)
            self.progress["writer"] = time.monotonic()
            time.sleep(self.writer.pause(time.monotonic()))  # a failing disk: its backoff
        # Keep committing until the serial side has stopped handing over (a batch it read
        # just before the stop must be committed and ACKed, not stranded).
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and not self.shared.reading_done.is_set():
            self.writer.run_once(time.monotonic(), timeout=0.01)
            time.sleep(min(self.writer.pause(time.monotonic()), 0.05))
        self.writer.drain()
        self.writer._publish()
        self.shared.writer_done.set()
        for port in self.channels.ports:
            port.waker.wake()

    def _alive(self, name: str) -> bool:
        return any(t.name == name and t.is_alive() for t in self._threads)

    def start(self) -> None:
        loops: list[tuple[str, Callable[[], None]]] = [
            (self._thread(side), functools.partial(self._serial_loop, side)) for side in self.sides
        ]
        loops.append(("writer", self._writer_loop))
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
            ",".join(s.device for s in self.config.serials),
            self.config.store.synchronous,
            self.store.event_count,
        )

    def stop(self) -> None:
        """Stop reading, commit and ACK what is pending, close cleanly."""
        log.info("agent_stopping")
        self.shared.stopping.set()  # the one signal; the loops order the rest themselves
        for t in self._threads:
            t.join(timeout=STOP_TIMEOUT + 1)
        # The loops are gone: say so, or the CLI would show the last live values forever.
        self.writer.publish(self.writer.last_live.stopped(round(time.time(), 3)))
        self.store.close()
        for port in self.channels.ports:
            port.waker.close()
        log.info("agent_stopped")

    def reload(self) -> None:
        """SIGHUP: re-read the file; apply what can change live (log level)."""
        try:
            fresh = config_mod.load(self.config.source)
        except ConfigError as exc:
            for line in str(exc).splitlines():  # one log line per problem
                log.error("reload_failed %s (keeping the running configuration)", line)
            return
        if self.pinned_level:
            log.info("reloaded log_level=%s (from the command line; the file says %s)",
                     self.pinned_level, fresh.agent.log_level.upper())  # fmt: skip
        else:
            logging.getLogger().setLevel(fresh.agent.log_level.upper())
            log.info("reloaded log_level=%s", fresh.agent.log_level.upper())
        if len(fresh.serials) == len(self.config.serials):
            serials = list(self.config.serials)
            for i, (now_s, new_s) in enumerate(zip(serials, fresh.serials, strict=True)):
                if new_s.capture != now_s.capture and new_s.label == now_s.label:
                    self.sides[i].want_capture = new_s.capture  # its thread applies it
                    serials[i] = dataclasses.replace(now_s, capture=new_s.capture)
                    log.info("reloaded capture=%s port=%s", str(new_s.capture).lower(),
                             now_s.label)  # fmt: skip
            self.config = dataclasses.replace(self.config, serials=tuple(serials))
        # Everything else needs a restart: say so rather than ignore it silently.
        live = dataclasses.replace(fresh.agent, log_level=self.config.agent.log_level)
        if dataclasses.replace(fresh, agent=live, source=self.config.source) != self.config:
            log.warning("reload_needs_restart: only log_level and [serial] capture apply "
                        "live; restart for the rest")  # fmt: skip

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
        # From the published snapshot: the uplink's connection belongs to its thread.
        live = self.writer.last_live
        backlog = max(0, int(live.store.get("top_rowid", 0)) - int(live.store.get("cursor", 1)) + 1)
        breaker = live.breaker.state if live.published else "-"
        if len(self.sides) == 1:
            link = self.serial.link
            links = f"link={link.state} controller={link.controller_id or '-'}"
        else:  # names are the configuration's; a controller id is peer input, left out
            up = sum(1 for side in self.sides if side.link.state == "up")
            down = [side.name for side in self.sides if side.link.state != "up"]
            links = f"links={up}/{len(self.sides)} up" + (f" down={','.join(down)}" if down else "")
        text = f"{links} events={self.store.event_count} backlog={backlog} breaker={breaker}"
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


LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
AGENT_USER: Final = "ironfleet"  # the unit's User=: what check-config run as root checks for
BROKER_PROBE_TIMEOUT: Final = 3.0  # seconds check-config waits for a TCP connect


CONFIG_OPTION: Final = click.option(
    "--config", "config_path", required=True, metavar="FILE", help="TOML configuration file."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name=DISTRIBUTION, prog_name="ironfleet-agent",
                      message="%(prog)s %(version)s")  # fmt: skip
def cli() -> None:
    """IronFleet edge agent: serial ingest, durable buffer, fleet uplink."""


@cli.command("run")
@CONFIG_OPTION
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              help="Log level, over [agent] log_level (kept across SIGHUP).")  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, help="The same as --log-level DEBUG.")
@click.pass_context
def run_command(ctx: click.Context, config_path: str, log_level: str | None,
                verbose: bool) -> None:  # fmt: skip
    """Run the daemon (under systemd: systemd/ironfleet-agent.service)."""
    if verbose and log_level:
        raise click.UsageError("give --log-level or -v, not both")
    ctx.exit(run_daemon(config_path, "DEBUG" if verbose else log_level))


@cli.command("check-config")
@CONFIG_OPTION
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 2): a missing "
              "device, an unreachable broker, a file that cannot be checked.")  # fmt: skip
@click.pass_context
def check_config_command(ctx: click.Context, config_path: str, strict: bool) -> None:
    """Validate a configuration file and what it names, then exit (0 ok, 2 refused)."""
    try:
        config = config_mod.load(config_path)
    except ConfigError as exc:
        print_config_error(exc)
        # All problems in one run: the file's own too.
        for finding in filecheck.check_config_file(Path(config_path), euid=os.geteuid()):
            print(f"ironfleet-agent: {finding}", file=sys.stderr)
        ctx.exit(2)
    ctx.exit(check_config(config_path, config, strict=strict))


@cli.command("keygen")
@click.option("--private", "private_path", required=True, type=click.Path(path_type=Path),
              help="The vehicle's private key to create (0600, never overwritten): "
              "[agent] signing_key_file.")  # fmt: skip
@click.option("--public", "public_path", required=True, type=click.Path(path_type=Path),
              help="Its public key, for the fleet: <vehicle id>.pub in the collector's "
              "--vehicle-keys directory.")  # fmt: skip
@click.pass_context
def keygen_command(ctx: click.Context, private_path: Path, public_path: Path) -> None:
    """Create the vehicle's Ed25519 key pair, which signs the bundles `ironfleet export`
    writes (the fleet checks them on import); prints the fingerprint to compare."""
    try:
        made = keygen(private_path, public_path)
    except OSError as exc:
        print(f"ironfleet-agent: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        ctx.exit(1)
    print(f"wrote {private_path} (0600) and {public_path}: key {key_fingerprint(made)}")


def print_config_error(exc: ConfigError) -> None:
    for line in str(exc).splitlines():  # every problem of the file, one per line
        print(f"ironfleet-agent: {line}", file=sys.stderr)


def check_broker(config: Config, timeout: float = BROKER_PROBE_TIMEOUT) -> list[filecheck.Finding]:
    """`check-config`: can this machine open a TCP connection to the broker now? Only TCP:
    an MQTT CONNECT with the agent's client id would take over the running agent's session
    (TLS and credentials show in `ironfleet doctor` and `breaker` once it runs)."""
    up = config.uplink
    if not up.enabled:
        return []
    address = f"{up.host}:{up.port}"
    try:
        with socket.create_connection((up.host, up.port), timeout=timeout):
            return []
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        return [filecheck.Finding(address, f"[uplink] broker not reachable now: {why}",
                                  "check the network, the broker and [uplink] host/port; the "
                                  "agent buffers and retries meanwhile", fatal=False)]  # fmt: skip


def check_config(path: str, config: Config, *, strict: bool = False) -> int:
    """`check-config` after the file loaded: every problem on stderr, then ok (0) or 2.
    `strict`: warnings count as problems too."""
    euid = os.geteuid()
    if euid == 0:  # root checks for the unit's user, who will own the state (User=)
        with contextlib.suppress(KeyError):
            euid = pwd.getpwnam(AGENT_USER).pw_uid
    findings = (filecheck.check_all(config, euid=euid) + filecheck.check_present(config)
                + check_broker(config))  # fmt: skip
    for finding in findings:
        print(f"ironfleet-agent: {finding}", file=sys.stderr)
    if filecheck.refusals(findings) or (strict and findings):
        return 2
    print(f"{path}: ok (database {config.database}, device {config.serial.device})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `ironfleet-agent`: the exit status of the command, 2 for a
    usage error (as click's standalone mode would, but returned, for in-process callers)."""
    return run_click(cli, argv, "ironfleet-agent")


def run_daemon(config_path: str, log_level: str | None) -> int:
    """`run`: load, check the files, start the threads; the exit status."""
    try:
        config = config_mod.load(config_path)
    except ConfigError as exc:
        print_config_error(exc)
        return 2
    if log_level:  # the command line wins over the file, SIGHUP included
        config = dataclasses.replace(
            config, agent=dataclasses.replace(config.agent, log_level=log_level.upper())
        )
    setup_logging(config.agent.log_level)
    log.debug("log_level=%s from=%s", config.agent.log_level.upper(),
              "command line" if log_level else config.source)  # fmt: skip
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
        daemon.pinned_level = log_level.upper() if log_level else None
    except filecheck.UnsafeFile as exc:
        log.error("start_refused %s", exc)
        return 2
    except AgentError as exc:
        log.error("start_failed error=%r", str(exc))
        return 1
    return daemon.run()


if __name__ == "__main__":
    raise SystemExit(main())
