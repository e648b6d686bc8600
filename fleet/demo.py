"""`make demo`: the whole chain on one machine, with the faults a vehicle sees.

Two controllers, each on a pseudo-terminal -> agent -> MQTT broker (mosquitto when
installed, otherwise the pure-Python amqtt) -> reference collector. A scripted scenario
of about a minute: steady state, link loss with buffering, restore and resync, a
controller reboot, a burst of serial noise. A live status line, then a report that
proves (or disproves) zero loss. Every process started here is stopped on the way out.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import click

from agent import livestate
from agent.fleet import Batch
from agent.fleet_auth import FleetSigner, keygen, load_private_key
from agent.livestate import LiveState
from agent.storedb import read_cursor
from firmware_bridge.clickrun import run_click
from fleet.collector import Collector, CollectorStore
from fleet.subscriber import FleetSubscriber

VEHICLE = "demo-truck-7"
CONTROLLERS = 2  # onboard controllers, each on its own pty and [[serial]] entry
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """mosquitto if installed, else amqtt (pure Python, from PyPI); started by PID."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.proc: subprocess.Popen[bytes] | None = None
        mosquitto = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if mosquitto:
            conf = workdir / "mosquitto.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
            self.cmd = [mosquitto, "-c", str(conf)]
            self.name = "mosquitto"
        else:
            conf = workdir / "amqtt.yaml"
            conf.write_text(
                "listeners:\n  default:\n    type: tcp\n"
                f"    bind: 127.0.0.1:{port}\n"
                "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                "    allow_anonymous: true\n"
            )
            self.cmd = [str(BIN / "amqtt"), "-c", str(conf)]
            self.name = "amqtt (embedded, pure Python)"

    def start(self) -> None:
        log = (self.workdir / "broker.log").open("ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start; see {self.workdir / 'broker.log'}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class DemoCollector:
    """The reference collector in-process, so the demo can time convergence."""

    def __init__(self, db: Path, port: int, signer: FleetSigner) -> None:
        self.store = CollectorStore(db)
        self.collector = Collector(self.store, signer=signer)
        self.lock = threading.Lock()
        self.state_batches_at: list[float] = []
        self.sub = FleetSubscriber("127.0.0.1", port, self._handle, client_id="demo-collector",
                                   on_session_lost=self.collector.session_lost)  # fmt: skip
        self.collector.transport = self.sub
        self.sub.start()

    def _handle(self, topic: str, payload: bytes) -> None:
        self.collector.handle(topic, payload)
        if topic.endswith("/state"):
            with contextlib.suppress(Exception):
                Batch.decode(payload)
                with self.lock:
                    self.state_batches_at.append(time.monotonic())

    def stop(self) -> None:
        self.sub.stop()


def read_agent(db: Path) -> tuple[LiveState, int]:
    """The agent's live snapshot and its persisted fleet cursor (empty, 1 if unreadable)."""
    if not db.exists():
        return LiveState(), 1
    try:
        conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True, timeout=1)
        try:
            return livestate.read(conn), read_cursor(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return LiveState(), 1


def status_line(t: float, agent: tuple[LiveState, int], delivered: int) -> str:
    """One meaning per figure: `stored` events the agent stored (duplicates not counted);
    `published` events it published to the broker, resends after a lost link counted
    again; `fleet_acked` events below the fleet's persisted cursor (up to 1 s behind: the
    checkpoint cadence); `at_collector` distinct events in the collector's database."""
    live, cursor = agent
    store, uplink = live.store, live.uplink.counters
    fleet_acked = cursor - 1  # rowids: arrival order from 1
    return (
        f"t={t:5.1f}s stored={int(store.get('stored', 0)):6d} "
        f"published={int(uplink.get('events_sent', 0)):6d} fleet_acked={fleet_acked:6d} "
        f"at_collector={delivered:6d} breaker={live.breaker.state:9s} "
        f"serial={','.join(k.state for k in live.controllers):9s} mqtt={live.uplink.state}"
    )


def truth_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n"):
                yield json.loads(line)


# The live line rewrites itself on a terminal; into a pipe or a log it is a plain line
# every PLAIN_EVERY seconds, without escape codes.
LIVE: Final = sys.stdout.isatty()
PLAIN_EVERY: Final = 5.0


def say(text: str) -> None:
    sys.stdout.write(("\r\033[K" if LIVE else "") + text + "\n")
    sys.stdout.flush()


class Demo:
    """One run of the scenario; `run()` returns the exit code (0 only with zero loss)."""

    def __init__(self, workdir: Path, scale: float = 1.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.scale = workdir, scale
        self.port = free_port()
        self.broker = Broker(workdir, self.port)
        self.procs: list[subprocess.Popen[Any]] = []
        self.control = workdir / "control"
        self.control.write_text("")
        self.truth = workdir / "truth.jsonl"
        self.agent_db = workdir / "state" / "agent.db"
        # A throwaway fleet key pair: the collector signs acks and commands, the agent
        # verifies them (docs/fleet-protocol.md), as in production.
        self.fleet_key, self.fleet_pub = workdir / "fleet.key", workdir / "fleet.pub"
        if not self.fleet_key.exists():
            keygen(self.fleet_key, self.fleet_pub)
        self.collector: DemoCollector | None = None
        self.restored_at: float | None = None
        self.start = time.monotonic()
        self._next_plain = 0.0  # when the next plain status line is due (not a terminal)

    def run(self) -> int:
        try:
            say(f"demo: workdir {self.workdir}; broker {self.broker.name} on :{self.port}")
            self.broker.start()
            signer = FleetSigner(load_private_key(str(self.fleet_key)))
            self.collector = DemoCollector(self.workdir / "collector.db", self.port, signer)
            sim = self._start_sim()
            agent = self._start_agent(sim)
            self.start = time.monotonic()
            self._scenario()
            sim.wait(timeout=30)
            self._drain()
            agent.send_signal(signal.SIGTERM)
            agent_rc = agent.wait(timeout=15)
            sys.stdout.write("\n")
            return self.report(agent_rc)
        finally:
            self._cleanup()

    def _start_sim(self) -> subprocess.Popen[str]:
        sim = subprocess.Popen(
            [str(BIN / "ironfleet-sim"), "--link-dir", str(self.workdir / "dev"), "--truth",
             str(self.truth), "--controllers", str(CONTROLLERS), "--rate", "200",
             "--streams", "6", "--seed", "7", "--bare-streams",
             "--control", str(self.control)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs.append(sim)
        return sim

    def _start_agent(self, sim: subprocess.Popen[str]) -> subprocess.Popen[bytes]:
        assert sim.stdout is not None
        found = [sim.stdout.readline().split() for _ in range(CONTROLLERS)]  # DEVICE id path
        serial = "".join(
            f'[[serial]]\nname = "{cid}"\ndevice = "{path}"\nheartbeat_interval = 0.25\n'
            for _, cid, path in found
        )  # one entry per controller: one thread and link each, one writer
        config = self.workdir / "agent.toml"
        config.write_text(
            f'[agent]\nvehicle_id = "{VEHICLE}"\nstate_dir = "{self.workdir / "state"}"\n'
            f'runtime_dir = "{self.workdir / "run"}"\n'
            f"{serial}"
            "[store]\nmin_free_bytes = 0\n"
            f"[uplink]\nport = {self.port}\nkeepalive = 5\nack_timeout = 5.0\n"
            f'fleet_key_file = "{self.fleet_pub}"\n'
            "breaker_failure_threshold = 3\nbreaker_recovery_timeout = 2.0\n"
            "reconnect_min = 0.2\nreconnect_max = 2.0\nbatch_max_delay_ms = 50.0\n"
        )
        log = (self.workdir / "agent.log").open("ab")
        agent = subprocess.Popen(
            [str(BIN / "ironfleet-agent"), "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(agent)
        return agent

    def _command(self, text: str) -> None:
        with self.control.open("a") as fh:
            fh.write(text + "\n")

    def _restore(self) -> None:
        self.broker.start()
        self.restored_at = time.monotonic()

    def _noise(self) -> None:
        self._command("noise 3 1e-3")
        self._command("garbage 4096")

    def _scenario(self) -> None:
        actions: list[tuple[float, str, Callable[[], None]]] = [
            (12, "steady state: controller -> agent -> broker -> collector", lambda: None),
            (27, "LINK LOSS: broker killed; the agent buffers, the breaker opens",
             self.broker.kill),
            (37, "RESTORE: broker back; state first, then the backlog", self._restore),
            (44, "CONTROLLER REBOOT: new boot epoch, sequences restart",
             lambda: self._command("reboot")),
            (52, "SERIAL NOISE: 3 s at a bit error rate of 1e-3, plus garbage", self._noise),
            (60, "stopping the controller; draining", lambda: self._command("stop")),
        ]  # fmt: skip
        for t_end, note, action in actions:
            action()
            say(f"[{time.monotonic() - self.start:5.1f}s] {note}")
            while time.monotonic() - self.start < t_end * self.scale:
                self._status()
                time.sleep(0.5)

    def _status(self) -> None:
        agent = read_agent(self.agent_db)
        delivered = len(self.collector.store.keys(VEHICLE)) if self.collector else 0
        now = time.monotonic()
        line = status_line(now - self.start, agent, delivered)
        if LIVE:
            sys.stdout.write("\r\033[K" + line)
        elif now >= self._next_plain:
            self._next_plain = now + PLAIN_EVERY
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def _drain(self) -> None:
        """Wait until the fleet acknowledged everything the agent stored."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live, cursor = read_agent(self.agent_db)
            if cursor > live.store.get("stored", 0) > 0:
                return
            self._status()
            time.sleep(0.5)

    def _cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.collector is not None:
            self.collector.stop()
        self.broker.kill()

    def report(self, agent_rc: int) -> int:
        assert self.collector is not None
        sent: set[tuple[str, int, int]] = set()
        acked: set[tuple[str, int, int]] = set()
        summary: dict[str, Any] = {}
        for r in truth_records(self.truth):
            # [[serial]] entries named like their controllers: the agent stores each
            # (bare) stream under its port's name.
            key = (f"{r.get('controller')}/{r.get('stream')}", r.get("boot_epoch"), r.get("seq"))
            if r["op"] == "sent":
                sent.add(key)  # type: ignore[arg-type]
            elif r["op"] == "acked":
                acked.add(key)  # type: ignore[arg-type]
            elif r["op"] == "summary":
                summary = r
        conn = sqlite3.connect(self.agent_db.absolute().as_uri() + "?mode=ro", uri=True)
        stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        live = livestate.read(conn)
        conn.close()
        delivered = self.collector.store.keys(VEHICLE)
        lost = acked - delivered
        rows = self.collector.store.report()
        row = rows[0] if rows else {}
        link = {
            key: sum(k.counters.get(key, 0) for k in live.controllers)
            for key in ("retransmits_reacked",)
        }  # over every controller
        store_stats, uplink = live.store, live.uplink.counters
        restored = self.restored_at
        converge = [
            t - restored for t in self.collector.state_batches_at if restored and t >= restored
        ]
        dups = (
            row.get("duplicates_received", 0)
            + link.get("retransmits_reacked", 0)
            + store_stats.get("duplicates", 0)
        )
        rejected = int(sum(sum(k.rejects.values()) for k in live.controllers))
        lines = [
            "",
            "IronFleet demo report",
            f"  events sent by the controllers  {len(sent):8d}",
            f"  ACKed to the controller          {len(acked):8d}"
            f"  (sent, never ACKed: {len(sent - acked)}: in flight when it stopped or lost at"
            " its reboot)",
            f"  stored by the agent              {stored:8d}",
            f"  delivered to the collector       {len(delivered):8d}",
            f"  duplicates absorbed              {dups:8d}  (collector "
            f"{row.get('duplicates_received', 0)}, serial re-ACKs "
            f"{link.get('retransmits_reacked', 0)}, store {store_stats.get('duplicates', 0)})",
            f"  serial frames rejected           {rejected:8d}"
            f"  (resent by the controller: {summary.get('retransmits', 0)})",
            f"  lost at controller reboot (RAM)  {summary.get('lost_at_reboot', 0):8d}"
            "  (never ACKed: the controller's ring buffer is in RAM)",
            f"  LOST (ACKed, not delivered)      {len(lost):8d}",
            "  link restore -> fleet view converged: "
            + (f"{converge[0]:.2f} s" if converge else "not observed")
            + f" (agent connect -> state acked: {uplink.get('last_convergence_s', -1):.3f} s)",
            f"  agent exit code on SIGTERM: {agent_rc}",
        ]
        print("\n".join(lines))
        return 0 if not lost and agent_rc == 0 and delivered else 1


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="keep files here")
@click.option("--scale", type=float, default=1.0, help="stretch the scenario")
def cli(workdir: Path | None, scale: float) -> int:
    if workdir is not None:
        return Demo(workdir, scale).run()
    with tempfile.TemporaryDirectory(prefix="ironfleet-demo-") as tmp:
        return Demo(Path(tmp), scale).run()


def main(argv: list[str] | None = None) -> int:
    """`python -m fleet.demo` (`make demo`) on `argv`: the demo's exit status, 2 for a
    usage error."""
    return run_click(cli, argv, "python -m fleet.demo")


if __name__ == "__main__":
    raise SystemExit(main())
