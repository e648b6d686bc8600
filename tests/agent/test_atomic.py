"""`storedb.atomic`: every write transaction of the store is all or nothing, and the
connection is never left inside a transaction, whatever failed (a statement, Python code
between statements, or the COMMIT itself)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.storedb import atomic, connect


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
