"""Schema of the event store, as named migrations applied once each and recorded.

Tables are created with sqlite-utils; each migration is a function of the database,
applied in order inside one transaction, and recorded in `_migrations` so a technician
can see which schema a vehicle runs. docs/schema.md documents every table and column.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable

import sqlite_utils

from agent.storedb import atomic


def _m001_initial(db: sqlite_utils.Database) -> None:
    db["streams"].create(  # type: ignore[union-attr]
        {"id": int, "name": str, "controller": str, "priority": int, "first_seen": float,
         "last_seen": float},
        pk="id",
        not_null={"name", "priority"},
    )  # fmt: skip
    db["streams"].create_index(["name"], unique=True)  # type: ignore[union-attr]
    db.execute(
        """CREATE TABLE stream_epochs (
            stream_id INTEGER NOT NULL REFERENCES streams(id),
            boot_epoch INTEGER NOT NULL,
            low_seq INTEGER NOT NULL,
            high_seq INTEGER NOT NULL,
            latest_rowid INTEGER NOT NULL,
            events INTEGER NOT NULL,
            PRIMARY KEY (stream_id, boot_epoch)
        ) WITHOUT ROWID"""
    )
    # The hot table: append-only, rowid = arrival order, deliberately no secondary index
    # (uniqueness of (stream, boot_epoch, seq) is kept by stream_epochs; see decisions.md).
    db["events"].create(  # type: ignore[union-attr]
        {"id": int, "stream_id": int, "boot_epoch": int, "seq": int, "ts": float,
         "ts_quality": int, "kind": str, "priority": int, "payload": bytes,
         "received_at": float},
        pk="id",
        not_null={"stream_id", "boot_epoch", "seq", "ts", "ts_quality", "kind", "priority",
                  "payload", "received_at"},
    )  # fmt: skip
    db["checkpoints"].create(  # type: ignore[union-attr]
        {"stream_id": int, "boot_epoch": int, "seq": int, "acked_at": float},
        pk="stream_id",
        not_null={"boot_epoch", "seq", "acked_at"},
    )
    db["gaps"].create(  # type: ignore[union-attr]
        {"id": int, "stream_id": int, "boot_epoch": int, "first_seq": int, "last_seq": int,
         "missing": int, "pieces": str, "detected_at": float, "closed_at": float},
        pk="id",
        not_null={"stream_id", "boot_epoch", "first_seq", "last_seq", "missing", "pieces",
                  "detected_at"},
    )  # fmt: skip
    db["shed"].create(  # type: ignore[union-attr]
        {"id": int, "at": float, "reason": str, "stream_id": int, "boot_epoch": int,
         "first_seq": int, "last_seq": int, "count": int, "first_rowid": int,
         "last_rowid": int},
        pk="id",
        not_null={"at", "reason", "count"},
    )  # fmt: skip
    db["agent_state"].create(  # type: ignore[union-attr]
        {"key": str, "value": str, "updated_at": float}, pk="key", not_null={"value"}
    )
    # For technicians using sqlite-utils or Datasette: events with their stream names.
    db.create_view(
        "event_log",
        """SELECT e.id, s.name AS stream, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind,
                  e.priority, e.payload, e.received_at
           FROM events AS e JOIN streams AS s ON s.id = e.stream_id""",
    )


def _m002_open_gaps_index(db: sqlite_utils.Database) -> None:
    # The writer loads a stream's open gaps on demand (its cache is bounded), so it needs
    # them by (stream, epoch). Partial: closed gaps, the bulk of the table, stay out.
    db.execute("CREATE INDEX gaps_open ON gaps (stream_id, boot_epoch) WHERE closed_at IS NULL")


def _m003_controller_epochs(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE controller_epochs (
            controller TEXT NOT NULL,
            boot_epoch INTEGER NOT NULL,
            epoch INTEGER NOT NULL,
            first_seen REAL NOT NULL,
            PRIMARY KEY (controller, boot_epoch)
        ) WITHOUT ROWID"""
    )
    db.execute("CREATE INDEX controller_epochs_top ON controller_epochs (controller, epoch)")
    seed_controller_epochs(db.conn)


def seed_controller_epochs(conn: sqlite3.Connection) -> None:
    """Record every stored (controller, boot epoch) not yet mapped as its own epoch.

    Run when the table is created and after a salvage, so that a session announcing an
    epoch at or below one already stored is seen as a rollback (docs/protocol.md).
    """
    conn.execute(
        """INSERT OR IGNORE INTO controller_epochs (controller, boot_epoch, epoch, first_seen)
           SELECT s.controller, se.boot_epoch, se.boot_epoch, coalesce(min(s.first_seen), 0)
           FROM stream_epochs AS se JOIN streams AS s ON s.id = se.stream_id
           WHERE s.controller IS NOT NULL
           GROUP BY s.controller, se.boot_epoch"""
    )


def _m004_live_snapshot(db: sqlite_utils.Database) -> None:
    drop_legacy_live_keys(db.conn)


def drop_legacy_live_keys(conn: sqlite3.Connection) -> None:
    """The live state became one JSON row (`live`, agent/livestate.py): drop the keys it
    replaced, which would otherwise show their last values forever. The old store figures
    become the row's `store` when there is no row yet, so the loss ledger keeps its
    published `loss_received` across the upgrade. Kept: uplink.cursor and the other
    persisted keys (events.max_id, alarm.*, store.salvage). Run by migration 004 and after
    a salvage (which copies agent_state from a file that may predate 004)."""
    row = conn.execute("SELECT value FROM agent_state WHERE key = 'store.stats'").fetchone()
    has_live = conn.execute("SELECT 1 FROM agent_state WHERE key = 'live'").fetchone()
    if row is not None and has_live is None:
        try:
            stats = json.loads(row[0])
        except (TypeError, ValueError):
            stats = None
        if isinstance(stats, dict):
            conn.execute(
                "INSERT INTO agent_state (key, value, updated_at) VALUES ('live', ?, 0)",
                (json.dumps({"version": 1, "store": stats}),),
            )
    conn.execute(
        """DELETE FROM agent_state
           WHERE (key GLOB 'daemon.*' OR key GLOB 'link.*' OR key GLOB 'breaker.*'
                  OR key = 'store.stats' OR key GLOB 'uplink.*')
             AND key <> 'uplink.cursor'"""
    )


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_initial", _m001_initial),
    ("002_open_gaps_index", _m002_open_gaps_index),
    ("003_controller_epochs", _m003_controller_epochs),
    ("004_live_snapshot", _m004_live_snapshot),
]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now."""
    db = sqlite_utils.Database(conn)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    applied = []
    for name, step in MIGRATIONS:
        if name in done:
            continue
        with atomic(conn):
            step(db)
            conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, time.time())
            )
        applied.append(name)
    return applied
