"""Capped exponential backoff with full jitter, for serial and MQTT reconnects."""

from __future__ import annotations

import random


class Backoff:
    """Delays for successive retries: uniform in [0, min(cap, base * 2**attempt)].

    Full jitter spreads 500 vehicles reconnecting after a broker restart instead of having
    them retry in lockstep. The random source is injected so tests are deterministic.
    Not thread-safe: each retry loop owns one.
    """

    def __init__(self, base: float, cap: float, *, rng: random.Random | None = None) -> None:
        if not base > 0:
            raise ValueError(f"base must be > 0 seconds, got {base!r}")
        if not cap >= base:
            raise ValueError(f"cap must be >= base ({base}), got {cap!r}")
        self.base = float(base)
        self.cap = float(cap)
        self._rng = rng if rng is not None else random.Random()
        self.attempt = 0

    def ceiling(self) -> float:
        """Upper bound of the next delay."""
        # min() before the power would overflow after ~1000 attempts; cap the exponent.
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        """Delay before the next retry; each call counts one more attempt."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0
