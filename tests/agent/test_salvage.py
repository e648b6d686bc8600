"""Page-level salvage (issue 12, finding 7) on real damaged SQLite files.

Files are made by the real EventStore, then damaged as a disk would: truncated to half,
one page of the events b-tree overwritten with garbage, an interior page lost, a torn
WAL frame. Salvage goes into a fresh, migrated database, the way EventStore calls it;
one test starts the real `ironfleet-agent` on a damaged state dir.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.migrations import migrate, seed_controller_epochs
from agent.resilience import Event
from agent.salvage import LOST_REASON, SalvageReport, salvage
from agent.store import EventStore, connect

from simharness import AgentProcess, Sim, TruthReader, agent_state, stored_events

pytestmark = pytest.mark.timeout(120)

PAGE = 4096
EVENTS = 24_000
STREAMS = 40
CURSOR = 5001  # the fleet acknowledged rowids 1..5000


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu9"


def build(db: Path, events: int = EVENTS, *, close: bool = True) -> EventStore:
    """A store of `events` events over STREAMS streams, cursor and one checkpoint set."""
    store = EventStore(db)
    seqs = [0] * STREAMS
    for start in range(0, events, 500):
        batch = []
        for i in range(start, min(events, start + 500)):
            seqs[i % STREAMS] += 1
            payload = bytes([i % 251]) * (60 + i % 80)
            event = Event(
                f"old/s{i % STREAMS:02d}",
                seqs[i % STREAMS],
                boot_epoch=1,
                ts=float(i),
                payload=payload,
            )
            batch.append(In(event))
        store.append(batch)
    store.mark_delivered(CURSOR - 1, {"old/s01": (1, 100)})
    if close:
        store.close()
    return store


def rows(db: Path) -> dict[int, tuple[object, ...]]:
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return {r[0]: r for r in conn.execute("SELECT * FROM events")}
    finally:
        conn.close()


def leaves(db: Path, table: str = "events") -> list[tuple[int, int]]:
    """(page number, rows on it) of every leaf of `table`, by page number (dbstat)."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
            (table,),
        ).fetchall()
    finally:
        conn.close()


def root_page(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(
            conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[
                0
            ]
        )
    finally:
        conn.close()


def overwrite_page(db: Path, number: int, data: bytes) -> None:
    with db.open("r+b") as fh:
        fh.seek((number - 1) * PAGE)
        fh.write(data)


def salvage_into(source: Path, dest: Path) -> tuple[SalvageReport, sqlite3.Connection]:
    """What EventStore does after the quarantine: connect, migrate, salvage."""
    conn = connect(dest)
    migrate(conn)
    report = salvage(source, conn)
    seed_controller_epochs(conn)
    return report, conn


def state(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM agent_state").fetchall())


def test_half_truncated_file_keeps_every_row_of_the_intact_half(tmp_path: Path) -> None:
    """Old code: 0 rows (`max(id)` failed on the truncated tree), cursor and checkpoints
    dropped (everything resent)."""
    db = tmp_path / "agent.db"
    build(db)
    original = rows(db)
    half = db.stat().st_size // 2 // PAGE
    intact = sum(n for page, n in leaves(db) if page <= half)
    assert root_page(db, "agent_state") <= half
    assert root_page(db, "checkpoints") <= half
    assert root_page(db, "stream_epochs") <= half
    os.truncate(db, half * PAGE)

    report, conn = salvage_into(db, tmp_path / "new.db")
    assert report.events >= 0.95 * intact
    assert report.events == intact  # measured: every row of the intact half
    saved = {r[0]: r for r in conn.execute("SELECT * FROM events")}
    assert all(original[rowid] == row for rowid, row in saved.items())  # byte-equal
    assert state(conn)["uplink.cursor"] == str(CURSOR)
    assert conn.execute("SELECT boot_epoch, seq FROM checkpoints").fetchall() == [(1, 100)]
    assert report.rows["streams"] == STREAMS
    # Lost: the rows past the intact half; stream_epochs (intact) names the newest rowid.
    assert report.max_id == EVENTS
    assert report.lost_unacked_estimate == report.lost_estimate == EVENTS - intact
    shed = conn.execute("SELECT reason, sum(count) FROM shed GROUP BY reason").fetchall()
    assert shed == [(LOST_REASON, EVENTS - intact)]
    assert json.loads(state(conn)["store.salvage"])["rows"]["events"] == intact
    assert "lost_estimate=" in state(conn)["alarm.store_salvage"]
    conn.close()


def test_one_bad_page_loses_only_that_pages_rows(tmp_path: Path) -> None:
    """Old code: the 1,000-row chunk holding the bad page was skipped whole."""
    db = tmp_path / "agent.db"
    build(db)
    original = rows(db)
    pages = leaves(db)
    victim, on_page = pages[len(pages) // 2]
    overwrite_page(db, victim, os.urandom(PAGE))

    report, conn = salvage_into(db, tmp_path / "new.db")
    assert report.events == EVENTS - on_page
    saved = {r[0] for r in conn.execute("SELECT id FROM events")}
    missing = sorted(set(original) - saved)
    assert len(missing) == on_page
    assert missing == list(range(missing[0], missing[-1] + 1))  # one page: one rowid run
    assert report.lost_ranges == ((missing[0], missing[-1]),)
    assert report.lost_estimate == on_page
    shed = conn.execute("SELECT reason, count, first_rowid, last_rowid FROM shed").fetchall()
    assert shed == [(LOST_REASON, on_page, missing[0], missing[-1])]
    assert state(conn)["uplink.cursor"] == str(CURSOR)
    conn.close()


def test_lost_interior_page_rows_come_back_without_resurrecting_deleted_ones(
    tmp_path: Path,
) -> None:
    """The events root is garbage: every leaf is an orphan, placed by its shape; the
    pages freed by an earlier prune (stale rows) stay dead."""
    db = tmp_path / "agent.db"
    build(db)
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM events WHERE id < ?", (CURSOR,))  # as the acked prune does
    conn.commit()
    conn.close()
    live = rows(db)
    overwrite_page(db, root_page(db, "events"), b"\xa5" * PAGE)

    report, conn = salvage_into(db, tmp_path / "new.db")
    assert {r[0]: r for r in conn.execute("SELECT * FROM events")} == live
    assert report.orphans_mapped >= len(live)
    assert report.lost_unacked_estimate == 0
    conn.close()


def test_a_garbage_free_list_cannot_hide_live_pages(tmp_path: Path) -> None:
    """The free-list trunk rewritten to list every live events leaf: the tree walk still
    reads them all (the free list only keeps stale pages out of the orphan scan)."""
    db = tmp_path / "agent.db"
    build(db, events=6000)
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM events WHERE id < ?", (CURSOR,))
    conn.commit()
    conn.close()
    live = rows(db)
    header = db.read_bytes()[:100]
    trunk = int.from_bytes(header[32:36], "big")
    assert trunk, "the prune freed no page"
    pages = [page for page, _ in leaves(db)]
    listing = (0).to_bytes(4, "big") + len(pages).to_bytes(4, "big")
    listing += b"".join(page.to_bytes(4, "big") for page in pages)
    overwrite_page(db, trunk, listing.ljust(PAGE, b"\0"))
    report, conn = salvage_into(db, tmp_path / "new.db")
    assert {r[0]: r for r in conn.execute("SELECT * FROM events")} == live
    assert report.orphans_mapped == 0
    conn.close()


def test_committed_wal_frames_are_read_and_a_torn_commit_is_not(tmp_path: Path) -> None:
    """A crash image (database + WAL copied while the writer runs): every committed
    transaction in the WAL is salvaged; a torn last frame drops only its transaction."""
    db = tmp_path / "live" / "agent.db"
    db.parent.mkdir()
    store = build(db, events=3000, close=False)
    image = tmp_path / "image"
    image.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(f"{db}{suffix}", image / f"agent.db{suffix}")
    store.close()
    wal = image / "agent.db-wal"
    assert wal.stat().st_size > 32 + 24 + PAGE  # the events really are in the WAL

    report, conn = salvage_into(image / "agent.db", tmp_path / "whole.db")
    assert report.events == 3000
    assert state(conn)["uplink.cursor"] == str(CURSOR)
    conn.close()

    # Tear the last frame: the last transaction (the cursor update) is not committed.
    with wal.open("r+b") as fh:
        fh.seek(wal.stat().st_size - 100)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    report, conn = salvage_into(image / "agent.db", tmp_path / "torn.db")
    assert report.events == 3000
    assert "uplink.cursor" not in state(conn)
    conn.close()


def test_garbage_file_and_zero_budget_never_raise(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(64 * 1024))
    report, conn = salvage_into(junk, tmp_path / "a.db")
    assert report.events == 0
    conn.close()
    db = tmp_path / "agent.db"
    build(db, events=2000)
    conn = connect(tmp_path / "b.db")
    migrate(conn)
    clock = iter([0.0, *[10.0] * 1000]).__next__
    report = salvage(db, conn, budget=1.0, clock=clock)
    assert report.timed_out
    assert "timed_out=true" in report.summary()
    conn.close()


def test_missing_source_is_an_empty_salvage(tmp_path: Path) -> None:
    report, conn = salvage_into(tmp_path / "gone.db", tmp_path / "a.db")
    assert (report.events, report.pages) == (0, 0)
    conn.close()


@pytest.mark.parametrize("seed", range(8))
def test_random_damage_never_raises_and_keeps_rows_true(tmp_path: Path, seed: int) -> None:
    """Garbage runs at random offsets (cell pointers, headers, payloads, the schema page):
    salvage never raises, the result is a sound database, and a saved row whose rowid
    the original had is that row unless its own bytes were hit."""
    db = tmp_path / "agent.db"
    build(db, events=3000)
    original = rows(db)
    rng = random.Random(seed)
    data = bytearray(db.read_bytes())
    for _ in range(12):
        size = rng.randrange(1, 300)
        at = rng.randrange(len(data) - size)
        data[at : at + size] = rng.randbytes(size)
    db.write_bytes(bytes(data))
    report, conn = salvage_into(db, tmp_path / "new.db")
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert report.events <= len(original)
    saved = {r[0]: r for r in conn.execute("SELECT * FROM events")}
    assert sum(1 for rowid, row in saved.items() if original.get(rowid) == row) >= 0.9 * len(saved)
    print(f"seed={seed} {report.summary()}")
    conn.close()


def test_salvaged_store_opens_and_never_reuses_a_rowid(tmp_path: Path) -> None:
    """Quarantine, salvage, then EventStore opens the result as healthy and serves."""
    db = tmp_path / "agent.db"
    build(db)
    half = db.stat().st_size // 2 // PAGE
    os.truncate(db, half * PAGE)
    quarantined = tmp_path / "agent.db.corrupt-test"
    db.rename(quarantined)
    report, conn = salvage_into(quarantined, db)
    conn.close()
    store = EventStore(db)
    assert store.quarantined is None
    assert store.cursor == CURSOR
    assert store.checkpoint("old/s01") == (1, 100)
    assert store.event_count == report.events
    high: dict[str, int] = {}
    for stored in store.iter_events():
        high[stored.event.stream] = max(high.get(stored.event.stream, 0), stored.event.seq)
    assert {e.stream: e.seq for e in store.latest()} == high  # replay from the rebuild
    fresh = In(Event("new/s", 1, boot_epoch=7, ts=1.0, payload=b"x"), controller_id="ecu1")
    assert store.append([fresh]).stored == 1
    top = store.conn.execute("SELECT max(id) FROM events").fetchone()[0]
    assert top == report.max_id + 1 == EVENTS + 1  # no rowid of the lost tail reused
    store.close()


def test_daemon_start_quarantines_salvages_reports_and_serves(
    start_sim: Callable[..., Sim], start_agent: Callable[..., AgentProcess]
) -> None:
    """The real `ironfleet-agent run` on a half-truncated state dir. Needs EventStore to
    call `salvage` (the one-line wiring); the old row walk saved 0 rows of this file."""
    sim = start_sim("--rate", "500", "--events", "1000")
    agent = start_agent(sim.devices["ecu0"])
    agent.db.parent.mkdir(mode=0o750)
    build(agent.db)
    half = agent.db.stat().st_size // 2 // PAGE
    intact = sum(n for page, n in leaves(agent.db) if page <= half)
    os.truncate(agent.db, half * PAGE)
    began = time.monotonic()
    agent.start()
    assert sim.wait(timeout=90) == 0
    assert agent.terminate() == 0
    assert time.monotonic() - began < 90
    assert list(agent.db.parent.glob("agent.db.corrupt-*"))
    st = agent_state(agent.db)
    assert "alarm.store_quarantined" in st
    report = json.loads(st["store.salvage"])
    assert report["rows"]["events"] >= 0.95 * intact
    assert st["uplink.cursor"] == str(CURSOR)
    stored = stored_events(agent.db)
    assert sum(1 for key in stored if key[0].startswith("old/")) == report["rows"]["events"]
    truth = TruthReader(sim.truth_path)
    truth.poll()
    assert len(truth.acked) == 1000
    assert all(key in stored for key in truth.acked)  # served: every ACKed event stored
    assert b"store_salvaged" in agent.log.read_bytes()
