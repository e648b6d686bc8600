"""An injected wall clock for a whole process, loaded by Python at start-up.

With this directory on PYTHONPATH and IRONFLEET_FAKE_CLOCK naming a file, `time.time`
and `time.time_ns` return the real time plus the offset (seconds) written in that file,
re-read at most every 5 ms: a test moves the wall clock of a running agent or simulator
by rewriting one line. The monotonic clock is untouched, as on a vehicle whose RTC is
stepped by NTP or GPS. (libfaketime does this with LD_PRELOAD, but under it Python's
`time.sleep` fails with EINVAL when the monotonic clock is left unfaked, and queue waits
hang when it is faked: measured with libfaketime 0.9.10.)
"""

from __future__ import annotations

import os
import time

_PATH = os.environ.get("IRONFLEET_FAKE_CLOCK")
_REFRESH_NS = 5_000_000

if _PATH:
    _real_time_ns = time.time_ns
    _monotonic_ns = time.monotonic_ns
    _state = {"offset_ns": 0, "read_at": -_REFRESH_NS}

    def _offset_ns() -> int:
        now = _monotonic_ns()
        if now - _state["read_at"] >= _REFRESH_NS:
            _state["read_at"] = now
            try:
                with open(_PATH, encoding="ascii") as fh:
                    _state["offset_ns"] = round(float(fh.read().strip() or 0) * 1e9)
            except (OSError, ValueError):
                pass  # keep the last offset: a file being replaced
        return _state["offset_ns"]

    def _time_ns() -> int:
        return _real_time_ns() + _offset_ns()

    def _time() -> float:
        return _time_ns() / 1e9

    time.time_ns = _time_ns
    time.time = _time
