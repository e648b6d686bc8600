"""The uplink's byte budget: `[uplink] max_bytes_per_second` on a scarce or billed link.

A token bucket in bytes that may go into debt by one message: a batch is sent whenever
the bucket is not empty, and its size is taken afterwards, so a batch larger than a
second's worth still goes out (the link is then quiet until the debt is repaid) and the
long-run rate never exceeds the budget by more than one batch. A plain bucket that
refuses a cost above its content would stall for ever on such a batch.

A contact window's quota (`[uplink] max_bytes_per_contact`, `contact_seconds`) caps what
one window may carry, for links billed per pass or per session: a window opens with the
first message sent after the previous one ended and lasts `contact_seconds` of monotonic
time, whatever the connection does inside it (a flapping link does not refill it).
Batches and state pages are cut to the room left (`room`), so a window's total exceeds
the quota by at most the smallest batch (QUOTA_MIN_BATCH) and one MQTT header.

Pure: the caller passes the monotonic time; `agent.resync.Resync` owns one and asks it
before each batch, live before backlog (docs/operations.md, section 4).
"""

from __future__ import annotations

import math
from typing import Final

QUOTA_MIN_BATCH: Final = 1024  # bytes: a batch cut to the window's room holds at least this


class ByteBudget:
    """`rate` bytes per second on average (0: unlimited), at most `burst` bytes at once
    after a quiet spell (default: one second's worth); and at most `per_contact` bytes
    per contact window of `contact_seconds` (0: no quota)."""

    def __init__(
        self,
        rate: float,
        burst: float = 0.0,
        *,
        now: float = 0.0,
        per_contact: int = 0,
        contact_seconds: float = 3600.0,
    ) -> None:
        if not (rate >= 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
        if per_contact < 0 or not (contact_seconds > 0 and math.isfinite(contact_seconds)):
            raise ValueError(
                f"per_contact must be >= 0 and contact_seconds > 0, got {per_contact!r}, "
                f"{contact_seconds!r}"
            )
        self.rate = float(rate)
        self.burst = float(burst) if burst > 0 else self.rate
        self._tokens = self.burst
        self._at = now
        self.spent = 0  # bytes sent through the budget
        self.per_contact = int(per_contact)
        self.contact_seconds = float(contact_seconds)
        # (opened at, bytes spent) of the current window, one tuple so that a reader in
        # another thread (the live snapshot) never pairs one window's start with another's
        # bytes; None until the first send.
        self._window: tuple[float, int] | None = None
        self._seen = now  # the latest time asked about: when a send without one happened

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def ready(self, now: float) -> bool:
        """Whether a message may go out at `now`: the bucket is not in debt and the
        contact window has room."""
        if self.room(now) <= 0:
            return False
        if self.unlimited:
            return True
        if now > self._at:  # a clock that steps back refills nothing
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        return self._tokens > 0

    def _open(self, now: float) -> tuple[float, int] | None:
        """The current window, if one is open at `now` (a clock that stepped back ends it:
        a step back can end a window early, never stretch one)."""
        w = self._window
        if w is None or not 0 <= now - w[0] < self.contact_seconds:
            return None
        return w

    def room(self, now: float) -> float:
        """Bytes the contact window allows at `now` (inf without a quota): what is left
        in the open window, or a whole quota when none is open (the next send opens one)."""
        self._seen = max(self._seen, now)
        if not self.per_contact:
            return math.inf
        w = self._open(now)
        return float(self.per_contact - (w[1] if w is not None else 0))

    def window_left(self, now: float) -> float:
        """Seconds until the open window ends (0 when none is open, or no quota)."""
        w = self._open(now) if self.per_contact else None
        return 0.0 if w is None else max(0.0, w[0] + self.contact_seconds - now)

    def window_opened(self, now: float) -> float | None:
        """When the window open at `now` opened (None when none is)."""
        w = self._open(now) if self.per_contact else None
        return None if w is None else w[0]

    def contact_spent(self, now: float) -> int:
        """Bytes sent in the window open at `now` (0 when none is)."""
        w = self._open(now)
        return 0 if w is None else w[1]

    def spend(self, nbytes: int, now: float | None = None) -> None:
        """Take the size of a message that went out at `now` (default: the latest time
        asked about); the bucket may go into debt, and the send opens a contact window
        when none is open."""
        self.spent += nbytes
        if not self.unlimited:
            self._tokens -= nbytes
        if self.per_contact:
            at = self._seen if now is None else now
            w = self._open(at) or (at, 0)
            self._window = (w[0], w[1] + nbytes)

    def seconds_for(self, nbytes: float) -> float:
        """How long `nbytes` take at the budget's rate (0 when unlimited)."""
        return 0.0 if self.unlimited else nbytes / self.rate


def drain_estimate(
    backlog_bytes: float, rate: float, per_contact: int, room: float
) -> tuple[float | None, int | None]:
    """(seconds the backlog takes at `rate`, further contact windows it needs after the
    `room` left in the current one); None where no limit is set. What `ironfleet status`
    and the metrics show: the budget decides the drain, not the link's speed."""
    seconds = backlog_bytes / rate if rate > 0 else None
    windows = None
    if per_contact > 0:
        windows = max(0, math.ceil((backlog_bytes - max(0.0, room)) / per_contact))
    return seconds, windows
