"""Helpers shared by the tests: waiting on conditions with deadlines, counting fds."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Console scripts of the venv running the tests.
SIM = str(Path(sys.executable).with_name("ironfleet-sim"))


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` until truthy, or fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def open_fds() -> int:
    """Number of file descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))
