"""The store's database file: PRAGMAs in one connect function, checks, and readers.

Everything here works on any connection, the read-only CLI's included: `connect` (every
PRAGMA the agent relies on), `check_integrity`, `disk_free_bytes`, and the readers that
need no writer state, `read_cursor` and `read_latest` (point reads, paginated on demand).
`agent.store` re-exports them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from agent.errors import StoreError
from agent.livestate import read_row
from agent.resilience import Event
from agent.resilience.cursor import CLASSES
from agent.resilience.loss import LossLedger

PAGE_SIZE: Final = 4096
# SQLite checkpoints the WAL every 1000 pages (its default wal_autocheckpoint); the WAL
# file grows to about that before it is reused. A quarter more for the batch that tips it.
WAL_RESERVE_BYTES: Final = 1000 * PAGE_SIZE * 5 // 4
SYNCHRONOUS_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
# Exact 64-bit sums in SQL: each value is split into its high and low 32 bits, summed apart
# (neither sum can overflow below 2**31 rows), and joined in Python's unbounded integers. A
# controller's sequence numbers reach 2**63 - 1, so a plain sum() of gap sizes overflows.
LOW_BITS: Final = 32
LOW_MASK: Final = 2**LOW_BITS - 1


# Ledgers of exports awaiting the fleet's receipt (agent/export.py), next to the database.
EXPORTS_DIR: Final = "exports"


def read_cursor(conn: sqlite3.Connection) -> int:
    """The persisted uplink cursor: lowest rowid the fleet has not acknowledged."""
    row = conn.execute("SELECT value FROM agent_state WHERE key = 'uplink.cursor'").fetchone()
    return int(row[0]) if row else 1


def read_frontiers(conn: sqlite3.Connection, cursor: int | None = None) -> tuple[int, ...]:
    """Each priority class's persisted frontier: the highest rowid at or below which every
    row of that class is acknowledged (the backlog drains by priority, so a class runs
    ahead of the cursor). Never below `cursor` - 1; a missing or malformed value (the file
    is not trusted) reads as the cursor, which only costs resends."""
    floor = (read_cursor(conn) if cursor is None else cursor) - 1
    row = conn.execute("SELECT value FROM agent_state WHERE key = 'uplink.frontiers'").fetchone()
    try:
        values = [int(v) for v in str(row[0]).split(",")] if row else []
    except ValueError:
        values = []
    if len(values) != CLASSES:
        values = [floor] * CLASSES
    return tuple(max(floor, v) for v in values)


def held_sql(cursor: int, frontiers: tuple[int, ...]) -> str:
    """SQL true for an events row the fleet holds: below `cursor`, or at or below its
    priority class's frontier (the top class takes every priority above it, the lowest
    every one below). Integer literals, no parameters; the one definition the ladder, the
    TTL and every view use (checked against agent/resilience/cursor.py `is_held`)."""
    cursor = int(cursor)
    if not frontiers or max(frontiers) < cursor:
        return f"(id < {cursor})"
    cases = " ".join(f"WHEN {c} THEN {int(f)}" for c, f in enumerate(frontiers[:-1]))
    return (
        f"(id < {cursor} OR id <= CASE min(max(priority, 0), {len(frontiers) - 1}) {cases} "
        f"ELSE {int(frontiers[-1])} END)"
    )


def frontiers_text(frontiers: tuple[int, ...]) -> str:
    """How `read_frontiers` finds them in agent_state: the classes' rowids, comma-separated."""
    return ",".join(str(int(f)) for f in frontiers)


def exact_sum_sql(column: str) -> str:
    """Two SQL expressions whose results `exact_sum` joins into the exact sum of `column`."""
    return f"coalesce(sum({column} >> {LOW_BITS}), 0), coalesce(sum({column} & {LOW_MASK}), 0)"


def exact_sum(high: int, low: int) -> int:
    """The sum of a column from the two parts `exact_sum_sql` selects."""
    return (int(high) << LOW_BITS) + int(low)


def load_loss(conn: sqlite3.Connection) -> LossLedger:
    """The loss ledger from the tables: stored events per stream epoch, `shed` by reason,
    and the gaps closed with numbers still missing (given up, not filled).

    `received` is the larger of the tables' count and the last published figure: a
    salvage rebuilds `stream_epochs` from the rows it kept (and keeps `agent_state`).
    """
    ledger = LossLedger()
    ledger.received = exact_sum(
        *conn.execute(f"SELECT {exact_sum_sql('events')} FROM stream_epochs").fetchone()
    )
    published = read_row(conn).store.get("loss_received", 0)
    if isinstance(published, int):
        ledger.received = max(ledger.received, published)
    shed = f"SELECT reason, {exact_sum_sql('count')} FROM shed GROUP BY reason"
    for reason, high, low in conn.execute(shed):
        ledger.on_shed(str(reason), exact_sum(high, low))
    lost = f"SELECT {exact_sum_sql('missing')} FROM gaps WHERE closed_at IS NOT NULL"
    ledger.gap_lost = exact_sum(*conn.execute(lost).fetchone())
    return ledger


def read_latest(
    conn: sqlite3.Connection, *, after: str | None = None, limit: int | None = None
) -> list[tuple[int, Event, int, float]]:
    """Latest event of every stream as (rowid, event, ts_quality, received_at), by stream.

    Point reads through `stream_epochs.latest_rowid` (one per stream), so any connection,
    the read-only CLI's included, answers in milliseconds on a million-event buffer.
    With `after` and/or `limit`: one page, streams named above `after`, at most `limit`
    (memory bounded by the page, whatever the number of streams).
    """
    if after is None and limit is None:
        rows = conn.execute(
            """SELECT e.id, s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind,
                      e.priority, e.payload, e.received_at
               FROM stream_epochs AS se
               JOIN (SELECT stream_id, max(boot_epoch) AS epoch FROM stream_epochs
                     GROUP BY stream_id) AS top
                 ON top.stream_id = se.stream_id AND top.epoch = se.boot_epoch
               JOIN events AS e ON e.id = se.latest_rowid
               JOIN streams AS s ON s.id = se.stream_id
               ORDER BY s.name"""
        ).fetchall()
    else:
        rows = conn.execute(
            """SELECT e.id, s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind,
                      e.priority, e.payload, e.received_at
               FROM streams AS s
               JOIN stream_epochs AS se ON se.stream_id = s.id AND se.boot_epoch =
                    (SELECT max(boot_epoch) FROM stream_epochs WHERE stream_id = s.id)
               JOIN events AS e ON e.id = se.latest_rowid
               WHERE s.name > ? ORDER BY s.name LIMIT ?""",
            ("" if after is None else after, -1 if limit is None else limit),
        ).fetchall()
    return [
        (rowid, Event.trusted(name, seq, epoch, ts, kind, priority, bytes(payload)), tq, at)
        for rowid, name, epoch, seq, ts, tq, kind, priority, payload, at in rows
    ]


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


@contextlib.contextmanager
def atomic(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: `BEGIN IMMEDIATE`, `COMMIT` when the block ends, `ROLLBACK`
    on any exception (re-raised), whatever statement or Python code failed.

    IMMEDIATE takes the write lock at the start, so a reader's snapshot can never turn a
    write into SQLITE_BUSY halfway through. The rollback is skipped when SQLite already
    rolled back by itself (a full disk or an I/O error end the transaction); a failed
    COMMIT is rolled back too, so the connection is never left inside a transaction that
    the next writer would join by mistake. Every write path of the store goes through
    here: one definition of "all or nothing" instead of one per call site.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def set_state(conn: sqlite3.Connection, key: str, value: str, now: float | None = None) -> None:
    """Upsert one `agent_state` key (inside the caller's transaction, if any)."""
    conn.execute(
        "INSERT INTO agent_state (key, value, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
        "updated_at = excluded.updated_at",
        (key, value, time.time() if now is None else now),
    )


# SQLite's primary result codes that mean the file itself is damaged (sqlite.org/rescode.html).
SQLITE_CORRUPT: Final = 11
SQLITE_NOTADB: Final = 26


def damaged(exc: sqlite3.DatabaseError) -> bool:
    """True if SQLite says the file is corrupt or not a database (quarantine it); False for
    an error of the moment (full, locked, I/O, permission), where the file may be intact."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised by Python's module itself, not by SQLite
        return not isinstance(exc, sqlite3.OperationalError)
    return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
