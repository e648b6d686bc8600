"""What `ironfleet` reads from the agent's store and live state, shaped into plain rows.

The daemon publishes its live values (serial link, uplink, breaker, counters) as one
snapshot (`agent.livestate`); the functions here read it and the event, gap and shed
tables inside the caller's short read transaction (`agent.cliaccess.reading`) and return dicts that
`--json` prints as they are and `agent.clitext` renders as text. They are kept apart from
the click commands so that reading and shaping data can be used and tested without them.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from agent import livestate
from agent.cliaccess import CliError
from agent.identity import boot_id, host_name
from agent.livestate import LinkLive, LiveState
from agent.pages import decode_signals
from agent.readsafe import exact_sum, exact_sum_sql, fetch_bounded
from agent.render import CLOCK_BACK_TOLERANCE
from agent.render import age_of as _age
from agent.resilience.budget import drain_estimate
from agent.store import read_cursor
from agent.storedb import held_sql, read_frontiers

FOLLOW_BATCH: Final = 1000  # rows per poll; a longer backlog is read in several polls
# The daemon publishes every second (agent.daemon.PUBLISH_INTERVAL); a few missed
# publishes mean it is stopped or its writer thread is stuck.
HEARTBEAT_STALE: Final = 5.0
RATE_WINDOW: Final = 10.0  # seconds over which `link` counts recent events
RATE_SCAN_ROWS: Final = 100_000  # ... reading at most this many of the newest rows

Row = dict[str, Any]


def read_live(conn: sqlite3.Connection) -> LiveState:
    """The daemon's live snapshot for this database (`agent.livestate.read`)."""
    return livestate.read(conn)


def last_ack_at(conn: sqlite3.Connection) -> float | None:
    """When the persisted fleet cursor last moved (else the newest checkpoint's time)."""
    row = conn.execute("SELECT updated_at FROM agent_state WHERE key = 'uplink.cursor'").fetchone()
    if row is None:
        row = conn.execute("SELECT max(acked_at) FROM checkpoints").fetchone()
    value = row[0] if row else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # a pid no kernel has
        return False
    except PermissionError:
        return True
    return True


def daemon_view(live: LiveState, now: float) -> Row:
    """Who published the live values and how long ago (`live` if within HEARTBEAT_STALE).

    `copy`: the daemon ran on another host (a database copied to a laptop); `rebooted`:
    on this host but an earlier boot. Either way its pid means nothing here and it is not
    live, however fresh the heartbeat looks (a copy made a second ago). The boot id
    decides first: the same boot is this machine whatever the host names say (the unit's
    ProtectHostname= keeps the name the daemon started with; a container has its own)."""
    d = live.daemon
    beat, stopped, pid, host, boot = d.heartbeat, d.stopped_at, d.pid, d.host, d.boot_id
    age = _age(beat, now)
    same_boot = bool(boot) and boot == boot_id()
    copy = not same_boot and bool(host) and host != host_name()
    rebooted = not same_boot and not copy and bool(boot) and bool(boot_id())
    here = not copy and not rebooted
    alive = here and pid > 0 and not stopped and pid_alive(pid)
    fresh = (here and not stopped and age is not None
             and -CLOCK_BACK_TOLERANCE <= age <= HEARTBEAT_STALE)  # fmt: skip
    # One classification that status, doctor, breaker and link all print from.
    if beat is None:
        condition = "never"
    elif copy or rebooted or stopped:
        condition = "copy" if copy else "stopped" if stopped else "rebooted"
    else:
        condition = "live" if fresh else "stuck" if alive else "gone"
    return {
        "condition": condition,
        "pid": pid or None,
        "host": host,
        "copy": copy,
        "rebooted": rebooted,
        # The process is there but its heartbeat is not: it cannot write its database.
        "process_alive": alive,
        "heartbeat": beat,
        "heartbeat_age_s": age,
        "stopped_at": stopped,
        "stopped_age_s": _age(stopped, now),
        "live": fresh,
        "alarm": d.alarm,
        "counters": dict(d.counters),
        # Where these values were read: the database, or the runtime file that keeps
        # updating while the database cannot be written; and fields of the snapshot that
        # did not decode (read as their defaults), if any.
        "source": live.source,
        "snapshot_problems": list(live.problems),
    }


def fleet_view(live: LiveState, conn: sqlite3.Connection, now: float) -> Row:
    """What the fleet has acknowledged and when (the persisted cursor), and the uplink."""
    last = last_ack_at(conn)
    return {
        "cursor": read_cursor(conn),
        "last_ack_at": last,
        "last_ack_age_s": _age(last, now),
        "uplink": live.uplink.state,
        "phase": live.uplink.phase,
        "breaker": live.breaker.state if live.published else "",
        "broker": live.uplink.broker,
        "last_error": live.uplink.last_error,
    }


def budget_view(live: LiveState, conn: sqlite3.Connection, unacked: int) -> Row | None:
    """The byte budget and what it means for the backlog, or None without one.

    Bytes an event takes on the wire: as the uplink counted them for events batches
    (compressed, MQTT header included, the replay's pages left out) once it sent 1,000,
    else the newest stored rows' payload plus 45 bytes (uncompressed: an upper bound)."""
    c = live.uplink.counters
    rate, quota = (
        float(c.get("budget_bytes_per_second", 0)),
        int(c.get("budget_bytes_per_contact", 0)),
    )
    if not rate and not quota:
        return None
    sent, events = int(c.get("event_bytes_sent", 0)), int(c.get("events_sent", 0))
    if events >= 1000:
        per_event, basis = sent / events, "as sent"
    else:
        row = conn.execute(
            "SELECT avg(length(payload)) FROM (SELECT payload FROM events ORDER BY id DESC "
            "LIMIT 1000)"
        ).fetchone()
        per_event, basis = float(row[0] or 0) + 45.0, "uncompressed"
    spent, left = int(c.get("contact_bytes", 0)), float(c.get("contact_window_left_s", 0.0))
    backlog = unacked * per_event
    # No window open: the first of the windows needed has yet to open, so none has room.
    room = quota - spent if quota and left > 0 else 0.0
    seconds, windows = drain_estimate(backlog, rate, quota, room)
    return {
        "bytes_per_second": rate,
        "bytes_per_contact": quota,
        "contact_bytes": spent,
        "contact_window_left_s": left,
        "bytes_per_event": round(per_event, 1),
        "bytes_per_event_basis": basis,
        "backlog_bytes": round(backlog),
        "drain_s": None if seconds is None else round(seconds, 1),
        "contact_windows_needed": windows,
    }


def link_view(live: LiveState) -> Row:
    """The serial side as last published (the first controller's link)."""
    return _link_row(live.link)


def _link_row(link: LinkLive) -> Row:
    return {
        "name": link.name,
        "state": link.state,
        "controller": link.controller,
        "boot_epoch": link.boot_epoch,
        "port": link.port,
        "device": link.device,
    }


def links_view(live: LiveState) -> list[Row]:
    """Every controller's link as last published, with its frame counters."""
    return [
        {**_link_row(k), "frames_accepted": k.frames_accepted, "counters": dict(k.counters),
         "rejects": dict(k.rejects)}
        for k in live.controllers
    ]  # fmt: skip


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
    live = read_live(conn)
    cursor = read_cursor(conn)
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    # Not held by the fleet: above the cursor and its class's frontier (a drain by priority).
    waiting = f"id >= ? AND NOT {held_sql(cursor, read_frontiers(conn, cursor))}"
    unacked = conn.execute(f"SELECT count(*) FROM events WHERE {waiting}", (cursor,)).fetchone()[0]
    oldest = conn.execute(
        f"SELECT received_at FROM events WHERE {waiting} ORDER BY id LIMIT 1", (cursor,)
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
        "daemon": daemon_view(live, now),
        "link": {**link_view(live), "last_event_at": newest_at,
                 "last_event_age_s": _age(newest_at, now)},
        "controllers": links_view(live),
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
        "fleet": fleet_view(live, conn, now),
        "budget": budget_view(live, conn, unacked),
        "gaps": {"open": gaps_open, "missing": missing, "total": gaps_total},
        "shed": {"records": shed_records, "events": shed_events},
        "flash": flash_view(live),
    }  # fmt: skip


def flash_view(live: LiveState) -> Row:
    """Flash wear as the daemon measured it (agent/flashwear.py): None where not known."""
    store = live.store
    return {
        "write_bytes": store.get("flash_write_bytes"),
        "write_bytes_per_s": store.get("flash_write_bytes_per_s"),
        "bytes_per_event": store.get("flash_bytes_per_event"),
        "years_left": store.get("flash_years_left"),
    }


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
    return {**read_gap_counts(conn), "link_gaps": read_live(conn).link.counters.get("gaps")}


def read_fleet(conn: sqlite3.Connection, now: float) -> Row:
    """The fleet cursor and the time of the last acknowledgement."""
    return fleet_view(read_live(conn), conn, now)


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
    live = read_live(conn)
    newest = conn.execute(
        "SELECT e.received_at, s.name FROM events AS e CROSS JOIN streams AS s "
        "WHERE s.id = e.stream_id ORDER BY e.id DESC LIMIT 1"
    ).fetchone()
    recent = conn.execute(
        f"SELECT count(*) FROM (SELECT received_at FROM events ORDER BY id DESC "
        f"LIMIT {RATE_SCAN_ROWS}) WHERE received_at >= ?",
        (now - RATE_WINDOW,),
    ).fetchone()[0]
    published = live.daemon.heartbeat
    return {
        **link_view(live),
        "published_at": published,
        "published_age_s": _age(published, now),
        "daemon": daemon_view(live, now),
        "last_event_at": newest[0] if newest else None,
        "last_event_age_s": _age(newest[0] if newest else None, now),
        "last_event_stream": newest[1] if newest else None,
        "events_last_10s": recent,
        "frames_accepted": live.link.frames_accepted,
        "counters": dict(live.link.counters),
        "rejects": dict(live.link.rejects),
        "controllers": links_view(live),
    }


def read_breaker(conn: sqlite3.Connection, now: float) -> Row:
    """The uplink breaker as published, the uplink around it, and the likely reasons."""
    live = read_live(conn)
    daemon = daemon_view(live, now)
    up, br = live.uplink, live.breaker
    counters = dict(up.counters)
    age = daemon["heartbeat_age_s"] or 0.0
    view: Row = {
        "state": br.state,
        "failures": br.failures,
        "successes": br.successes,
        "retry_in_s": None if br.retry_in is None else max(0.0, round(br.retry_in - age, 1)),
        "transitions": br.transitions,
        "uplink": up.state,
        "phase": up.phase,
        "broker": up.broker,
        "last_error": up.last_error,
        "in_flight": up.in_flight if live.published else None,
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
            cause = view["last_error"] or "see the log line uplink_down reason=..."
            why.append(
                f"the broker cannot be reached or refuses the agent (uplink disconnected): {cause}"
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
