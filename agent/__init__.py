"""IronFleet edge agent: durable buffering, replay and uplink of vehicle telemetry."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "ironfleet-agent"


def agent_version() -> str:
    """The installed package's version (what `--version` prints and the start line logs);
    "unknown" when run from a tree that was never installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
