"""The command lines of `ironfleet-collector` and `python -m fleet.demo` (click, fleet/cli.py):
usage errors exit 2 naming the option, the signing options exclude each other, every
subcommand has --help listing its options. In process through `main(argv)`, as the
console script calls it, plus one real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from fleet import demo
from fleet.cli import cli, main

COLLECTOR = str(Path(sys.executable).with_name("ironfleet-collector"))
SIGNED = ["run", "replay", "import"]  # the subcommands taking --signing-key or --unsigned


def _required(command: str, tmp_path: Path) -> list[str]:
    """The arguments `command` needs besides the signing options."""
    return {
        "run": ["--db", str(tmp_path / "c.db")],
        "replay": ["--vehicle", "v1"],
        "import": [str(tmp_path / "bundle"), "--db", str(tmp_path / "c.db"),
                   "--vehicle-keys", str(tmp_path)],
    }[command]  # fmt: skip


@pytest.mark.parametrize("command", SIGNED)
def test_signing_key_and_unsigned_exclude_each_other(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "fleet.key"  # never read: the usage error comes first
    argv = [command, *_required(command, tmp_path), "--signing-key", str(key), "--unsigned"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--signing-key and --unsigned exclude each other" in err
    assert f"Usage: ironfleet-collector {command}" in err
    assert not (tmp_path / "c.db").exists()  # nothing done before the usage error


@pytest.mark.parametrize("command", SIGNED)
def test_one_of_the_signing_options_is_required(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, *_required(command, tmp_path)]) == 2
    assert "give --signing-key FILE or --unsigned" in capsys.readouterr().err


def test_usage_errors_exit_2_and_name_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["retention", "--db", "postgresql://x/y", "--keep-days", "soon"]) == 2
    assert "Invalid value for '--keep-days': 'soon' is not a valid integer" in (
        capsys.readouterr().err
    )
    assert main(["report"]) == 2
    assert "Missing option '--db'" in capsys.readouterr().err
    assert main(["run", "--db", "c.db", "--unsigned", "--writer", "2"]) == 2  # no abbreviations
    assert "No such option '--writer'" in capsys.readouterr().err
    assert main(["keygen", "--private", "k"]) == 2
    assert "Missing option '--public'" in capsys.readouterr().err
    assert main(["collect"]) == 2
    assert "No such command 'collect'" in capsys.readouterr().err
    assert main([]) == 2  # a subcommand is required: the help, as the error


def test_every_subcommand_has_help_listing_its_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    assert set(cli.commands) == {"run", "report", "replay", "retention", "import", "keygen"}
    for name, command in cli.commands.items():
        assert name in out
        assert main([name, "--help"]) == 0
        usage = capsys.readouterr().out
        assert usage.startswith(f"Usage: ironfleet-collector {name} [OPTIONS]")
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} has no help text"
                assert all(opt in usage for opt in param.opts), (name, param.opts)
    assert main(["run", "-h"]) == 0
    run_help = capsys.readouterr().out
    assert "--signing-key FILE" in run_help
    assert "--session-expiry SECONDS" in run_help


def test_repeatable_and_default_values_are_the_argparse_ones() -> None:
    run = cli.commands["run"]
    ctx = run.make_context("run", ["--db", "c.db", "--unsigned", "--vehicle", "a",
                                   "--vehicle", "b"])  # fmt: skip
    assert ctx.params["vehicles"] == ("a", "b")
    assert ctx.params["broker"] == "127.0.0.1:1883"
    assert (ctx.params["session_expiry"], ctx.params["store_wait"]) == (60, 60.0)
    assert (ctx.params["writers"], ctx.params["client_id"], ctx.params["group"]) == (0, None, None)


def test_the_console_script_exits_2_on_a_usage_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [COLLECTOR, "run", "--db", str(tmp_path / "c.db"), "--unsigned", "--signing-key", "k"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "--signing-key and --unsigned exclude each other" in res.stderr
    assert res.stdout == ""


def test_demo_usage_error_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--scale", "fast"]) == 2
    assert "Invalid value for '--scale'" in capsys.readouterr().err
    assert demo.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: python -m fleet.demo [OPTIONS]")
    assert "--workdir PATH" in out
    assert "--scale FLOAT" in out
