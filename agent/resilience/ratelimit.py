"""Rate limits for what peers can make the agent do: a token bucket and a log throttle.

A peer that floods (a retained command re-delivered, a controller rebooting in a loop, a
script publishing pings) must cost the agent a bounded amount of work, memory and log
lines. Both classes are pure: time is passed in, so tests step a fake clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class TokenBucket:
    """Allows `rate` actions per second on average, with bursts of up to `burst`.

    Refused actions are counted in `refused` (for metrics); memory is constant.
    Not thread-safe: one owner.
    """

    def __init__(self, rate: float, burst: float, *, now: float = 0.0) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        if not (burst >= 1 and math.isfinite(burst)):
            raise ValueError(f"burst must be a finite number >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = now
        self.allowed = 0
        self.refused = 0

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take `cost` tokens if there are enough at `now`; False (and counted) if not."""
        if now > self._at:  # a clock that steps back refills nothing
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        if self._tokens >= cost:
            self._tokens -= cost
            self.allowed += 1
            return True
        self.refused += 1
        return False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `LogThrottle.check` decided: log this occurrence or not, and how many
    occurrences were held back since the last line that was logged (to report them)."""

    log: bool
    suppressed: int


class LogThrottle:
    """One log line per key per `interval` seconds; the rest are counted, not printed.

    The first occurrence of a key is logged at once; later ones within `interval` are
    suppressed, and the next logged line reports how many were ("N more in the last
    60 s"). Keys past `max_keys` share one overflow key, so a peer choosing keys cannot
    grow memory.
    """

    OVERFLOW = "<other>"

    def __init__(self, interval: float = 60.0, max_keys: int = 64) -> None:
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a finite number > 0, got {interval!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.interval = float(interval)
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def check(self, key: str, now: float) -> Verdict:
        """Whether to log this occurrence of `key` at `now`, and how many were held back."""
        if key not in self._last and len(self._last) >= self.max_keys:
            key = self.OVERFLOW
        last = self._last.get(key)
        if last is None or now - last >= self.interval or now < last:
            held = self._held.pop(key, 0)
            self._last[key] = now
            return Verdict(True, held)
        self._held[key] = self._held.get(key, 0) + 1
        return Verdict(False, 0)
