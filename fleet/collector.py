"""`ironfleet-collector`: the reference fleet-side consumer.

It subscribes for any number of vehicles, stores every event in its own SQLite
(synchronous=FULL), deduplicates by (vehicle, stream, boot_epoch, seq), keeps the
converged latest state per vehicle and stream (historical events never overwrite newer
state), and publishes an ack for a batch only after that batch is committed. Acks and
commands are signed with the fleet's Ed25519 key (`--signing-key`, made by `keygen`;
docs/fleet-protocol.md). It is a reference for tests and the demo, not a fleet backend: at
fleet scale the same topics feed an MQTT cluster and from there Kafka or a database.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.errors import CommitFailed
from agent.fleet import (
    Ack,
    Batch,
    Command,
    FleetMessageError,
    batch_digest,
    decode_status,
    parse_topic,
)
from agent.fleet_auth import FleetSigner
from agent.fsprobe import JournalProbe
from agent.resilience.ratelimit import LogThrottle
from agent.storedb import atomic

log = logging.getLogger(__name__)

# After the broker lost our session (docs/fleet-deployment.md 7, reconnect storm): the
# vehicles asked to send their state and backlog again, at most this many, and at most
# once per interval (a flapping broker; the agents also coalesce and rate-limit replays).
MAX_REPLAY_VEHICLES = 100_000
REPLAY_ALL_INTERVAL = 30.0  # seconds
# A group's members lose their sessions within seconds of each other (one broker restart);
# the first claim covers them for this long. Shorter than REPLAY_ALL_INTERVAL, so that a
# collector's own next round, timed by its clock, finds its claim (timed by the server's,
# a few ms later) expired.
REPLAY_CLAIM_SECONDS = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    vehicle TEXT NOT NULL, stream TEXT NOT NULL, boot_epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL, ts REAL NOT NULL, ts_quality INTEGER NOT NULL, kind TEXT NOT NULL,
    priority INTEGER NOT NULL, payload BLOB NOT NULL, historical INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (vehicle, stream, boot_epoch, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    vehicle TEXT NOT NULL, stream TEXT NOT NULL, boot_epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL, ts REAL NOT NULL, kind TEXT NOT NULL, priority INTEGER NOT NULL,
    payload BLOB NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (vehicle, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vehicles (
    vehicle TEXT PRIMARY KEY, status TEXT, status_at REAL, batches INTEGER NOT NULL DEFAULT 0,
    state_batches INTEGER NOT NULL DEFAULT 0, events INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0, first_state_at REAL, last_batch_at REAL
);
"""


class CollectorStore:
    """The collector's database. Thread-safe by a lock (paho calls from its own thread)."""

    def __init__(self, path: str | Path) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.conn.executescript(SCHEMA)
        self.lock = threading.Lock()
        # After each commit, before the ack: is the file system's journal still alive?
        # (agent/fsprobe.py: ext4 can report a commit durable that its abort threw away.)
        self._probe = JournalProbe(Path(path)) if str(path) != ":memory:" else None

    def ingest(self, batch: Batch, now: float | None = None) -> tuple[int, int]:
        """Store a batch in one transaction; return (stored, duplicates)."""
        at = time.time() if now is None else now
        stored = 0
        with self.lock:
            c = self.conn
            with atomic(c):
                for event, tq in batch.events:
                    cur = c.execute(
                        "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (batch.vehicle, event.stream, event.boot_epoch, event.seq, event.ts, tq,
                         event.kind, event.priority, event.payload, int(batch.historical), at),
                    )  # fmt: skip
                    stored += cur.rowcount
                    self._update_state(batch, event, at)
                c.execute(
                    "INSERT INTO vehicles (vehicle) VALUES (?) ON CONFLICT DO NOTHING",
                    (batch.vehicle,),
                )
                dups = len(batch.events) - stored
                c.execute(
                    """UPDATE vehicles SET batches = batches + (? = 'events'),
                       state_batches = state_batches + (? = 'state'), events = events + ?,
                       duplicates = duplicates + ?, last_batch_at = ?,
                       first_state_at = coalesce(first_state_at, CASE WHEN ? = 'state'
                                                 THEN ? END)
                       WHERE vehicle = ?""",
                    (batch.kind, batch.kind, stored, dups, at, batch.kind, at, batch.vehicle),
                )
            if self._probe is not None:
                self._probe.check()  # OSError: committed, but maybe not kept; no ack
        return stored, len(batch.events) - stored

    def _update_state(self, batch: Batch, event: Any, at: float) -> None:
        # Newer position wins; a historical (backlog) event only fills an empty slot.
        condition = (
            "WHERE 0"
            if batch.historical
            else "WHERE (excluded.boot_epoch, excluded.seq) > (state.boot_epoch, state.seq)"
        )
        self.conn.execute(
            f"""INSERT INTO state VALUES (?,?,?,?,?,?,?,?,?)
                ON CONFLICT (vehicle, stream) DO UPDATE SET boot_epoch = excluded.boot_epoch,
                  seq = excluded.seq, ts = excluded.ts, kind = excluded.kind,
                  priority = excluded.priority, payload = excluded.payload,
                  updated_at = excluded.updated_at {condition}""",
            (batch.vehicle, event.stream, event.boot_epoch, event.seq, event.ts, event.kind,
             event.priority, event.payload, at),
        )  # fmt: skip

    def set_status(self, vehicle: str, status: str, at: float) -> None:
        with self.lock:
            self.conn.execute(
                "INSERT INTO vehicles (vehicle, status, status_at) VALUES (?, ?, ?) "
                "ON CONFLICT (vehicle) DO UPDATE SET status = excluded.status, "
                "status_at = excluded.status_at",
                (vehicle, status, at),
            )

    def state(self, vehicle: str) -> dict[str, tuple[int, int, bytes]]:
        """Converged state: stream -> (boot_epoch, seq, payload)."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT stream, boot_epoch, seq, payload FROM state WHERE vehicle = ?", (vehicle,)
            ).fetchall()
        return {s: (e, q, bytes(p)) for s, e, q, p in rows}

    def keys(self, vehicle: str) -> set[tuple[str, int, int]]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT stream, boot_epoch, seq FROM events WHERE vehicle = ?", (vehicle,)
            ).fetchall()
        return {(s, e, q) for s, e, q in rows}

    def claim_replay(self, interval: float) -> bool:
        """Always: one file, one collector (Collector paces its own requests)."""
        del interval
        return True

    def vehicles(self, limit: int) -> list[str]:
        """The vehicles this store has heard from, at most `limit`, in name order."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT vehicle FROM vehicles ORDER BY vehicle LIMIT ?", (limit,)
            ).fetchall()
        return [v for (v,) in rows]

    def report(self) -> list[dict[str, Any]]:
        """Per vehicle: events, duplicates received, gaps, converged state."""
        with self.lock:
            vehicles = self.conn.execute(
                "SELECT vehicle, status, batches, state_batches, events, duplicates "
                "FROM vehicles ORDER BY vehicle"
            ).fetchall()
            out = []
            for vehicle, status, batches, state_batches, events, dups in vehicles:
                gaps = self.conn.execute(
                    """SELECT max(seq) - min(seq) + 1 - count(*)
                       FROM events WHERE vehicle = ? GROUP BY stream, boot_epoch""",
                    (vehicle,),
                ).fetchall()
                state = self.conn.execute(
                    "SELECT stream, boot_epoch, seq FROM state WHERE vehicle = ? ORDER BY stream",
                    (vehicle,),
                ).fetchall()
                out.append(
                    {
                        "vehicle": vehicle,
                        "status": status,
                        "batches": batches,
                        "state_batches": state_batches,
                        "events": events,
                        "duplicates_received": dups,
                        "missing_in_sequence": sum(g[0] for g in gaps),
                        "streams": len(state),
                        "state": {s: [e, q] for s, e, q in state},
                    }
                )
        return out


class FleetStore(Protocol):
    """What `Collector` needs of a store: `CollectorStore` (SQLite, embedded) or
    `fleet.pgstore.PgCollectorStore` (PostgreSQL, shared by N collectors)."""

    def ingest(self, batch: Batch, now: float | None = None) -> tuple[int, int]: ...
    def set_status(self, vehicle: str, status: str, at: float) -> None: ...
    def state(self, vehicle: str) -> dict[str, tuple[int, int, bytes]]: ...
    def keys(self, vehicle: str) -> set[tuple[str, int, int]]: ...
    def vehicles(self, limit: int) -> list[str]: ...
    def claim_replay(self, interval: float) -> bool: ...
    def report(self) -> list[dict[str, Any]]: ...


def open_store(db: str) -> FleetStore:
    """A `postgresql://` URL opens the shared PostgreSQL store (psycopg imported only
    then, so the embedded default needs neither); anything else is a SQLite file."""
    if db.startswith(("postgresql://", "postgres://")):
        from fleet.pgstore import PgCollectorStore  # noqa: PLC0415 - optional dependency

        return PgCollectorStore(db)
    return CollectorStore(db)


class Collector:
    """Wires the store to MQTT: decode, commit, then ack (signed when `signer` is given;
    unsigned acks are only honoured by agents in lab mode, `allow_unsigned = true`)."""

    def __init__(
        self, store: FleetStore, transport: Any = None, signer: FleetSigner | None = None
    ) -> None:
        self.store = store
        self.transport = transport
        self.signer = signer
        # Written by every WriterPool thread: `+=` on an attribute is three steps, and
        # only CPython 3.11's switch points keep it whole; a lock keeps it so anywhere.
        self._count = threading.Lock()
        self.bad_messages = 0
        self.acks_sent = 0
        self.commit_failures = 0
        self.replays_sent = 0  # replay commands sent after the broker lost our session
        self._last_cmd_id = 0
        # One thread for the collector's life (with PostgreSQL, one connection), started
        # by the first lost session; `_replay_due` is set for every one after it.
        self._replayer: threading.Thread | None = None
        self._replay_due = threading.Event()
        self._last_replay_all = -REPLAY_ALL_INTERVAL  # monotonic
        self._throttle = LogThrottle(60.0, max_keys=8)  # a flood of junk: one line a minute

    def handle(self, topic_name: str, payload: bytes) -> None:
        """One MQTT message: store it (one transaction), then acknowledge it."""
        try:
            vehicle, kind = parse_topic(topic_name)
            if kind == "status":
                status = decode_status(payload)
                self.store.set_status(vehicle, str(status.get("state")), time.time())
                return
            batch = Batch.decode(payload)
        except FleetMessageError as exc:
            self._bad("collector_bad_message", topic_name, str(exc))
            return
        if batch.vehicle != vehicle:
            self._bad("collector_vehicle_mismatch", topic_name, f"batch vehicle {batch.vehicle}")
            return
        try:
            stored, dups = self.store.ingest(batch)
        except (sqlite3.Error, OSError, CommitFailed) as exc:
            # Not stored (or not surely kept): no ack, so the vehicle sends it again.
            with self._count:
                self.commit_failures += 1
                verdict = self._throttle.check("collector_commit_failed", time.monotonic())
            if verdict.log:
                log.error("collector_commit_failed vehicle=%s error=%r (not acked)", vehicle,
                          str(exc))  # fmt: skip
            return
        if self.transport is not None:
            ack = Ack(batch.batch_id, batch.kind, stored, dups, batch_digest(payload),
                      int(time.time() * 1000))  # fmt: skip
            if self.signer is not None:
                ack = self.signer.sign_ack(vehicle, ack)
            self.transport.ack(vehicle, ack.encode())
            with self._count:
                self.acks_sent += 1

    def _bad(self, what: str, topic_name: str, detail: str) -> None:
        with self._count:
            self.bad_messages += 1
            verdict = self._throttle.check(what, time.monotonic())
        if verdict.log:
            log.warning("%s topic=%r error=%r more_in_last_interval=%d", what, topic_name[:120],
                        detail[:160], verdict.suppressed)  # fmt: skip

    def command(self, vehicle: str, op: str, cmd_id: int | None = None) -> Command:
        """Publish command `op` to `vehicle`, signed if we can. Its id is the replay counter
        the agent checks: by default the wall clock in ms, strictly increasing here."""
        assert self.transport is not None
        if cmd_id is None:
            cmd_id = self._next_cmd_id()
        self._last_cmd_id = max(self._last_cmd_id, cmd_id)
        cmd = Command(op, cmd_id)
        if self.signer is not None:
            cmd = self.signer.sign_command(vehicle, cmd)
        self.transport.command(vehicle, cmd.encode())
        return cmd

    def _next_cmd_id(self) -> int:
        """The wall clock in ms, above every id this collector has used."""
        return max(int(time.time() * 1000), self._last_cmd_id + 1)

    def request_replay(self, vehicle: str, cmd_id: int | None = None) -> None:
        self.command(vehicle, "replay", cmd_id)

    def session_lost(self) -> None:
        """The subscriber reconnected and found the broker had forgotten our session
        (restarted without persistence, or the session expired): whatever the vehicles
        published before we subscribed again had no subscriber and was dropped, the
        state each sends first on its own reconnect included. Ask every known vehicle to
        send its state and unacknowledged backlog again now, rather than each waiting
        out its ack_timeout. Called on paho's thread: the commands are signed on a thread
        of their own (5,000 take ~0.2 s), so paho's thread goes on; their sends share its
        queue with the acks (1.9 s at 100,000 vehicles, measured)."""
        with self._count:
            if self._replayer is None:
                self._replayer = threading.Thread(target=self._replay_loop, daemon=True,
                                                  name="collector-replay")  # fmt: skip
                self._replayer.start()
        self._replay_due.set()

    def _replay_targets(self) -> list[str]:
        named = [v for v in getattr(self.transport, "vehicles", ("+",)) if v != "+"]
        if named:  # this collector's own vehicles (--vehicles): no other answers for them
            return named[:MAX_REPLAY_VEHICLES]
        vehicles = self.store.vehicles(MAX_REPLAY_VEHICLES)  # read first: a failed read
        if not self.store.claim_replay(REPLAY_CLAIM_SECONDS):  # leaves the claim to others
            log.info("collector_session_lost: another collector of the group has asked")
            return []
        return vehicles

    def _replay_loop(self) -> None:
        while True:
            self._replay_due.wait()
            time.sleep(max(0.0, self._last_replay_all + REPLAY_ALL_INTERVAL - time.monotonic()))
            # Cleared before the requests go: a loss reported from here on gets a round of
            # its own; one reported before is served by this one.
            self._replay_due.clear()
            self._last_replay_all = time.monotonic()
            try:
                vehicles = self._replay_targets()
                # One id for the round: ids need only grow per vehicle, and one each
                # (max(now, last + 1)) would run ahead of the clock by a ms a vehicle, so
                # that agents refused the next command stamped with the clock.
                round_id = self._next_cmd_id()
                for vehicle in vehicles:
                    self.request_replay(vehicle, round_id)
                    with self._count:
                        self.replays_sent += 1
            except (sqlite3.Error, CommitFailed) as exc:  # the store is down: the agents'
                vehicles = []  # ack_timeout resends instead
                log.error("collector_replay_failed error=%r", str(exc)[:200])
            except Exception:  # last resort, as WriterPool's: the thread must live
                vehicles = []
                log.exception("collector_replay_bug")
            log.warning("collector_session_lost replays_sent=%d (the broker had forgotten "
                        "our session)", len(vehicles))  # fmt: skip


class WriterPool:
    """Hands messages from paho's thread to `writers` threads that each run `handle`
    (store, commit, ack). With PostgreSQL every thread has its own connection, so one
    collector keeps several batches in flight. A vehicle always goes to the same writer:
    two transactions of one vehicle would wait on each other's row locks (its state rows)
    until commit (measured: 15-25 % of samples waiting). What waits is bounded by bytes
    (QUEUE_BYTES, plus one message): a slow database then holds paho's thread, and through
    TCP the broker. Not by a small count: paho sends the writers' acks from its own
    thread, so a thread blocked on a full queue delays every ack."""

    QUEUE_BYTES = 32 * 2**20  # 128 batches at the agents' default batch_max_bytes

    def __init__(self, handle: Callable[[str, bytes], None], writers: int) -> None:
        self.handle = handle
        self.queues: list[queue.Queue[tuple[str, bytes] | None]] = [
            queue.Queue() for _ in range(writers)
        ]
        self._room = threading.Condition()
        self._queued = 0  # bytes submitted and not yet handled
        self.threads = [threading.Thread(target=self._work, args=(q,), daemon=True,
                                         name=f"collector-writer-{i}")
                        for i, q in enumerate(self.queues)]  # fmt: skip
        for t in self.threads:
            t.start()

    def submit(self, topic_name: str, payload: bytes) -> None:
        with self._room:
            while self._queued > self.QUEUE_BYTES:
                self._room.wait()
            self._queued += len(payload)
        vehicle = topic_name.rsplit("/", 1)[0]
        self.queues[hash(vehicle) % len(self.queues)].put((topic_name, payload))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued (after the subscriber stopped), then end the threads."""
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join(timeout)

    def _work(self, q: queue.Queue[tuple[str, bytes] | None]) -> None:
        while (item := q.get()) is not None:
            try:
                self.handle(*item)
            except Exception:  # last resort, as FleetSubscriber's: the thread must live
                log.exception("collector_handler_bug topic=%r", item[0][:120])
            with self._room:
                self._queued -= len(item[1])
                self._room.notify()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `ironfleet-collector` (pyproject.toml); the command line is
    fleet/cli.py."""
    from fleet.cli import main as cli_main  # noqa: PLC0415 - fleet.cli imports this module

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
