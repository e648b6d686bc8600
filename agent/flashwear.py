"""Flash wear at run time: how many bytes the agent writes per event, and how long the
storage lasts at that rate.

The figure is the process's own: `write_bytes` of /proc/self/io, the bytes it caused to
be sent to the block layer (the store's pages, its WAL and checkpoints, the log if it
goes to a file), not the bytes it handed to write(2). The writer samples it with every
published snapshot; `FlashWear` keeps the samples of the last `WINDOW` seconds (bounded by
`MAX_SAMPLES`) and turns them into a rate, bytes per committed event, and the years until
`[store] flash_endurance_bytes` at that rate. Pure apart from `process_write_bytes`.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Final

WINDOW: Final = 600.0  # seconds of samples a rate is taken over
MAX_SAMPLES: Final = 1024  # one per publish (1 s): more than WINDOW's worth
YEAR: Final = 365.25 * 86400.0
PROC_IO: Final = Path("/proc/self/io")


def process_write_bytes(path: Path = PROC_IO) -> int | None:
    """This process's `write_bytes` so far, or None where the kernel does not count it
    (no task I/O accounting, or a file system that never reaches a block device)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "write_bytes":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class FlashWear:
    """Samples of (time, bytes written, events committed); figures over the last WINDOW."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=MAX_SAMPLES)
        self._first: tuple[float, int, int] | None = None

    def sample(self, now: float, written: int | None, events: int) -> None:
        """Record a sample (`written` None: not counted here, nothing recorded)."""
        if written is None:
            return
        sample = (now, written, events)
        if self._first is None:
            self._first = sample
        self._samples.append(sample)
        while self._samples and now - self._samples[0][0] > WINDOW:
            self._samples.popleft()

    def figures(self, endurance_bytes: int = 0) -> dict[str, float]:
        """`flash_write_bytes` since the process started; over the window, when it spans time:
        `flash_write_bytes_per_s`, `flash_bytes_per_event` (when events were committed) and
        `flash_years_left` (with an endurance budget and a rate above 0)."""
        if self._first is None:
            return {}
        last = self._samples[-1]
        out: dict[str, float] = {"flash_write_bytes": last[1]}  # since the process started
        start = self._samples[0]
        span, written, events = last[0] - start[0], last[1] - start[1], last[2] - start[2]
        if span <= 0:
            return out
        rate = max(0.0, written / span)
        out["flash_write_bytes_per_s"] = round(rate, 1)
        if events > 0:
            out["flash_bytes_per_event"] = round(written / events, 1)
        if endurance_bytes > 0 and rate > 0:
            out["flash_years_left"] = round(endurance_bytes / rate / YEAR, 2)
        return out
