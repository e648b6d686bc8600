"""The event store: SQLite in WAL mode, the agent's only source of truth.

A small verb set serves the rest of the agent: `append` a batch (one transaction; the
caller ACKs after it returns), `latest` (replay's input), `backlog` (events above the
uplink cursor, oldest first, streamed), `mark_delivered` (cursor and checkpoints, never
backwards),
`make_room` (the eviction ladder), `stats`, and `publish` for the daemon's live state.

Design notes (measurements in docs/decisions.md):
- `events` has no secondary index. Uniqueness of (stream, boot_epoch, seq) is kept by
  `stream_epochs`, one row per stream and boot epoch holding the highest committed seq
  and the rowid of its latest event, updated in the same transaction. An event is a
  duplicate iff its seq is at or below that high-water mark and not inside an open gap.
  The single writer keeps that table and the open gaps cached in memory; the cache only
  changes after a commit succeeded.
- rowid is arrival order; the fleet backlog and eviction work on rowid ranges.
- After any SQLite error the transaction is rolled back (if SQLite has not done so
  already) and the caller gets `CommitFailed`: nothing of that batch may be ACKed.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from agent.config import StoreSection
from agent.errors import CommitFailed, StoreError, StoreFull
from agent.resilience import Event

log = logging.getLogger(__name__)

PAGE_SIZE: Final = 4096
# SQLite checkpoints the WAL every 1000 pages (its default wal_autocheckpoint); the WAL
# file grows to about that before it is reused. A quarter more for the batch that tips it.
WAL_RESERVE_BYTES: Final = 1000 * PAGE_SIZE * 5 // 4
# Open gap pieces tracked per (stream, boot epoch). Each late fill can split a piece in
# two; past this a hostile or broken controller could grow memory without bound.
MAX_GAP_PIECES: Final = 10_000
SYNCHRONOUS_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")


_EVENT_COLUMNS: Final = (
    "id, stream_id, boot_epoch, seq, ts, ts_quality, kind, priority, payload, received_at"
)


def read_cursor(conn: sqlite3.Connection) -> int:
    """The persisted uplink cursor: lowest rowid the fleet has not acknowledged."""
    row = conn.execute("SELECT value FROM agent_state WHERE key = 'uplink.cursor'").fetchone()
    return int(row[0]) if row else 1


def read_latest(conn: sqlite3.Connection) -> list[tuple[int, Event, int, float]]:
    """Latest event of every stream as (rowid, event, ts_quality, received_at), by stream.

    Point reads through `stream_epochs.latest_rowid` (one per stream), so any connection,
    the read-only CLI's included, answers in milliseconds on a million-event buffer.
    """
    rows = conn.execute(
        """SELECT e.id, s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind, e.priority,
                  e.payload, e.received_at
           FROM stream_epochs AS se
           JOIN (SELECT stream_id, max(boot_epoch) AS epoch FROM stream_epochs
                 GROUP BY stream_id) AS top
             ON top.stream_id = se.stream_id AND top.epoch = se.boot_epoch
           JOIN events AS e ON e.id = se.latest_rowid
           JOIN streams AS s ON s.id = se.stream_id
           ORDER BY s.name"""
    ).fetchall()
    return [
        (rowid, Event.trusted(name, seq, epoch, ts, kind, priority, bytes(payload)), tq, at)
        for rowid, name, epoch, seq, ts, tq, kind, priority, payload, at in rows
    ]


class Arrival(Protocol):
    """What `append` needs of an incoming event (the link's `Received` fits)."""

    @property
    def event(self) -> Event: ...

    @property
    def time_quality(self) -> int: ...

    @property
    def controller_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Store knobs. Defaults come from the [store] section: one place (agent/config.py)."""

    synchronous: str = StoreSection.synchronous
    max_buffer_bytes: int = StoreSection.max_buffer_bytes
    min_free_bytes: int = StoreSection.min_free_bytes
    high_water: float = StoreSection.high_water  # run the eviction ladder above this
    low_water: float = StoreSection.low_water  # ... until usage is back under this
    low_priority_max: int = StoreSection.low_priority_max  # compacted first (ladder step 2)
    busy_timeout_ms: int = 5000
    journal_size_limit: int = 64 * 2**20


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


@dataclass(slots=True)
class _Batch:
    """One append, planned against staged copies of the cache before it is written."""

    received_at: float
    next_id: int
    next_gap: int
    rows: list[tuple[object, ...]] = field(default_factory=list)
    new_ids: dict[str, int] = field(default_factory=dict)
    new_streams: list[tuple[int, str, str, int, float]] = field(default_factory=list)
    staged: dict[tuple[int, int], _EpochState] = field(default_factory=dict)
    staged_gaps: dict[tuple[int, int], list[_Gap]] = field(default_factory=dict)
    gap_inserts: list[tuple[object, ...]] = field(default_factory=list)
    gap_updates: dict[int, _Gap] = field(default_factory=dict)
    gap_dropped: list[int] = field(default_factory=list)
    duplicates: int = 0
    opened: int = 0
    filled: int = 0


@dataclass(slots=True)
class _EpochState:
    low_seq: int
    high_seq: int
    latest_rowid: int
    events: int


@dataclass(slots=True)
class _Gap:
    gap_id: int
    pieces: list[list[int]] = field(default_factory=list)  # [lo, hi] still missing

    @property
    def missing(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.pieces)


def connect(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    synchronous: str = "FULL",
    busy_timeout_ms: int = 5000,
    journal_size_limit: int = 64 * 2**20,
) -> sqlite3.Connection:
    """Open the database with every PRAGMA the agent relies on, in one place.

    Read-only connections (technician CLI) use `mode=ro` and `query_only`, so they can
    neither write nor take the write lock, whatever the SQL.
    """
    if synchronous not in SYNCHRONOUS_MODES:
        raise StoreError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
    if readonly:
        uri = Path(path).absolute().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA query_only = 1")
        return conn
    conn = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # only takes effect on a new file
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StoreError(f"could not switch {path} to WAL (journal_mode={mode})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(f"PRAGMA journal_size_limit = {int(journal_size_limit)}")
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute("PRAGMA foreign_keys = OFF")  # integrity is kept by the single writer
    return conn


def disk_free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `directory`."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_integrity(conn: sqlite3.Connection, *, full: bool = False) -> list[str]:
    """Problems found by `quick_check` (or `integrity_check`); empty when healthy."""
    pragma = "integrity_check" if full else "quick_check"
    rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}(20)")]
    return [] if rows == ["ok"] else rows


class EventStore:
    """The single writer's handle on the event store. Not thread-safe: one owner."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: StoreConfig | None = None,
        *,
        free_bytes: Callable[[Path], int] = disk_free_bytes,
    ) -> None:
        """Open (or create, migrate, recover) the store at `path`.

        `free_bytes(directory)` is where the free-space floor reads the disk; tests give
        it a model of a disk, since a shared file system's free space moves under them.
        """
        self.path = Path(path)
        self.config = config or StoreConfig()
        self._free_bytes = free_bytes
        self.quarantined: Path | None = None
        self.salvaged = 0
        self.conn = self._open_or_recover()
        self._stream_ids: dict[str, int] = {}
        self._stream_names: dict[int, str] = {}
        self._stream_priority: dict[int, int] = {}
        self._epochs: dict[tuple[int, int], _EpochState] = {}
        self._gaps: dict[tuple[int, int], list[_Gap]] = {}
        self._checkpoints: dict[int, tuple[int, int]] = {}
        # streams.last_seen is written with the published state (about once a second),
        # not per commit: per commit it cost 2.4 µs per event at 1,000 streams.
        self._last_seen: dict[int, float] = {}
        self._load()
        self.counters: dict[str, int] = dict.fromkeys(
            ("stored", "duplicates", "gaps_opened", "gaps_filled", "commit_failures",
             "acks_applied", "acks_stale", "pruned_acked", "shed_compact_low_priority",
             "shed_drop_oldest"),
            0,
        )  # fmt: skip

    # -- opening and recovery ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        c = self.config
        conn = connect(
            self.path,
            synchronous=c.synchronous,
            busy_timeout_ms=c.busy_timeout_ms,
            journal_size_limit=c.journal_size_limit,
        )
        # Hard cap: SQLite itself refuses to grow past it (SQLITE_FULL), so a runaway can
        # never fill the disk; the eviction ladder runs well before it.
        conn.execute(f"PRAGMA max_page_count = {math.ceil(c.max_buffer_bytes / PAGE_SIZE)}")
        return conn

    def _open_or_recover(self) -> sqlite3.Connection:
        """Open, check, migrate; quarantine and salvage a corrupt file instead of dying."""
        # Imported here: sqlite-utils costs ~0.1 s of import time, and only the writer
        # migrates; the technician CLI imports this module on every call.
        from agent.migrations import migrate  # noqa: PLC0415

        problems: list[str]
        try:
            conn = self._connect()
            problems = check_integrity(conn)
            if not problems:
                migrate(conn)
                return conn
            conn.close()
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        self.quarantined = self._quarantine(problems)
        conn = self._connect()
        migrate(conn)
        self.salvaged = self._salvage(conn, self.quarantined)
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

    def _salvage(self, conn: sqlite3.Connection, source: Path) -> int:
        """Copy what can still be read from a quarantined file; return events saved."""
        try:
            old = sqlite3.connect(source.absolute().as_uri() + "?mode=ro", uri=True)
        except sqlite3.DatabaseError:
            return 0
        saved = 0
        with contextlib.closing(old):
            try:
                for row in old.execute("SELECT id, name, controller, priority FROM streams"):
                    conn.execute(
                        "INSERT OR IGNORE INTO streams (id, name, controller, priority) "
                        "VALUES (?, ?, ?, ?)",
                        row,
                    )
            except sqlite3.DatabaseError as exc:
                log.warning("salvage_streams_failed error=%r", str(exc))
            try:
                top = old.execute("SELECT max(id) FROM events").fetchone()[0] or 0
            except sqlite3.DatabaseError:
                top = 0  # the table's root is unreadable: nothing to walk
            last = 0
            while last < top:  # chunk by rowid: one bad page loses one chunk, not the rest
                try:
                    rows = old.execute(
                        "SELECT id, stream_id, boot_epoch, seq, ts, ts_quality, kind, "
                        "priority, payload, received_at FROM events WHERE id > ? "
                        "ORDER BY id LIMIT 1000",
                        (last,),
                    ).fetchall()
                except sqlite3.DatabaseError:
                    last += 1000
                    continue
                if not rows:
                    break
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
                conn.execute("COMMIT")
                saved += len(rows)
                last = rows[-1][0]
        self._rebuild_stream_epochs(conn)
        log.warning("store_salvaged events=%d from=%s", saved, source)
        return saved

    @staticmethod
    def _rebuild_stream_epochs(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM stream_epochs")
        conn.execute(
            """INSERT INTO stream_epochs (stream_id, boot_epoch, low_seq, high_seq, latest_rowid,
                                          events)
               SELECT stream_id, boot_epoch, min(seq), max(seq), 0, count(*) FROM events
               GROUP BY stream_id, boot_epoch"""
        )
        conn.execute(
            """UPDATE stream_epochs SET latest_rowid = (
                 SELECT max(e.id) FROM events e
                 WHERE e.stream_id = stream_epochs.stream_id
                   AND e.boot_epoch = stream_epochs.boot_epoch
                   AND e.seq = stream_epochs.high_seq)"""
        )
        conn.execute("COMMIT")

    def _load(self) -> None:
        conn = self.conn
        for sid, name, priority in conn.execute("SELECT id, name, priority FROM streams"):
            self._stream_ids[name] = sid
            self._stream_names[sid] = name
            self._stream_priority[sid] = priority
        for sid, epoch, low, high, latest, count in conn.execute(
            "SELECT stream_id, boot_epoch, low_seq, high_seq, latest_rowid, events "
            "FROM stream_epochs"
        ):
            self._epochs[(sid, epoch)] = _EpochState(low, high, latest, count)
        # Open gaps come back exactly as last committed (their remaining pieces are
        # persisted with every fill): no scan of events, whatever was pruned since.
        for gid, sid, epoch, pieces in conn.execute(
            "SELECT id, stream_id, boot_epoch, pieces FROM gaps WHERE closed_at IS NULL ORDER BY id"
        ):
            self._gaps.setdefault((sid, epoch), []).append(_Gap(gid, json.loads(pieces)))
        for sid, epoch, seq in conn.execute("SELECT stream_id, boot_epoch, seq FROM checkpoints"):
            self._checkpoints[sid] = (epoch, seq)
        # Rowids are never reused: after eviction the highest rows may be gone, and a reused
        # rowid at or below the uplink cursor would count as delivered without being sent.
        top = conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0
        row = conn.execute("SELECT value FROM agent_state WHERE key = 'events.max_id'").fetchone()
        self._next_id = max(top, int(row[0]) if row else 0, read_cursor(conn) - 1) + 1
        self._next_gap = (conn.execute("SELECT max(id) FROM gaps").fetchone()[0] or 0) + 1
        self._next_stream = (conn.execute("SELECT max(id) FROM streams").fetchone()[0] or 0) + 1
        self._rows: int = conn.execute("SELECT count(*) FROM events").fetchone()[0]

    def close(self) -> None:
        """Checkpoint the WAL into the database and close."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()

    # -- append ----------------------------------------------------------------------------

    def append(self, arrivals: Sequence[Arrival], now: float | None = None) -> AppendResult:
        """Store a batch in one transaction; duplicates are skipped, gaps recorded.

        When this returns, every event of the batch is durable (stored now or before), so
        the caller may ACK all of them. Raises `CommitFailed` (nothing durable) or
        `StoreFull` (the database is at its cap; nothing durable).
        """
        batch = self._plan(arrivals, time.time() if now is None else now)
        try:
            self._write(batch)
        except sqlite3.Error as exc:
            self._rollback()
            self.counters["commit_failures"] += 1
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
                raise StoreFull(f"database or disk is full: {exc}") from exc
            raise CommitFailed(f"append of {len(batch.rows)} events failed: {exc}") from exc
        self._apply(batch)  # committed: only now does the cached state move
        return AppendResult(len(batch.rows), batch.duplicates, batch.opened, batch.filled)

    def _plan(self, arrivals: Sequence[Arrival], received_at: float) -> _Batch:
        """Decide row by row what to insert, against a staged copy of the cached state."""
        b = _Batch(received_at, self._next_id, self._next_gap)
        for arrival in arrivals:
            event = arrival.event
            sid = self._stream_ids.get(event.stream) or b.new_ids.get(event.stream)
            if sid is None:
                sid = self._next_stream + len(b.new_ids)
                b.new_ids[event.stream] = sid
                b.new_streams.append(
                    (sid, event.stream, arrival.controller_id, event.priority, received_at)
                )
            key = (sid, event.boot_epoch)
            seq = event.seq
            state = b.staged.get(key)
            if state is None:
                base = self._epochs.get(key)
                if base is not None:
                    state = _EpochState(base.low_seq, base.high_seq, base.latest_rowid, base.events)
                elif seq > 1 and self._knew_stream(sid):
                    # A new boot epoch first seen past seq 1: its first events were lost.
                    self._open_gap(b, key, 1, seq - 1)
                    state = _EpochState(1, seq - 1, 0, 0)
                else:
                    # First sight of this stream: nothing is known below `seq`, so nothing
                    # below it can be a duplicate (low_seq, not 0, bounds the dedup range).
                    state = _EpochState(seq, seq - 1, 0, 0)
                b.staged[key] = state
            if state.low_seq <= seq <= state.high_seq:
                gap = _find_gap(self._staged_gaps(b, key), seq)
                if gap is None:
                    b.duplicates += 1
                    continue
                _remove_from_pieces(gap.pieces, seq)
                b.gap_updates[gap.gap_id] = gap
                b.filled += 1
            elif seq > state.high_seq + 1:
                self._open_gap(b, key, state.high_seq + 1, seq - 1)
            elif seq < state.low_seq - 1:
                self._open_gap(b, key, seq + 1, state.low_seq - 1)  # a late, older event
            state.low_seq = min(state.low_seq, seq)
            b.rows.append(
                (b.next_id, sid, event.boot_epoch, seq, event.ts, int(arrival.time_quality),
                 event.kind, event.priority, event.payload, received_at)
            )  # fmt: skip
            if seq > state.high_seq:
                state.high_seq = seq
                state.latest_rowid = b.next_id
            state.events += 1
            b.next_id += 1
        return b

    def _staged_gaps(self, b: _Batch, key: tuple[int, int]) -> list[_Gap]:
        gaps = b.staged_gaps.get(key)
        if gaps is None:
            gaps = b.staged_gaps[key] = _copy_gaps(self._gaps.get(key, ()))
        return gaps

    def _open_gap(self, b: _Batch, key: tuple[int, int], lo: int, hi: int) -> None:
        gaps = self._staged_gaps(b, key)
        gap = _Gap(b.next_gap, [[lo, hi]])
        b.next_gap += 1
        gaps.append(gap)
        for dropped in _bound_gaps(gaps):
            b.gap_dropped.append(dropped.gap_id)
        b.gap_inserts.append(
            (gap.gap_id, key[0], key[1], lo, hi, hi - lo + 1, json.dumps([[lo, hi]]),
             b.received_at)
        )  # fmt: skip
        b.opened += 1

    def _write(self, b: _Batch) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        if b.new_streams:
            conn.executemany(
                "INSERT INTO streams (id, name, controller, priority, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(*s, s[4]) for s in b.new_streams],
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
                ],
            )
        conn.execute("COMMIT")

    def _apply(self, b: _Batch) -> None:
        for name, sid in b.new_ids.items():
            self._stream_ids[name] = sid
            self._stream_names[sid] = name
        for sid, _name, _controller, priority, _at in b.new_streams:
            self._stream_priority[sid] = priority
        self._epochs.update(b.staged)
        for sid, _epoch in b.staged:
            self._last_seen[sid] = b.received_at
        for key, gaps in b.staged_gaps.items():
            self._gaps[key] = [g for g in gaps if g.pieces]
        self._next_id, self._next_gap = b.next_id, b.next_gap
        self._next_stream += len(b.new_ids)
        self._rows += len(b.rows)
        self.counters["stored"] += len(b.rows)
        self.counters["duplicates"] += b.duplicates
        self.counters["gaps_opened"] += b.opened
        self.counters["gaps_filled"] += b.filled

    def _knew_stream(self, sid: int) -> bool:
        """True if another boot epoch of this stream was seen (a reboot lost events)."""
        return sid in self._stream_names and any(k[0] == sid for k in self._epochs)

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (disk full, I/O error): check.
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    # -- reading ---------------------------------------------------------------------------

    def latest(self) -> list[Event]:
        """The latest stored event of every stream: replay's answer (one join, ~ms)."""
        return [event for _, event, _, _ in read_latest(self.conn)]

    def _row_to_event(self, row: tuple[object, ...]) -> StoredEvent:
        rowid, sid, epoch, seq, ts, tq, kind, priority, payload, received_at = row
        event = Event.trusted(
            self._stream_names[sid],  # type: ignore[index]
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
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (start, limit),
        ).fetchall()
        return [self._row_to_event(row) for row in rows]

    def iter_events(self, batch: int = 1000) -> Iterator[StoredEvent]:
        """Every stored event in arrival order, read in batches (memory stays flat)."""
        last = 0
        while True:
            rows = self.conn.execute(
                "SELECT id, stream_id, boot_epoch, seq, ts, ts_quality, kind, priority, payload, "
                "received_at FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (last, batch),
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._row_to_event(row)
            last = rows[-1][0]

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self, stream: str) -> tuple[int, int] | None:
        """(boot_epoch, seq) the fleet has acknowledged for `stream`, or None."""
        sid = self._stream_ids.get(stream)
        return self._checkpoints.get(sid) if sid is not None else None

    def checkpoints(self) -> dict[str, tuple[int, int]]:
        """Every stream's checkpoint."""
        return {self._stream_names[sid]: pos for sid, pos in self._checkpoints.items()}

    def mark_delivered(
        self,
        upto_rowid: int,
        positions: Mapping[str, tuple[int, int]],
        now: float | None = None,
    ) -> bool:
        """Record that the fleet holds every event with rowid <= `upto_rowid`.

        The uplink cursor moves to `upto_rowid + 1` and each stream's checkpoint to the
        highest `positions` entry seen; neither ever moves backwards (a lower or equal
        value is ignored and counted in `acks_stale`). Both are persisted in one
        transaction. Returns False if nothing moved.
        """
        at = time.time() if now is None else now
        cursor = upto_rowid + 1
        if cursor <= self._cursor():
            self.counters["acks_stale"] += 1
            return False
        moves: dict[int, tuple[int, int]] = {}
        for stream, position in positions.items():
            sid = self._stream_ids.get(stream)
            pos = (int(position[0]), int(position[1]))
            if sid is None:
                continue
            current = self._checkpoints.get(sid)
            if current is None or pos > current:
                moves[sid] = pos
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT INTO checkpoints (stream_id, boot_epoch, seq, acked_at) VALUES (?,?,?,?) "
                "ON CONFLICT (stream_id) DO UPDATE SET boot_epoch = excluded.boot_epoch, "
                "seq = excluded.seq, acked_at = excluded.acked_at",
                [(sid, e, s, at) for sid, (e, s) in moves.items()],
            )
            self._set_state(self.conn, "uplink.cursor", str(cursor), at)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise CommitFailed(f"checkpoint update failed: {exc}") from exc
        self._checkpoints.update(moves)
        self._cursor_value = cursor
        self.counters["acks_applied"] += 1
        return True

    def _cursor(self) -> int:
        """Lowest rowid the fleet may not hold yet (persisted in agent_state)."""
        value = getattr(self, "_cursor_value", None)
        if value is None:
            value = read_cursor(self.conn)
            self._cursor_value = value
        return value

    @property
    def cursor(self) -> int:
        """Lowest rowid the fleet has not acknowledged."""
        return self._cursor()

    # -- space -------------------------------------------------------------------------------

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

    def make_room(self, now: float | None = None) -> bool:
        """Run the eviction ladder until usage is under the low-water mark.

        1. delete events the fleet acknowledged (keeping each stream's latest);
        2. compact low-priority streams to their latest event;
        3. drop the oldest events of the lowest priority present.
        Steps 2 and 3 lose data the fleet has not seen: each is recorded in `shed`.
        Returns False if still above the mark (the caller then stops ACKing).
        """
        at = time.time() if now is None else now
        target = self.config.low_water * self.capacity()
        keep = self._latest_rowids()
        steps = [
            ("acked", self._prune_acked),
            ("compact_low_priority", self._compact_low_priority),
            ("drop_oldest", self._drop_oldest),
        ]
        for name, step in steps:
            if self.used_bytes() <= target:
                return True
            try:
                step(keep, target, at)
            except sqlite3.Error as exc:
                self._rollback()
                log.error("evict_failed step=%s error=%r", name, str(exc))
                return False
        return self.used_bytes() <= target

    def _latest_rowids(self) -> str:
        """Rowids eviction must keep: each stream's latest event (its newest boot epoch)."""
        best: dict[int, tuple[int, int]] = {}
        for (sid, epoch), state in self._epochs.items():
            if state.latest_rowid and (sid not in best or epoch > best[sid][0]):
                best[sid] = (epoch, state.latest_rowid)
        return ",".join(str(rowid) for _, rowid in best.values()) or "0"

    def _remember_max_id(self, at: float) -> None:
        # Inside the deleting transaction: the highest rowid ever used survives deletion.
        self._set_state(self.conn, "events.max_id", str(self._next_id - 1), at)

    def _prune_acked(self, keep: str, _target: float, at: float) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self._remember_max_id(at)
        cur = self.conn.execute(
            f"DELETE FROM events WHERE id < ? AND id NOT IN ({keep})", (self._cursor(),)
        )
        self.conn.execute("COMMIT")
        self._rows -= cur.rowcount
        self.counters["pruned_acked"] += cur.rowcount
        log.info("evict step=acked deleted=%d", cur.rowcount)

    def _shed(self, where: str, params: tuple[object, ...], reason: str, at: float) -> int:
        """Record then delete the unacknowledged events matching `where`, one transaction."""
        unacked = f"id >= {int(self._cursor())}"
        self.conn.execute("BEGIN IMMEDIATE")
        self._remember_max_id(at)
        self.conn.execute(
            f"""INSERT INTO shed (at, reason, stream_id, boot_epoch, first_seq, last_seq, count,
                                  first_rowid, last_rowid)
                SELECT ?, ?, stream_id, boot_epoch, min(seq), max(seq), count(*), min(id), max(id)
                FROM events WHERE {where} AND {unacked} GROUP BY stream_id, boot_epoch""",
            (at, reason, *params),
        )
        cur = self.conn.execute(f"DELETE FROM events WHERE {where} AND {unacked}", params)
        self.conn.execute("COMMIT")
        self._rows -= cur.rowcount
        self.counters[f"shed_{reason}"] = self.counters.get(f"shed_{reason}", 0) + cur.rowcount
        if cur.rowcount:
            log.warning("evict step=%s shed=%d", reason, cur.rowcount)
        return int(cur.rowcount)

    def _compact_low_priority(self, keep: str, _target: float, at: float) -> None:
        self._shed(
            f"priority <= ? AND id NOT IN ({keep})",
            (self.config.low_priority_max,),
            "compact_low_priority",
            at,
        )

    def _drop_oldest(self, keep: str, target: float, at: float) -> None:
        while self.used_bytes() > target:
            row = self.conn.execute(
                f"SELECT min(priority) FROM events WHERE id NOT IN ({keep})"
            ).fetchone()
            if row is None or row[0] is None:
                return
            # Oldest first, in chunks; rowid order needs no index.
            chunk = max(1000, self._rows // 20)
            dropped = self._shed(
                f"id IN (SELECT id FROM events WHERE priority = ? AND id NOT IN ({keep}) "
                f"ORDER BY id LIMIT {chunk})",
                (row[0],),
                "drop_oldest",
                at,
            )
            if not dropped:
                return

    # -- state and stats ---------------------------------------------------------------------

    def publish(self, values: Mapping[str, str], now: float | None = None) -> None:
        """Write the daemon's live state (link, breaker, counters) for the CLI to read."""
        at = time.time() if now is None else now
        seen, self._last_seen = self._last_seen, {}
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for key, value in values.items():
                self._set_state(self.conn, key, value, at)
            self.conn.executemany(
                "UPDATE streams SET last_seen = ? WHERE id = ?",
                [(t, sid) for sid, t in seen.items()],
            )
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._last_seen = {**seen, **self._last_seen}
            raise CommitFailed(f"state update failed: {exc}") from exc

    @staticmethod
    def _set_state(
        conn: sqlite3.Connection, key: str, value: str, now: float | None = None
    ) -> None:
        conn.execute(
            "INSERT INTO agent_state (key, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at",
            (key, value, time.time() if now is None else now),
        )

    def shed_records(self) -> list[ShedRecord]:
        """Every shed record, oldest first."""
        return [
            ShedRecord(reason, self._stream_names.get(sid, "?"), epoch, lo, hi, count)
            for reason, sid, epoch, lo, hi, count in self.conn.execute(
                "SELECT reason, stream_id, boot_epoch, first_seq, last_seq, count FROM shed "
                "ORDER BY id"
            )
        ]

    def open_gaps(self) -> dict[tuple[str, int], list[tuple[int, int]]]:
        """Missing (lo, hi) ranges per (stream, boot_epoch), from the writer's cache."""
        return {
            (self._stream_names[sid], epoch): [(lo, hi) for g in gaps for lo, hi in g.pieces]
            for (sid, epoch), gaps in self._gaps.items()
            if gaps
        }

    @property
    def event_count(self) -> int:
        """Events currently stored."""
        return self._rows

    def stats(self) -> dict[str, int | float]:
        """Figures for status and metrics, from the cache plus cheap PRAGMAs."""
        oldest = self.conn.execute(
            "SELECT received_at FROM events WHERE id >= ? ORDER BY id LIMIT 1", (self._cursor(),)
        ).fetchone()
        return {
            "events": self._rows,
            "streams": len(self._stream_ids),
            "used_bytes": self.used_bytes(),
            "open_gaps": sum(len(g) for g in self._gaps.values()),
            "oldest_unacked_received_at": float(oldest[0]) if oldest else 0.0,
            "cursor": self._cursor(),
            "top_rowid": self._next_id - 1,
            **self.counters,
        }


def _copy_gaps(gaps: Sequence[_Gap]) -> list[_Gap]:
    return [_Gap(g.gap_id, [p[:] for p in g.pieces]) for g in gaps]


def _find_gap(gaps: list[_Gap], seq: int) -> _Gap | None:
    for gap in gaps:
        for lo, hi in gap.pieces:
            if lo <= seq <= hi:
                return gap
    return None


def _remove_from_pieces(pieces: list[list[int]], seq: int) -> None:
    for i, (lo, hi) in enumerate(pieces):
        if lo <= seq <= hi:
            replacement = [r for r in ([lo, seq - 1], [seq + 1, hi]) if r[0] <= r[1]]
            pieces[i : i + 1] = replacement
            return


def _bound_gaps(gaps: list[_Gap]) -> list[_Gap]:
    """Forget the oldest gaps past MAX_GAP_PIECES (their late fills become dups)."""
    dropped = []
    total = sum(len(g.pieces) for g in gaps)
    while total > MAX_GAP_PIECES and gaps:
        oldest = gaps.pop(0)
        total -= len(oldest.pieces)
        dropped.append(oldest)
        log.warning("gap_tracking_dropped gap_id=%d pieces=%d", oldest.gap_id, len(oldest.pieces))
    return dropped
