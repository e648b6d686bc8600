"""The event store: SQLite in WAL mode, the agent's only source of truth.

A small verb set serves the rest of the agent: `append` a batch (one transaction; the
caller ACKs after it returns), `latest` (replay's input), `backlog` (events above the
uplink cursor, oldest first, streamed), `mark_delivered` (cursor and checkpoints, never
backwards),
`make_room` (the eviction ladder), `stats`, and `publish` for the daemon's live state.

Split by responsibility: agent/storedb.py (connect, PRAGMAs, readers any connection can
use; re-exported here), agent/streamcache.py (bounded per-stream cache, dedup planning,
the boot-epoch rule), agent/delivery.py (cursor, class frontiers, checkpoints),
agent/eviction.py (capacity and the eviction ladder).

Design notes (measurements in docs/decisions.md):
- `events` has no secondary index. Uniqueness of (stream, boot_epoch, seq) is kept by
  `stream_epochs`, one row per stream and boot epoch holding the highest committed seq
  and the rowid of its latest event, updated in the same transaction. An event is a
  duplicate iff its seq is at or below that high-water mark and not inside an open gap.
- The single writer caches that state for active streams only (agent/streamcache.py:
  LRU, `max_cached_streams`); a miss is a point read, and a failed append drops the
  streams it touched from the cache (their next use reads the committed state). Memory
  does not grow with the number of streams a controller invents.
- Stored boot epochs follow the arrival order of each controller's sessions
  (`controller_epochs`): an announced epoch at or below one already stored is a
  rollback, alarmed and stored as the next epoch, so it can never pin replay.
- rowid is arrival order; the fleet backlog and eviction work on rowid ranges.
- After any SQLite error the transaction is rolled back (if SQLite has not done so
  already) and the caller gets `CommitFailed`: nothing of that batch may be ACKed.
- After every commit, duplicates-only ones included, `JournalProbe` asks the file system
  whether its journal still lives (agent/fsprobe.py: ext4 can report a commit durable
  that its aborted journal threw away); if not, `CommitFailed` too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.config import StoreSection
from agent.delivery import DeliveryState
from agent.errors import CommitFailed, StoreError, StoreFull
from agent.eviction import EvictionLadder
from agent.fsprobe import JournalProbe
from agent.livestate import write_row
from agent.resilience import Event
from agent.storedb import (
    PAGE_SIZE,
    SYNCHRONOUS_MODES,
    WAL_RESERVE_BYTES,
    atomic,
    check_integrity,
    connect,
    damaged,
    disk_free_bytes,
    load_loss,
    read_cursor,
    read_frontiers,
    read_latest,
    set_state,
)
from agent.streamcache import Arrival, Batch, StreamState

__all__ = [
    "PAGE_SIZE",
    "ROLLBACK_ALARM",
    "SYNCHRONOUS_MODES",
    "WAL_RESERVE_BYTES",
    "AppendResult",
    "Arrival",
    "CommitFailed",
    "EventStore",
    "ShedRecord",
    "StoreError",
    "StoreFull",
    "StoreSection",
    "StoredEvent",
    "check_integrity",
    "connect",
    "disk_free_bytes",
    "read_cursor",
    "read_frontiers",
    "read_latest",
]

log = logging.getLogger(__name__)

ROLLBACK_LOG_INTERVAL: Final = 60.0  # seconds: later boot-epoch rollbacks log at DEBUG
ROLLBACK_ALARM: Final = "alarm.boot_epoch_rollback"

_EVENTS_WITH_NAMES: Final = (
    "SELECT e.id, s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind, e.priority, "
    "e.payload, e.received_at FROM events AS e JOIN streams AS s ON s.id = e.stream_id"
)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one committed `append` did."""

    stored: int
    duplicates: int
    gaps_opened: int
    gaps_filled: int


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as read back from the store, with its rowid."""

    rowid: int
    event: Event
    time_quality: int
    received_at: float


@dataclass(frozen=True, slots=True)
class ShedRecord:
    """Events the buffer policy removed before the fleet acknowledged them."""

    reason: str
    stream: str
    boot_epoch: int
    first_seq: int
    last_seq: int
    count: int


class EventStore(DeliveryState, EvictionLadder):
    """The single writer's handle on the event store. Not thread-safe: one owner."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: StoreSection | None = None,
        *,
        free_bytes: Callable[[Path], int] = disk_free_bytes,
        busy_timeout_ms: int = 5000,
    ) -> None:
        """Open (or create, migrate, recover) the store at `path` ([store] `config`).

        `free_bytes(directory)` is where the free-space floor reads the disk; tests give
        it a model of a disk, since a shared file system's free space moves under them.
        `busy_timeout_ms`: how long a write waits for another connection's lock.
        """
        self.path = Path(path)
        self.config = config or StoreSection()
        self._free_bytes = free_bytes
        self._busy_timeout_ms = busy_timeout_ms
        self.quarantined: Path | None = None
        self.salvaged = 0
        self.conn = self._open_or_recover()
        self._probe = JournalProbe(self.path)
        # Committed state of active streams only (LRU); misses are point reads.
        self._state = StreamState(self.conn, self.config.max_cached_streams)
        self._last_rollback_log = -math.inf
        self._rollbacks_unlogged = 0
        # streams.last_seen is written with the published state (about once a second),
        # not per commit: per commit it cost 2.4 µs per event at 1,000 streams. Past
        # max_cached_streams entries it is written with the next append instead.
        self._last_seen: dict[int, float] = {}
        self._load()
        self.counters: dict[str, int] = dict.fromkeys(
            ("stored", "duplicates", "gaps_opened", "gaps_filled", "commit_failures",
             "acks_applied", "acks_stale", "pruned_acked", "shed_compact_low_priority",
             "shed_drop_oldest", "epoch_rollbacks", "commits_unconfirmed"),
            0,
        )  # fmt: skip

    # -- opening and recovery ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        c = self.config
        conn = connect(
            self.path, synchronous=c.synchronous.upper(), busy_timeout_ms=self._busy_timeout_ms
        )
        # Hard cap: SQLite itself refuses to grow past it (SQLITE_FULL), so a runaway can
        # never fill the disk; the eviction ladder runs well before it.
        conn.execute(f"PRAGMA max_page_count = {math.ceil(c.max_buffer_bytes / PAGE_SIZE)}")
        return conn

    def _open_or_recover(self) -> sqlite3.Connection:
        """Open, check, migrate; quarantine and salvage a corrupt file instead of dying."""
        # Imported here: sqlite-utils costs ~0.1 s of import time, and only the writer
        # migrates; the technician CLI imports this module on every call.
        from agent.migrations import (  # noqa: PLC0415
            drop_legacy_live_keys,
            migrate,
            seed_controller_epochs,
        )
        from agent.salvage import salvage  # noqa: PLC0415

        problems: list[str]
        try:
            conn = self._connect()
            problems = check_integrity(conn)
            if not problems:
                migrate(conn)
                return conn
            conn.close()
        except sqlite3.DatabaseError as exc:
            if not damaged(exc):
                # A full disk, an I/O error, a lock, a permission: the file may be fine.
                # Quarantining it would move a healthy buffer aside (and the salvage would
                # need the space that is missing): refuse to start, loudly, instead.
                raise StoreError(f"cannot open {self.path}: {exc}") from exc
            problems = [str(exc)]
        self.quarantined = self._quarantine(problems)
        conn = self._connect()
        migrate(conn)
        self.salvaged = salvage(self.quarantined, conn).events
        seed_controller_epochs(conn)  # salvaged sessions count for rollback detection
        drop_legacy_live_keys(conn)  # the salvaged agent_state may predate migration 004
        self._set_state(conn, "alarm.store_quarantined", f"{self.quarantined} {problems[0]}")
        return conn

    def _quarantine(self, problems: list[str]) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        log.error("store_corrupt path=%s quarantine=%s problem=%r", self.path, target, problems[0])
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                shutil.move(src, f"{target}{suffix}")
        return target

    def _load(self) -> None:
        # Counters only: per-stream state is read on demand (memory flat in streams).
        conn = self.conn
        self._stream_count: int = conn.execute("SELECT count(*) FROM streams").fetchone()[0]
        self._open_gaps: int = conn.execute(
            "SELECT count(*) FROM gaps WHERE closed_at IS NULL"
        ).fetchone()[0]
        # Rowids are never reused: after eviction the highest rows may be gone, and a reused
        # rowid at or below the uplink cursor would count as delivered without being sent.
        top = conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0
        row = conn.execute("SELECT value FROM agent_state WHERE key = 'events.max_id'").fetchone()
        # Nor one at or below a class frontier (agent/delivery.py): it would count as held.
        self._next_id = max(top, int(row[0]) if row else 0, *read_frontiers(conn)) + 1
        self._next_gap = (conn.execute("SELECT max(id) FROM gaps").fetchone()[0] or 0) + 1
        self._next_stream = (conn.execute("SELECT max(id) FROM streams").fetchone()[0] or 0) + 1
        self._rows: int = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        self.loss = load_loss(conn)

    def close(self) -> None:
        """Checkpoint the WAL into the database and close."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()
        self._probe.close()

    # -- append ----------------------------------------------------------------------------

    def append(self, arrivals: Sequence[Arrival], now: float | None = None) -> AppendResult:
        """Store a batch in one transaction; duplicates are skipped, gaps recorded.

        When this returns, every event of the batch is durable (stored now or before), so
        the caller may ACK all of them. Raises `CommitFailed` (nothing durable) or
        `StoreFull` (the database is at its cap; nothing durable).
        """
        at = time.time() if now is None else now
        try:
            # Planning reads the state of streams missing from the cache: it can fail too
            # (and then forgets what it touched itself).
            batch = self._state.plan(arrivals, at, self._next_id, self._next_gap, self._next_stream)
            try:
                self._write(batch)
            except BaseException:
                self._state.forget(batch)  # their cached state was planned, not committed
                raise
        except sqlite3.Error as exc:  # _write's transaction is rolled back (atomic)
            self.counters["commit_failures"] += 1
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
                raise StoreFull(f"database or disk is full: {exc}") from exc
            raise CommitFailed(f"append of {len(arrivals)} events failed: {exc}") from exc
        self._apply(batch)  # committed: the planned state is now the cache's
        try:
            self._probe.check()
        except OSError as exc:
            self.counters["commit_failures"] += 1
            self.counters["commits_unconfirmed"] += 1
            raise CommitFailed(
                f"append of {len(arrivals)} events committed, but the file system failed"
                f" right after ({exc.strerror}): it may not have kept them"
            ) from exc
        return AppendResult(len(batch.rows), batch.duplicates, batch.opened, batch.filled)

    def _write(self, b: Batch) -> None:
        conn = self.conn
        with atomic(conn):
            if b.new_streams:
                conn.executemany(
                    "INSERT INTO streams (id, name, controller, priority, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(*s, s[4]) for s in b.new_streams],
                )
            if b.new_epochs:
                conn.executemany(
                    "INSERT INTO controller_epochs (controller, boot_epoch, epoch, first_seen) "
                    "VALUES (?, ?, ?, ?)",
                    [(c, e, stored, b.received_at) for (c, e), stored in b.new_epochs.items()],
                )
            for controller, announced, top, stored in b.rollbacks:
                set_state(
                    conn,
                    ROLLBACK_ALARM,
                    f"controller={controller} announced={announced} highest={top} stored={stored}",
                    b.received_at,
                )
            if b.rows:
                conn.executemany(
                    "INSERT INTO events (id, stream_id, boot_epoch, seq, ts, ts_quality, kind, "
                    "priority, payload, received_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    b.rows,
                )
                conn.executemany(
                    "INSERT INTO stream_epochs (stream_id, boot_epoch, low_seq, high_seq, "
                    "latest_rowid, events) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (stream_id, boot_epoch) DO UPDATE SET low_seq = excluded.low_seq, "
                    "high_seq = excluded.high_seq, latest_rowid = excluded.latest_rowid, "
                    "events = excluded.events",
                    [
                        (k[0], k[1], s.low_seq, s.high_seq, s.latest_rowid, s.events)
                        for k, s in b.staged.items()
                    ],
                )
            if b.gap_inserts:
                conn.executemany(
                    "INSERT INTO gaps (id, stream_id, boot_epoch, first_seq, last_seq, missing, "
                    "pieces, detected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    b.gap_inserts,
                )
            if b.gap_dropped:
                # No longer tracked (MAX_GAP_PIECES): closed, with `missing` left as it was.
                conn.executemany(
                    "UPDATE gaps SET closed_at = ? WHERE id = ?",
                    [(b.received_at, gid) for gid in b.gap_dropped],
                )
            dropped = set(b.gap_dropped)
            if b.gap_updates:
                conn.executemany(
                    "UPDATE gaps SET missing = ?, pieces = ?, closed_at = ? WHERE id = ?",
                    [
                        (
                            g.missing,
                            json.dumps(g.pieces),
                            b.received_at if not g.pieces else None,
                            g.gap_id,
                        )
                        for g in b.gap_updates.values()
                        if g.gap_id not in dropped  # a dropped gap stays closed
                    ],
                )
            if len(self._last_seen) >= self.config.max_cached_streams:
                self._write_last_seen(self._last_seen)  # bounded: flushed here, not kept
                b.flush_last_seen = True

    def _apply(self, b: Batch) -> None:
        self._state.apply(b)
        if b.flush_last_seen:
            self._last_seen = {}
        seen = self._last_seen
        seen.update(dict.fromkeys(b.by_sid, b.received_at))
        for sid, *_ in b.new_streams:  # their rows were just written with last_seen
            del seen[sid]
        for controller, announced, top, stored in b.rollbacks:
            self._log_rollback(controller, announced, top, stored, b.received_at)
        closed = set(b.gap_dropped)
        closed.update(g.gap_id for g in b.gap_updates.values() if not g.pieces)
        self._open_gaps += len(b.gap_inserts) - len(closed)
        self._next_id, self._next_gap = b.next_id, b.next_gap
        self._next_stream += len(b.new_streams)
        self._stream_count += len(b.new_streams)
        self._rows += len(b.rows)
        self.loss.on_stored(len(b.rows))
        self.loss.on_gap_lost(b.gap_lost)
        self.counters["stored"] += len(b.rows)
        self.counters["duplicates"] += b.duplicates
        self.counters["gaps_opened"] += b.opened
        self.counters["gaps_filled"] += b.filled
        self.counters["epoch_rollbacks"] += len(b.rollbacks)

    def _log_rollback(
        self, controller: str, announced: int, top: int, stored: int, at: float
    ) -> None:
        # First of a streak at WARNING; repeats within ROLLBACK_LOG_INTERVAL at DEBUG.
        if at - self._last_rollback_log >= ROLLBACK_LOG_INTERVAL:
            log.warning(
                "boot_epoch_rollback controller=%s announced=%d highest=%d stored=%d "
                "more_since_last=%d",
                controller, announced, top, stored, self._rollbacks_unlogged,
            )  # fmt: skip
            self._last_rollback_log = at
            self._rollbacks_unlogged = 0
        else:
            self._rollbacks_unlogged += 1
            log.debug(
                "boot_epoch_rollback controller=%s announced=%d highest=%d stored=%d",
                controller, announced, top, stored,
            )  # fmt: skip

    def _write_last_seen(self, seen: Mapping[int, float]) -> None:
        self.conn.executemany(
            "UPDATE streams SET last_seen = ? WHERE id = ?", [(t, sid) for sid, t in seen.items()]
        )

    # -- reading ---------------------------------------------------------------------------

    def latest(self) -> list[Event]:
        """The latest stored event of every stream: replay's answer (one join, ~ms)."""
        return [event for _, event, _, _ in read_latest(self.conn)]

    @staticmethod
    def _row_to_event(row: tuple[object, ...]) -> StoredEvent:
        rowid, name, epoch, seq, ts, tq, kind, priority, payload, received_at = row
        event = Event.trusted(
            name,  # type: ignore[arg-type]
            seq,  # type: ignore[arg-type]
            epoch,  # type: ignore[arg-type]
            ts,  # type: ignore[arg-type]
            kind,  # type: ignore[arg-type]
            priority,  # type: ignore[arg-type]
            payload,
        )
        return StoredEvent(rowid, event, tq, received_at)  # type: ignore[arg-type]

    def backlog(self, after_rowid: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to `limit` events the fleet has not acknowledged, oldest first."""
        start = max(after_rowid, self._cursor() - 1)
        rows = self.conn.execute(
            f"{_EVENTS_WITH_NAMES} WHERE e.id > ? ORDER BY e.id LIMIT ?", (start, limit)
        ).fetchall()
        return [self._row_to_event(row) for row in rows]

    def iter_events(self, batch: int = 1000) -> Iterator[StoredEvent]:
        """Every stored event in arrival order, read in batches (memory stays flat)."""
        last = 0
        while True:
            rows = self.conn.execute(
                f"{_EVENTS_WITH_NAMES} WHERE e.id > ? ORDER BY e.id LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._row_to_event(row)
            last = rows[-1][0]

    # -- state and stats ---------------------------------------------------------------------

    def publish(self, live: str, now: float | None = None) -> None:
        """Write the daemon's live snapshot (`agent.livestate`, encoded) for the CLI."""
        at = time.time() if now is None else now
        seen, self._last_seen = self._last_seen, {}
        try:
            with atomic(self.conn):
                write_row(self.conn, live, at)
                self._write_last_seen(seen)
        except sqlite3.Error as exc:
            self._last_seen = {**seen, **self._last_seen}
            raise CommitFailed(f"state update failed: {exc}") from exc

    @staticmethod
    def _set_state(
        conn: sqlite3.Connection, key: str, value: str, now: float | None = None
    ) -> None:
        set_state(conn, key, value, now)

    def shed_records(self) -> list[ShedRecord]:
        """Every shed record, oldest first."""
        return [
            ShedRecord(reason, name, epoch, lo, hi, count)
            for reason, name, epoch, lo, hi, count in self.conn.execute(
                "SELECT sh.reason, coalesce(s.name, '?'), sh.boot_epoch, sh.first_seq, "
                "sh.last_seq, sh.count FROM shed AS sh LEFT JOIN streams AS s "
                "ON s.id = sh.stream_id ORDER BY sh.id"
            )
        ]

    def open_gaps(self) -> dict[tuple[str, int], list[tuple[int, int]]]:
        """Missing (lo, hi) ranges per (stream, boot_epoch), as committed."""
        out: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for name, epoch, pieces in self.conn.execute(
            "SELECT s.name, g.boot_epoch, g.pieces FROM gaps AS g "
            "JOIN streams AS s ON s.id = g.stream_id WHERE g.closed_at IS NULL ORDER BY g.id"
        ):
            out.setdefault((name, epoch), []).extend((lo, hi) for lo, hi in json.loads(pieces))
        return out

    @property
    def event_count(self) -> int:
        """Events currently stored."""
        return self._rows

    def stats(self) -> dict[str, int | float]:
        """Figures for status and metrics, from the cache plus cheap PRAGMAs."""
        oldest = self.conn.execute(
            f"SELECT received_at FROM events WHERE id >= ? AND NOT {self.acked_sql()} "
            "ORDER BY id LIMIT 1",
            (self._cursor(),),
        ).fetchone()
        return {
            "events": self._rows,
            "streams": self._stream_count,
            "used_bytes": self.used_bytes(),
            "open_gaps": self._open_gaps,
            "oldest_unacked_received_at": float(oldest[0]) if oldest else 0.0,
            "cursor": self._cursor(),
            "top_rowid": self._next_id - 1,
            "cached_streams": len(self._state.streams),
            # Evictions per second near the commit rate: the cap is below the active set.
            "cache_evictions": self._state.streams.evictions,
            **self.counters,
            **self.loss.as_dict(),
        }
