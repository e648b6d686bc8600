"""The store's space policy: capacity against the disk, and the eviction ladder.

Mixed into `EventStore` (the single writer); the ladder's steps run in their own
transactions and work on rowid ranges and a subquery of each stream's latest rowid
(`stream_epochs`), so no step builds anything in memory per stream or per event. Which
events go first is the core's definition (agent/resilience/ladder.py `victim_order`);
this is its SQL fast path, checked against it in tests/agent/test_ladder_vs_core.py.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from agent.config import StoreSection
from agent.resilience.ladder import (
    ACKED,
    COMPACT_LOW_PRIORITY,
    DROP,
    DROP_OLDEST,
    EXPIRED,
    REFUSE,
    SANE_WALL_CLOCK,
)
from agent.resilience.loss import LossLedger
from agent.storedb import (
    EXPORTS_DIR,
    PAGE_SIZE,
    WAL_RESERVE_BYTES,
    atomic,
    held_sql,
    set_state,
)

log = logging.getLogger("agent.store")

# Rowids eviction keeps: each stream's latest event (its newest stored boot epoch). A
# subquery SQLite materializes once per statement, never a list built in Python.
KEEP_LATEST: Final = (
    "SELECT latest_rowid FROM stream_epochs AS k WHERE k.boot_epoch = "
    "(SELECT max(boot_epoch) FROM stream_epochs WHERE stream_id = k.stream_id)"
)


# Recording what is shed takes a page of `shed` now and then, and a database at its hard
# page cap has none free: without room the ladder failed for good and ACKs stopped (a 6 MiB
# tmpfs, 22-page cap). The ladder may overdraw the cap by this much while it runs; each of
# its transactions frees far more than it takes, and the free-space floor absorbs 64 KiB.
LADDER_OVERDRAFT_PAGES: Final = 16


# Rowids one ladder transaction may span. The WAL reserve (storedb.WAL_RESERVE_BYTES)
# allows about 250 pages of growth past an autocheckpoint; a ladder step deleting across
# the whole file in one transaction rewrote most of it (a 2.2 MB store grew its WAL to
# 5.8 MB under load and the free-space floor fell to 0.3 MiB). 2,048 rows of 100-300 B
# span at most ~150 leaf pages.
LADDER_WINDOW_IDS: Final = 2048


class EvictionLadder:
    """Space figures and the eviction ladder of `EventStore` (which provides the state)."""

    conn: sqlite3.Connection
    config: StoreSection
    path: Path
    counters: dict[str, int]
    loss: LossLedger
    _free_bytes: Callable[[Path], int]
    _rows: int
    _next_id: int

    def _cursor(self) -> int:
        raise NotImplementedError

    def _frontiers(self) -> tuple[int, ...]:
        raise NotImplementedError

    def acked_sql(self) -> str:
        raise NotImplementedError

    def used_bytes(self) -> int:
        """Bytes of database pages in use (free pages are reused before the file grows)."""
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * PAGE_SIZE)

    def capacity(self) -> int:
        """The effective cap: max_buffer_bytes, lowered to keep min_free_bytes on disk."""
        c = self.config
        free = self._free_bytes(self.path.parent)
        # Our own file counts as usable whole (free pages included): SQLite reuses them
        # but never returns them to the disk, so counting only pages in use would lower
        # the cap by every eviction and shed the whole backlog for nothing. Its size on
        # disk, not page_count: pages still in the WAL take free space when checkpointed.
        own = self.path.stat().st_size
        # The WAL is not room for the database: it grows to about one checkpoint before
        # it is reused, and that growth must come out of free space too. (Counting the
        # WAL as ours let a small file system fill to 0 under a 1 MiB floor: measured.)
        wal = Path(f"{self.path}-wal")
        wal_room = max(0, WAL_RESERVE_BYTES - (wal.stat().st_size if wal.exists() else 0))
        allowed = own + free - c.min_free_bytes - wal_room
        return max(0, min(c.max_buffer_bytes, allowed))

    def needs_room(self) -> bool:
        """True when usage is above the high-water mark of the effective cap.

        Also lowers SQLite's hard page cap to the effective cap, so the free-space floor
        holds even if the ladder cannot keep up (SQLite never shrinks below the file).
        """
        cap = self.capacity()
        self.conn.execute(f"PRAGMA max_page_count = {max(1, math.ceil(cap / PAGE_SIZE))}")
        return self.used_bytes() >= self.config.high_water * cap

    def make_room(self, now: float | None = None, before: Callable[[], None] | None = None) -> bool:
        """Run the eviction ladder until usage is under the low-water mark.

        1. delete events the fleet acknowledged (keeping each stream's latest);
        2. compact low-priority streams to their latest event;
        3. drop the oldest events of the lowest priority present.
        Steps 2 and 3 lose data the fleet has not seen: each is recorded in `shed`.
        Returns False if still above the mark (the caller then stops ACKing). `before`
        runs first, inside the ladder's page overdraft: the writer persists the fleet's
        latest acks there, so step 1 prunes them (at the hard cap, outside it, that commit
        would fail and the ladder shed rows the fleet already holds).
        """
        at = time.time() if now is None else now
        target = self.config.low_water * self.capacity()
        keep = self._latest_rowids()
        steps: list[tuple[str, Callable[[str, float, float], None]]] = [(ACKED, self._prune_acked)]
        if self.config.full_policy_low == DROP:  # else the class is kept: refuse new
            steps.append((COMPACT_LOW_PRIORITY, self._compact_low_priority))
        if DROP in (self.config.full_policy, self.config.full_policy_low):
            steps.append((DROP_OLDEST, self._drop_oldest))
        cap_pages = int(self.conn.execute("PRAGMA max_page_count").fetchone()[0])
        self.conn.execute(f"PRAGMA max_page_count = {cap_pages + LADDER_OVERDRAFT_PAGES}")
        try:
            if before is not None:
                before()
            for name, step in steps:
                if self.used_bytes() <= target:
                    return True
                try:
                    step(keep, target, at)  # each transaction of a step is atomic()
                except sqlite3.Error as exc:
                    log.error("evict_failed step=%s error=%r", name, str(exc))
                    return False
            return self.used_bytes() <= target
        finally:
            self.conn.execute(f"PRAGMA max_page_count = {cap_pages}")

    def expire(self, now: float) -> int:
        """Shed the unacknowledged events past their class's TTL ([store] ttl_seconds,
        ttl_low_seconds; agent/resilience/ladder.py `is_expired`, the definition this is
        the SQL of), oldest first, recorded in `shed` with reason `ttl`. Rows are stored in
        wall-clock order, so the scan stops at the first window with nothing that old."""
        c = self.config
        low = int(c.low_priority_max)
        classes = [(f"priority <= {low}", c.ttl_low_seconds), (f"priority > {low}", c.ttl_seconds)]
        keep = self._latest_rowids()
        shed = 0
        for cls, ttl in classes:
            if ttl <= 0 or now - ttl < SANE_WALL_CLOCK:
                continue
            cutoff = now - ttl
            where = (
                f"id >= ? AND id < ? AND {cls} AND received_at >= {SANE_WALL_CLOCK!r} "
                f"AND received_at < ? AND id NOT IN ({keep})"
            )
            for lo, hi in self._windows(start=self._cursor()):
                oldest = self.conn.execute(
                    "SELECT min(received_at) FROM events WHERE id >= ? AND id < ? "
                    f"AND received_at >= {SANE_WALL_CLOCK!r}",
                    (lo, hi),
                ).fetchone()[0]
                if oldest is not None and oldest >= cutoff:
                    break
                hit = self.conn.execute(
                    f"SELECT 1 FROM events WHERE {where} LIMIT 1", (lo, hi, cutoff)
                ).fetchone()
                if hit:
                    shed += self._shed(where, (lo, hi, cutoff), EXPIRED, now, quiet=True)
        if shed:
            log.warning("expire step=ttl shed=%d", shed)
        return shed

    @staticmethod
    def _latest_rowids() -> str:
        """SQL for the rowids eviction must keep: each stream's latest event."""
        return KEEP_LATEST

    def _remember_max_id(self, at: float) -> None:
        # Inside the deleting transaction: the highest rowid ever used survives deletion.
        set_state(self.conn, "events.max_id", str(self._next_id - 1), at)

    def _windows(self, below: int | None = None, start: int = 0) -> list[tuple[int, int]]:
        """Rowid windows [lo, hi) covering the stored events (from `start`, below `below`
        if given), LADDER_WINDOW_IDS wide: one ladder transaction each."""
        lo, hi = self.conn.execute(
            "SELECT min(id), max(id) FROM events WHERE id >= ?", (start,)
        ).fetchone()
        if lo is None:
            return []
        end = hi + 1 if below is None else min(hi + 1, below)
        return [(a, min(a + LADDER_WINDOW_IDS, end)) for a in range(lo, end, LADDER_WINDOW_IDS)]

    def _prune_acked(self, keep: str, _target: float, at: float) -> None:
        # Below the cursor every row is held; above it, up to the highest class frontier,
        # the rows of the classes the backlog drained ahead (agent/delivery.py). Not those
        # while an export awaits its receipt: the daemon rebuilds each exported chunk from
        # every row of its run to check the fleet's digest (agent/receipts.py), and a run
        # with rows pruned would be refused as a mismatch and resent.
        deleted = 0
        acked, top = self.acked_sql(), max(self._cursor() - 1, *self._frontiers())
        if self._exports_pending():
            acked, top = held_sql(self._cursor(), ()), self._cursor() - 1
        for lo, hi in self._windows(below=top + 1):
            with atomic(self.conn):
                self._remember_max_id(at)
                cur = self.conn.execute(
                    f"DELETE FROM events WHERE id >= ? AND id < ? AND {acked} "
                    f"AND id NOT IN ({keep})",
                    (lo, hi),
                )
            self._rows -= cur.rowcount
            deleted += cur.rowcount
        self.counters["pruned_acked"] += deleted
        log.info("evict step=acked deleted=%d", deleted)

    def _exports_pending(self) -> bool:
        """An export ledger waits for its receipt (`<state_dir>/exports/*.json`)."""
        try:
            return any((self.path.parent / EXPORTS_DIR).glob("*.json"))
        except OSError:
            return True  # unknown: keep the rows (only space is at stake)

    def _shed(
        self, where: str, params: tuple[object, ...], reason: str, at: float, *, quiet: bool = False
    ) -> int:
        """Record then delete the unacknowledged events matching `where`, one transaction."""
        unacked = f"id >= {int(self._cursor())} AND NOT {self.acked_sql()}"
        with atomic(self.conn):
            self._remember_max_id(at)
            self.conn.execute(
                f"""INSERT INTO shed (at, reason, stream_id, boot_epoch, first_seq, last_seq,
                                      count, first_rowid, last_rowid)
                    SELECT ?, ?, stream_id, boot_epoch, min(seq), max(seq), count(*), min(id),
                           max(id)
                    FROM events WHERE {where} AND {unacked} GROUP BY stream_id, boot_epoch""",
                (at, reason, *params),
            )
            cur = self.conn.execute(f"DELETE FROM events WHERE {where} AND {unacked}", params)
        self._rows -= cur.rowcount
        self.counters[f"shed_{reason}"] = self.counters.get(f"shed_{reason}", 0) + cur.rowcount
        self.loss.on_shed(reason, cur.rowcount)
        if cur.rowcount and not quiet:
            log.warning("evict step=%s shed=%d", reason, cur.rowcount)
        return int(cur.rowcount)

    def _compact_low_priority(self, keep: str, _target: float, at: float) -> None:
        shed = 0
        for lo, hi in self._windows():
            shed += self._shed(
                f"id >= ? AND id < ? AND priority <= ? AND id NOT IN ({keep})",
                (lo, hi, self.config.low_priority_max),
                COMPACT_LOW_PRIORITY,
                at,
                quiet=True,
            )
        if shed:
            log.warning("evict step=compact_low_priority shed=%d", shed)

    def _drop_oldest(self, keep: str, target: float, at: float) -> None:
        low = int(self.config.low_priority_max)
        # The classes whose policy is to drop (the ladder runs this step only if one is).
        droppable = {
            (DROP, DROP): "1",
            (DROP, REFUSE): f"priority > {low}",
            (REFUSE, DROP): f"priority <= {low}",
        }[(self.config.full_policy, self.config.full_policy_low)]
        while self.used_bytes() > target:
            # One scan per priority level: its oldest unacked row, then windows forward.
            unacked = f"NOT {self.acked_sql()}"
            row = self.conn.execute(
                f"SELECT min(priority), max(id) FROM events WHERE id >= ? AND {droppable} "
                f"AND {unacked} AND id NOT IN ({keep})",
                (self._cursor(),),
            ).fetchone()
            if row is None or row[0] is None:
                return
            priority, top = row
            first = self.conn.execute(
                f"SELECT id FROM events WHERE priority = ? AND id >= ? AND {unacked} "
                f"AND id NOT IN ({keep}) ORDER BY id LIMIT 1",
                (priority, self._cursor()),
            ).fetchone()
            if first is None:
                return
            dropped = 0
            for lo in range(first[0], top + 1, LADDER_WINDOW_IDS):
                if self.used_bytes() <= target:
                    break
                dropped += self._shed(
                    f"id >= ? AND id < ? AND priority = ? AND id NOT IN ({keep})",
                    (lo, lo + LADDER_WINDOW_IDS, priority),
                    DROP_OLDEST,
                    at,
                    quiet=True,
                )
            if dropped:
                log.warning("evict step=drop_oldest priority=%d shed=%d", priority, dropped)
            else:
                return
