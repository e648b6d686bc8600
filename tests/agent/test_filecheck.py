"""File checks at start (issue 12, finding 8), on real files and real processes.

Each refusal is checked through `ironfleet-agent run` or `check-config` as a process: its
exit status, its one line naming the file and the fix, and that nothing was created or
changed where a link pointed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from agent import filecheck
from agent.config import from_mapping
from agent.filecheck import UnsafeFile
from agent.store import connect

from simharness import AGENT

pytestmark = pytest.mark.timeout(60)


def write_config(tmp_path: Path, **uplink: object) -> tuple[Path, Path]:
    """A config whose serial device never exists (the agent waits for it) and its state dir."""
    state = tmp_path / "state"
    lines = [
        "[agent]",
        f'state_dir = "{state}"',
        "[serial]",
        f'device = "{tmp_path / "no-such-tty"}"',
        "[uplink]",
    ]
    values: dict[str, object] = {"enabled": False, **uplink}
    for key, value in values.items():
        if isinstance(value, bool):
            shown = "true" if value else "false"
        else:
            shown = str(value) if isinstance(value, int) else f'"{value}"'
        lines.append(f"{key} = {shown}")
    config = tmp_path / "agent.toml"
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o640)
    return config, state


def run_agent(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AGENT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def foreign_database(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    conn.execute("INSERT INTO invoices (amount) VALUES (12.5)")
    conn.commit()
    conn.close()
    return path


def test_symlinked_database_is_refused_and_the_foreign_file_untouched(tmp_path: Path) -> None:
    """Old code: the agent added its tables to invoices.db (and created a WAL beside it)."""
    config, state = write_config(tmp_path)
    state.mkdir(mode=0o750)
    foreign = foreign_database(tmp_path / "invoices.db")
    before = digest(foreign)
    (state / "agent.db").symlink_to(foreign)
    res = run_agent("run", "--config", str(config))
    assert res.returncode == 2, res.stdout + res.stderr
    refused = [line for line in res.stdout.splitlines() if "start_refused" in line]
    assert len(refused) == 1
    assert f"{state / 'agent.db'}: is a symlink to {foreign}" in refused[0]
    assert "fix: remove the link" in refused[0]
    assert digest(foreign) == before
    assert not Path(f"{foreign}-wal").exists()
    conn = sqlite3.connect(foreign)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["invoices"]
    conn.close()


def test_dangling_symlink_is_refused_and_nothing_created_at_its_target(tmp_path: Path) -> None:
    """Old code: SQLite created the database at the link's target."""
    config, state = write_config(tmp_path)
    state.mkdir(mode=0o750)
    target = tmp_path / "elsewhere" / "agent.db"
    target.parent.mkdir()
    (state / "agent.db").symlink_to(target)
    res = run_agent("run", "--config", str(config))
    assert res.returncode == 2
    assert "(dangling)" in res.stdout
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_symlinked_wal_or_shm_is_refused(tmp_path: Path, suffix: str) -> None:
    config, state = write_config(tmp_path)
    state.mkdir(mode=0o750)
    (state / f"agent.db{suffix}").symlink_to(tmp_path / "trap")
    res = run_agent("check-config", "--config", str(config))
    assert res.returncode == 2
    assert f"agent.db{suffix}: is a symlink" in res.stderr
    assert not (tmp_path / "trap").exists()


def test_world_writable_database_is_refused(tmp_path: Path) -> None:
    """Old code: a 0666 database started silently."""
    config, state = write_config(tmp_path)
    state.mkdir(mode=0o750)
    db = state / "agent.db"
    connect(db).close()
    db.chmod(0o666)
    res = run_agent("run", "--config", str(config))
    assert res.returncode == 2
    assert f"{db}: mode 0666 is writable by others; fix: chmod 0640 {db}" in res.stdout


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_group_or_world_writable_state_dir_is_refused(tmp_path: Path, mode: int) -> None:
    """Old code: a world-writable state dir started silently."""
    config, state = write_config(tmp_path)
    state.mkdir()
    state.chmod(mode)
    res = run_agent("run", "--config", str(config))
    assert res.returncode == 2
    assert f"{state}: mode {mode:04o} is writable by" in res.stdout
    assert not (state / "agent.db").exists()


def test_world_readable_password_file_is_refused(tmp_path: Path) -> None:
    """Old code: never permission-checked; the daemon read and used it."""
    password = tmp_path / "mqtt-password"
    password.write_text("hunter2\n")
    password.chmod(0o644)
    config, _state = write_config(
        tmp_path, enabled=True, allow_unsigned=True, username="veh", tls=False,
        allow_plaintext_password=True, password_file=str(password),
    )  # fmt: skip
    res = run_agent("run", "--config", str(config))
    assert res.returncode == 2
    assert f"{password} ([uplink] password_file): mode 0644" in res.stdout
    assert f"chmod 0600 {password}" in res.stdout
    password.chmod(0o600)
    assert run_agent("check-config", "--config", str(config)).returncode == 0


def test_config_writable_by_others_is_refused(tmp_path: Path) -> None:
    """Old code: never permission-checked."""
    config, _state = write_config(tmp_path)
    config.chmod(0o666)
    res = run_agent("run", "--config", str(config))
    assert res.returncode == 2
    assert f"{config} (configuration file): mode 0666 is writable by others" in res.stdout


def test_check_config_reports_every_problem_in_one_run(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o640)
    password = tmp_path / "mqtt-password"
    password.write_text("hunter2\n")
    password.chmod(0o604)
    config, state = write_config(
        tmp_path, enabled=True, allow_unsigned=True, username="veh", tls=True,
        password_file=str(password), key_file=str(key), cert_file=str(key),
    )  # fmt: skip
    config.chmod(0o646)
    state.mkdir()
    state.chmod(0o777)
    (state / "agent.db").symlink_to(tmp_path / "elsewhere.db")
    res = run_agent("check-config", "--config", str(config))
    assert res.returncode == 2
    refused = [line for line in res.stderr.splitlines() if "refused:" in line]
    named = [str(state), f"{state / 'agent.db'}", str(config), str(password), str(key)]
    assert len(refused) == len(named), res.stderr
    for path in named:
        assert any(f" {path}" in line and "fix: " in line for line in refused), path
    assert ": ok " not in res.stdout


def test_a_unit_like_layout_passes(tmp_path: Path) -> None:
    """StateDirectoryMode=0750, UMask=0027, a 0600 credential: no finding at all."""
    password = tmp_path / "mqtt-password"
    password.write_text("hunter2\n")
    password.chmod(0o600)
    broker = socket.socket()  # something answers at the broker's address, as on a vehicle
    broker.bind(("127.0.0.1", 0))
    broker.listen()
    config, state = write_config(
        tmp_path, enabled=True, allow_unsigned=True, username="veh", tls=True,
        password_file=str(password), port=broker.getsockname()[1],
    )  # fmt: skip
    state.mkdir(mode=0o750)
    db = state / "agent.db"
    connect(db).close()
    for path in state.iterdir():
        path.chmod(0o640)
    (tmp_path / "no-such-tty").symlink_to("/dev/null")  # a device is there after all
    res = run_agent("check-config", "--config", str(config))
    broker.close()
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert ": ok " in res.stdout


def test_readable_by_others_is_a_warning_not_a_refusal(tmp_path: Path) -> None:
    config, state = write_config(tmp_path)
    state.mkdir(mode=0o755)
    res = run_agent("check-config", "--config", str(config))
    assert res.returncode == 0
    assert f"warning: {state}: mode 0755 is readable by others" in res.stderr


def test_foreign_owner_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    st = state.stat()
    found = filecheck.check_state(state, state / "agent.db", euid=st.st_uid + 1)
    assert [f.fatal for f in found] == [True]
    assert f"is owned by uid {st.st_uid}, not the agent (uid {st.st_uid + 1})" in found[0].problem


def test_database_replaced_during_open_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    connect(db).close()
    before = filecheck.stat_before_open(db)
    other = tmp_path / "other.db"
    connect(other).close()
    os.replace(other, db)  # the name now holds another file than the one checked
    conn = connect(db)
    try:
        with pytest.raises(UnsafeFile, match="replaced while it was being opened"):
            filecheck.verify_opened(db, before)
        filecheck.verify_opened(db, filecheck.stat_before_open(db))
    finally:
        conn.close()


def test_the_opened_file_must_be_held_by_this_process(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    connect(db).close()
    with pytest.raises(UnsafeFile, match="not the one at this path"):
        filecheck.verify_opened(db, filecheck.stat_before_open(db))  # nothing holds it open


def test_stat_before_open_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "agent.db").symlink_to(tmp_path / "x")
    with pytest.raises(UnsafeFile, match="is a symlink"):
        filecheck.stat_before_open(tmp_path / "agent.db")
    assert filecheck.stat_before_open(tmp_path / "absent.db") is None


def test_defaults_config_checks_only_the_state(tmp_path: Path) -> None:
    config = from_mapping({"agent": {"state_dir": str(tmp_path / "none")}, "uplink": {
        "enabled": False}}, "<defaults>")  # fmt: skip
    assert filecheck.check_all(config) == []


def test_check_config_refuses_a_missing_credential_and_warns_of_a_missing_device(
    tmp_path: Path,
) -> None:
    """It said `ok` for both; the agent would then fail at every connect, or wait."""
    missing = tmp_path / "mqtt-password"
    config, _ = write_config(tmp_path, enabled=True, allow_unsigned=True,
                             password_file=str(missing))  # fmt: skip
    res = run_agent("check-config", "--config", str(config))
    assert res.returncode == 2, res.stderr
    assert f"refused: {missing}: [uplink] password_file does not exist" in res.stderr
    assert f"warning: {tmp_path / 'no-such-tty'}: [serial] device: nothing there now" in res.stderr
    missing.write_text("s3cret\n")
    missing.chmod(0o600)
    res = run_agent("check-config", "--config", str(config))
    assert res.returncode == 0, res.stderr
    assert "[serial] device: nothing there now" in res.stderr  # still a warning only
    assert ": ok " in res.stdout
