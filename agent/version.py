"""Which version of the agent this is: what `--version` prints and the start line logs.

A module of its own, not `agent/__init__.py`: under an editable install pytest's
`pythonpath = ["tests"]` makes `tests/agent/` a namespace portion named `agent`, which
wins over the editable finder for `agent` itself (its submodules still resolve), so a
name defined in `agent/__init__.py` cannot be imported in the test run.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "ironfleet-agent"


def agent_version() -> str:
    """The installed package's version; "unknown" when run from a tree never installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
