"""Bounds on every technician read: time, memory, rows, bytes and snapshot age (WAL growth).

A read-only connection cannot write, but it can still hurt the vehicle: a query that
allocates (`SELECT zeroblob(1e9)` took 2 GB, a string-doubling recursive CTE 5.8 GB) or a
read that keeps its snapshot while the daemon writes (every commit then lands at the end of
the WAL, which the daemon cannot restart: 4 MB to 298 MB in 40 s at 1,500 events/s). So:

- `SQLITE_LIMIT_LENGTH` refuses any string or blob above MAX_VALUE_BYTES before it is
  built ("string or blob too big"), whatever the SQL;
- the console process caps SQLite's whole heap (`PRAGMA hard_heap_limit`, process-wide,
  so only `ironfleet`'s own entry point sets it);
- `ReadGuard` watches the read from a thread and interrupts it (`sqlite3_interrupt`, which
  also stops single long steps such as a sort or `quick_check`, where no progress handler
  runs) once its deadline passes or once the WAL has grown by WAL_GROWTH_BYTES since the
  read began, or past WAL_CEILING_BYTES (`wal_limit`): the snapshot is cut, and the
  daemon's next checkpoint restarts the WAL;
- `fetch_bounded` stops fetching at a row count and at a byte count.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# Re-exported for the CLI's readers (defined with the store, which sums with them too).
from agent.storedb import LOW_BITS as LOW_BITS  # noqa: PLC0414
from agent.storedb import LOW_MASK as LOW_MASK  # noqa: PLC0414
from agent.storedb import PAGE_SIZE
from agent.storedb import exact_sum as exact_sum  # noqa: PLC0414
from agent.storedb import exact_sum_sql as exact_sum_sql  # noqa: PLC0414

# Longest string or blob a technician read may produce or fetch. Stored values are far
# smaller: an event payload fits in one 512-byte serial frame, published state values are
# a few KiB of JSON; past this size a value can only come from SQL that builds it.
MAX_VALUE_BYTES: Final = 1 * 2**20
# SQLite heap for the whole `ironfleet` process: a few times the default page cache (2 MiB
# per connection) plus sorter memory before it spills to temporary files; what is left of
# the 100 MiB RSS budget of a CLI command goes to Python's own objects.
SQLITE_HEAP_BYTES: Final = 32 * 2**20
# WAL a read may cost. Without readers the daemon's WAL peaks near one autocheckpoint
# (1,000 pages; 3.9 MiB measured at 1,500 events/s). One read may grow it by half that, and
# no read may hold its snapshot while the file grows past 1.5 autocheckpoints (reads one
# after another would otherwise relay the growth before the daemon restarts its WAL). The
# rest, up to 2x, is for what the daemon appends while its checkpoint catches up after a cut.
AUTOCHECKPOINT_BYTES: Final = 1000 * PAGE_SIZE
WAL_GROWTH_BYTES: Final = AUTOCHECKPOINT_BYTES // 2
WAL_CEILING_BYTES: Final = AUTOCHECKPOINT_BYTES * 3 // 2
WATCH_INTERVAL: Final = 0.01  # seconds between two looks at the clock and the WAL size
PROGRESS_STEPS: Final = 1000  # SQLite VM instructions between two deadline checks
# Bytes of query results held in memory at most (the approximate size of the values
# fetched; `run_query` stops there and says so). Rendering multiplies it a few times.
MAX_FETCH_BYTES: Final = 4 * 2**20


def limit_process_heap(limit: int = SQLITE_HEAP_BYTES) -> None:
    """Cap SQLite's heap for this whole process (only for a process that is `ironfleet`)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(f"PRAGMA hard_heap_limit = {int(limit)}")
    finally:
        conn.close()


def wal_bytes(path: Path) -> int:
    """Size of the database's write-ahead log, 0 when there is none."""
    try:
        return os.stat(f"{path}-wal").st_size
    except OSError:
        return 0


@dataclass
class ReadGuard:
    """Interrupts `conn` at `deadline` (monotonic) or once the WAL passed `wal_limit`."""

    conn: sqlite3.Connection
    path: Path
    deadline: float
    reason: str = ""  # why the read was interrupted; empty while it was not
    wal_limit: int = 0  # WAL bytes past which the read is cut; see `wal_limit`
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ReadGuard:
        """Begin watching; the deadline also holds inside SQLite via a progress handler."""
        self.wal_limit = wal_limit(wal_bytes(self.path))
        self.conn.set_progress_handler(self._progress, PROGRESS_STEPS)
        self._thread = threading.Thread(target=self._watch, name="ironfleet-read-guard",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the connection closes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _progress(self) -> int:
        # A non-zero return makes SQLite abort the running statement with "interrupted".
        if self.reason:
            return 1
        if time.monotonic() > self.deadline:
            self.reason = "deadline"
            return 1
        return 0

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            if time.monotonic() > self.deadline:
                self.reason = self.reason or "deadline"
            elif wal_bytes(self.path) > self.wal_limit:
                self.reason = self.reason or "wal"
            if self.reason:
                with contextlib.suppress(sqlite3.ProgrammingError):  # closed meanwhile
                    self.conn.interrupt()
                return


def wal_limit(start: int) -> int:
    """WAL size past which a read that began at `start` bytes is cut.

    At most WAL_GROWTH_BYTES of growth, and no growth at all past WAL_CEILING_BYTES (a WAL
    file larger than that from earlier may be reused, never extended, while we read).
    """
    return min(start + WAL_GROWTH_BYTES, max(start, WAL_CEILING_BYTES))


def harden(conn: sqlite3.Connection, path: Path, timeout: float) -> ReadGuard:
    """Bound `conn`'s values and decoding, and start a guard ending reads after `timeout` s."""
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    # TEXT that is not UTF-8 (a damaged or foreign file) is shown with U+FFFD, not refused.
    conn.text_factory = _text
    return ReadGuard(conn, path, time.monotonic() + timeout).start()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def value_size(value: Any) -> int:
    """Approximate bytes a fetched value holds (its text or blob length, 8 for numbers)."""
    if isinstance(value, str | bytes):
        return len(value) + 8
    return 8


def fetch_bounded(
    cur: sqlite3.Cursor, max_rows: int, max_bytes: int = MAX_FETCH_BYTES
) -> tuple[list[Sequence[Any]], str]:
    """Up to `max_rows` rows and about `max_bytes` of values; why it stopped early, or ''."""
    rows: list[Sequence[Any]] = []
    size = 0
    while True:
        chunk = cur.fetchmany(100)
        if not chunk:
            return rows, ""
        for row in chunk:
            if len(rows) >= max_rows:
                return rows, "rows"
            size += sum(value_size(v) for v in row) + 16
            if size > max_bytes and rows:
                return rows, "bytes"
            rows.append(row)
