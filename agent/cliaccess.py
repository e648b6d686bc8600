"""Guarded read access to the agent's live database, for the technician CLI (`ironfleet`).

Every read of `ironfleet` goes through `reading`: a read-only connection (`mode=ro`,
`query_only`, an authorizer that refuses acting PRAGMAs, ATTACH and VACUUM INTO) under
`readsafe`'s deadline, memory and WAL bounds, with SQLite's errors turned into one line
for the technician. It lives apart from the views and commands so that these bounds, and
the limits of `--limit` and `--timeout`, are kept in one place that nothing bypasses.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

import click

from agent.readsafe import (
    MAX_VALUE_BYTES,
    SQLITE_HEAP_BYTES,
    WAL_CEILING_BYTES,
    WAL_GROWTH_BYTES,
    ReadGuard,
    harden,
)
from agent.render import escape, human_bytes
from agent.store import connect

DEFAULT_TIMEOUT: Final = 2.0  # seconds; the design asks for answers well under one second
# Rows one command reads and renders at most (--limit): 10,000 rows of the largest events
# (512-byte frames, decoded and escaped) stay well under the CLI's 100 MiB budget. Longer
# listings page with --after (streams, replay, checkpoints). Also keeps SQLite's 64-bit
# LIMIT from overflowing (found by fuzzing: 2**63 rows was a traceback).
MAX_LIMIT: Final = 10_000
# Longest --timeout: a technician read is a glance (the design asks for answers well under
# a second), and every second of it takes one of the vehicle's two cores from ingest. The
# WAL is bounded separately (readsafe.wal_limit), so this caps CPU, not disk; it
# also keeps the millisecond busy timeout finite (1e308 was a traceback, found by fuzzing).
MAX_TIMEOUT: Final = 10.0


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan (which compares false with both bounds)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if math.isnan(rv):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return rv


LIMIT: Final = click.IntRange(min=1, max=MAX_LIMIT)
TIMEOUT: Final = FiniteFloatRange(min=0.001, max=MAX_TIMEOUT)


class CliError(click.ClickException):
    """A problem for the technician: one line on stderr, exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"ironfleet: {escape(self.format_message())}", err=True)


# -- reading the store ---------------------------------------------------------------------


# PRAGMAs `query` may run: those that only read. Anything else is refused, because mode=ro
# and query_only do not stop all of them: `PRAGMA wal_checkpoint(TRUNCATE)` from a
# read-only connection checkpointed and truncated the daemon's WAL (found by fuzzing).
READ_PRAGMAS: Final = frozenset({
    "application_id", "auto_vacuum", "cache_size", "collation_list", "compile_options",
    "data_version", "database_list", "encoding", "freelist_count", "function_list",
    "hard_heap_limit", "journal_mode", "journal_size_limit", "max_page_count", "module_list",
    "page_count", "page_size", "pragma_list", "query_only", "schema_version", "soft_heap_limit",
    "synchronous", "user_version", "wal_autocheckpoint",
})  # fmt: skip
# Those that read something named by their argument.
READ_PRAGMAS_WITH_ARGUMENT: Final = frozenset({
    "foreign_key_list", "index_info", "index_list", "index_xinfo", "integrity_check",
    "quick_check", "table_info", "table_list", "table_xinfo",
})  # fmt: skip


def _authorize(action: int, arg1: str | None, arg2: str | None, *_: str | None) -> int:
    # mode=ro already protects agent.db's rows; this keeps `query` from creating other
    # files (ATTACH of a new name, VACUUM INTO), switching query_only off, or running a
    # PRAGMA that acts (a checkpoint, an optimize) or sets anything.
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if name in READ_PRAGMAS_WITH_ARGUMENT or (arg2 is None and name in READ_PRAGMAS):
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def open_guarded(
    path: str | os.PathLike[str], timeout: float
) -> tuple[sqlite3.Connection, ReadGuard]:
    """A read-only, bounded connection and the guard that interrupts it (`readsafe`)."""
    conn = connect(path, readonly=True, busy_timeout_ms=max(1, int(timeout * 1000)))
    conn.set_authorizer(_authorize)
    return conn, harden(conn, Path(path), timeout)


def open_readonly(path: str | os.PathLike[str], timeout: float) -> sqlite3.Connection:
    """A read-only connection whose statements are interrupted `timeout` s after opening."""
    return open_guarded(path, timeout)[0]


def _bound_hit(exc: sqlite3.Error | MemoryError, why: str) -> str:
    """The message for a read stopped by one of `readsafe`'s bounds, or ''."""
    if why == "wal":
        return (
            "read stopped: the agent's write-ahead log kept growing while this read held its "
            f"snapshot (one read may add {human_bytes(WAL_GROWTH_BYTES)}, never past "
            f"{human_bytes(WAL_CEILING_BYTES)}; a long read keeps the agent from checkpointing): "
            "narrow the query, or query a copy (docs/operations.md, section 11)"
        )
    if isinstance(exc, MemoryError):
        return (
            f"query stopped: it needed more than {human_bytes(SQLITE_HEAP_BYTES)} of SQLite "
            "memory (narrow it, or add LIMIT)"
        )
    if "too big" in str(exc).lower():
        return (
            f"query stopped: it built a value larger than {human_bytes(MAX_VALUE_BYTES)}, "
            "the most one read may produce (narrow it)"
        )
    return ""


def explain(exc: sqlite3.Error | MemoryError, path: Path, timeout: float, why: str = "") -> str:
    """One line saying what an SQLite error means for the technician (`why`: guard reason)."""
    bound = _bound_hit(exc, why)
    if bound:
        return bound
    text = str(exc)
    low = text.lower()
    if "unable to open" in low and not os.access(path, os.R_OK):
        return f"permission denied reading {path}: technicians need the 'ironfleet' group"
    cannot_open = "unable to open" in low or "readonly" in low
    if cannot_open and not Path(f"{path}-wal").exists() and not os.access(path.parent, os.W_OK):
        # A stopped agent removed its -wal and -shm; a WAL reader must create them again
        # (SQLite says "attempt to write a readonly database" or "unable to open").
        return (
            f"cannot read {path} while the agent is stopped: SQLite must create "
            f"{path.name}-wal and -shm in {path.parent}, which you may not write; "
            "start the agent, or read it as the agent's user"
        )
    for needles, message in (
        (("interrupted",), f"query timed out after {timeout:g} s and was stopped "
                           "(raise --timeout, or narrow the query)"),
        (("locked", "busy"), f"database busy: {path} stayed locked for {timeout:g} s "
                             "(the agent may be starting or recovering; try again)"),
        (("unable to open",), f"cannot open {path} read-only ({text}): are its -wal and -shm "
                              "files readable by you? `ironfleet doctor` checks"),
        (("not a database", "malformed"), f"{path} is damaged or not a database ({text}); the "
                                          "agent quarantines a damaged file at its next start"),
        (("no such table", "no such column"), f"{path} is not an IronFleet agent database of a "
                                              f"known schema ({text})"),
        (("readonly", "read-only", "not authorized", "authorization denied"),
         f"refused: the CLI opens {path} read-only and reads nothing else ({text})"),
    ):  # fmt: skip
        if any(needle in low for needle in needles):
            return message
    return f"database error on {path}: {text}"


@contextlib.contextmanager
def reading(path: Path, timeout: float) -> Iterator[sqlite3.Connection]:
    """One short, guarded read transaction on `path`; errors become one-line CliErrors."""
    try:
        conn, guard = open_guarded(path, timeout)
    except sqlite3.Error as exc:
        raise CliError(explain(exc, path, timeout)) from None
    try:
        conn.execute("BEGIN")  # one snapshot for the whole command, ended below
        yield conn
    except (sqlite3.Error, MemoryError) as exc:  # MemoryError: SQLite's heap limit
        raise CliError(explain(exc, path, timeout, guard.reason)) from None
    finally:
        guard.stop()
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("COMMIT")
        conn.close()
