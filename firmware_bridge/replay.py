"""`ironfleet-sim --replay`: a wire capture's controller side played back into a pty.

The bytes the controller sent (direction 0 of `firmware_bridge.capture`) are written to a
fresh pseudo-terminal in their recorded order, either at the recorded pace (gaps kept,
so timing bugs reproduce) or as fast as the agent reads. What the agent sends back is read
and dropped: the capture, not this process, plays the controller, so the agent stores
what it stored from the original line, and its duplicates and gaps come out the same.

Playback starts once the agent has opened the port (its first byte arrives), because a
serial open may flush input that was written before it.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from firmware_bridge.capture import FROM_CONTROLLER, read_records

OPEN_TIMEOUT = 60.0  # seconds to wait for the agent to open the port
DRAIN_WAIT = 1.0  # seconds after the last record for the agent to take the last bytes


def replay(
    files: Sequence[Path],
    *,
    link: Path | None,
    paced: bool,
    announce: Callable[[str], None],
    stopped: Callable[[], bool],
) -> dict[str, Any]:
    """Play `files` (oldest first) into a new pty; returns counts for the summary line."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    path = os.ttyname(slave)
    if link is not None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(path)
        path = str(link)
    announce(path)
    sent = records = 0
    try:
        if not _wait_for_reader(master, stopped):
            return {"replayed_records": 0, "replayed_bytes": 0, "error": "agent never opened"}
        start = time.monotonic()
        first: float | None = None
        for f in files:
            for rec in read_records(f):
                if rec.direction != FROM_CONTROLLER:
                    continue
                if stopped():
                    break
                first = rec.at if first is None else first
                if paced:
                    _pause_until(master, start + (rec.at - first), stopped)
                _write_all(master, rec.data, stopped)
                sent += len(rec.data)
                records += 1
        _pause_until(master, time.monotonic() + DRAIN_WAIT, stopped)
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        if link is not None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
    return {"replayed_records": records, "replayed_bytes": sent}


def _drain(master: int) -> int:
    """Read and drop what the agent sent; bytes read."""
    got = 0
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(master, 65536):
            got += len(chunk)
    return got


def _wait_for_reader(master: int, stopped: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + OPEN_TIMEOUT
    while time.monotonic() < deadline and not stopped():
        select.select([master], [], [], 0.1)
        if _drain(master):
            return True
    return False


def _pause_until(master: int, when: float, stopped: Callable[[], bool]) -> None:
    while (left := when - time.monotonic()) > 0 and not stopped():
        select.select([master], [], [], min(left, 0.1))
        _drain(master)


def _write_all(master: int, data: bytes, stopped: Callable[[], bool]) -> None:
    view = memoryview(data)
    while view and not stopped():
        try:
            view = view[os.write(master, view) :]
        except BlockingIOError:
            select.select([master], [master], [], 0.1)
            _drain(master)  # the agent's replies must not fill the other direction
