"""The live snapshot (agent/livestate.py): one typed value, decoded totally, read from the
database row or the runtime file, whichever is newer and describes this database."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import livestate
from agent.identity import boot_id
from agent.livestate import (
    MAX_BYTES,
    MAX_COUNTERS,
    MAX_LINKS,
    BreakerLive,
    DaemonLive,
    LinkLive,
    LiveState,
    UplinkLive,
    decode,
    encode,
    file_id,
    write_file,
)
from agent.store import EventStore

FULL = LiveState(
    database="/var/lib/ironfleet/agent.db",
    runtime_file="/run/ironfleet/live.json",
    daemon=DaemonLive(pid=42, host="truck", boot_id="b", heartbeat=1.5e9, alarm="store full",
                      counters={"events_committed": 7}),
    link=LinkLive(name="x", state="up", controller="ecu0", boot_epoch=3, port="open",
                  device="/dev/x", frames_accepted=9, counters={"gaps": 1}, rejects={"crc": 2}),
    links=(LinkLive(name="x", state="up", controller="ecu0", boot_epoch=3, port="open",
                    device="/dev/x", frames_accepted=9, counters={"gaps": 1},
                    rejects={"crc": 2}),
           LinkLive(name="nav", state="down", port="reconnecting", device="/dev/y")),
    uplink=UplinkLive(state="connected", phase="live", broker="127.0.0.1:1883", delivered=5,
                      in_flight=1, next_attempt_in=0.0, counters={"last_convergence_s": 0.25}),
    breaker=BreakerLive(state="closed", failures=0, successes=3, retry_in=0.0, transitions=2),
    store={"events": 10, "loss_ratio": 0.0},
)  # fmt: skip


def test_encode_decode_round_trip() -> None:
    again = decode(encode(FULL), "database")
    assert dataclasses.replace(again, source="") == FULL
    assert again.problems == ()


def test_a_wrong_field_reads_as_its_default_and_is_named() -> None:
    doc = json.loads(encode(FULL))
    doc["daemon"]["pid"] = True  # a bool is not a pid
    doc["link"]["boot_epoch"] = 2**70  # past SQLite's and the protocol's range
    doc["uplink"]["counters"] = {"acks": 1e999}  # inf
    doc["breaker"] = "open"
    doc["store"] = {f"k{i}": i for i in range(MAX_COUNTERS + 1)}
    got = decode(json.dumps(doc))
    assert (got.daemon.pid, got.link.boot_epoch, dict(got.uplink.counters)) == (0, None, {})
    assert got.breaker == BreakerLive()
    assert dict(got.store) == {}
    assert set(got.problems) == {
        "daemon.pid", "link.boot_epoch", "uplink.counters", "breaker", "store",
    }  # fmt: skip
    assert got.daemon.alarm == "store full"  # the rest is kept


def test_a_newer_version_is_read_for_the_fields_known() -> None:
    doc = json.loads(encode(FULL)) | {"version": 2, "wheels": 6}
    doc["link"]["new_field"] = {"x": [1]}
    got = decode(json.dumps(doc))
    assert (got.version, got.link, got.problems) == (2, FULL.link, ())


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                               max_size=6),
    max_leaves=30,
)  # fmt: skip
_sections = st.fixed_dictionaries(
    {}, optional=dict.fromkeys(("version", "daemon", "link", "uplink", "breaker", "store",
                                "database"), _json),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _sections.map(lambda d: json.dumps(d).encode())))
def test_decode_is_total(data: bytes) -> None:
    got = decode(data)
    assert isinstance(got, LiveState)
    # Whatever came in, what goes out re-encodes as strict JSON (no NaN, no Infinity).
    json.loads(encode(got), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_oversized_snapshot_is_refused_unread() -> None:
    got = decode(b" " * (MAX_BYTES + 1))
    assert not got.published
    assert "larger" in got.problems[0]


# -- reading: the database row or the runtime file --------------------------------------


def _store_with(db: Path, live: LiveState) -> None:
    store = EventStore(db)
    store.publish(encode(live), live.daemon.heartbeat)
    store.close()


def _read(db: Path) -> LiveState:
    conn = sqlite3.connect(db)
    try:
        return livestate.read(conn)
    finally:
        conn.close()


def _live(db: Path, run: Path, beat: float, alarm: str = "") -> LiveState:
    return LiveState(
        database=os.path.realpath(db),
        runtime_file=str(run / "live.json"),
        daemon=DaemonLive(pid=1, heartbeat=beat, alarm=alarm, boot_id=boot_id()),
    )


def test_the_newer_of_row_and_file_wins(tmp_path: Path) -> None:
    db, run = tmp_path / "agent.db", tmp_path / "run"
    run.mkdir()
    _store_with(db, _live(db, run, 100.0))
    assert _read(db).source == "database"  # no file yet
    write_file(run / "live.json", encode(_live(db, run, 105.0, alarm="store full")))
    got = _read(db)
    assert (got.source, got.daemon.heartbeat, got.daemon.alarm) == ("runtime file", 105.0,
                                                                     "store full")  # fmt: skip
    _store_with(db, _live(db, run, 110.0))  # the database is writable again
    assert (_read(db).source, _read(db).daemon.heartbeat) == ("database", 110.0)


def test_a_file_about_another_database_is_never_read(tmp_path: Path) -> None:
    """A copy of the database on a laptop whose own agent writes /run/ironfleet/live.json."""
    db, run = tmp_path / "copy.db", tmp_path / "run"
    run.mkdir()
    _store_with(db, _live(db, run, 100.0))
    other = dataclasses.replace(_live(db, run, 999.0), database="/var/lib/ironfleet/agent.db")
    write_file(run / "live.json", encode(other))
    assert (_read(db).source, _read(db).daemon.heartbeat) == ("database", 100.0)


def test_the_row_names_only_a_live_json_file(tmp_path: Path) -> None:
    """The row is untrusted: it cannot make the CLI read some other file."""
    db = tmp_path / "agent.db"
    secret = tmp_path / "secret.json"
    secret.write_text(encode(_live(db, tmp_path, 500.0)))
    _store_with(db, dataclasses.replace(_live(db, tmp_path, 100.0), runtime_file=str(secret)))
    assert _read(db).daemon.heartbeat == 100.0


def test_write_file_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "live.json"
    for beat in (1.0, 2.0):
        write_file(path, encode(dataclasses.replace(FULL, daemon=DaemonLive(heartbeat=beat))))
    assert decode(path.read_bytes()).daemon.heartbeat == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json"]
    assert path.stat().st_mode & 0o007 == 0  # never readable by others (0640 less the umask)


def test_a_row_naming_a_fifo_a_link_or_garbage_never_hangs_or_crashes(tmp_path: Path) -> None:
    """The row is untrusted: a FIFO (a read would block), a symlink, a NUL in the path."""
    db = tmp_path / "agent.db"
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "live.json")
    (tmp_path / "link").mkdir()
    write_file(tmp_path / "real.json", encode(_live(db, tmp_path, 900.0)))
    (tmp_path / "link" / "live.json").symlink_to(tmp_path / "real.json")
    for named in (tmp_path / "fifo" / "live.json", tmp_path / "link" / "live.json",
                  "/tmp/a\x00b/live.json"):  # fmt: skip
        _store_with(db, dataclasses.replace(_live(db, tmp_path, 100.0), runtime_file=str(named)))
        got = _read(db)
        assert (got.source, got.daemon.heartbeat) == ("database", 100.0), named


def test_a_file_from_another_boot_or_another_inode_is_not_read(tmp_path: Path) -> None:
    db, run = tmp_path / "agent.db", tmp_path / "run"
    run.mkdir()
    _store_with(db, _live(db, run, 100.0))
    newer = _live(db, run, 200.0)
    for stale in (
        dataclasses.replace(newer, daemon=dataclasses.replace(newer.daemon, boot_id="other")),
        dataclasses.replace(newer, database_id="1:2"),  # a copy at the same path
    ):
        write_file(run / "live.json", encode(stale))
        assert _read(db).daemon.heartbeat == 100.0
    write_file(run / "live.json", encode(dataclasses.replace(newer, database_id=file_id(db))))
    assert _read(db).daemon.heartbeat == 200.0


def test_the_controllers_links_are_bounded_and_each_read_on_its_own() -> None:
    """`links` (one per [[serial]] entry): more than MAX_LINKS, or not a list, reads as
    none; a bad field in one link is named by its index and the link is kept."""
    doc = json.loads(encode(FULL))
    doc["links"][1]["boot_epoch"] = "seven"
    got = decode(json.dumps(doc))
    assert [k.name for k in got.controllers] == ["x", "nav"]
    assert got.links[1].boot_epoch is None
    assert got.problems == ("links[1].boot_epoch",)
    for bad in ([doc["links"][0]] * (MAX_LINKS + 1), {"0": {}}, [1, 2], "x"):
        got = decode(json.dumps(doc | {"links": bad}))
        assert got.links == ()
        assert got.controllers == (got.link,)  # an older agent's snapshot: its one link
        assert "links" in got.problems
    stopped = FULL.stopped(2.0e9)
    assert [(k.state, k.port) for k in stopped.controllers] == [("down", "closed")] * 2
