"""The technician's per-stream listings (`streams`, `replay`, `checkpoints`), one page at a time.

A vehicle may carry a million distinct stream names (a controller chooses them), and
listing them all at once took 6.6 s and 824 MB (`streams`) or 9.7 s and 910 MB (`replay`).
Each listing here reads one page of streams in name order after a given name, using the
unique index on `streams.name` and point reads on `stream_epochs` / `events`, so its time
and memory depend on the page size, never on the number of streams. One row more than asked
tells whether another page follows; `Page.next_after` is the name to continue after.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from agent.readsafe import LOW_BITS, LOW_MASK, exact_sum
from agent.render import age_of as _age

PAGE_ROWS: Final = 1000  # default page of streams, replay and checkpoints
Row = dict[str, Any]


def decode_signals(payload: bytes) -> Any:
    """The msgpack signal map of an event; undecodable bytes come back as hex."""
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types (ValueError, TypeError, ...)
        return {"_undecodable_hex": payload.hex()}


@dataclass(frozen=True)
class Page:
    """One page of a listing sorted by stream name: rows, and the name to continue after."""

    rows: list[Row]
    next_after: str | None  # None: this was the last page


# The page of streams a listing shows: names after `?`, in name order (the unique index on
# streams.name), one row more than asked so we know whether another page follows.
_PAGE_SQL: Final = """page AS (SELECT id, name, controller, priority, first_seen, last_seen
                               FROM streams WHERE name > ? ORDER BY name LIMIT ?)"""
# The latest boot epoch of a stream: a seek on stream_epochs' primary key.
_LATEST_EPOCH: Final = """se.boot_epoch = (SELECT max(boot_epoch) FROM stream_epochs
                                           WHERE stream_id = p.id)"""


def _paged(
    rows: list[Any], limit: int, name_of: Callable[[Any], str]
) -> tuple[list[Any], str | None]:
    """The first `limit` of `limit + 1` rows, and the name to continue after if there are more."""
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], name_of(rows[limit - 1])


def read_streams(
    conn: sqlite3.Connection, now: float, after: str = "", limit: int = PAGE_ROWS
) -> Page:
    """A page of streams with their latest position, checkpoint and open gaps, by name."""
    rows = conn.execute(
        f"""WITH {_PAGE_SQL}
           SELECT p.name, p.controller, p.priority, se.boot_epoch, se.low_seq, se.high_seq,
                  r.high, r.low, c.boot_epoch, c.seq, p.first_seen, p.last_seen,
                  coalesce(g.open, 0)
           FROM page AS p
           LEFT JOIN stream_epochs AS se ON se.stream_id = p.id AND {_LATEST_EPOCH}
           LEFT JOIN checkpoints AS c ON c.stream_id = p.id
           LEFT JOIN (SELECT stream_id, sum(events >> {LOW_BITS}) AS high,
                             sum(events & {LOW_MASK}) AS low
                      FROM stream_epochs WHERE stream_id IN (SELECT id FROM page)
                      GROUP BY stream_id) AS r ON r.stream_id = p.id
           LEFT JOIN (SELECT stream_id, count(*) AS open FROM gaps
                      WHERE closed_at IS NULL AND stream_id IN (SELECT id FROM page)
                      GROUP BY stream_id) AS g ON g.stream_id = p.id
           ORDER BY p.name""",
        (after, limit + 1),
    ).fetchall()
    rows, next_after = _paged(rows, limit, lambda r: str(r[0]))
    return Page(
        [
            {
                "stream": name, "controller": controller, "priority": priority,
                "boot_epoch": epoch, "low_seq": low, "high_seq": high,
                "received": exact_sum(hi or 0, lo or 0), "acked_boot_epoch": acked_epoch,
                "acked_seq": acked_seq, "first_seen": first, "last_seen": last,
                "last_seen_age_s": _age(last, now), "open_gaps": gaps,
            }
            for (name, controller, priority, epoch, low, high, hi, lo, acked_epoch, acked_seq,
                 first, last, gaps) in rows
        ],
        next_after,
    )  # fmt: skip


def read_replay(
    conn: sqlite3.Connection, now: float, after: str = "", limit: int = PAGE_ROWS
) -> Page:
    """A page of the latest event of every stream: the compacted state the fleet gets first.

    Point reads per stream (latest epoch, then its latest rowid), like the store's
    `read_latest`, but one page at a time: memory is bounded by the page, not the streams.
    """
    rows = conn.execute(
        f"""WITH {_PAGE_SQL}
           SELECT p.name, e.id, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind, e.priority,
                  e.payload, e.received_at
           FROM page AS p
           LEFT JOIN stream_epochs AS se ON se.stream_id = p.id AND {_LATEST_EPOCH}
           LEFT JOIN events AS e ON e.id = se.latest_rowid
           ORDER BY p.name""",
        (after, limit + 1),
    ).fetchall()
    rows, next_after = _paged(rows, limit, lambda r: str(r[0]))
    return Page(
        [
            {
                "id": rowid, "stream": name, "boot_epoch": epoch, "seq": seq, "ts": ts,
                "ts_quality": tq, "kind": kind, "priority": priority, "received_at": at,
                "received_age_s": _age(at, now), "signals": decode_signals(bytes(payload)),
            }
            for name, rowid, epoch, seq, ts, tq, kind, priority, payload, at in rows
            if rowid is not None  # a stream whose latest event was evicted has no state
        ],
        next_after,
    )  # fmt: skip


def read_checkpoints(
    conn: sqlite3.Connection, now: float, after: str = "", limit: int = PAGE_ROWS
) -> Page:
    """A page of streams: what the fleet acknowledged, what is stored, how far behind."""
    rows = conn.execute(
        f"""WITH {_PAGE_SQL}
           SELECT p.name, c.boot_epoch, c.seq, c.acked_at, se.boot_epoch, se.high_seq
           FROM page AS p
           LEFT JOIN checkpoints AS c ON c.stream_id = p.id
           LEFT JOIN stream_epochs AS se ON se.stream_id = p.id AND {_LATEST_EPOCH}
           ORDER BY p.name""",
        (after, limit + 1),
    ).fetchall()
    rows, next_after = _paged(rows, limit, lambda r: str(r[0]))
    out = []
    for name, epoch, seq, acked_at, latest_epoch, high in rows:
        # Counted in the latest boot epoch only: unknown when the ack is from an older one.
        behind = high - seq if epoch is not None and epoch == latest_epoch else None
        out.append({
            "stream": name, "acked_boot_epoch": epoch, "acked_seq": seq, "acked_at": acked_at,
            "acked_age_s": _age(acked_at, now), "latest_boot_epoch": latest_epoch,
            "latest_seq": high, "behind": behind,
        })  # fmt: skip
    return Page(out, next_after)
