"""`ironfleet-sim`'s command line (click): ranges refused as usage errors (exit 2, naming
the option) before anything runs, `--window` at MAX_WINDOW and MAX_WINDOW + 1, the
argparse-era defaults and repeatable `--replay`, the help's option groups."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from firmware_bridge.controller import DEFAULT_RING
from firmware_bridge.protocol import MAX_WINDOW
from firmware_bridge.simdevice import SimOptions
from firmware_bridge.simulator import cli, main

from support import SIM


def _parsed(*argv: str) -> SimOptions:
    """The options `argv` parses to, without running the simulation."""
    return SimOptions(**cli.make_context("ironfleet-sim", list(argv)).params)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--window", "0"], "--window"),
        (["--window", str(MAX_WINDOW + 1)], "--window"),
        (["--controllers", "0"], "--controllers"),
        (["--streams", "0"], "--streams"),
        (["--ring", "0"], "--ring"),
        (["--rate", "0"], "--rate"),
        (["--rate", "-5"], "--rate"),
        (["--profile", "truck"], "--profile"),
        (["--events", "many"], "--events"),
        (["--ber", "high"], "--ber"),
    ],
)
def test_a_bad_value_exits_2_naming_the_option(
    argv: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = tmp_path / "truth.jsonl"
    assert main([*argv, "--truth", str(truth), "--duration", "0.1"]) == 2
    captured = capsys.readouterr()
    assert f"Invalid value for '{option}'" in captured.err
    assert captured.err.startswith("Usage: ironfleet-sim [OPTIONS]")
    assert "DEVICE" not in captured.out
    assert not truth.exists()  # refused before anything ran


def test_window_at_its_maximum_is_accepted() -> None:
    assert _parsed("--window", str(MAX_WINDOW)).window == MAX_WINDOW


def test_defaults_and_repeatable_replay() -> None:
    options = _parsed()
    assert (options.controllers, options.controller_id, options.streams) == (1, "ecu", 4)
    assert (options.rate, options.window, options.ring) == (100.0, 64, DEFAULT_RING)
    assert (options.link_name, options.profile, options.baudrate) == (
        "ttyIF{index}", "counter", 921_600)  # fmt: skip
    assert (options.seed, options.link_dir, options.truth, options.replay) == (
        None, None, None, ())  # fmt: skip
    assert not options.bare_streams
    assert not options.replug_rename
    two = _parsed("--replay", "a.ifcap.1", "--replay", "a.ifcap", "--link-dir", "dev")
    assert two.replay == (Path("a.ifcap.1"), Path("a.ifcap"))
    assert two.link_dir == Path("dev")
    assert _parsed("--seed", "-5", "--ber=1e-4").seed == -5  # a negative value, '=' form


def test_every_option_is_a_field_of_the_options() -> None:
    names = {p.name for p in cli.params} - {"version"}
    assert names == {f.name for f in dataclasses.fields(SimOptions)}


def test_help_lists_the_option_groups() -> None:
    res = subprocess.run([SIM, "-h"], capture_output=True, text=True, check=False, timeout=30)
    assert res.returncode == 0, res.stderr
    headings = [line for line in res.stdout.splitlines() if line.endswith(":") and line[0] != " "]
    assert headings == ["options:", "controllers and traffic:", "device:", "link protocol:",
                        "fault injection (controller to agent):", "output:",
                        "replay of a wire capture (instead of simulated controllers):"]  # fmt: skip
    assert "--window INTEGER RANGE" in res.stdout
    assert f"1<=x<={MAX_WINDOW}" in res.stdout


def test_the_console_script_exits_2_on_a_usage_error() -> None:
    res = subprocess.run([SIM, "--window", str(MAX_WINDOW + 1)], capture_output=True, text=True,
                         check=False, timeout=30)  # fmt: skip
    assert res.returncode == 2
    assert f"Invalid value for '--window': {MAX_WINDOW + 1} is not in the range" in res.stderr
    assert res.stdout == ""
