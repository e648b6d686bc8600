"""The collector's store on PostgreSQL: one database shared by any number of collectors.

`PgCollectorStore` has the verbs `Collector` uses from the SQLite `CollectorStore`
(ingest, set_status, state, keys, report) and two of its own for the schedule
(ensure_partitions, retention). Selected by `ironfleet-collector run --db postgresql://...`;
psycopg is imported here only, and this module only when such a URL is given, so the
embedded SQLite collector (`make demo`) runs without PostgreSQL or psycopg.

Rules, enforced by the database so that N collectors converge in any order:
- events are keyed (vehicle, stream, boot_epoch, seq, ts); a resent batch stores nothing
  new, whichever collector receives it (a plain INSERT first, redone with ON CONFLICT DO
  NOTHING when it meets a stored key: the fast path for the common, new batch). `ts`
  is in the key because it is the partition key (PostgreSQL requires it in every unique
  index of a partitioned table); a resend carries the bytes the agent stored, so the
  same ts and the same partition. Only a key reused with another ts (not something an
  agent does) would be stored twice; `report()` counts such keys.
- the fleet's latest state per (vehicle, stream) moves only forward in (boot_epoch, seq):
  an upsert whose DO UPDATE has `WHERE (state.boot_epoch, state.seq) < (excluded...)`,
  fed only by the rows this transaction actually inserted, so the state is always the
  highest stored event (agent.resilience.replay of the events table);
- one transaction per batch, synchronous_commit on (forced for our sessions): the caller
  acks only after `ingest` returned, i.e. after the commit. The transaction is one
  statement (small batches: arrays through unnest, one round trip) or a binary COPY
  into a temporary table plus that statement (batches of COPY_ABOVE events or more).
- events are partitioned by day of the event's own ts (declarative RANGE partitions,
  created ahead by every collector and on demand for a backlog's older days); ts outside
  [today - MAX_BACKFILL_DAYS, today + AHEAD_DAYS] (a controller clock at 1970) lands in
  the DEFAULT partition. `retention(keep_days)` drops whole day partitions and deletes
  DEFAULT rows by their received_at.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from agent.errors import CommitFailed
from agent.fleet import Batch
from fleet.pgsql import (
    COPY_IN,
    COPY_TYPES,
    DAY,
    MIGRATIONS,
    NAMES,
    QUARANTINE_SQL,
    day_of,
    ingest_sql,
    name_day,
    partition_ddl,
    partition_name,
)

log = logging.getLogger(__name__)

AHEAD_DAYS: Final = 2  # partitions made ahead of today, so midnight never waits on DDL
# A vehicle back from weeks offline uploads old days: they get their own partitions up to
# this age (the agent's buffer rarely holds more); older or future ts go to DEFAULT.
MAX_BACKFILL_DAYS: Final = 45
CONNECT_TIMEOUT: Final = 5  # seconds: a dead server must not hang paho's thread
# A server that stops answering (network cut, not a refused connection) must fail a batch,
# not hang a writer: TCP keepalives and a user timeout bound a dead link to ~30 s, and a
# batch statement (milliseconds normally) to STATEMENT_TIMEOUT_MS.
STATEMENT_TIMEOUT_MS: Final = 60_000
_CONNECT_OPTIONS: Final[dict[str, Any]] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "application_name": "ironfleet-collector",
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
}
LOCK_TIMEOUT_MS: Final = 5000  # partition DDL waits at most this long for ingest locks
DDL_RETRY: Final = 60.0  # seconds between partition DDL attempts after one failed
TRANSIENT_RETRIES: Final = 3  # a deadlock or serialization failure is retried in place
MIGRATION_LOCK: Final = 0x1F1EE7  # pg_advisory_xact_lock key: schema and partition DDL
InsertMethod = Literal["auto", "unnest", "copy", "values"]
# `auto`: below this many events one unnest statement, its own transaction in autocommit
# (1 round trip: live batches are a few events); from it, binary COPY (6 round trips,
# but C-speed row encoding, and the collector is bound by its one core). bench_fleet.py
# --sections 1 --batch-events N, client CPU an event, ev/s: 40 events unnest 5.4 us,
# 50k, COPY 8.0 us, 31k; 128: both 3.3 us, unnest 76k, COPY 60k; 200: unnest 2.9 us,
# 81k, COPY 2.5 us, 70k; 256: 2.8 against 2.2 us (docs/decisions.md).
COPY_ABOVE: Final = 200


class PgCollectorStore:
    """The fleet's store on PostgreSQL. Thread-safe: each calling thread has its own
    connection, so a collector's writer threads keep several batches in flight (one
    PostgreSQL backend works one transaction at a time); `lock` guards the partition
    cache and DDL only.

    Every failure of a write (server down, connection lost, deadlock after retries, a
    value PostgreSQL cannot hold) raises `CommitFailed`: the batch is not known durable,
    so the caller must not ack it; the vehicle sends it again. The connection is opened
    lazily and reopened after it broke, so a restarted server is picked up by the next
    batch.
    """

    def __init__(self, url: str, *, method: InsertMethod = "auto", now: float | None = None):
        self.url = url
        self.method = method
        self.lock = threading.Lock()
        self._local = threading.local()  # .conn: this thread's connection
        self._conns: list[psycopg.Connection[Any]] = []  # every one opened, for close()
        self._conns_lock = threading.Lock()
        self._days: set[int] = set()  # day partitions known to exist
        self._ahead_until = -1  # last day made ahead; checked on every batch
        self._ddl_retry_at = 0.0  # monotonic: no partition DDL before this after a failure
        with self.lock:
            self._migrate()
            self._make_ahead(time.time() if now is None else now)

    # -- the verbs Collector uses ------------------------------------------------------------

    def ingest(self, batch: Batch, now: float | None = None) -> tuple[int, int]:
        """Store a batch in one committed transaction; return (stored, duplicates)."""
        at = time.time() if now is None else now
        rows = _rows(batch)
        # PostgreSQL text cannot hold U+0000: those events go to events_nul, in the same
        # transaction (docs/fleet-deployment.md).
        nul = [r for r in rows if "\x00" in r[0] or "\x00" in r[5]]
        if nul:
            rows = [r for r in rows if "\x00" not in r[0] and "\x00" not in r[5]]
        # A state batch repeats what is mostly stored already: straight to ON CONFLICT.
        on_conflict = batch.kind == "state"
        retries = 0
        with self.lock:
            self._partitions_for(rows, at)  # never raises: DEFAULT holds rows meanwhile
        while True:
            try:
                stored = self._ingest_once(batch, rows, at, on_conflict, nul)
            except pg_errors.UniqueViolation as exc:
                if on_conflict:  # not from the events insert: a bug, never acked
                    raise CommitFailed(f"ingest: {exc}") from exc
                on_conflict = True  # a resend: the aborted attempt kept nothing
                continue
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                retries += 1
                if retries > TRANSIENT_RETRIES:
                    raise CommitFailed(f"ingest: {exc}") from exc
                continue
            except psycopg.Error as exc:
                self._forget_broken()
                raise CommitFailed(f"ingest: {type(exc).__name__}: {exc}") from exc
            return stored, len(rows) + len(nul) - stored

    def set_status(self, vehicle: str, status: str, at: float) -> None:
        """Record a vehicle's retained status (online/offline) and when we saw it."""
        self._exec(
            """INSERT INTO vehicles (vehicle, status, status_at)
               VALUES (%s, %s, to_timestamp(%s))
               ON CONFLICT (vehicle) DO UPDATE SET status = excluded.status,
                 status_at = excluded.status_at""",
            (vehicle, status, at),
        )

    def state(self, vehicle: str) -> dict[str, tuple[int, int, bytes]]:
        """Converged state: stream -> (boot_epoch, seq, payload)."""
        rows = self._read(
            "SELECT stream, boot_epoch, seq, payload FROM state WHERE vehicle = %s", (vehicle,)
        )
        return {s: (e, q, bytes(p)) for s, e, q, p in rows}

    def keys(self, vehicle: str) -> set[tuple[str, int, int]]:
        """Every stored (stream, boot_epoch, seq) of `vehicle` (events_nul's included)."""
        rows = self._read(
            "SELECT stream, boot_epoch, seq FROM events WHERE vehicle = %s", (vehicle,)
        )
        nul = self._read(
            "SELECT stream, boot_epoch, seq FROM events_nul WHERE vehicle = %s", (vehicle,)
        )
        return {(s, e, q) for s, e, q in rows} | {(bytes(s).decode(), e, q) for s, e, q in nul}

    def claim_replay(self, interval: float) -> bool:
        """True for the first collector of the group to ask within `interval` seconds:
        after a broker restart every member finds its session gone at once, and one
        fleet-wide replay request is enough (each would make every vehicle resend its
        state)."""
        return bool(self._exec(
            "UPDATE fleet_replays SET last_at = now() WHERE id = 1 "
            "AND last_at < now() - make_interval(secs => %s)", (interval,)))  # fmt: skip

    def vehicles(self, limit: int) -> list[str]:
        """The vehicles the fleet has heard from, at most `limit`, in name order."""
        rows = self._read("SELECT vehicle FROM vehicles ORDER BY vehicle LIMIT %s", (limit,))
        return [v for (v,) in rows]

    def report(self) -> list[dict[str, Any]]:
        """Per vehicle: events, duplicates received, gaps, reused keys, converged state."""
        vehicles = self._read(
            "SELECT vehicle, status, batches, state_batches, events, duplicates "
            "FROM vehicles ORDER BY vehicle"
        )
        gaps = dict(
            self._read(
                """SELECT vehicle, sum(g)::bigint FROM (
                     SELECT vehicle, max(seq) - min(seq) + 1 - count(DISTINCT seq) AS g
                     FROM events GROUP BY vehicle, stream, boot_epoch) x GROUP BY vehicle"""
            )
        )
        reused = dict(
            self._read(
                """SELECT vehicle, count(*) FROM (SELECT vehicle FROM events
                     GROUP BY vehicle, stream, boot_epoch, seq HAVING count(*) > 1) x
                   GROUP BY vehicle"""
            )
        )
        states: dict[str, dict[str, list[int]]] = {}
        for vehicle, stream, epoch, seq in self._read(
            "SELECT vehicle, stream, boot_epoch, seq FROM state ORDER BY vehicle, stream"
        ):
            states.setdefault(vehicle, {})[stream] = [epoch, seq]
        return [
            {
                "vehicle": vehicle,
                "status": status,
                "batches": batches,
                "state_batches": state_batches,
                "events": events,
                "duplicates_received": dups,
                "missing_in_sequence": int(gaps.get(vehicle) or 0),
                "reused_keys": int(reused.get(vehicle) or 0),
                "streams": len(states.get(vehicle, {})),
                "state": states.get(vehicle, {}),
            }
            for vehicle, status, batches, state_batches, events, dups in vehicles
        ]

    # -- partitions and retention ------------------------------------------------------------

    def ensure_partitions(self, now: float | None = None) -> list[str]:
        """Create the day partitions from yesterday to AHEAD_DAYS ahead; names created."""
        with self.lock:
            return self._make_ahead(time.time() if now is None else now, force=True)

    def partitions(self) -> list[str]:
        """Names of the day partitions, oldest first (DEFAULT not included)."""
        with self.lock:
            self._load_days()
            return [partition_name(d) for d in sorted(self._days)]

    def retention(self, keep_days: int, now: float | None = None) -> tuple[list[str], int]:
        """Drop day partitions older than `keep_days` full days before today, and DEFAULT
        rows received before that; return (partitions dropped, default rows deleted).

        Safe to run from cron or a systemd timer on any collector host while collectors
        ingest: each DROP waits at most LOCK_TIMEOUT_MS for their locks.
        """
        if keep_days < 1:
            raise ValueError("keep_days must be at least 1 (today's partition is kept)")
        at = time.time() if now is None else now
        first_kept = day_of(at) - keep_days
        dropped: list[str] = []
        with self.lock:
            self._load_days()
            for day in sorted(d for d in self._days if d < first_kept):
                name = partition_name(day)
                self._ddl([sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name))])
                self._days.discard(day)
                dropped.append(name)
            deleted = self._exec(
                "DELETE FROM events_default WHERE received_at < to_timestamp(%s)",
                (first_kept * DAY,),
            )
        log.info("collector_retention keep_days=%d dropped=%d default_rows_deleted=%d",
                 keep_days, len(dropped), deleted)  # fmt: skip
        return dropped, deleted

    def close(self) -> None:
        """Close every thread's connection."""
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    # -- private -----------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            try:
                conn = psycopg.connect(self.url, autocommit=True, **_CONNECT_OPTIONS)
            except psycopg.Error as exc:
                raise CommitFailed(f"cannot connect to PostgreSQL: {exc}") from exc
            # The ack promises durability: never let a server default of `off` weaken it.
            row = conn.execute("SHOW synchronous_commit").fetchone()
            if row is not None and row[0] == "off":
                log.warning("collector_synchronous_commit_off: forced on for our sessions")
                conn.execute("SET synchronous_commit = on")
            if self.method in ("copy", "auto"):
                conn.execute("""CREATE TEMP TABLE incoming (stream text, boot_epoch int8,
                    seq int8, ts float8, ts_quality int2, kind text, priority int2,
                    payload bytea) ON COMMIT DELETE ROWS""")  # fmt: skip
            self._local.conn = conn
            with self._conns_lock:
                self._conns = [c for c in self._conns if not c.closed] + [conn]
        return conn

    def _forget_broken(self) -> None:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            conn.close()
            self._local.conn = None

    def _ingest_once(
        self,
        batch: Batch,
        rows: list[tuple[Any, ...]],
        at: float,
        on_conflict: bool,
        nul: Sequence[tuple[Any, ...]] = (),
    ) -> int:
        conn = self._connection()
        if nul:  # rare: the plain statement, then the quarantined rows, one transaction
            with conn.transaction():
                stored = self._ingest_statement(conn, batch, rows, at, on_conflict,
                                                method="unnest")  # fmt: skip
                for r in nul:
                    cur = conn.execute(QUARANTINE_SQL, (
                        batch.vehicle, r[0].encode(), r[1], r[2], r[3], r[4], r[5].encode(),
                        r[6], r[7], batch.historical, at))  # fmt: skip
                    stored += max(cur.rowcount, 0)
                return stored
        return self._ingest_statement(conn, batch, rows, at, on_conflict, method=self.method)

    def _ingest_statement(
        self,
        conn: psycopg.Connection[Any],
        batch: Batch,
        rows: list[tuple[Any, ...]],
        at: float,
        on_conflict: bool,
        *,
        method: str,
    ) -> int:
        params: dict[str, Any] = {
            "vehicle": batch.vehicle, "historical": batch.historical, "at": at,
            "total": len(rows), "is_events": int(batch.kind == "events"),
            "is_state": int(batch.kind == "state"),
        }  # fmt: skip
        if method == "auto" or not rows:  # VALUES cannot be empty
            method = "copy" if len(rows) >= COPY_ABOVE else "unnest"
        if method == "values":
            for i, r in enumerate(rows):
                for name, value in zip(NAMES, r, strict=True):
                    params[f"{name}{i}"] = value
        elif method == "unnest":
            columns = list(zip(*rows, strict=True)) or [()] * len(NAMES)
            for name, column in zip(NAMES, columns, strict=True):
                params[name] = list(column)
        statement = ingest_sql(method, on_conflict, len(rows))
        if method != "copy":  # one statement: in autocommit, its own transaction
            return _count(conn.execute(statement.encode(), params))
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(COPY_IN) as copy:
                copy.set_types(COPY_TYPES)
                for r in rows:
                    copy.write_row(r)
            return _count(cur.execute(statement.encode(), params))

    def _exec(self, statement: str, params: tuple[Any, ...]) -> int:
        """One autocommit write (the lock held by the caller); rows affected."""
        try:
            cur = self._connection().execute(statement, params)
        except psycopg.Error as exc:
            self._forget_broken()
            raise CommitFailed(f"{type(exc).__name__}: {exc}") from exc
        return max(cur.rowcount, 0)

    def _read(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._connection().execute(statement, params or None).fetchall()
        except psycopg.Error as exc:
            self._forget_broken()
            raise CommitFailed(f"{type(exc).__name__}: {exc}") from exc

    def _ddl(self, statements: Iterable[sql.Composed | sql.SQL]) -> None:
        """Run DDL in one transaction under the schema lock, with a bounded lock wait."""
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                for s in statements:
                    conn.execute(s)
        except psycopg.Error as exc:
            self._forget_broken()
            raise CommitFailed(f"DDL: {type(exc).__name__}: {exc}") from exc

    def _migrate(self) -> None:
        """Apply the named migrations not yet recorded (under the advisory lock, so several
        collectors starting at once apply each exactly once)."""
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute("""CREATE TABLE IF NOT EXISTS ironfleet_migrations (
                    name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())""")
                done = {r[0] for r in conn.execute("SELECT name FROM ironfleet_migrations")}
                for name, script in MIGRATIONS:
                    if name not in done:
                        conn.execute(script.encode())
                        conn.execute("INSERT INTO ironfleet_migrations (name) VALUES (%s)",
                                     (name,))  # fmt: skip
                        log.info("collector_migration_applied name=%s", name)
        except psycopg.Error as exc:
            self._forget_broken()
            raise CommitFailed(f"migration: {type(exc).__name__}: {exc}") from exc

    def _load_days(self) -> None:
        try:
            rows = (
                self._connection()
                .execute(
                    """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                   WHERE i.inhparent = 'events'::regclass"""
                )
                .fetchall()
            )
        except psycopg.Error as exc:
            self._forget_broken()
            raise CommitFailed(f"{type(exc).__name__}: {exc}") from exc
        self._days = {d for (name,) in rows if (d := name_day(name)) is not None}

    def _make_ahead(self, at: float, force: bool = False) -> list[str]:
        today = day_of(at)
        if today + AHEAD_DAYS <= self._ahead_until and not force:
            return []
        self._load_days()
        made = self._create_days(range(today - 1, today + AHEAD_DAYS + 1))
        self._ahead_until = today + AHEAD_DAYS
        return made

    def _partitions_for(self, rows: list[tuple[Any, ...]], at: float) -> None:
        """Make sure every in-window day of the batch has its partition (DDL outside the
        batch's transaction, so the batch never holds the parent's exclusive lock).

        A failure (server down, lock timeout) is logged and retried after DDL_RETRY
        seconds: meanwhile those rows land in DEFAULT, and are moved into their day's
        partition when it is created."""
        if time.monotonic() < self._ddl_retry_at:
            return
        today = day_of(at)
        low, high = today - MAX_BACKFILL_DAYS, today + AHEAD_DAYS
        try:
            self._make_ahead(at)
            wanted = {d for r in rows if low <= (d := day_of(r[3])) <= high} - self._days
            if wanted:
                self._create_days(sorted(wanted))
        except (CommitFailed, psycopg.Error) as exc:
            self._forget_broken()
            self._ddl_retry_at = time.monotonic() + DDL_RETRY
            log.warning("collector_partition_failed error=%r (rows go to events_default "
                        "meanwhile)", str(exc)[:200])  # fmt: skip

    def _create_days(self, days: Iterable[int]) -> list[str]:
        missing = [d for d in days if d not in self._days]
        if not missing:
            return []
        try:
            self._ddl(stmt for d in missing for stmt in partition_ddl(d))
        finally:
            self._load_days()
        names = [partition_name(d) for d in missing]
        log.info("collector_partitions_created names=%s", ",".join(names))
        return names


def _rows(batch: Batch) -> list[tuple[Any, ...]]:
    """A batch's rows in column order, sorted by key: concurrent collectors then take
    row locks in one order."""
    return sorted(
        ((e.stream, e.boot_epoch, e.seq, e.ts, tq, e.kind, e.priority, e.payload)
         for e, tq in batch.events),
        key=lambda r: (r[0], r[1], r[2]),
    )  # fmt: skip


def _count(cur: psycopg.Cursor[Any]) -> int:
    row = cur.fetchone()
    return int(row[0]) if row else 0
