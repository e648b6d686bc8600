"""Process helpers the benchmarks share: a child's name, a wait with a deadline that fails
as soon as a child dies, and a stop that ends in SIGKILL. Only processes a bench started
are touched."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def exe(proc: subprocess.Popen[bytes]) -> str:
    """The file name of the program `proc` runs."""
    args = proc.args
    return Path(os.fsdecode(args[0] if isinstance(args, list) else str(args))).name


def wait_for(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    alive: Iterable[subprocess.Popen[bytes]],
    *,
    fail: Callable[[str], BaseException],
    poll: float,
) -> None:
    """Poll `ready()` every `poll` seconds until true; raise `fail(message)` after
    `timeout` or as soon as a process in `alive` exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        for proc in alive:
            if proc.poll() is not None:
                raise fail(f"{what}: {exe(proc)} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return int(proc.returncode)
