"""The systemd side: unit verified and hardened offline, notify protocol on a real socket."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from simharness import AGENT, AgentProcess, Sim
from support import wait_for

UNIT = Path(__file__).parents[2] / "systemd" / "ironfleet-agent.service"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's agent, so verify can check it."""
    copy = tmp_path / "ironfleet-agent.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/ironfleet-agent", AGENT))
    return copy


def test_unit_verifies(unit_copy: Path) -> None:
    res = subprocess.run([ANALYZE, "verify", str(unit_copy)], capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "ironfleet-agent.service" not in res.stderr, res.stderr


def test_unit_exposure_is_at_most_2(unit_copy: Path) -> None:
    res = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--threshold=20", str(unit_copy)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:]
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert level is not None
    assert float(level.group(1)) <= 2.0
    print(f"systemd-analyze security exposure: {level.group(1)}")


def test_unit_has_the_required_settings() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=ironfleet",
        "StateDirectory=ironfleet",
        "StateDirectoryMode=0750",
        "DevicePolicy=closed",
        "LoadCredential=",
        "ProtectSystem=strict",
        "MemoryMax=",
        "TasksMax=",
    ):
        assert line in text, line  # fmt: skip
    # PrivateDevices=yes would hide the physical serial ports.
    assert not re.search(r"^PrivateDevices=yes", text, re.MULTILINE)


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def poll(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def has(self, key: str) -> bool:
        self.poll()
        return any(key in m for _, m in self.messages)

    def pings_since(self, t: float) -> list[float]:
        self.poll()
        return [at for at, m in self.messages if m.get("WATCHDOG") == "1" and at >= t]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def test_ready_watchdog_stalls_and_stopping(
    start_sim: Callable[..., Sim],
    start_agent: Callable[..., AgentProcess],
    notify_socket: NotifySocket,
) -> None:
    sim = start_sim("--rate", "500", "--streams", "4")
    agent = start_agent(sim.devices["ecu0"], store={"min_free_bytes": 0})
    agent.start(env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"})
    wait_for(lambda: notify_socket.has("READY"), 30, "READY=1")
    ready = next(m for _, m in notify_socket.messages if "READY" in m)
    assert "link=" in ready["STATUS"]
    assert agent.db.exists()  # READY comes after the database is open
    start = time.monotonic()
    wait_for(lambda: len(notify_socket.pings_since(start)) >= 4, 10, "watchdog pings")
    # Stall ingest: a writer lock held elsewhere blocks the agent's commit (busy_timeout).
    notify_socket.poll()
    blocker = sqlite3.connect(agent.db, isolation_level=None, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")
    settle = time.monotonic() + 0.8  # the writer's next commit blocks in the busy wait
    while time.monotonic() < settle:
        notify_socket.poll()  # receive promptly: messages are timed on arrival
    stalled_at = time.monotonic()
    while time.monotonic() < stalled_at + 2.5:
        notify_socket.poll()
    pings_during_stall = notify_socket.pings_since(stalled_at)
    blocker.execute("ROLLBACK")
    blocker.close()
    assert pings_during_stall == [], "a stalled writer must stop the watchdog pings"
    resumed = time.monotonic()
    wait_for(lambda: notify_socket.pings_since(resumed), 10, "pings to resume")
    assert b"watchdog_withheld stalled=writer" in agent.log.read_bytes()
    assert agent.terminate() == 0
    assert notify_socket.has("STOPPING")
    sim.signal(signal.SIGTERM)
