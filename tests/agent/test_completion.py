"""Shell completion of `ironfleet` (click's): what bash is told for a partial command line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from simharness import AGENT

CLI = str(Path(AGENT).with_name("ironfleet"))


def complete(*words: str) -> list[str]:
    env = {**os.environ, "COMP_WORDS": " ".join(["ironfleet", *words]),
           "COMP_CWORD": str(len(words)), "_IRONFLEET_COMPLETE": "bash_complete"}  # fmt: skip
    res = subprocess.run([CLI], env=env, capture_output=True, text=True, check=False)
    assert (res.returncode, res.stderr) == (0, "")
    return [line.split(",", 1)[1] for line in res.stdout.splitlines()]


@pytest.mark.parametrize(
    ("words", "expected"),
    [(("sta",), ["status"]), (("doctor", "--max"), ["--max-ack-age"]),
     (("bre",), ["breaker"])],
)  # fmt: skip
def test_commands_and_options_complete(words: tuple[str, ...], expected: list[str]) -> None:
    assert complete(*words) == expected


def test_the_bash_script_is_what_the_docs_tell_to_source() -> None:
    env = {**os.environ, "_IRONFLEET_COMPLETE": "bash_source"}
    res = subprocess.run([CLI], env=env, capture_output=True, text=True, check=True)
    assert "complete -o nosort -F _ironfleet_completion ironfleet" in res.stdout
    docs = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    assert 'eval "$(_IRONFLEET_COMPLETE=bash_source ironfleet)"' in docs
