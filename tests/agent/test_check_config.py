"""`ironfleet-agent check-config`: every problem in one run, the broker probed, and
`--strict` turning warnings into a failure (for a provisioning script)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from simharness import AGENT
from support import fleet_keys


def check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, "check-config", "--config", str(config), *extra],
                          capture_output=True, text=True, check=False)  # fmt: skip


@pytest.fixture
def listening() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts TCP connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_file(tmp_path: Path, port: int, device: str, extra: str = "") -> Path:
    device_path = tmp_path / "tty"
    if device == "present":
        device_path.touch()
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n{extra}'
        f'[serial]\ndevice = "{device_path}"\n'
        f'[uplink]\nport = {port}\nfleet_key_file = "{fleet_keys()[1]}"\n'
    )
    return path


def test_every_problem_of_the_file_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nvehicle_id = "a/b"\nlog_level = "LOUD"\nnope = 1\n'
                    "[serial]\nbaudrate = -1\n[store]\nhigh_water = 'high'\n")  # fmt: skip
    res = check(path)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    for key in ("vehicle_id", "log_level", "'nope'", "baudrate", "high_water"):
        assert [line for line in lines if key in line and str(path) in line], (key, lines)
    assert len(lines) == 5, lines


def test_an_unreachable_broker_is_named_and_strict_fails(tmp_path: Path, closed_port: int) -> None:
    path = config_file(tmp_path, closed_port, device="present")
    res = check(path)
    assert res.returncode == 0, res.stderr
    assert f"warning: 127.0.0.1:{closed_port}: [uplink] broker not reachable now" in res.stderr
    assert "Connection refused" in res.stderr
    strict = check(path, "--strict")
    assert strict.returncode == 2
    assert "ok (" not in strict.stdout


def test_a_reachable_broker_and_a_present_device_pass_strict(
    tmp_path: Path, listening: int
) -> None:
    res = check(config_file(tmp_path, listening, device="present"), "--strict")
    assert (res.returncode, res.stderr) == (0, "")
    assert ": ok (database" in res.stdout


def test_strict_fails_on_a_missing_device(tmp_path: Path, listening: int) -> None:
    path = config_file(tmp_path, listening, device="absent")
    assert check(path).returncode == 0
    res = check(path, "--strict")
    assert res.returncode == 2
    assert "[serial] device: nothing there now" in res.stderr


def test_a_disabled_uplink_is_not_probed(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    (tmp_path / "tty").touch()
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serial]\ndevice = "{tmp_path / "tty"}"\n[uplink]\nenabled = false\n'
    )
    res = check(path, "--strict")
    assert (res.returncode, res.stderr) == (0, "")
