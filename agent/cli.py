"""`ironfleet`: the technician CLI (being written)."""

from __future__ import annotations


def main() -> int:
    """Console entry point of `ironfleet`."""
    raise SystemExit("ironfleet: not built yet")
