"""Page-level salvage of a quarantined event store into a fresh, migrated database.

`salvage(source, dest)` reads the damaged file page by page, without asking SQLite to
open it: the last committed WAL frames are laid over the main file, every table b-tree
named in the schema is walked from its root, and pages no tree reaches are scanned for
rows whose shape matches one of our tables (SQLite's `.recover` calls those
`lost_and_found`). Rows go into `dest` table by table, keeping rowids; stream epochs
are rebuilt from the events saved; the uplink cursor and `events.max_id` survive when
their page does, and rowids are never reused below anything the old file knew.

Why a walk of our own and not the `sqlite3` shell's `.recover`: Debian 12's sqlite3
(3.40.1) is built without the `sqlite_dbpage` table `.recover` needs, so it fails with
"SQL logic error" even on a healthy file (docs/decisions.md). The walk needs nothing but
the file, reads one page at a time and writes in batches, so memory stays flat; a time
budget bounds it.

What cannot be read is estimated from the interior pages' rowid keys: each unreadable
child page of the events tree leaves a rowid range. The part of those ranges the fleet
had not acknowledged is recorded in `shed` (reason `salvage_lost`), and the report is
kept in `agent_state` (`alarm.store_salvage`, `store.salvage`).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.livestate import read_row
from agent.pagefile import PageFile, Value
from agent.resilience.loss import SALVAGE_LOST
from agent.storedb import atomic, set_state

log = logging.getLogger(__name__)

# A salvage runs before the daemon is READY: inside the unit's TimeoutStartSec=300, with
# room for the integrity check and migration. Past it the rest of the file is given up.
SALVAGE_TIME_BUDGET: Final = 240.0
# Rows per insert transaction: memory per batch stays a few hundred kilobytes.
BATCH_ROWS: Final = 1000
# shed records written for lost rowid ranges; the rest are merged into the last one.
MAX_LOST_RECORDS: Final = 1000
LOST_REASON: Final = SALVAGE_LOST  # the loss ledger counts these (agent/resilience/loss.py)
# Tables copied, in this order; stream_epochs is rebuilt from events (WITHOUT ROWID).
TABLES: Final = ("events", "streams", "checkpoints", "gaps", "shed", "agent_state")


@dataclass(frozen=True, slots=True)
class SalvageReport:
    """What a salvage recovered and what it could not read."""

    source: str
    method: str
    rows: dict[str, int]  # rows copied into the new database, per table
    orphans_mapped: int  # rows found on pages no tree reached, placed by their shape
    orphans_unmapped: int  # such rows that matched none of our tables (counted only)
    pages: int
    pages_unreadable: int  # referenced by a tree but missing, beyond EOF or not a b-tree
    lost_ranges: tuple[tuple[int, int], ...]  # events rowid ranges that were unreadable
    lost_estimate: int  # events in those ranges not recovered (an upper bound)
    lost_unacked_estimate: int  # ... of which the fleet had not acknowledged
    cursor: int
    max_id: int
    timed_out: bool
    seconds: float

    @property
    def events(self) -> int:
        """Events saved."""
        return self.rows.get("events", 0)

    def summary(self) -> str:
        """One key=value line for the log and the alarm."""
        rows = " ".join(f"{k}={v}" for k, v in self.rows.items())
        return (
            f"method={self.method} {rows} orphans_mapped={self.orphans_mapped} "
            f"orphans_unmapped={self.orphans_unmapped} pages_unreadable={self.pages_unreadable}"
            f"/{self.pages} lost_estimate={self.lost_estimate} "
            f"lost_unacked_estimate={self.lost_unacked_estimate} cursor={self.cursor} "
            f"timed_out={str(self.timed_out).lower()}"
        )

    def to_json(self) -> str:
        """The report as JSON (the first 100 lost ranges only)."""
        doc = {
            "source": self.source, "method": self.method, "rows": self.rows,
            "orphans_mapped": self.orphans_mapped, "orphans_unmapped": self.orphans_unmapped,
            "pages": self.pages, "pages_unreadable": self.pages_unreadable,
            "lost_ranges": [list(r) for r in self.lost_ranges[:100]],
            "lost_range_count": len(self.lost_ranges), "lost_estimate": self.lost_estimate,
            "lost_unacked_estimate": self.lost_unacked_estimate, "cursor": self.cursor,
            "max_id": self.max_id, "timed_out": self.timed_out,
            "seconds": round(self.seconds, 3),
        }  # fmt: skip
        return json.dumps(doc, sort_keys=True)


def salvage(
    source: Path,
    dest: sqlite3.Connection,
    *,
    budget: float = SALVAGE_TIME_BUDGET,
    clock: Callable[[], float] = time.monotonic,
) -> SalvageReport:
    """Copy every readable row of the damaged file `source` (and its `-wal`) into `dest`.

    `dest` is an open connection to a fresh, migrated store (autocommit mode). Never
    raises for a damaged source; the report says what was saved and what was not.
    """
    began = clock()
    walk = _Walk(source, dest, deadline=began + budget, clock=clock)
    if walk.pages.error:
        log.error("salvage_unreadable error=%r", walk.pages.error)
    try:
        walk.run()
    except Exception:  # a salvage bug must not crash-loop the daemon
        log.exception("salvage_failed source=%s (keeping the rows copied so far)", source)
    finally:
        walk.pages.close()
    report = walk.finish(clock() - began)
    log.warning("store_salvaged from=%s %s", source, report.summary())
    return report


# -- tables -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Table:
    name: str
    columns: list[str]  # in record order
    types: list[str]  # declared, upper case
    notnull: list[bool]
    alias: int | None  # index of the INTEGER PRIMARY KEY column (the rowid), if any
    insert: str = ""  # INSERT for the columns dest also has
    keep: list[int] = field(default_factory=list)  # their indexes in `columns`
    root: int | None = None
    lossy: bool = True  # rows may be missing from its tree: take matching orphans
    batch: list[tuple[Value, ...]] = field(default_factory=list)

    def fits(self, values: list[Value]) -> bool:
        """True if `values` has this table's shape (count, types, NOT NULL)."""
        if len(values) != len(self.columns):
            return False
        for i, (v, decl, nn) in enumerate(zip(values, self.types, self.notnull, strict=True)):
            if i == self.alias:
                if v is not None:
                    return False
            elif v is None:
                if nn:
                    return False
            elif not _affine(v, decl):
                return False
        return True

    def row(self, rowid: int, values: list[Value]) -> tuple[Value, ...]:
        values = values + [None] * (len(self.columns) - len(values))
        if self.alias is not None:
            values[self.alias] = rowid
        return tuple(values[i] for i in self.keep)


def _describe(sql: str | None, name: str, dest: sqlite3.Connection) -> _Table:
    """Columns of `name` as the old file declared them (dest's, if unreadable)."""
    info: list[tuple[object, ...]] = []
    if sql:
        mem = sqlite3.connect(":memory:")
        try:
            mem.execute(sql)
            info = mem.execute(f"PRAGMA table_info({_quote(name)})").fetchall()
        except sqlite3.Error:
            info = []
        finally:
            mem.close()
    if not info:
        info = dest.execute(f"PRAGMA table_info({_quote(name)})").fetchall()
    pks = [row for row in info if int(row[5])]  # type: ignore[call-overload]
    alias = None
    if len(pks) == 1 and str(pks[0][2]).upper() == "INTEGER":
        alias = int(pks[0][0])  # type: ignore[call-overload]
    table = _Table(
        name,
        [str(r[1]) for r in info],
        [str(r[2]).upper() for r in info],
        [bool(r[3]) for r in info],
        alias,
    )
    have = {str(r[1]) for r in dest.execute(f"PRAGMA table_info({_quote(name)})")}
    table.keep = [i for i, c in enumerate(table.columns) if c in have]
    cols = ", ".join(_quote(table.columns[i]) for i in table.keep)
    marks = ", ".join("?" for _ in table.keep)
    table.insert = f"INSERT OR IGNORE INTO {_quote(name)} ({cols}) VALUES ({marks})"
    return table


def _affine(value: Value, decl: str) -> bool:
    """True if a non-NULL `value` is what a column declared `decl` holds."""
    if "INT" in decl:
        return isinstance(value, int)
    if any(k in decl for k in ("REAL", "FLOA", "DOUB")):
        return isinstance(value, int | float)
    if "TEXT" in decl or "CHAR" in decl:
        return isinstance(value, str)
    return "BLOB" not in decl or isinstance(value, bytes)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- the walk -----------------------------------------------------------------------------


class _Walk:
    """One salvage: walk the trees, then the orphan pages; write rows in batches."""

    def __init__(
        self, source: Path, dest: sqlite3.Connection, deadline: float, clock: Callable[[], float]
    ) -> None:
        self.source = source
        self.dest = dest
        self.deadline = deadline
        self.clock = clock
        self.pages = PageFile(source)
        self.rows = dict.fromkeys(TABLES, 0)
        self.orphans_mapped = 0
        self.orphans_unmapped = 0
        self.lost: list[tuple[int, int | None]] = []  # events rowid ranges unreadable
        self.top_key = 0  # highest events rowid any interior key or cell mentions
        self.timed_out = False
        self.tables: dict[str, _Table] = {}

    def expired(self) -> bool:
        if not self.timed_out and self.clock() > self.deadline:
            self.timed_out = True
            log.error("salvage_timed_out source=%s (the rest of the file is given up)", self.source)
        return self.timed_out

    def run(self) -> None:
        schema: dict[str, tuple[int, str]] = {}
        if self.pages.header_ok:
            for _rowid, values in self.pages.table_rows(1, self.expired):
                if len(values) == 5 and values[0] == "table" and isinstance(values[3], int):
                    schema[str(values[1])] = (values[3], str(values[4] or ""))
        for name in TABLES:
            root, sql = schema.get(name, (None, None))
            self.tables[name] = _describe(sql, name, self.dest)
            self.tables[name].root = root
        for name in TABLES:
            table = self.tables[name]
            if table.root is None or self.expired():
                continue
            lost_before = len(self.lost) + self.pages.unreadable
            lost = self.lost if name == "events" else None
            for rowid, values in self.pages.table_rows(table.root, self.expired, lost):
                self._add(table, rowid, values)
            table.lossy = len(self.lost) + self.pages.unreadable > lost_before
            self._flush(table)
        # After the walks: a garbage free-list page then cannot hide a live page from them.
        self.pages.mark_free_list()
        self._orphans()
        epochs = schema.get("stream_epochs")
        if epochs is not None and not self.expired():
            # (stream_id, boot_epoch, low_seq, high_seq, latest_rowid, events): the newest
            # rowid it names bounds what the lost tail of the events tree held.
            for values in self.pages.index_records(epochs[0], self.expired):
                if len(values) == 6 and all(isinstance(v, int) for v in values):
                    self.top_key = max(self.top_key, int(values[4]))  # type: ignore[arg-type]

    def _orphans(self) -> None:
        """Rows on leaf pages no tree reached, placed by shape (SQLite's lost_and_found)."""
        lossy = [t for t in self.tables.values() if t.lossy]
        if not lossy:
            return
        events = self.tables["events"]
        ranges = _merge(self.lost)
        starts = [lo for lo, _ in ranges]
        for number in range(1, self.pages.count + 1):
            if (number & 255 == 0 and self.expired()) or self.timed_out:
                break
            for rowid, values in self.pages.orphan_rows(number):
                table = next((t for t in lossy if t.fits(values)), None)
                if table is None:
                    self.orphans_unmapped += 1
                    continue
                if table is events:
                    if events.root is not None and not _inside(rowid, ranges, starts):
                        continue  # a stale copy of a row the tree still holds (or dropped)
                    self.top_key = max(self.top_key, rowid)
                self.orphans_mapped += 1
                self._add(table, rowid, values)
        for table in lossy:
            self._flush(table)

    def _add(self, table: _Table, rowid: int, values: list[Value]) -> None:
        table.batch.append(table.row(rowid, values))
        if len(table.batch) >= BATCH_ROWS:
            self._flush(table)

    def _flush(self, table: _Table) -> None:
        rows, table.batch = table.batch, []
        if not rows:
            return
        before = self.dest.total_changes
        try:
            with atomic(self.dest):
                try:
                    self.dest.executemany(table.insert, rows)
                except sqlite3.IntegrityError:
                    for row in rows:  # one row breaking a constraint costs only itself
                        with contextlib.suppress(sqlite3.IntegrityError):
                            self.dest.execute(table.insert, row)
        except sqlite3.Error as exc:
            log.error("salvage_write_failed table=%s rows=%d error=%r", table.name, len(rows), exc)
            return
        self.rows[table.name] += self.dest.total_changes - before

    def finish(self, seconds: float) -> SalvageReport:
        """Rebuild what is derived, keep rowids unique, record the report in `dest`."""
        with atomic(self.dest) as conn:
            return self._record(conn, time.time(), seconds)

    def _record(self, conn: sqlite3.Connection, at: float, seconds: float) -> SalvageReport:
        # Events whose stream row was lost still need a stream, or nobody can read them.
        conn.execute(
            """INSERT OR IGNORE INTO streams (id, name, controller, priority, first_seen,
                                             last_seen)
               SELECT stream_id, 'salvaged-stream-' || stream_id, '', max(priority),
                      min(received_at), max(received_at)
               FROM events WHERE stream_id NOT IN (SELECT id FROM streams)
               GROUP BY stream_id"""
        )
        _rebuild_stream_epochs(conn)
        cursor = _state_int(conn, "uplink.cursor", 1)
        top = conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0
        max_id = max(
            _state_int(conn, "events.max_id", 0), _published_top(conn), self.top_key,
            self.pages.max_key, top,
            cursor - 1,
        )  # fmt: skip
        lost = self._lost_ranges(conn, max_id)
        total = unacked = 0
        records: list[tuple[int, int, int]] = []
        for lo, hi in lost:
            missing = self._missing(conn, lo, hi)
            total += missing
            ulo = max(lo, cursor)
            if ulo <= hi:
                count = self._missing(conn, ulo, hi)
                if count:
                    unacked += count
                    records.append((ulo, hi, count))
        if len(records) > MAX_LOST_RECORDS:
            tail = records[MAX_LOST_RECORDS - 1 :]
            merged = (tail[0][0], tail[-1][1], sum(r[2] for r in tail))
            records = [*records[: MAX_LOST_RECORDS - 1], merged]
        conn.executemany(
            "INSERT INTO shed (at, reason, count, first_rowid, last_rowid) VALUES (?, ?, ?, ?, ?)",
            [(at, LOST_REASON, count, lo, hi) for lo, hi, count in records],
        )
        rows = {name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for name in TABLES}
        rows["stream_epochs"] = conn.execute("SELECT count(*) FROM stream_epochs").fetchone()[0]
        report = SalvageReport(
            source=str(self.source),
            method="page-walk",
            rows=rows,
            orphans_mapped=self.orphans_mapped,
            orphans_unmapped=self.orphans_unmapped,
            pages=self.pages.count,
            pages_unreadable=self.pages.unreadable,
            lost_ranges=tuple(lost),
            lost_estimate=total,
            lost_unacked_estimate=unacked,
            cursor=cursor,
            max_id=max_id,
            timed_out=self.timed_out,
            seconds=seconds,
        )
        for key, value in (
            ("events.max_id", str(max_id)),
            ("alarm.store_salvage", report.summary()),
            ("store.salvage", report.to_json()),
        ):
            set_state(conn, key, value, at)
        return report

    def _lost_ranges(self, conn: sqlite3.Connection, max_id: int) -> list[tuple[int, int]]:
        """Unreadable events rowid ranges, merged, open ends closed at `max_id`."""
        if self.tables["events"].root is None and self.pages.header_ok:
            return []  # no schema row for events: nothing known about what it held
        closed = sorted((lo, hi if hi is not None else max_id) for lo, hi in self.lost)
        merged: list[tuple[int, int]] = []
        for lo, hi in closed:
            if lo > hi:
                continue
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    @staticmethod
    def _missing(conn: sqlite3.Connection, lo: int, hi: int) -> int:
        have = conn.execute(
            "SELECT count(*) FROM events WHERE id BETWEEN ? AND ?", (lo, hi)
        ).fetchone()[0]
        return int(hi - lo + 1 - have)


def _merge(ranges: list[tuple[int, int | None]]) -> list[tuple[int, float]]:
    """Sorted, disjoint ranges (an open end is infinite)."""
    merged: list[tuple[int, float]] = []
    for lo, hi in sorted((lo, math.inf if hi is None else hi) for lo, hi in ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _inside(rowid: int, ranges: list[tuple[int, float]], starts: list[int]) -> bool:
    i = bisect.bisect_right(starts, rowid) - 1
    return i >= 0 and rowid <= ranges[i][1]


def _state_int(conn: sqlite3.Connection, key: str, default: int) -> int:
    row = conn.execute("SELECT value FROM agent_state WHERE key = ?", (key,)).fetchone()
    try:
        return int(row[0]) if row else default
    except (TypeError, ValueError):
        return default


def _published_top(conn: sqlite3.Connection) -> int:
    """The daemon's last published top rowid (its live snapshot, or the `store.stats` key
    of a file from before migration 004), 0 if unknown."""
    try:
        top = read_row(conn).store.get("top_rowid", 0)
        if not top:
            row = conn.execute("SELECT value FROM agent_state WHERE key = 'store.stats'").fetchone()
            top = json.loads(row[0]).get("top_rowid", 0) if row else 0
    except (sqlite3.Error, TypeError, ValueError, AttributeError):
        return 0
    return top if isinstance(top, int) and not isinstance(top, bool) else 0


def _rebuild_stream_epochs(conn: sqlite3.Connection) -> None:
    """stream_epochs from the events saved (inside the caller's transaction).

    Two grouped scans: a correlated max(id) per stream epoch would scan events once per
    row (quadratic in streams on a large buffer). With max(seq) the only aggregate, SQLite
    takes the bare `id` from the row holding it: the epoch's latest event.
    """
    conn.execute("DELETE FROM stream_epochs")
    conn.execute(
        """INSERT INTO stream_epochs (stream_id, boot_epoch, low_seq, high_seq, latest_rowid,
                                      events)
           SELECT top.stream_id, top.boot_epoch, n.low, top.high, top.id, n.events
           FROM (SELECT stream_id, boot_epoch, max(seq) AS high, id FROM events
                 GROUP BY stream_id, boot_epoch) AS top
           JOIN (SELECT stream_id, boot_epoch, min(seq) AS low, count(*) AS events FROM events
                 GROUP BY stream_id, boot_epoch) AS n
             ON n.stream_id = top.stream_id AND n.boot_epoch = top.boot_epoch"""
    )
