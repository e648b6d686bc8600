"""Configuration: defaults valid, bad keys and values named with their file."""

from __future__ import annotations

import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from agent.config import Config, UplinkSection, from_mapping, load
from agent.errors import ConfigError

from simharness import AGENT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_need_only_the_fleet_key(tmp_path: Path) -> None:
    config = load(write(tmp_path, "[uplink]\nfleet_key_file = '/k.pub'\n"))
    assert config.store.synchronous == "FULL"
    assert config.database == Path("/var/lib/ironfleet/agent.db")
    uplink = UplinkSection(fleet_key_file="/k.pub")
    assert config == Config(uplink=uplink, source=str(tmp_path / "agent.toml"))


def test_empty_file_is_refused_secure_by_default(tmp_path: Path) -> None:
    """With the uplink on, acks and commands must be verifiable: no key, no start."""
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert f"{path}: [uplink] fleet_key_file" in str(info.value)
    assert "allow_unsigned = true" in str(info.value)


def test_values_are_read(tmp_path: Path) -> None:
    text = '[agent]\nstate_dir = "/x"\n[serial]\nheartbeat_interval = 2\n[uplink]\nenabled = false'
    config = load(write(tmp_path, text))
    assert config.database == Path("/x/agent.db")
    assert config.serial.heartbeat_interval == 2.0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[store]\nsynchronus = 'FULL'\n", "[store] unknown key 'synchronus'"),
        ("[stroe]\n", "unknown section [stroe]"),
        ("[store]\nsynchronous = 'SOMETIMES'\n", "[store] synchronous = 'SOMETIMES'"),
        ("[store]\nmax_buffer_bytes = '1G'\n", "[store] max_buffer_bytes: expected int, got str"),
        ("[serial]\nbaudrate = 1.5\n", "[serial] baudrate: expected int, got float"),
        ("[serial]\nheartbeat_interval = nan\n", "[serial] heartbeat_interval: must be a finite"),
        ("[store]\nlow_water = 0.95\n", "[store] high_water"),
        ("[agent]\nvehicle_id = 'a/b'\n", "[agent] vehicle_id"),
        ("[serial\n", "not valid TOML"),
        ("store = 3\n", "[store] must be a table"),
        ("[uplink]\nfleet_key_file = '/k'\nusername = 'u'\n", "[uplink] username = 'u'"),
        ("[uplink]\nfleet_key_file = '/k'\nallow_unsigned = true\n", "[uplink] fleet_key_file"),
    ],
)
def test_errors_name_file_section_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_from_mapping_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^inline: "):
        from_mapping({"store": {"commit_max_events": 0}}, "inline")


def test_check_config_command(tmp_path: Path) -> None:
    key = tmp_path / "fleet.pub"
    key.write_text("a key file: check-config checks that it is there, and its owner and mode\n")
    good = write(tmp_path, f"[store]\nsynchronous = 'FULL'\n[uplink]\nfleet_key_file = '{key}'\n")
    ok = subprocess.run(
        [AGENT, "check-config", "--config", str(good)], capture_output=True, check=False
    )
    assert ok.returncode == 0
    assert b"ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[store]\nmax_buffer_bytes = 10\n")
    res = subprocess.run(
        [AGENT, "check-config", "--config", str(bad)], capture_output=True, check=False
    )
    assert res.returncode == 2
    assert b"max_buffer_bytes" in res.stderr
    assert str(bad).encode() in res.stderr


def test_every_command_has_help() -> None:
    for args in (["--help"], ["run", "--help"], ["check-config", "--help"]):
        res = subprocess.run([AGENT, *args], capture_output=True, text=True, check=False)
        assert res.returncode == 0
        assert "--config" in res.stdout or "run" in res.stdout


def test_version_is_the_installed_packages() -> None:
    """`--version` on every entry point prints what `pip` installed (click's default
    wording for the technician CLI; the other three keep the `name version` line they
    printed under argparse)."""
    expected = version("ironfleet-agent")
    for name, line in (
        ("ironfleet-agent", f"ironfleet-agent {expected}"),
        ("ironfleet", f"ironfleet, version {expected}"),
        ("ironfleet-collector", f"ironfleet-collector {expected}"),
        ("ironfleet-sim", f"ironfleet-sim {expected}"),
    ):
        program = str(Path(AGENT).with_name(name))
        res = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
        assert (res.returncode, res.stdout.strip(), res.stderr) == (0, line, ""), name


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("max_bytes_per_contact", 0, True),
        ("max_bytes_per_contact", 4095, False),
        ("max_bytes_per_contact", 4096, True),
        ("max_bytes_per_contact", 10**12, True),
        ("max_bytes_per_contact", 10**12 + 1, False),
        ("contact_seconds", 0.999, False),
        ("contact_seconds", 1, True),
        ("contact_seconds", 604_800, True),
        ("contact_seconds", 604_801, False),
    ],
)
def test_contact_window_bounds(tmp_path: Path, key: str, value: int, ok: bool) -> None:
    text = f"[uplink]\nfleet_key_file = '/k.pub'\n{key} = {value}\n"
    if ok:
        assert getattr(load(write(tmp_path, text)).uplink, key) == value
        return
    with pytest.raises(ConfigError, match=rf"\[uplink\] {key}"):
        load(write(tmp_path, text))
