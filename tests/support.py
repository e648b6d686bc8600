"""Helpers shared by the tests: waiting on conditions with deadlines, counting fds."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from agent.fleet_auth import FleetSigner, keygen, load_private_key

# Console scripts of the venv running the tests.
SIM = str(Path(sys.executable).with_name("ironfleet-sim"))


@functools.cache
def fleet_keys() -> tuple[Path, Path]:
    """(private, public) PEM files of a fleet signing key pair, made once per process:
    agents started by the harnesses verify with the public one, collectors sign."""
    folder = Path(tempfile.mkdtemp(prefix="ironfleet-test-keys-"))
    keygen(folder / "fleet.key", folder / "fleet.pub")
    return folder / "fleet.key", folder / "fleet.pub"


@functools.cache
def vehicle_keys(vehicle: str) -> tuple[Path, Path]:
    """(the vehicle's private key, the collector's --vehicle-keys directory holding its
    `<vehicle>.pub`), made once per process and vehicle id."""
    folder = Path(tempfile.mkdtemp(prefix="ironfleet-test-vehicle-keys-"))
    (folder / "pub").mkdir()
    keygen(folder / "vehicle.key", folder / "pub" / f"{vehicle}.pub")
    return folder / "vehicle.key", folder / "pub"


def fleet_signer() -> FleetSigner:
    """The signer of `fleet_keys()`."""
    return FleetSigner(load_private_key(str(fleet_keys()[0])))


# A deadline is what the wait takes on an idle machine; a loaded one (CI beside other
# work, a burner per core) stretches it by its load per core, up to this factor.
MAX_SLOWDOWN: Final = 4.0


def slowdown() -> float:
    """How much slower than idle this machine runs now: 1-minute load per core, in
    [1, MAX_SLOWDOWN]. Deadlines scale by it; what a test asserts never does."""
    per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    return min(MAX_SLOWDOWN, max(1.0, per_core))


def scaled(seconds: float) -> float:
    """`seconds` of an idle machine, stretched by `slowdown()`: for timeouts of waits."""
    return seconds * slowdown()


def wait_for(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll `condition` until truthy, or fail after `timeout` seconds (scaled by
    `slowdown()`) naming `what` (and what `detail` says, to read the failure by)."""
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            more = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}{more}")
        time.sleep(0.01)


def open_fds() -> int:
    """Number of file descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))
