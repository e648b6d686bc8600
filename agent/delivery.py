"""What the fleet holds, as the store persists it: the uplink cursor, each priority class's
frontier, and each stream's checkpoint.

Mixed into `EventStore` (the single writer). The uplink drains its backlog highest
priority first (agent/resilience/cursor.py `ClassedCursor`), so a class can be delivered
far above the cursor (the rowid below which every class is). The frontiers are persisted
with the cursor, in one transaction, and `acked_sql` is the one definition of "the fleet
holds this row" that the eviction ladder and the TTL use: a row of a class drained ahead
is pruned as acknowledged, never shed and counted lost, and never sent again after a
restart.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence

from agent.errors import CommitFailed
from agent.resilience.cursor import CLASSES
from agent.storedb import (
    atomic,
    frontiers_text,
    held_sql,
    read_cursor,
    read_frontiers,
    set_state,
)
from agent.streamcache import StreamState


class DeliveryState:
    """Cursor, class frontiers and checkpoints of `EventStore` (which provides the state)."""

    conn: sqlite3.Connection
    counters: dict[str, int]
    _state: StreamState
    _cursor_value: int | None = None
    _frontiers_value: tuple[int, ...] | None = None

    def checkpoint(self, stream: str) -> tuple[int, int] | None:
        """(boot_epoch, seq) the fleet has acknowledged for `stream`, or None."""
        entry = self._state.entry(stream)
        return entry.checkpoint if entry is not None else None

    def checkpoints(self) -> dict[str, tuple[int, int]]:
        """Every stream's checkpoint (read from the database: one row per stream)."""
        return {
            name: (epoch, seq)
            for name, epoch, seq in self.conn.execute(
                "SELECT s.name, c.boot_epoch, c.seq FROM checkpoints AS c "
                "JOIN streams AS s ON s.id = c.stream_id"
            )
        }

    def mark_delivered(
        self,
        upto_rowid: int,
        positions: Mapping[str, tuple[int, int]],
        now: float | None = None,
        *,
        frontiers: Sequence[int] = (),
    ) -> bool:
        """Record that the fleet holds every event with rowid <= `upto_rowid`, and every
        event of priority class c with rowid <= `frontiers[c]`.

        The uplink cursor moves to `upto_rowid + 1`, each frontier and each stream's
        checkpoint to the highest value seen; none ever moves backwards (a call that moves
        nothing is ignored and counted in `acks_stale`). All are persisted in one
        transaction. Returns False if nothing moved.
        """
        at = time.time() if now is None else now
        cursor = max(upto_rowid + 1, self._cursor())
        old = self._frontiers()
        given = [int(f) for f in frontiers][:CLASSES]
        given += [upto_rowid] * (CLASSES - len(given))
        fronts = tuple(max(o, f, cursor - 1) for o, f in zip(old, given, strict=True))
        if cursor <= self._cursor() and fronts == old:
            self.counters["acks_stale"] += 1
            return False
        moves: dict[int, tuple[int, int]] = {}
        names: dict[int, str] = {}
        try:
            entries = self._state.entries(positions)  # may read the database: in the try
            for stream, position in positions.items():
                entry = entries.get(stream)
                if entry is None:
                    continue
                pos = (int(position[0]), int(position[1]))
                if entry.checkpoint is None or pos > entry.checkpoint:
                    moves[entry.sid] = pos
                    names[entry.sid] = stream
            with atomic(self.conn):
                self.conn.executemany(
                    "INSERT INTO checkpoints (stream_id, boot_epoch, seq, acked_at) "
                    "VALUES (?,?,?,?) ON CONFLICT (stream_id) DO UPDATE SET "
                    "boot_epoch = excluded.boot_epoch, seq = excluded.seq, "
                    "acked_at = excluded.acked_at",
                    [(sid, e, s, at) for sid, (e, s) in moves.items()],
                )
                set_state(self.conn, "uplink.cursor", str(cursor), at)
                set_state(self.conn, "uplink.frontiers", frontiers_text(fronts), at)
        except sqlite3.Error as exc:
            raise CommitFailed(f"checkpoint update failed: {exc}") from exc
        for sid, pos in moves.items():
            self._state.set_checkpoint(names[sid], pos)
        self._cursor_value = cursor
        self._frontiers_value = fronts
        self.counters["acks_applied"] += 1
        return True

    def _cursor(self) -> int:
        """Lowest rowid the fleet may not hold yet (persisted in agent_state)."""
        if self._cursor_value is None:
            self._cursor_value = read_cursor(self.conn)
        return self._cursor_value

    def _frontiers(self) -> tuple[int, ...]:
        """Each class's highest rowid the fleet holds every row of (never below cursor - 1)."""
        if self._frontiers_value is None:
            self._frontiers_value = read_frontiers(self.conn, self._cursor())
        return self._frontiers_value

    @property
    def cursor(self) -> int:
        """Lowest rowid the fleet has not acknowledged."""
        return self._cursor()

    @property
    def frontiers(self) -> tuple[int, ...]:
        """Each priority class's frontier (see `read_frontiers`)."""
        return self._frontiers()

    def acked_sql(self) -> str:
        """SQL true for an events row the fleet holds (storedb `held_sql`)."""
        return held_sql(self._cursor(), self._frontiers())
