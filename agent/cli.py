"""`ironfleet`: the technician's read-only view of the agent and its event store.

Every command opens the store with `agent.store.connect(readonly=True)` (`mode=ro` plus
`query_only`: it can neither write nor take the write lock), reads what it needs inside
one short transaction under a deadline (`--timeout`), closes the connection, and only then
prints. A reader never holds a transaction across output, so it never holds back the
daemon's WAL checkpoints (DESIGN.md invariant 12 and "Readers must be brief").

Live values (serial link, uplink, breaker, counters) come from `agent_state`, which the
daemon rewrites about once a second (`Writer._publish`); `daemon.heartbeat` dates them and
every view shows its age, so a stale picture is obvious. The functions at the top read
and shape data; the click commands at the bottom only parse, call and format.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import grp
import itertools
import json
import math
import os
import pwd
import re
import signal
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import click
from click.core import ParameterSource

from agent import config as config_mod
from agent.config import Config
from agent.errors import ConfigError
from agent.pages import PAGE_ROWS, Page, decode_signals, read_checkpoints, read_replay, read_streams
from agent.readsafe import (
    MAX_FETCH_BYTES,
    MAX_VALUE_BYTES,
    SQLITE_HEAP_BYTES,
    WAL_CEILING_BYTES,
    WAL_GROWTH_BYTES,
    ReadGuard,
    exact_sum,
    exact_sum_sql,
    fetch_bounded,
    harden,
    limit_process_heap,
)
from agent.render import (
    CLOCK_BACK_TOLERANCE,
    TIME_QUALITY,
    ago,
    cell,
    clock_time,
    controller_time,
    echo_hint,
    emit,
    escape,
    human_bytes,
    json_text,
    n,
    pairs,
    shell_arg,
    signals_text,
    span,
    table,
)
from agent.render import age_of as _age
from agent.store import check_integrity, connect, read_cursor

DEFAULT_CONFIG: Final = "/etc/ironfleet/agent.toml"
DB_ENV: Final = "IRONFLEET_DB"
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
FOLLOW_INTERVAL: Final = 0.5  # seconds between two polls of `events --follow`
FOLLOW_BATCH: Final = 1000  # rows per poll; a longer backlog is read in several polls
# The daemon publishes every second (agent.daemon.PUBLISH_INTERVAL); a few missed
# publishes mean it is stopped or its writer thread is stuck.
HEARTBEAT_STALE: Final = 5.0
MIN_SANE_YEAR: Final = 2020  # an earlier wall clock was never set (RTC without battery)
CONTROLLER_SKEW_WARN: Final = 60.0  # seconds between a synced controller clock and ours
RATE_WINDOW: Final = 10.0  # seconds over which `link` counts recent events
RATE_SCAN_ROWS: Final = 100_000  # ... reading at most this many of the newest rows
WAL_WARN_BYTES: Final = 128 * 2**20  # twice the store's journal_size_limit
SKEW_SCAN_ROWS: Final = 1000  # newest events doctor reads to compare controller clocks

Row = dict[str, Any]
T = TypeVar("T")


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


def read_state(conn: sqlite3.Connection) -> dict[str, tuple[str, float]]:
    """Every `agent_state` key as (value, updated_at)."""
    return {
        key: (value, float(at or 0.0))
        for key, value, at in conn.execute("SELECT key, value, updated_at FROM agent_state")
    }


def _text(state: dict[str, tuple[str, float]], key: str) -> str:
    return state[key][0] if key in state else ""


def _number(state: dict[str, tuple[str, float]], key: str) -> float | None:
    try:
        return float(state[key][0])
    except (KeyError, ValueError):
        return None


def _int(state: dict[str, tuple[str, float]], key: str) -> int | None:
    value = _number(state, key)
    return None if value is None or not math.isfinite(value) else int(value)


def _json(state: dict[str, tuple[str, float]], key: str) -> dict[str, Any]:
    try:
        value = json.loads(state[key][0])
    except (KeyError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_view(state: dict[str, tuple[str, float]], now: float) -> Row:
    """Who published the live values and how long ago (`live` if within HEARTBEAT_STALE)."""
    beat = _number(state, "daemon.heartbeat")
    age = _age(beat, now)
    stopped = _number(state, "daemon.stopped_at")  # set by a clean stop, empty while running
    pid = _int(state, "daemon.pid")
    return {
        "pid": pid,
        # The process is there but its heartbeat is not: it cannot write its database.
        "process_alive": pid is not None and pid > 0 and not stopped and pid_alive(pid),
        "heartbeat": beat,
        "heartbeat_age_s": age,
        "stopped_at": stopped,
        "live": not stopped and age is not None and -CLOCK_BACK_TOLERANCE <= age <= HEARTBEAT_STALE,
        "alarm": _text(state, "daemon.alarm"),
        "counters": _json(state, "daemon.counters"),
    }


def fleet_view(state: dict[str, tuple[str, float]], conn: sqlite3.Connection, now: float) -> Row:
    """What the fleet has acknowledged and when (the persisted cursor), and the uplink."""
    last = state["uplink.cursor"][1] if "uplink.cursor" in state else None
    if last is None:
        last = conn.execute("SELECT max(acked_at) FROM checkpoints").fetchone()[0]
    return {
        "cursor": read_cursor(conn),
        "last_ack_at": last,
        "last_ack_age_s": _age(last, now),
        "uplink": _text(state, "uplink.state") or "unknown",
        "phase": _text(state, "uplink.phase"),
        "breaker": _text(state, "breaker.state"),
    }


def link_view(state: dict[str, tuple[str, float]]) -> Row:
    """The serial side as last published."""
    epoch = _text(state, "link.boot_epoch")
    return {
        "state": _text(state, "link.state") or "unknown",
        "controller": _text(state, "link.controller"),
        "boot_epoch": int(epoch) if epoch.isdigit() else None,
        "port": _text(state, "link.port"),
        "device": _text(state, "link.device"),
    }


def file_bytes(path: Path) -> tuple[int, int]:
    """Sizes of the database file and of its write-ahead log (0 when absent)."""
    sizes = []
    for name in (str(path), f"{path}-wal"):
        try:
            sizes.append(os.stat(name).st_size)
        except OSError:
            sizes.append(0)
    return sizes[0], sizes[1]


def read_status(conn: sqlite3.Connection, path: Path, now: float) -> Row:
    """The one-screen answer: daemon alive, controller, buffer, backlog, fleet, gaps, shed."""
    state = read_state(conn)
    cursor = read_cursor(conn)
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    unacked = conn.execute("SELECT count(*) FROM events WHERE id >= ?", (cursor,)).fetchone()[0]
    oldest = conn.execute(
        "SELECT received_at FROM events WHERE id >= ? ORDER BY id LIMIT 1", (cursor,)
    ).fetchone()
    newest = conn.execute("SELECT received_at FROM events ORDER BY id DESC LIMIT 1").fetchone()
    streams = conn.execute("SELECT count(*) FROM streams").fetchone()[0]
    summary = read_gap_counts(conn)
    gaps_open, missing, gaps_total = summary["open"], summary["missing"], summary["total"]
    shed_records, high, low = conn.execute(
        f"SELECT count(*), {exact_sum_sql('count')} FROM shed"
    ).fetchone()
    shed_events = exact_sum(high, low)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    db_bytes, wal_bytes = file_bytes(path)
    newest_at = float(newest[0]) if newest else None
    oldest_at = float(oldest[0]) if oldest else None
    return {
        "database": str(path),
        "now": now,
        "daemon": daemon_view(state, now),
        "link": {**link_view(state), "last_event_at": newest_at,
                 "last_event_age_s": _age(newest_at, now)},
        "buffer": {
            "events": events,
            "streams": streams,
            "used_bytes": (pages - free) * page_size,
            "file_bytes": db_bytes,
            "wal_bytes": wal_bytes,
        },
        "backlog": {
            "unacked_events": unacked,
            "oldest_unacked_received_at": oldest_at,
            "oldest_unacked_age_s": _age(oldest_at, now),
        },
        "fleet": fleet_view(state, conn, now),
        "gaps": {"open": gaps_open, "missing": missing, "total": gaps_total},
        "shed": {"records": shed_records, "events": shed_events},
    }  # fmt: skip


@dataclass(frozen=True)
class EventFilter:
    """What `events` selects: stream names or GLOB patterns, kinds, received_at window."""

    streams: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None


_EVENT_SQL: Final = """SELECT e.id, s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind,
       e.priority, e.payload, e.received_at
FROM events AS e CROSS JOIN streams AS s"""
# CROSS JOIN makes SQLite walk `events` in rowid order (the outer loop) and stop at the
# LIMIT, instead of starting from `streams` and sorting the whole table.


def _event_where(conn: sqlite3.Connection, flt: EventFilter) -> tuple[list[str], list[object]]:
    where: list[str] = ["s.id = e.stream_id"]
    params: list[object] = []
    if flt.streams:
        ids: set[int] = set()
        for pattern in flt.streams:
            found = {r[0] for r in conn.execute("SELECT id FROM streams WHERE name GLOB ?",
                                                (pattern,))}  # fmt: skip
            if not found:
                raise CliError(f"no stream matches {pattern!r}; `ironfleet streams` lists them")
            ids |= found
        where.append(f"e.stream_id IN ({','.join(str(i) for i in sorted(ids))})")
    if flt.kinds:
        where.append(f"e.kind IN ({','.join('?' * len(flt.kinds))})")
        params += flt.kinds
    if flt.since is not None:
        where.append("e.received_at >= ?")
        params.append(flt.since)
    if flt.until is not None:
        where.append("e.received_at < ?")
        params.append(flt.until)
    return where, params


def _event_row(row: Sequence[Any], now: float) -> Row:
    rowid, stream, epoch, seq, ts, tq, kind, priority, payload, received_at = row
    return {
        "id": rowid, "stream": stream, "boot_epoch": epoch, "seq": seq, "ts": ts,
        "ts_quality": tq, "kind": kind, "priority": priority, "received_at": received_at,
        "received_age_s": _age(received_at, now), "signals": decode_signals(bytes(payload)),
    }  # fmt: skip


def read_events(
    conn: sqlite3.Connection, flt: EventFilter, limit: int, now: float
) -> tuple[list[Row], int]:
    """The newest `limit` matching events, oldest first, and the highest rowid now stored."""
    where, params = _event_where(conn, flt)
    rows = conn.execute(
        f"{_EVENT_SQL} WHERE {' AND '.join(where)} ORDER BY e.id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    top = conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0
    return [_event_row(r, now) for r in reversed(rows)], int(top)


def read_events_after(
    conn: sqlite3.Connection, flt: EventFilter, after_id: int, now: float
) -> list[Row]:
    """Matching events with a rowid above `after_id`, oldest first, FOLLOW_BATCH at most."""
    where, params = _event_where(conn, flt)
    rows = conn.execute(
        f"{_EVENT_SQL} WHERE {' AND '.join(where)} AND e.id > ? ORDER BY e.id LIMIT ?",
        (*params, after_id, FOLLOW_BATCH),
    ).fetchall()
    return [_event_row(r, now) for r in rows]


def read_gaps(conn: sqlite3.Connection, open_only: bool, limit: int, now: float) -> list[Row]:
    """The newest `limit` gaps (or open gaps only), in order of detection."""
    where = "WHERE g.closed_at IS NULL" if open_only else ""
    rows = conn.execute(
        f"""SELECT g.id, s.name, g.boot_epoch, g.first_seq, g.last_seq, g.missing,
                   g.detected_at, g.closed_at
            FROM gaps AS g LEFT JOIN streams AS s ON s.id = g.stream_id
            {where} ORDER BY g.id DESC LIMIT ?""",
        (limit,),
    ).fetchall()
    return [
        {
            "id": gid, "stream": name, "boot_epoch": epoch, "first_seq": lo, "last_seq": hi,
            "missing": missing, "open": closed is None, "detected_at": detected,
            "detected_age_s": _age(detected, now), "closed_at": closed,
            "closed_age_s": _age(closed, now),
        }
        for gid, name, epoch, lo, hi, missing, detected, closed in reversed(rows)
    ]  # fmt: skip


def read_gap_counts(conn: sqlite3.Connection) -> Row:
    """Open gaps, events they miss (an exact sum: one gap alone may miss 2**63 - 3), all gaps."""
    opened, high, low = conn.execute(
        f"SELECT count(*), {exact_sum_sql('missing')} FROM gaps WHERE closed_at IS NULL"
    ).fetchone()
    total = conn.execute("SELECT count(*) FROM gaps").fetchone()[0]
    return {"open": opened, "missing": exact_sum(high, low), "total": total}


def read_gap_summary(conn: sqlite3.Connection) -> Row:
    """Counts over every gap, plus the serial link's own frame gaps (NACKed, resent)."""
    link = _json(read_state(conn), "link.counters")
    return {**read_gap_counts(conn), "link_gaps": link.get("gaps")}


def read_fleet(conn: sqlite3.Connection, now: float) -> Row:
    """The fleet cursor and the time of the last acknowledgement."""
    return fleet_view(read_state(conn), conn, now)


def read_shed(conn: sqlite3.Connection, limit: int, now: float) -> list[Row]:
    """The newest `limit` shed records: events the disk ladder removed unacknowledged."""
    rows = conn.execute(
        """SELECT sh.id, sh.at, sh.reason, s.name, sh.boot_epoch, sh.first_seq, sh.last_seq,
                  sh.count, sh.first_rowid, sh.last_rowid
           FROM shed AS sh LEFT JOIN streams AS s ON s.id = sh.stream_id
           ORDER BY sh.id DESC LIMIT ?""",
        (limit,),
    ).fetchall()
    return [
        {
            "id": sid, "at": at, "age_s": _age(at, now), "reason": reason, "stream": name,
            "boot_epoch": epoch, "first_seq": lo, "last_seq": hi, "count": count,
            "first_rowid": first, "last_rowid": last,
        }
        for sid, at, reason, name, epoch, lo, hi, count, first, last in reversed(rows)
    ]  # fmt: skip


def read_shed_totals(conn: sqlite3.Connection) -> list[tuple[str, int, int, float]]:
    """(reason, records, events, last at) over the whole shed table."""
    return [
        (reason, records, exact_sum(high, low), at)
        for reason, records, high, low, at in conn.execute(
            f"SELECT reason, count(*), {exact_sum_sql('count')}, max(at) FROM shed "
            "GROUP BY reason ORDER BY 1"
        )
    ]


def read_link(conn: sqlite3.Connection, now: float) -> Row:
    """Serial link as published, plus the newest stored event and the recent event rate."""
    state = read_state(conn)
    newest = conn.execute(
        "SELECT e.received_at, s.name FROM events AS e CROSS JOIN streams AS s "
        "WHERE s.id = e.stream_id ORDER BY e.id DESC LIMIT 1"
    ).fetchone()
    recent = conn.execute(
        f"SELECT count(*) FROM (SELECT received_at FROM events ORDER BY id DESC "
        f"LIMIT {RATE_SCAN_ROWS}) WHERE received_at >= ?",
        (now - RATE_WINDOW,),
    ).fetchone()[0]
    published = state["link.state"][1] if "link.state" in state else None
    return {
        **link_view(state),
        "published_at": published,
        "published_age_s": _age(published, now),
        "daemon": daemon_view(state, now),
        "last_event_at": newest[0] if newest else None,
        "last_event_age_s": _age(newest[0] if newest else None, now),
        "last_event_stream": newest[1] if newest else None,
        "events_last_10s": recent,
        "counters": _json(state, "link.counters"),
        "rejects": _json(state, "link.rejects"),
    }


def read_breaker(conn: sqlite3.Connection, now: float) -> Row:
    """The uplink breaker as published, the uplink around it, and the likely reasons."""
    state = read_state(conn)
    daemon = daemon_view(state, now)
    counters = _json(state, "uplink.counters")
    retry = _number(state, "breaker.retry_in")
    age = daemon["heartbeat_age_s"] or 0.0
    view: Row = {
        "state": _text(state, "breaker.state") or "unknown",
        "failures": _int(state, "breaker.failures"),
        "successes": _int(state, "breaker.successes"),
        "retry_in_s": None if retry is None else max(0.0, round(retry - age, 1)),
        "transitions": _int(state, "breaker.transitions"),
        "uplink": _text(state, "uplink.state") or "unknown",
        "phase": _text(state, "uplink.phase"),
        "in_flight": _int(state, "uplink.in_flight"),
        "ack_timeouts": counters.get("ack_timeouts"),
        "uplink_counters": counters,
        "daemon": daemon,
    }
    view["why"] = breaker_reasons(view)
    return view


def breaker_reasons(view: Row) -> list[str]:
    """Plain-language reasons for the breaker's state, from the published values."""
    why: list[str] = []
    if view["uplink"] == "disabled":
        return ["the uplink is disabled: [uplink] enabled = false in the configuration"]
    if view["state"] == "unknown":
        return ["no breaker state was ever published (the uplink never started)"]
    if not view["daemon"]["live"]:
        why.append("the daemon is not publishing: these values are from its last heartbeat")
    if view["state"] in ("open", "half_open"):
        if view["uplink"] != "connected":
            why.append(
                "the broker cannot be reached or refuses the agent (uplink disconnected); "
                "the log line uplink_down reason=... names the cause"
            )
        if view["ack_timeouts"]:
            why.append(
                f"{int(view['ack_timeouts'])} batches were not acknowledged within "
                "[uplink] ack_timeout (collector down or slow?)"
            )
        if not why:
            why.append("publishes failed; the log lines uplink_down and uplink_ack_timeout tell")
    elif view["uplink"] != "connected":
        why.append("the breaker is closed but the uplink is down: reconnecting with backoff")
    return why


def run_query(conn: sqlite3.Connection, sql: str, limit: int) -> tuple[list[str], list[Row], str]:
    """Run one read-only SQL statement; columns, up to `limit` rows (and MAX_FETCH_BYTES of
    values), and why it stopped early: 'rows', 'bytes' or ''."""
    cur = conn.execute(sql)
    columns = [d[0] for d in cur.description or ()]
    fetched, cut = fetch_bounded(cur, limit)
    cur.close()
    return columns, [dict(zip(columns, r, strict=True)) for r in fetched], cut


# -- doctor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One doctor finding: `status` is ok, warn, fail or skip."""

    name: str
    status: str
    detail: str


def check_config(path: str) -> tuple[Check, Config | None]:
    """The configuration file loads and validates exactly as the daemon would load it."""
    try:
        config = config_mod.load(path)
    except ConfigError as exc:
        return Check("config", "fail", str(exc)), None
    return Check("config", "ok", f"{path}: valid (device {config.serial.device})"), config


def _mode(path: Path) -> str:
    """`drwxr-x--- ironfleet:ironfleet`, numeric ids where no name is known."""
    st = path.stat()
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.filemode(st.st_mode)} {user}:{group}"


def check_permissions(db: Path) -> Check:
    """State directory and database readable by us, not writable by everyone."""
    folder = db.parent
    status, problems = "ok", []
    try:
        detail = f"{folder} {_mode(folder)}"
        if not os.access(folder, os.R_OK | os.X_OK):
            problems.append("directory not readable by you: technicians need the 'ironfleet' group")
        elif not db.exists():
            problems.append(f"no {db.name} in it")
        else:
            detail += f", {db.name} {_mode(db)}"
            for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                if path.exists() and not os.access(path, os.R_OK):
                    problems.append(f"{path.name} not readable by you ({_mode(path)})")
            if (folder.stat().st_mode | db.stat().st_mode) & stat.S_IWOTH:
                problems.append("writable by everyone")
        if folder.stat().st_mode & stat.S_IRWXO and not problems:
            status, problems = "warn", ["open to everyone (the unit uses StateDirectoryMode=0750)"]
    except OSError as exc:
        return Check("permissions", "fail", f"{exc.filename}: {exc.strerror}")
    if problems and status == "ok":
        status = "fail"
    return Check("permissions", status, "; ".join([detail, *problems]))


def resolve_device(pattern: str) -> list[str]:
    """Existing paths for a configured device: the path itself, or a glob's matches."""
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern))
    return [pattern] if os.path.exists(pattern) else []


def check_device(config: Config | None, published: str) -> Check:
    """The configured serial device (glob resolved) is present."""
    if config is None:
        return Check("device", "skip", "needs a valid configuration")
    pattern = config.serial.device
    found = resolve_device(pattern)
    if not found:
        return Check("device", "fail", f"{pattern}: not present (cable, power, udev rule?)")
    target = os.path.realpath(found[0])
    kind = "character device" if stat.S_ISCHR(os.stat(target).st_mode) else "not a tty"
    detail = f"{pattern} -> {found[0]} ({target}, {kind})"
    if len(found) > 1:
        detail += f"; {len(found)} matches, the agent opens the first"
    if published:
        detail += f"; the agent has {published} open"
    return Check("device", "ok" if kind == "character device" else "warn", detail)


def check_disk(config: Config | None, db: Path) -> Check:
    """Free space on the state file system against [store] min_free_bytes."""
    if config is None:
        return Check("disk", "skip", "needs a valid configuration")
    try:
        st = os.statvfs(db.parent)
    except OSError as exc:
        return Check("disk", "fail", f"{db.parent}: {exc.strerror}")
    free = st.f_bavail * st.f_frsize
    floor = config.store.min_free_bytes
    detail = f"{human_bytes(free)} free, floor {human_bytes(floor)} ([store] min_free_bytes)"
    if free < floor:
        return Check("disk", "fail", f"{detail}: below the floor, the buffer is shrinking")
    if free < 2 * floor:
        return Check("disk", "warn", f"{detail}: close to the floor")
    return Check("disk", "ok", detail)


def check_clock(now: float, heartbeat: float | None, skew: float | None) -> Check:
    """Wall clock set, not behind the daemon's heartbeat, close to synced controller clocks."""
    year = datetime.fromtimestamp(now).year
    wall = datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")
    if year < MIN_SANE_YEAR:
        return Check("clock", "fail", f"wall clock reads {wall}: never set (NTP, RTC battery?)")
    if heartbeat is not None and heartbeat - now > CLOCK_BACK_TOLERANCE:
        return Check("clock", "fail", f"wall clock {wall} is {span(heartbeat - now)} behind the "
                     "daemon's last heartbeat: the clock moved backwards")  # fmt: skip
    detail = f"wall clock {wall}"
    if skew is not None:
        detail += f"; synced controller clock differs by {span(abs(skew))}"
        if abs(skew) > CONTROLLER_SKEW_WARN:
            return Check("clock", "warn", detail + " (one of the two clocks is wrong)")
    return Check("clock", "ok", detail)


def check_daemon(daemon: Row) -> Check:
    """The daemon publishes its heartbeat (about every second)."""
    if daemon["heartbeat"] is None:
        return Check("daemon", "fail", "no heartbeat ever published (agent never started?)")
    age = daemon["heartbeat_age_s"]
    pid = daemon["pid"] or "?"
    if daemon.get("stopped_at"):
        return Check("daemon", "fail", f"stopped cleanly (pid {pid}); `systemctl status "
                     "ironfleet-agent`")  # fmt: skip
    if not daemon["live"] and daemon.get("process_alive"):
        return Check("daemon", "fail", f"pid {pid} runs but has not written its database for "
                     f"{span(age or 0.0)}: disk full or read-only? `systemctl status "
                     "ironfleet-agent` shows its alarm")  # fmt: skip
    if not daemon["live"]:
        return Check("daemon", "fail", f"last heartbeat {span(age)} ago (pid {pid}): stopped or "
                     "stuck; `systemctl status ironfleet-agent`")  # fmt: skip
    alarm = daemon["alarm"]
    if alarm:
        return Check("daemon", "warn", f"heartbeat {span(age)} ago (pid {pid}); alarm: {alarm}")
    return Check("daemon", "ok", f"heartbeat {span(age)} ago (pid {pid})")


def read_doctor(conn: sqlite3.Connection, now: float) -> Row:
    """What doctor needs from the live state: heartbeat, opened device, clock skew."""
    state = read_state(conn)
    # The newest events only: bounded whatever the number of streams (1M streams' latest
    # events took 900 MB when read all at once). Non-finite differences are not clocks.
    skews = [
        d for (d,) in conn.execute(
            f"SELECT received_at - ts FROM (SELECT received_at, ts, ts_quality FROM events "
            f"ORDER BY id DESC LIMIT {SKEW_SCAN_ROWS}) WHERE ts_quality = ?",
            (TIME_QUALITY.index("synced"),),
        )
        if isinstance(d, float | int) and math.isfinite(d)
    ]  # fmt: skip
    return {
        "daemon": daemon_view(state, now),
        "device": _text(state, "link.device"),
        "skew": max(skews, key=abs) if skews else None,
    }


Reader = Callable[[Callable[[sqlite3.Connection], Any]], Any]


def check_database(db: Path, read: Reader) -> Check:
    """`PRAGMA quick_check` under the read deadline (it reads the whole file)."""
    try:
        problems = read(check_integrity)
    except CliError as exc:
        message = exc.format_message()
        # A read cut by its deadline or by the WAL bound says nothing about the file.
        cut = "timed out" in message or "read stopped" in message
        return Check("database", "warn" if cut else "fail", message)
    if problems:
        return Check("database", "fail", f"quick_check: {'; '.join(problems[:3])}")
    return Check("database", "ok", f"quick_check ok ({human_bytes(sum(file_bytes(db)))})")


def check_fleet_trust(config: Config | None) -> Check:
    """Acks and commands from the broker are verified against the fleet's key."""
    if config is None:
        return Check("fleet trust", "skip", "configuration invalid")
    if not config.uplink.enabled:
        return Check("fleet trust", "skip", "[uplink] enabled = false")
    # Imported here: `cryptography` costs import time every other command need not pay.
    from agent.fleet_auth import trust_warnings  # noqa: PLC0415

    warnings = trust_warnings(config.uplink)
    if warnings:
        return Check("fleet trust", "warn", "; ".join(warnings))
    return Check(
        "fleet trust", "ok", f"acks and commands verified with {config.uplink.fleet_key_file}"
    )


def doctor_checks(config_path: str, db: Path, read: Reader, now: float) -> list[Check]:
    """Every doctor check, in the order a technician fixes things."""
    config_check, config = check_config(config_path)
    checks = [config_check, check_fleet_trust(config), check_permissions(db),
              check_database(db, read)]  # fmt: skip
    _, wal = file_bytes(db)
    if wal > WAL_WARN_BYTES:
        checks.append(Check("wal", "warn", f"{human_bytes(wal)} of WAL: a reader holding a "
                            "transaction open starves checkpoints"))  # fmt: skip
    try:
        found: Row | None = read(lambda conn: read_doctor(conn, now))
    except CliError:
        found = None  # already reported by the database check
    daemon = found["daemon"] if found else None
    checks += [
        check_device(config, found["device"] if found else ""),
        check_disk(config, db),
        check_clock(now, daemon["heartbeat"] if daemon else None, found["skew"] if found else None),
        check_daemon(daemon) if daemon else Check("daemon", "skip", "database unreadable"),
    ]
    return checks


# -- time and size -------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)")
_UNIT_SECONDS: Final = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: float) -> float:
    """A time as Unix seconds: relative ("10m" ago), ISO 8601, or HH:MM[:SS] today (local)."""
    text = text.strip()
    if match := _RELATIVE.fullmatch(text):
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        try:
            clock = datetime.strptime(text, "%H:%M:%S" if text.count(":") == 2 else "%H:%M")
        except ValueError:
            raise ValueError(
                f"{text!r} is neither a duration (30s, 10m, 2h, 1d), an ISO time "
                "(2024-06-01T08:00:00) nor a time of day (14:05)"
            ) from None
        today = datetime.fromtimestamp(now)
        when = today.replace(hour=clock.hour, minute=clock.minute, second=clock.second,
                             microsecond=0)  # fmt: skip
    return when.timestamp()  # naive times are local times


# -- formatting ------------------------------------------------------------------------------


def daemon_line(d: Row) -> str:
    """'running, pid 42, heartbeat 0.6 s ago', or a warning that the view is stale."""
    if d["heartbeat"] is None:
        return "never published: has the agent run on this database?"
    if d["live"]:
        return f"running, pid {d['pid']}, heartbeat {ago(d['heartbeat_age_s'])}"
    if d.get("process_alive"):
        return (
            f"running, pid {d['pid']}, but NOT PUBLISHING for {span(d['heartbeat_age_s'] or 0.0)}: "
            "it cannot write its database (disk full or read-only?); live values below are "
            "from then: see its log (journalctl -u ironfleet-agent)"
        )
    return (
        f"NOT PUBLISHING: last heartbeat {ago(d['heartbeat_age_s'])} (pid {d['pid'] or '?'}); "
        "live values below are from then"
    )


def status_text(s: Row) -> str:
    """The status screen."""
    d, link, buf, back, fleet = s["daemon"], s["link"], s["buffer"], s["backlog"], s["fleet"]
    gaps, shed = s["gaps"], s["shed"]
    controller = link["controller"] or "none"
    if link["boot_epoch"] is not None:
        controller += f", boot epoch {link['boot_epoch']}"
    port = link["port"] or "-"
    if link["device"]:
        port += f" on {link['device']}"
    unacked = f"{n(back['unacked_events'])} events"
    if back["unacked_events"]:
        unacked += f", oldest received {ago(back['oldest_unacked_age_s'])}"
    uplink = fleet["uplink"]
    if fleet["phase"]:
        uplink += f", phase {fleet['phase']}"
    if fleet["breaker"]:
        uplink += f", breaker {fleet['breaker']}"
    counters = d["counters"]
    items = [
        ("database", f"{s['database']} ({human_bytes(buf['file_bytes'])}, "
                     f"WAL {human_bytes(buf['wal_bytes'])})"),
        ("daemon", daemon_line(d)),
        ("alarm", d["alarm"] or "none"),
        ("controller", f"{controller}; serial link {link['state']}"),
        ("serial port", port),
        ("last event", ago(link["last_event_age_s"])),
        ("buffer", f"{n(buf['events'])} events in {n(buf['streams'])} streams, "
                   f"{human_bytes(buf['used_bytes'])} used"),
        ("not acked", unacked),
        ("fleet ack", f"last {ago(fleet['last_ack_age_s'])} "
                      f"(events below id {n(fleet['cursor'])} acknowledged)"
                      if fleet["last_ack_at"] else "never: the fleet has acknowledged nothing"),
        ("uplink", uplink),
        ("gaps", f"{n(gaps['open'])} open ({n(gaps['missing'])} events missing), "
                 f"{n(gaps['total'])} detected in all"),
        ("shed", f"{n(shed['events'])} events in {n(shed['records'])} records"
                 if shed["records"] else "none"),
    ]  # fmt: skip
    if counters:
        items.append(("commits", f"{n(counters.get('batches'))} batches, "
                                 f"{n(counters.get('commit_failures'))} failed"))  # fmt: skip
    return pairs(items)


def streams_text(rows: list[Row]) -> str:
    """The streams table."""
    if not rows:
        return "no streams yet"
    body = []
    for r in rows:
        acked = f"{r['acked_boot_epoch']}/{r['acked_seq']}" if r["acked_seq"] is not None else "-"
        body.append([r["stream"], r["controller"], r["priority"], r["boot_epoch"],
                     r["high_seq"], n(r["received"]), acked, r["open_gaps"],
                     ago(r["last_seen_age_s"])])  # fmt: skip
    headers = ["stream", "controller", "prio", "epoch", "seq", "received", "acked",
               "open gaps", "last seen"]  # fmt: skip
    return table(headers, body)


def events_rows(rows: list[Row], now: float) -> list[list[object]]:
    """Table rows of events."""
    return [
        [r["id"], clock_time(r["received_at"], now), r["stream"], r["boot_epoch"], r["seq"],
         r["kind"], r["priority"], signals_text(r["signals"])]
        for r in rows
    ]  # fmt: skip


EVENT_HEADERS: Final = ("id", "received", "stream", "epoch", "seq", "kind", "prio", "signals")
# Fixed widths for `events --follow`, which prints rows as they come (no table to align).
FOLLOW_WIDTHS: Final = (8, 12, 14, 5, 7, 10, 4)


def event_line(row: Row | None) -> str:
    """One event as a fixed-width line for `events --follow`; the header line for None."""
    values = list(EVENT_HEADERS) if row is None else events_rows([row], time.time())[0]
    cells = [cell(v) for v in values]  # escaped: a stream name may hold ESC, CR, BEL...
    text = [f"{c:>{w}}" if i in (0, 3, 4, 6) else f"{c:<{w}}"
            for i, (c, w) in enumerate(zip(cells, FOLLOW_WIDTHS, strict=False))]  # fmt: skip
    return "  ".join([*text, cells[-1]])


def gaps_text(rows: list[Row], summary: Row) -> str:
    """The gaps table and its summary."""
    body = [
        [r["id"], r["stream"], r["boot_epoch"], f"{r['first_seq']}..{r['last_seq']}",
         r["missing"], ago(r["detected_age_s"]),
         "open" if r["open"] else f"filled {ago(r['closed_age_s'])}"]
        for r in rows
    ]  # fmt: skip
    head = table(["id", "stream", "epoch", "seq range", "missing", "detected", "state"], body)
    lines = [head if rows else "no gaps to show"]
    lines.append(
        f"\n{n(summary['open'])} open ({n(summary['missing'])} events still missing), "
        f"{n(summary['total'])} detected in all (--all lists the filled ones too)"
    )
    if summary["link_gaps"]:
        lines.append(
            f"serial link: {n(summary['link_gaps'])} frame gaps NACKed since the agent started "
            "(resent by the controller)"
        )
    return "\n".join(lines)


def replay_text(rows: list[Row], now: float) -> str:
    """The latest state per stream."""
    if not rows:
        return "no events stored"
    body = [
        [r["stream"], r["boot_epoch"], r["seq"], r["kind"], r["priority"],
         controller_time(r["ts"], r["ts_quality"]), ago(r["received_age_s"]),
         signals_text(r["signals"])]
        for r in rows
    ]  # fmt: skip
    headers = ["stream", "epoch", "seq", "kind", "prio", "controller time", "received", "signals"]
    return table(headers, body)


def checkpoints_text(rows: list[Row], fleet: Row) -> str:
    """Per-stream checkpoints and the fleet cursor."""
    body = []
    for r in rows:
        acked = "-" if r["acked_seq"] is None else f"{r['acked_boot_epoch']}/{r['acked_seq']}"
        latest = "-" if r["latest_seq"] is None else f"{r['latest_boot_epoch']}/{r['latest_seq']}"
        behind: object = r["behind"]
        if behind is None and r["latest_seq"] is not None:
            behind = "all" if r["acked_seq"] is None else "new epoch"
        body.append([r["stream"], acked, ago(r["acked_age_s"]), latest, behind])
    text = (
        table(["stream", "acked", "acked at", "stored", "behind"], body)
        if rows
        else ("no streams yet")
    )
    return (
        f"{text}\n\nfleet cursor: events below id {n(fleet['cursor'])} acknowledged, "
        f"last moved {ago(fleet['last_ack_age_s'])}; uplink {fleet['uplink']}"
    )


def shed_text(rows: list[Row], totals: list[tuple[str, int, int, float]], now: float) -> str:
    """Shed records and totals per reason."""
    if not totals:
        return "nothing shed: no event was removed before the fleet acknowledged it"
    body = [
        [r["id"], ago(r["age_s"]), r["reason"], r["stream"], r["boot_epoch"],
         f"{r['first_seq']}..{r['last_seq']}", n(r["count"])]
        for r in rows
    ]  # fmt: skip
    lines = [table(["id", "when", "reason", "stream", "epoch", "seq range", "events"], body), ""]
    for reason, records, events, at in totals:
        lines.append(
            f"{reason}: {n(events)} events in {n(records)} records, last {ago(_age(at, now))}"
        )
    return "\n".join(lines)


def link_text(v: Row) -> str:
    """The serial link screen."""
    counters = v["counters"]
    rejects = {k: c for k, c in v["rejects"].items() if c}
    controller = v["controller"] or "none"
    if v["boot_epoch"] is not None:
        controller += f" (boot epoch {v['boot_epoch']})"
    last = ago(v["last_event_age_s"])
    if v["last_event_stream"]:
        last += f" ({v['last_event_stream']}); {n(v['events_last_10s'])} in the last 10 s"
    items = [
        ("daemon", daemon_line(v["daemon"])),
        ("link", f"{v['state']} (published {ago(v['published_age_s'])})"),
        ("controller", controller),
        ("port", f"{v['port'] or '-'}" + (f" on {v['device']}" if v["device"] else "")),
        ("last event", last),
    ]
    keys = ("events_accepted", "acks_sent", "nacks_sent", "gaps", "retransmits_reacked",
            "link_downs", "controller_reboots", "outside_window", "foreign_session")  # fmt: skip
    if counters:
        items.append(("counters", " ".join(f"{k}={counters[k]}" for k in keys if k in counters)))
    items.append(("rejected frames", " ".join(f"{k}={c}" for k, c in rejects.items()) or "none"))
    return pairs(items)


def breaker_text(v: Row) -> str:
    """The breaker screen."""
    state = v["state"]
    if state == "open" and v["retry_in_s"] is not None:
        state += f" (next probe in about {span(v['retry_in_s'])})"
    items = [
        ("daemon", daemon_line(v["daemon"])),
        ("breaker", state),
        ("failures", n(v["failures"])),
        ("half-open ok", n(v["successes"])),
        ("transitions", n(v["transitions"])),
        ("uplink", v["uplink"] + (f", phase {v['phase']}" if v["phase"] else "")),
        ("in flight", n(v["in_flight"])),
        ("ack timeouts", n(v["ack_timeouts"])),
    ]
    items += [("why", reason) for reason in v["why"]]
    return pairs(items)


def doctor_text(checks: list[Check]) -> str:
    """One line per check."""
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}" for c in checks)


def query_text(columns: list[str], rows: list[Row], cut: str, limit: int) -> str:
    """Query results as a table; blobs shown by size."""

    def cell(value: object) -> object:
        return f"<{len(value)} bytes>" if isinstance(value, bytes) else value

    text = table(columns, [[cell(r[c]) for c in columns] for r in rows]) if columns else "done"
    if cut:
        text += "\n" + cut_note(cut, len(rows), limit)
    return text


def cut_note(cut: str, shown: int, limit: int) -> str:
    """Why `query` showed only the first rows."""
    if cut == "rows":
        return f"(first {n(limit)} rows; raise --limit for more, up to {n(MAX_LIMIT)})"
    return (
        f"(first {n(shown)} rows: the next would pass {human_bytes(MAX_FETCH_BYTES)} of "
        "results; select fewer columns or add LIMIT/OFFSET)"
    )


def more_note(command: str, page: Page, limit: int) -> str:
    """The line after a full page: how to see the next one."""
    extra = "" if limit == PAGE_ROWS else f" --limit {limit}"
    return (
        f"({n(limit)} streams shown, by name; next page: ironfleet {command}{extra} "
        f"--after {shell_arg(page.next_after or '')})"
    )


# -- command line -------------------------------------------------------------------------


@dataclass
class Options:
    """Global options: where the database and the configuration are, read deadline."""

    db: str | None
    db_source: str
    config_path: str
    timeout: float

    def config(self) -> Config:
        """The configuration file, loaded and validated; raises ConfigError."""
        return config_mod.load(self.config_path)

    def database(self, must_exist: bool = True) -> Path:
        """The database path from --db, IRONFLEET_DB, or the configuration's state_dir."""
        if self.db:
            path, source = Path(self.db).absolute(), self.db_source
        else:
            try:
                path = self.config().database
            except ConfigError as exc:
                raise CliError(
                    f"cannot locate the database ({exc}): pass --db PATH or --config FILE"
                ) from None
            source = f"[agent] state_dir in {self.config_path}"
            path = path.absolute()
        if must_exist:
            try:
                path.stat()
            except FileNotFoundError:
                raise CliError(
                    f"no database at {path} (from {source}): pass --db PATH (or set {DB_ENV}), "
                    "or --config FILE whose [agent] state_dir holds agent.db"
                ) from None
            except PermissionError:
                raise CliError(
                    f"permission denied reading {path}: technicians need the 'ironfleet' group"
                ) from None
        return path

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one short read transaction on the database, then close it."""
        with reading(self.database(), self.timeout) as conn:
            return fn(conn)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The --json flag every command has."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--db",
    envvar=DB_ENV,
    type=click.Path(dir_okay=False),
    help=f"Agent database (default: [agent] state_dir/agent.db of --config; env {DB_ENV}).",
)
@click.option(
    "--config",
    "config_path",
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Agent configuration file.",
)
@click.option(
    "--timeout",
    default=DEFAULT_TIMEOUT,
    show_default=True,
    type=TIMEOUT,
    help="Stop any database read after this many seconds.",
)
@click.version_option(package_name="ironfleet-agent", prog_name="ironfleet")
@click.pass_context
def cli(ctx: click.Context, db: str | None, config_path: str, timeout: float) -> None:
    """Read-only view of the IronFleet agent: link, buffer, fleet acks, breaker, gaps.

    Every command reads the agent's database read-only and briefly; the agent never
    waits for it. Add --json to any command for machine-readable output.
    """
    source = "--db"
    if ctx.get_parameter_source("db") is ParameterSource.ENVIRONMENT:
        source = DB_ENV
    ctx.obj = Options(db, source, config_path, timeout)


@cli.command()
@json_option
@click.pass_obj
def status(opts: Options, as_json: bool) -> None:
    """Is the agent alive, how much is buffered, when did the fleet last acknowledge."""
    now = time.time()
    path = opts.database()
    data = opts.read(lambda conn: read_status(conn, path, now))
    emit(data, as_json, lambda: status_text(data))


def page_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--after and --limit of the listings that have one row per stream."""
    f = click.option("--limit", default=PAGE_ROWS, show_default=True, type=LIMIT,
                     help="Streams shown (one page).")(f)  # fmt: skip
    return click.option("--after", default="", metavar="NAME",
                        help="Start after this stream name (the next page).")(f)  # fmt: skip


def emit_page(command: str, page: Page, limit: int, as_json: bool, text: Callable[[], str]) -> None:
    """A page as a table or a JSON array, then how to get the next page if there is one."""
    emit(page.rows, as_json, text)
    if page.next_after is not None:
        echo_hint(more_note(command, page, limit), as_json)


@cli.command()
@page_options
@json_option
@click.pass_obj
def streams(opts: Options, after: str, limit: int, as_json: bool) -> None:
    """Streams by name (a page): controller, priority, latest sequence, checkpoint, gaps.

    With --json: a JSON array; when more streams follow, a hint on stderr names the
    --after value of the next page (the last stream shown).
    """
    now = time.time()
    page = opts.read(lambda conn: read_streams(conn, now, after, limit))
    emit_page("streams", page, limit, as_json, lambda: streams_text(page.rows))


def _when(_ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Click callback for --since/--until: see `parse_when`."""
    if value is None:
        return None
    try:
        return parse_when(value, time.time())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _events_after(conn: sqlite3.Connection, flt: EventFilter, after_id: int) -> list[Row]:
    return read_events_after(conn, flt, after_id, time.time())


def poll_events(
    opts: Options, flt: EventFilter, after_id: int, stop: threading.Event
) -> Iterator[list[Row]]:
    """New matching events every FOLLOW_INTERVAL, each poll a fresh short read, until
    `stop` is set."""
    while not stop.is_set():
        rows = opts.read(functools.partial(_events_after, flt=flt, after_id=after_id))
        if rows:
            after_id = rows[-1]["id"]
            yield rows
        if len(rows) < FOLLOW_BATCH:
            stop.wait(FOLLOW_INTERVAL)


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[threading.Event]:
    """An event set by Ctrl-C (SIGINT): the handler only sets it, and the loop stops.

    A KeyboardInterrupt raised inside one of SQLite's callbacks (the progress handler)
    is swallowed by the sqlite3 module, and under load `events --follow` then ignored
    Ctrl-C for good (seen twice in loaded CI runs); a flag cannot be lost that way.
    """
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@cli.command()
@click.option("--stream", "streams_", multiple=True, help="Stream name or GLOB ('ecu0/*').")
@click.option("--kind", "kinds", multiple=True, help="Event kind (repeatable).")
@click.option("--since", callback=_when, help="Received at or after: 10m, 2h, 14:05, ISO time.")
@click.option("--until", callback=_when, help="Received before (same forms as --since).")
@click.option("--limit", default=20, show_default=True, type=LIMIT,
              help="Newest events shown.")  # fmt: skip
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events; Ctrl-C stops.")
@json_option
@click.pass_obj
def events(
    opts: Options,
    *,
    streams_: tuple[str, ...],
    kinds: tuple[str, ...],
    since: float | None,
    until: float | None,
    limit: int,
    follow: bool,
    as_json: bool,
) -> None:
    """Stored events, newest last, payloads decoded (times are the agent's clock).

    With --json: a JSON array; with --follow --json: one JSON object per line.
    """
    if follow and until is not None:
        raise click.UsageError("--follow and --until exclude each other")
    flt = EventFilter(streams_, kinds, since, until)
    now = time.time()
    rows, top = opts.read(lambda conn: read_events(conn, flt, limit, now))
    if not follow:
        emit(rows, as_json, lambda: table(EVENT_HEADERS, events_rows(rows, now)))
        return
    if not as_json:
        click.echo(event_line(None))
    with stop_on_interrupt() as stop:
        for batch in itertools.chain([rows], poll_events(opts, flt, top, stop)):
            for row in batch:
                click.echo(json_text(row, indent=None) if as_json else event_line(row))
            if stop.is_set():
                return


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Also gaps already filled by late events.")
@click.option("--limit", default=50, show_default=True, type=LIMIT,
              help="Newest gaps shown.")  # fmt: skip
@json_option
@click.pass_obj
def gaps(opts: Options, show_all: bool, limit: int, as_json: bool) -> None:
    """Missing sequence ranges per stream: open ones, or with --all filled ones too."""
    now = time.time()
    rows, summary = opts.read(
        lambda conn: (read_gaps(conn, not show_all, limit, now), read_gap_summary(conn))
    )
    emit(rows, as_json, lambda: gaps_text(rows, summary))


@cli.command()
@page_options
@json_option
@click.pass_obj
def replay(opts: Options, after: str, limit: int, as_json: bool) -> None:
    """The latest event of each stream (a page, by name), as the fleet gets it after a resync."""
    now = time.time()
    page = opts.read(lambda conn: read_replay(conn, now, after, limit))
    emit_page("replay", page, limit, as_json, lambda: replay_text(page.rows, now))


@cli.command()
@page_options
@json_option
@click.pass_obj
def checkpoints(opts: Options, after: str, limit: int, as_json: bool) -> None:
    """What the fleet has acknowledged per stream (a page, by name), and how far behind."""
    now = time.time()
    page, fleet = opts.read(
        lambda conn: (read_checkpoints(conn, now, after, limit), read_fleet(conn, now))
    )
    emit_page("checkpoints", page, limit, as_json, lambda: checkpoints_text(page.rows, fleet))


@cli.command()
@json_option
@click.pass_obj
def breaker(opts: Options, as_json: bool) -> None:
    """The uplink circuit breaker: state, counts, next probe, and why."""
    now = time.time()
    view = opts.read(lambda conn: read_breaker(conn, now))
    emit(view, as_json, lambda: breaker_text(view))


@cli.command()
@json_option
@click.pass_obj
def link(opts: Options, as_json: bool) -> None:
    """The serial link: is the controller talking, which one, frame counters."""
    now = time.time()
    view = opts.read(lambda conn: read_link(conn, now))
    emit(view, as_json, lambda: link_text(view))


@cli.command()
@click.option("--limit", default=50, show_default=True, type=LIMIT,
              help="Newest records shown.")  # fmt: skip
@json_option
@click.pass_obj
def shed(opts: Options, limit: int, as_json: bool) -> None:
    """Events the disk ladder removed before the fleet acknowledged them."""
    now = time.time()
    rows, totals = opts.read(lambda conn: (read_shed(conn, limit, now), read_shed_totals(conn)))
    emit(rows, as_json, lambda: shed_text(rows, totals, now))


@cli.command()
@json_option
@click.pass_obj
def doctor(opts: Options, as_json: bool) -> None:
    """Check config, permissions, database, device, disk, clock and daemon; exit 1 on FAIL."""
    now = time.time()
    db = opts.database(must_exist=False)
    checks = doctor_checks(opts.config_path, db, opts.read, now)
    ok = not any(c.status == "fail" for c in checks)
    emit({"ok": ok, "checks": [asdict(c) for c in checks]}, as_json, lambda: doctor_text(checks))
    if not ok:
        sys.exit(1)


@cli.command()
@click.argument("sql")
@click.option("--limit", default=1000, show_default=True, type=LIMIT,
              help="Rows shown at most.")  # fmt: skip
@json_option
@click.pass_obj
def query(opts: Options, sql: str, limit: int, as_json: bool) -> None:
    """Run one read-only SQL statement (docs/schema.md), stopped after --timeout.

    Bounded like every read: values up to 1 MiB, 32 MiB of SQLite memory, 4 MiB of
    results, and stopped early if the agent's WAL grows 3 MiB meanwhile.
    """
    columns, rows, cut = opts.read(lambda conn: run_query(conn, sql, limit))
    emit(rows, as_json, lambda: query_text(columns, rows, cut, limit))
    if cut and as_json:
        echo_hint(cut_note(cut, len(rows), limit), as_json)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `ironfleet`."""
    if argv is None:
        # This process is `ironfleet` itself: cap SQLite's heap process-wide. In-process
        # callers (tests, the fuzzer) pass argv and keep their own process's settings.
        limit_process_heap()
    args = list(argv) if argv is not None else sys.argv[1:]
    for arg in args:
        # Bytes that are not UTF-8 reach Python as lone surrogates; SQLite cannot take
        # them (a traceback, found by fuzzing). Say which argument, as a usage error.
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            print(f"ironfleet: argument '{shown}' is not valid UTF-8", file=sys.stderr)
            return 2
    try:
        cli.main(args=args, prog_name="ironfleet")
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
