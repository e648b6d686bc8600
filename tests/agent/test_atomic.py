"""`storedb.atomic`: every write transaction of the store is all or nothing, and the
connection is never left inside a transaction, whatever failed (a statement, Python code
between statements, or the COMMIT itself)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import StoreSection
from agent.errors import CommitFailed
from agent.resilience import Event
from agent.store import EventStore
from agent.storedb import atomic, connect, read_cursor


def _db(tmp_path: Path) -> sqlite3.Connection:
    conn = connect(tmp_path / "t.db")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    return conn


def _rows(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return conn.execute("SELECT k, v FROM t ORDER BY k").fetchall()


def test_block_commits_on_success(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    with atomic(conn):
        conn.execute("INSERT INTO t VALUES (1, 'a')")
        conn.execute("INSERT INTO t VALUES (2, 'b')")
    assert not conn.in_transaction
    other = connect(tmp_path / "t.db", readonly=True)
    assert _rows(other) == [(1, "a"), (2, "b")]  # committed: another connection sees it


def test_failed_statement_rolls_back_the_whole_block(tmp_path: Path) -> None:
    conn = _db(tmp_path)

    def write() -> None:
        with atomic(conn):
            conn.execute("INSERT INTO t VALUES (1, 'a')")
            conn.execute("INSERT INTO t VALUES (1, 'duplicate key')")

    with pytest.raises(sqlite3.IntegrityError):
        write()
    assert not conn.in_transaction
    assert _rows(conn) == []


def test_python_error_between_statements_rolls_back(tmp_path: Path) -> None:
    conn = _db(tmp_path)

    def write() -> None:
        with atomic(conn):
            conn.execute("INSERT INTO t VALUES (1, 'a')")
            raise KeyError("a bug after the first statement")

    with pytest.raises(KeyError):
        write()
    assert not conn.in_transaction
    assert _rows(conn) == []
    with atomic(conn):  # the connection is usable at once: no transaction left open
        conn.execute("INSERT INTO t VALUES (3, 'c')")
    assert _rows(conn) == [(3, "c")]


def test_failed_commit_is_rolled_back_not_left_open(tmp_path: Path) -> None:
    # A deferred foreign key is checked at COMMIT: the COMMIT fails and SQLite leaves the
    # transaction open. Left so, the next writer's statements would join it.
    conn = _db(tmp_path)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(
        "CREATE TABLE child (id INTEGER PRIMARY KEY, "
        "parent INTEGER REFERENCES t (k) DEFERRABLE INITIALLY DEFERRED)"
    )

    def write() -> None:
        with atomic(conn):
            conn.execute("INSERT INTO t VALUES (1, 'a')")
            conn.execute("INSERT INTO child VALUES (1, 99)")  # no parent 99: fails at COMMIT

    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        write()
    assert not conn.in_transaction
    assert _rows(conn) == []
    assert conn.execute("SELECT count(*) FROM child").fetchone()[0] == 0


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


NOW = 1_800_000_000.0


def test_the_store_paths_leave_nothing_half_written(tmp_path: Path) -> None:
    """The store's own writers through atomic(): a checkpoint update and a TTL shed whose
    statements fail part-way (a trigger refuses) leave the cursor, the shed records and
    the events as they were, and no transaction open for the writer's next commit."""
    store = EventStore(tmp_path / "a.db", StoreSection(ttl_seconds=60.0))
    store.append([In(Event("s", q, priority=5, payload=b"x")) for q in range(1, 11)], now=NOW)
    store.conn.execute(
        "CREATE TRIGGER no_checkpoint BEFORE INSERT ON checkpoints "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    with pytest.raises(CommitFailed):
        store.mark_delivered(5, {"s": (0, 5)}, now=NOW)
    assert not store.conn.in_transaction
    assert read_cursor(store.conn) == 1  # written before the refused insert: rolled back
    store.conn.execute(
        "CREATE TRIGGER no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.expire(NOW + 3600)  # the shed record is written, then the delete refused
    assert not store.conn.in_transaction
    assert store.conn.execute("SELECT count(*) FROM shed").fetchone()[0] == 0
    assert store.conn.execute("SELECT count(*) FROM events").fetchone()[0] == 10
    store.conn.execute("DROP TRIGGER no_delete")
    store.conn.execute("DROP TRIGGER no_checkpoint")
    assert store.mark_delivered(5, {"s": (0, 5)}, now=NOW)  # the next commits go through
    assert store.expire(NOW + 3600) == 4  # 6-9 shed; 10, the stream's latest, kept
