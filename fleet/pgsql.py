"""The fleet store's PostgreSQL text: schema migrations, the batch statement, and the
day partitions' names and DDL. Statements only; `fleet.pgstore` runs them (and says why
they are written so)."""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
from typing import Final

from psycopg import sql

DAY: Final = 86_400.0  # seconds; partitions are UTC days of the event's ts
PARTITION_NAME: Final = re.compile(r"^events_d(\d{8})$")

MIGRATIONS: Final[tuple[tuple[str, str], ...]] = (
    (
        "0001_fleet_schema",
        """
CREATE TABLE events (
    vehicle text NOT NULL, stream text NOT NULL, boot_epoch bigint NOT NULL,
    seq bigint NOT NULL, ts double precision NOT NULL, ts_quality smallint NOT NULL,
    kind text NOT NULL, priority smallint NOT NULL, payload bytea NOT NULL,
    historical boolean NOT NULL, received_at timestamptz NOT NULL,
    PRIMARY KEY (vehicle, stream, boot_epoch, seq, ts)
) PARTITION BY RANGE (ts);
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE TABLE state (
    vehicle text NOT NULL, stream text NOT NULL, boot_epoch bigint NOT NULL,
    seq bigint NOT NULL, ts double precision NOT NULL, kind text NOT NULL,
    priority smallint NOT NULL, payload bytea NOT NULL, updated_at timestamptz NOT NULL,
    PRIMARY KEY (vehicle, stream)
) WITH (fillfactor = 70);
CREATE TABLE vehicles (
    vehicle text PRIMARY KEY, status text, status_at timestamptz,
    batches bigint NOT NULL DEFAULT 0, state_batches bigint NOT NULL DEFAULT 0,
    events bigint NOT NULL DEFAULT 0, duplicates bigint NOT NULL DEFAULT 0,
    first_state_at timestamptz, last_batch_at timestamptz
) WITH (fillfactor = 70);
""",
    ),
    (
        # PostgreSQL text cannot hold U+0000, which the serial protocol allows in stream
        # and kind names: such events are kept here, names as UTF-8 bytes, so their batch
        # is stored and acked like any other (refusing it stalled the vehicle's backlog).
        "0002_events_nul",
        """
CREATE TABLE events_nul (
    vehicle text NOT NULL, stream bytea NOT NULL, boot_epoch bigint NOT NULL,
    seq bigint NOT NULL, ts double precision NOT NULL, ts_quality smallint NOT NULL,
    kind bytea NOT NULL, priority smallint NOT NULL, payload bytea NOT NULL,
    historical boolean NOT NULL, received_at timestamptz NOT NULL,
    PRIMARY KEY (vehicle, stream, boot_epoch, seq)
);
""",
    ),
    (
        # When the broker forgets the collectors' sessions it forgets them all at once;
        # one fleet-wide replay request serves the group: the first collector to claim
        # this row within the interval sends it (PgCollectorStore.claim_replay).
        "0003_fleet_replays",
        """
CREATE TABLE fleet_replays (
    id smallint PRIMARY KEY CHECK (id = 1), last_at timestamptz NOT NULL
);
INSERT INTO fleet_replays VALUES (1, '-infinity');
""",
    ),
)

QUARANTINE_SQL: Final = """
INSERT INTO events_nul (vehicle, stream, boot_epoch, seq, ts, ts_quality, kind, priority,
                        payload, historical, received_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s)) ON CONFLICT DO NOTHING"""

COLUMNS: Final = "stream, boot_epoch, seq, ts, ts_quality, kind, priority, payload"

# One statement per batch: insert the events, then, from the rows it actually inserted
# (RETURNING), move each stream's state forward and count the batch on its vehicle.
# Rows are sorted by key so that concurrent collectors take row locks in one order.
NAMES: Final = tuple(COLUMNS.split(", "))
COPY_IN: Final = f"COPY incoming ({COLUMNS}) FROM STDIN (FORMAT BINARY)"
COPY_TYPES: Final = ["text", "int8", "int8", "float8", "int2", "text", "int2", "bytea"]
SOURCES: Final = {
    "unnest": """FROM unnest(%(stream)b::text[], %(boot_epoch)b::int8[], %(seq)b::int8[],
                %(ts)b::float8[], %(ts_quality)b::int2[], %(kind)b::text[],
                %(priority)b::int2[], %(payload)b::bytea[])
       AS r(stream, boot_epoch, seq, ts, ts_quality, kind, priority, payload)""",
    "copy": "FROM incoming",
}
INGEST_SQL: Final = f"""
WITH ins AS (
  INSERT INTO events (vehicle, {COLUMNS}, historical, received_at)
  SELECT %(vehicle)s, {COLUMNS}, %(historical)s, to_timestamp(%(at)s)
  {{source}}
  ORDER BY stream, boot_epoch, seq
  {{conflict}}
  RETURNING stream, boot_epoch, seq, ts, kind, priority, payload
), top AS (
  SELECT DISTINCT ON (stream) * FROM ins ORDER BY stream, boot_epoch DESC, seq DESC
), st AS (
  INSERT INTO state AS s
  SELECT %(vehicle)s, stream, boot_epoch, seq, ts, kind, priority, payload, to_timestamp(%(at)s)
  FROM top ORDER BY stream
  ON CONFLICT (vehicle, stream) DO UPDATE SET boot_epoch = excluded.boot_epoch,
    seq = excluded.seq, ts = excluded.ts, kind = excluded.kind, priority = excluded.priority,
    payload = excluded.payload, updated_at = excluded.updated_at
  WHERE (s.boot_epoch, s.seq) < (excluded.boot_epoch, excluded.seq)
), n AS (SELECT count(*) AS stored FROM ins
), v AS (
  INSERT INTO vehicles AS v (vehicle, batches, state_batches, events, duplicates,
                             first_state_at, last_batch_at)
  SELECT %(vehicle)s, %(is_events)s, %(is_state)s, n.stored, %(total)s - n.stored,
         CASE WHEN %(is_state)s = 1 THEN to_timestamp(%(at)s) END, to_timestamp(%(at)s)
  FROM n
  ON CONFLICT (vehicle) DO UPDATE SET batches = v.batches + excluded.batches,
    state_batches = v.state_batches + excluded.state_batches,
    events = v.events + excluded.events, duplicates = v.duplicates + excluded.duplicates,
    first_state_at = coalesce(v.first_state_at, excluded.first_state_at),
    last_batch_at = excluded.last_batch_at
)
SELECT stored FROM n
"""


@functools.lru_cache(maxsize=64)
def ingest_sql(method: str, on_conflict: bool, n: int) -> str:
    """The batch statement for an insert method. Without `on_conflict` a duplicate key
    aborts it (UniqueViolation): the fast path, ~25 % quicker than ON CONFLICT DO NOTHING
    (whose speculative insertion costs one more index descent and WAL record per row)."""
    if method == "values":
        casts = ("", "::int8", "::int8", "::float8", "::int2", "", "::int2", "::bytea")
        values = ", ".join(
            "(" + ", ".join(f"%({name}{i})s{c}" for name, c in zip(NAMES, casts, strict=True)) + ")"
            for i in range(n)
        )
        source = f"FROM (VALUES {values}) AS r({COLUMNS})"
    else:
        source = SOURCES[method]
    conflict = "ON CONFLICT DO NOTHING" if on_conflict else ""
    return INGEST_SQL.format(source=source, conflict=conflict)


def day_of(ts: float) -> int:
    """UTC day number (days since 1970-01-01) of a timestamp in seconds."""
    return math.floor(ts / DAY)


def partition_name(day: int) -> str:
    return "events_d" + (dt.date(1970, 1, 1) + dt.timedelta(days=day)).strftime("%Y%m%d")


def name_day(name: str) -> int | None:
    m = PARTITION_NAME.match(name)
    if m is None:
        return None
    return (dt.datetime.strptime(m.group(1), "%Y%m%d").date() - dt.date(1970, 1, 1)).days


def partition_ddl(day: int) -> list[sql.Composed | sql.SQL]:
    """Create day `day`'s partition, moving any rows DEFAULT already holds for it (else
    PostgreSQL refuses the new partition)."""
    name = sql.Identifier(partition_name(day))
    low, high = sql.Literal(day * DAY), sql.Literal((day + 1) * DAY)
    exists = sql.Literal(partition_name(day))
    return [
        sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS moving ON COMMIT DROP AS "
            "SELECT * FROM events_default WITH NO DATA"
        ),
        sql.SQL(
            "WITH d AS (DELETE FROM events_default WHERE ts >= {low} AND ts < {high} "
            "AND NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = {exists}) RETURNING *) "
            "INSERT INTO moving SELECT * FROM d"
        ).format(low=low, high=high, exists=exists),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {name} PARTITION OF events FOR VALUES FROM ({low}) "
            "TO ({high})"
        ).format(name=name, low=low, high=high),
        sql.SQL("INSERT INTO events SELECT * FROM moving ON CONFLICT DO NOTHING"),
        sql.SQL("TRUNCATE moving"),
    ]
