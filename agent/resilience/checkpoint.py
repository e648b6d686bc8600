"""Checkpoints: per-stream positions the fleet has acknowledged, never moving backwards."""

from __future__ import annotations

import threading
from collections.abc import Mapping


class CheckpointManager:
    """Thread-safe, monotonic per-stream checkpoint positions with delta-based cadence.

    `mark` is the only way a position changes, and only upwards; lower or equal marks are
    ignored and counted in `ignored` (stale or duplicated fleet acks are expected after a
    reconnect, and a counter makes them visible without treating them as errors).
    Persistence is the store's job: it loads positions with `load` and saves what `mark`
    accepted in the same transaction as the state that depends on it.
    """

    def __init__(self, interval: int = 1000) -> None:
        if type(interval) is not int or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        self.interval = interval
        self._positions: dict[str, int] = {}
        self._ignored = 0
        self._lock = threading.Lock()

    def mark(self, stream: str, seq: int) -> bool:
        """Advance `stream` to `seq` if higher; return False (and change nothing) otherwise."""
        with self._lock:
            current = self._positions.get(stream)
            if current is not None and seq <= current:
                self._ignored += 1
                return False
            self._positions[stream] = seq
            return True

    def position(self, stream: str) -> int | None:
        """The checkpointed sequence of `stream`, or None if it has none yet."""
        with self._lock:
            return self._positions.get(stream)

    def should_checkpoint(self, stream: str, seq: int) -> bool:
        """True once `seq` is at least `interval` past the stream's position (0 if none)."""
        with self._lock:
            current = self._positions.get(stream, 0)
            return seq - current >= self.interval

    def load(self, positions: Mapping[str, int]) -> None:
        """Apply persisted positions at start-up; like `mark`, never lowers one."""
        for stream, seq in positions.items():
            self.mark(stream, seq)

    def positions(self) -> dict[str, int]:
        """A copy of every stream's position."""
        with self._lock:
            return dict(self._positions)

    @property
    def ignored(self) -> int:
        """How many marks were ignored for being lower than or equal to the position."""
        with self._lock:
            return self._ignored
