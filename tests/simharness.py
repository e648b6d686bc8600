"""Harness for bridge tests: a running `ironfleet-sim` and a real agent-side pump.

The agent side is the real `SerialPort` + `AgentLink` with a dictionary standing in for
the store (the store is tested on its own, with real SQLite): an event counts as durable
when it is in the dictionary, and only then is it reported to the link.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import livestate
from agent.livestate import LiveState
from agent.resilience import Backoff
from firmware_bridge.link import AgentLink
from firmware_bridge.serial_port import PortState, SerialPort

from support import fleet_keys, scaled

Key = tuple[str, int, int]


@dataclass
class Sim:
    """A running `ironfleet-sim` process and its ground truth."""

    proc: subprocess.Popen[str]
    truth_path: Path
    devices: dict[str, str]

    def records(self, op: str | None = None) -> list[dict[str, Any]]:
        out = []
        with self.truth_path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # a line still being written
                record = json.loads(line)
                if op is None or record["op"] == op:
                    out.append(record)
        return out

    def keys(self, op: str) -> dict[Key, str]:
        return {(r["stream"], r["boot_epoch"], r["seq"]): r["payload"] for r in self.records(op)}

    def summary(self) -> dict[str, Any]:
        found = self.records("summary")
        assert found, "the simulator wrote no summary"
        return found[-1]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=scaled(timeout))


@dataclass
class AgentSide:
    """SerialPort + AgentLink pumped in a thread; durable = stored in `stored`."""

    path: str
    heartbeat: float = 0.2
    stored: dict[Key, bytes] = field(default_factory=dict)
    duplicates: int = 0
    max_buffered: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.link = AgentLink(session=4242, heartbeat_interval=self.heartbeat)
        self._reopened = False
        self.port = SerialPort(
            self.path, backoff=Backoff(0.02, 0.1), on_state=self._on_state, write_timeout=1.0
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-side", daemon=True)

    def _on_state(self, state: PortState, _detail: str) -> None:
        if state is PortState.OPEN:
            self._reopened = True

    def start(self) -> AgentSide:
        self.port.open(time.monotonic())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=scaled(10))
        self.port.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self.port.poll(now)
                if self._reopened:
                    self._reopened = False
                    self.link.port_reopened(now)
                data = self.port.read(0.01) if self.port.state is PortState.OPEN else b""
                if not data and self.port.state is not PortState.OPEN:
                    time.sleep(0.01)
                now = time.monotonic()
                received = self.link.receive(data, now)
                self.max_buffered = max(self.max_buffered, self.link.decoder.buffered)
                for r in received:
                    key = (r.event.stream, r.event.boot_epoch, r.event.seq)
                    if key in self.stored:
                        self.duplicates += 1
                    self.stored[key] = r.event.payload
                self.link.durable([r.token for r in received], now)
                self.link.poll(now)
                out = self.link.outgoing()
                if out and self.port.state is PortState.OPEN:
                    self.port.write(out)
        except Exception as exc:  # surfaced by the test, not lost in a thread
            self.errors.append(repr(exc))
            raise


class TruthReader:
    """Reads a growing ground-truth file incrementally (complete lines only)."""

    def __init__(self, path: Path, *, ports: dict[str, str] | None = None) -> None:
        """`ports`: the agent reads [[serial]] entries, so it stores each stream under
        `<port name>/`; the port name of each controller id."""
        self.path = path
        self.ports = ports
        self._offset = 0
        self.sent: dict[Key, str] = {}
        self.acked: dict[Key, str] = {}
        self.lost_at_reboot: dict[Key, str] = {}

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            record = json.loads(line)
            op = record["op"]
            if op in ("sent", "acked", "lost_at_reboot"):
                stream = record["stream"]
                if self.ports is not None:
                    stream = f"{self.ports[record['controller']]}/{stream}"
                key = (stream, record["boot_epoch"], record["seq"])
                getattr(self, op)[key] = record["payload"]


AGENT = str(Path(sys.executable).with_name("ironfleet-agent"))
BROKEN = Path(__file__).parent / "chaos" / "broken.py"


def stored_events(db: Path) -> dict[Key, list[str]]:
    """Every event in an agent database: key -> payloads (hex), read-only.

    A database not created yet (the agent was killed during start-up) holds nothing.
    """
    if not db.exists():
        return {}
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if not {"events", "streams"} <= tables:
            return {}
        out: dict[Key, list[str]] = {}
        for stream, epoch, seq, payload in conn.execute(
            "SELECT s.name, e.boot_epoch, e.seq, e.payload FROM events e "
            "JOIN streams s ON s.id = e.stream_id"
        ):
            out.setdefault((stream, epoch, seq), []).append(bytes(payload).hex())
        return out
    finally:
        conn.close()


def integrity(db: Path) -> str:
    if not db.exists():
        return "ok"
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def agent_state(db: Path) -> dict[str, str]:
    """The persisted keys of `agent_state` (the fleet cursor, salvage records)."""
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT key, value FROM agent_state").fetchall())
    finally:
        conn.close()


def live(db: Path) -> LiveState:
    """The daemon's live snapshot, as `ironfleet status` reads it (row or runtime file)."""
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return livestate.read(conn)
    finally:
        conn.close()


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


@dataclass
class AgentProcess:
    """An `ironfleet-agent run` process with its own config, state dir and log."""

    workdir: Path
    device: str | list[str]  # several: one [[serial]] entry each
    overrides: dict[str, dict[str, object]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    wrapped: bool = False

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sections: dict[str, dict[str, object]] = {
            "agent": {
                "vehicle_id": "test-vehicle",
                "state_dir": str(self.workdir / "state"),
                "runtime_dir": str(self.workdir / "run"),
            },
            "serial": {"device": self.device, "heartbeat_interval": 0.2}
            if isinstance(self.device, str)
            else {},  # one [[serial]] entry per device
            "store": {"min_free_bytes": 0},
            "uplink": {"enabled": False},
        }
        for name, values in self.overrides.items():
            sections.setdefault(name, {}).update(values)
        up = sections["uplink"]
        if up.get("enabled", True) and "fleet_key_file" not in up and not up.get("allow_unsigned"):
            up["fleet_key_file"] = str(fleet_keys()[1])  # signed, as in production
        lines = []
        for name, values in sections.items():
            if name == "serial" and not isinstance(self.device, str):
                for device in self.device:  # the [serial] overrides apply to every entry
                    entry = {"device": device, "heartbeat_interval": 0.2, **values}
                    lines.append("[[serial]]")
                    lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
                continue
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        self.config = self.workdir / "agent.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.db = self.workdir / "state" / "agent.db"
        self.log = self.workdir / "agent.log"

    def start(
        self,
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
        broken: str | None = None,
        args: tuple[str, ...] = (),
    ) -> AgentProcess:
        """Start the agent, optionally under `wrapper` (strace, faketime: the agent is its
        child), with a deliberate bug patched in (`broken`: see tests/chaos/broken.py) and
        extra `run` arguments."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.wrapped = bool(wrapper)
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        patched = [sys.executable, str(BROKEN), broken] if broken else []
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*(wrapper or []), *patched, AGENT, "run", "--config", str(self.config), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        return self

    def started(self) -> bool:
        """True once this run has logged that it is up (database open, threads running)."""
        if not self.log.exists():
            return False
        with self.log.open("rb") as fh:
            fh.seek(getattr(self, "_log_offset", 0))
            return b"agent_started" in fh.read()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=scaled(10))

    def agent_pid(self) -> int:
        """The agent's own pid (under a wrapper such as strace, the wrapper's child)."""
        assert self.proc is not None
        if not self.wrapped:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM to the agent itself; its exit status (the wrapper passes it on)."""
        assert self.proc is not None
        os.kill(self.agent_pid(), signal.SIGTERM)
        return self.proc.wait(timeout=scaled(timeout))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop_quietly(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=scaled(10))


MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """mosquitto on 127.0.0.1 with its own config, started and stopped by PID."""

    workdir: Path
    persistence: bool = False
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        if MOSQUITTO is None:
            raise AssertionError(
                "mosquitto is not installed: `make test` installs it (apt-get install mosquitto)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "max_queued_messages 100000",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
        ]
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")

    def start(self) -> Broker:
        assert MOSQUITTO is not None
        self.starts += 1
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + scaled(10)
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mosquitto exited: {(self.workdir / 'mosquitto.log').read_text()}"
                )
            time.sleep(0.02)
        raise AssertionError("mosquitto did not listen within 10 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=scaled(10))


@dataclass
class Verdict:
    """The store-side oracle (O1, O2, O6) as figures, for harnesses and their controls."""

    acked: int
    stored: int
    lost: list[Key]  # ACKed to the controller, not in the store (O1)
    duplicates: list[Key]  # stored more than once (O2)
    altered: list[Key]  # stored with other bytes than were sent (O2)
    integrity: str  # PRAGMA integrity_check (O6)
    # Stored but never sent as such (a corrupt frame taken for an event). Only checked
    # once the simulator has exited: while it runs, its truth file may lag the store.
    foreign: list[Key] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        wrong = self.lost or self.duplicates or self.altered or self.foreign
        return not wrong and self.integrity == "ok"

    def describe(self) -> str:
        return (
            f"acked={self.acked} stored={self.stored} lost={len(self.lost)} "
            f"duplicates={len(self.duplicates)} altered={len(self.altered)} "
            f"foreign={len(self.foreign)} integrity={self.integrity} "
            f"e.g. {(self.lost + self.duplicates + self.altered + self.foreign)[:3]}"
        )


def verdict(truth: TruthReader, db: Path, *, complete: bool = False) -> Verdict:
    """Compare what the controller saw ACKed with what the agent's database holds.

    `complete`: the simulator has exited, so its truth is whole and every stored event
    can be checked against what was sent.
    """
    truth.poll()
    stored = stored_events(db)
    foreign = []
    if complete:
        foreign = [k for k, v in stored.items() if truth.sent.get(k) not in v]
    return Verdict(
        acked=len(truth.acked),
        stored=len(stored),
        lost=[k for k in truth.acked if k not in stored],
        duplicates=[k for k, v in stored.items() if len(v) > 1],
        altered=[k for k, v in truth.acked.items() if k in stored and v not in stored[k]],
        integrity=integrity(db),
        foreign=foreign,
    )


def assert_zero_loss(truth: TruthReader, db: Path, *, complete: bool = False) -> Verdict:
    """O1, O2, O6 hold: every ACKed event stored once, byte-equal; the database is sound."""
    found = verdict(truth, db, complete=complete)
    assert found.ok, found.describe()
    return found
