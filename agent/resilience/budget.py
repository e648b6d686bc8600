"""The uplink's byte budget: `[uplink] max_bytes_per_second` on a scarce or billed link.

A token bucket in bytes that may go into debt by one message: a batch is sent whenever
the bucket is not empty, and its size is taken afterwards, so a batch larger than a
second's worth still goes out (the link is then quiet until the debt is repaid) and the
long-run rate never exceeds the budget by more than one batch. A plain bucket that
refuses a cost above its content would stall for ever on such a batch.

Pure: the caller passes the monotonic time; `agent.resync.Resync` owns one and asks it
before each batch, live before backlog (docs/operations.md, section 4).
"""

from __future__ import annotations

import math


class ByteBudget:
    """`rate` bytes per second on average (0: unlimited), at most `burst` bytes at once
    after a quiet spell (default: one second's worth)."""

    def __init__(self, rate: float, burst: float = 0.0, *, now: float = 0.0) -> None:
        if not (rate >= 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst) if burst > 0 else self.rate
        self._tokens = self.burst
        self._at = now
        self.spent = 0  # bytes sent through the budget

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def ready(self, now: float) -> bool:
        """Whether a message may go out at `now` (the bucket is not in debt)."""
        if self.unlimited:
            return True
        if now > self._at:  # a clock that steps back refills nothing
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        return self._tokens > 0

    def spend(self, nbytes: int) -> None:
        """Take the size of a message that went out (the bucket may go into debt)."""
        self.spent += nbytes
        if not self.unlimited:
            self._tokens -= nbytes

    def seconds_for(self, nbytes: float) -> float:
        """How long `nbytes` take at the budget's rate (0 when unlimited)."""
        return 0.0 if self.unlimited else nbytes / self.rate
