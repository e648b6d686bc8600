"""Circuit breaker for the uplink: stop hammering a dead link, probe it, recover.

Semantics (from the incident's test suite):
- closed -> open after `failure_threshold` failures; a success while closed forgives one
  failure (3 failures then 2 successes leave 1);
- open -> half_open once `recovery_timeout` has passed since it opened;
- half_open -> closed after `half_open_successes` successes, whatever the threshold;
- a failure in half_open -> open again with a fresh timestamp, blocking a full period.

The breaker reads time only through its injected `clock` (monotonic by default), so wall
clock jumps cannot open or close it, and tests step a fake clock instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple


class BreakerState(StrEnum):
    """Breaker state; equal to the plain strings "closed", "open", "half_open"."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerSnapshot(NamedTuple):
    """A consistent view of the breaker, taken under its lock."""

    state: BreakerState
    failures: int
    successes: int


class CircuitBreaker:
    """Thread-safe circuit breaker with an injectable monotonic clock."""

    def __init__(
        self,
        failure_threshold: int,
        recovery_timeout: float,
        *,
        half_open_successes: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if type(failure_threshold) is not int or failure_threshold < 1:
            raise ValueError(f"failure_threshold must be an int >= 1, got {failure_threshold!r}")
        if not recovery_timeout >= 0:  # also rejects NaN
            raise ValueError(f"recovery_timeout must be >= 0 seconds, got {recovery_timeout!r}")
        if type(half_open_successes) is not int or half_open_successes < 1:
            raise ValueError(
                f"half_open_successes must be an int >= 1, got {half_open_successes!r}"
            )
        self.failure_threshold = failure_threshold
        self.recovery_timeout = float(recovery_timeout)
        self.half_open_successes = half_open_successes
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._transitions = 0

    # -- public -----------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """Current state; an open breaker past its timeout reads as half_open."""
        with self._lock:
            return self._settle()

    def allow(self) -> bool:
        """True if a call may go through now (closed, or probing in half_open)."""
        with self._lock:
            return self._settle() is not BreakerState.OPEN

    def record_success(self) -> None:
        """Count a successful call."""
        with self._lock:
            state = self._settle()
            if state is BreakerState.CLOSED:
                self._failures = max(0, self._failures - 1)
            elif state is BreakerState.HALF_OPEN:
                self._successes += 1
                if self._successes >= self.half_open_successes:
                    self._move(BreakerState.CLOSED)
            # A success reported while open is a late reply to a call made before it
            # opened; it proves nothing about the link now, so it is ignored.

    def record_failure(self) -> None:
        """Count a failed call."""
        with self._lock:
            state = self._settle()
            if state is BreakerState.CLOSED:
                self._failures += 1
                if self._failures >= self.failure_threshold:
                    self._open()
            elif state is BreakerState.HALF_OPEN:
                self._open()
            # While open, a late failure of an earlier call must not extend the wait.

    def snapshot(self) -> BreakerSnapshot:
        """State, failure count and half-open success count, read atomically."""
        with self._lock:
            return BreakerSnapshot(self._settle(), self._failures, self._successes)

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through; 0 when not open."""
        with self._lock:
            if self._settle() is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.recovery_timeout - self._clock())

    @property
    def transitions(self) -> int:
        """Number of state changes so far (a metric for flapping links)."""
        with self._lock:
            return self._transitions

    # -- private (caller holds the lock) ---------------------------------------------

    def _settle(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.recovery_timeout
        ):
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def _open(self) -> None:
        self._move(BreakerState.OPEN)
        self._opened_at = self._clock()

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self._successes = 0
        if state is BreakerState.CLOSED:
            self._failures = 0
        self._transitions += 1
