"""The delivery cursor: what the fleet holds, from acks that arrive in any order.

Batches cover contiguous runs of the store's rowids. The fleet acknowledges them one by
one, out of order after a reconnect or with several collectors, some twice, some never.
A row counts as delivered only when every row before it is: the cursor moves over acked
runs that join it, and only forwards. Each stream's checkpoint is the highest position
(boot_epoch, seq) among the runs the cursor passed, never lowered.

Pure: the uplink's `Resync` owns one and persists what `ack` returns (through the
writer, in one transaction with the checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Position = tuple[int, int]  # (boot_epoch, seq)


@dataclass(frozen=True, slots=True)
class AckedRun:
    """Rows [first, last] acknowledged together, and each stream's highest position."""

    first: int
    last: int
    positions: Mapping[str, Position]


def _highest(a: Mapping[str, Position], b: Mapping[str, Position]) -> dict[str, Position]:
    """Each stream's highest position over two runs."""
    out = dict(a)
    for stream, pos in b.items():
        if pos > out.get(stream, (-1, -1)):
            out[stream] = pos
    return out


class DeliveryCursor:
    """`delivered` is the highest rowid such that every row at or below it is acked.

    Runs acked ahead of a missing one wait, joined where they touch, at most `max_pending`
    of them (the oldest go first: a run that old is resent in other batches anyway); a run
    at or below the cursor is dropped on arrival.
    """

    def __init__(self, delivered: int = 0, *, max_pending: int = 4096) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending!r}")
        self.delivered = delivered
        self.max_pending = max_pending
        self._pending: list[AckedRun] = []

    @property
    def pending(self) -> int:
        """Acked runs waiting for an earlier one."""
        return len(self._pending)

    def restore(self, delivered: int) -> None:
        """Raise the cursor to a persisted value (never lowers it)."""
        self.delivered = max(self.delivered, delivered)
        self._pending = [r for r in self._pending if r.last > self.delivered]

    def ack(self, run: AckedRun) -> tuple[int, dict[str, Position]] | None:
        """Apply one acked run; return (new cursor, positions passed) if the cursor moved.

        The positions are the highest per stream over every run the cursor passed now:
        what the checkpoints may move to. None when the cursor did not move (a run ahead
        of a gap, or one already covered).
        """
        if run.last <= self.delivered:
            return None
        if not self._pending and run.first <= self.delivered + 1:
            # In order with nothing waiting (a drain's steady state): the run joins the
            # cursor alone, and its positions are the ones passed.
            self.delivered = run.last
            return run.last, dict(run.positions)
        # Runs that touch or overlap join into one: a long drain whose live batches are
        # acked ahead of the backlog keeps one waiting run, not one per batch (at 5 live
        # batches a second the cap dropped runs after 14 minutes, and their rows were
        # sent again once the backlog caught up).
        joined = run
        kept = []
        for other in self._pending:
            if other.first <= joined.last + 1 and joined.first <= other.last + 1:
                joined = AckedRun(
                    min(joined.first, other.first),
                    max(joined.last, other.last),
                    _highest(joined.positions, other.positions),
                )
            else:
                kept.append(other)
        kept.append(joined)
        self._pending = kept
        upto = self.delivered
        positions: dict[str, Position] = {}
        progress = True
        while progress:
            progress = False
            for waiting in list(self._pending):
                if waiting.first <= upto + 1:
                    self._pending.remove(waiting)
                    upto = max(upto, waiting.last)
                    for stream, pos in waiting.positions.items():
                        if pos > positions.get(stream, (-1, -1)):
                            positions[stream] = pos
                    progress = True
        del self._pending[: -self.max_pending]  # the cap counts only runs left waiting
        if upto <= self.delivered:
            return None
        self.delivered = upto
        return upto, positions


CLASSES = 8  # priority classes: the serial protocol's priorities 0..7


def class_of(priority: int) -> int:
    """A row's priority class (the top class takes every priority above it)."""
    return min(max(priority, 0), CLASSES - 1)


def is_held(rowid: int, priority: int, delivered: int, frontiers: Sequence[int]) -> bool:
    """Whether the fleet holds a stored row: every row at or below `delivered` is, and a
    row at or below its class's frontier is (the backlog drained that class ahead). The
    definition the store's SQL (agent/delivery.py `acked_sql`) is checked against."""
    cls = class_of(priority)
    return rowid <= delivered or (cls < len(frontiers) and rowid <= frontiers[cls])


class ClassedCursor:
    """The delivery cursor when the backlog drains by priority: one `DeliveryCursor` per
    priority class, and `delivered` the rowid every class has reached.

    A run of one class (`ack(run, cls)`) covers only that class's rows in [first, last]
    (the backlog sent high priority first); a run of every class (`cls` None: live
    batches, receipts) covers all rows in its range. A row is delivered once the runs of
    its class join below it, so `delivered`, the minimum over the classes, is what may be
    persisted and pruned, exactly as with one cursor when every run covers every class.
    Checkpoint positions passed by one class wait until `delivered` moves, then go out
    together (at most one per stream).
    """

    def __init__(
        self, delivered: int = 0, *, classes: int = CLASSES, max_pending: int = 4096
    ) -> None:
        self.cursors = [DeliveryCursor(delivered, max_pending=max_pending) for _ in range(classes)]
        self._positions: dict[str, Position] = {}

    @property
    def delivered(self) -> int:
        return min(c.delivered for c in self.cursors)

    @property
    def pending(self) -> int:
        """Acked runs waiting for an earlier one, over every class."""
        return sum(c.pending for c in self.cursors)

    def frontier(self, cls: int) -> int:
        """Highest rowid at or below which every row of class `cls` is acked."""
        return self.cursors[cls].delivered

    @property
    def frontiers(self) -> tuple[int, ...]:
        """Every class's frontier, lowest class first: what is persisted with the cursor,
        so a row of a class drained ahead counts as delivered for space, TTL and restarts."""
        return tuple(c.delivered for c in self.cursors)

    def restore(self, delivered: int, frontiers: Sequence[int] = ()) -> None:
        """Raise every class to a persisted value, and each class to its persisted
        frontier if given (never lowers one)."""
        for i, c in enumerate(self.cursors):
            c.restore(max(delivered, frontiers[i] if i < len(frontiers) else delivered))

    def ack(self, run: AckedRun, cls: int | None = None) -> tuple[int, dict[str, Position]] | None:
        """Apply one acked run of class `cls` (None: every class); return (new `delivered`,
        positions passed) if `delivered` moved, as `DeliveryCursor.ack` does."""
        before = self.delivered
        for c in self.cursors if cls is None else (self.cursors[cls],):
            moved = c.ack(run)
            if moved is None:
                continue
            if not self._positions:
                self._positions = moved[1]  # a fresh dict: nothing to merge with
                continue
            for stream, pos in moved[1].items():
                if pos > self._positions.get(stream, (-1, -1)):
                    self._positions[stream] = pos
        after = self.delivered
        if after <= before:
            return None
        positions, self._positions = self._positions, {}
        return after, positions
