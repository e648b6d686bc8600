"""`ironfleet`, the technician CLI, as a real process against databases real daemons wrote.

- every command answers, as a table and as JSON, with the values the database holds
  (checked against direct read-only SQL and the simulator's ground truth): a controller
  reboot under line noise leaves open gaps, a killed broker opens the breaker, a tiny
  buffer makes the ladder shed;
- the CLI's connection cannot write, a missing database is one line and a failure, a
  slow query is stopped by --timeout, `events --follow` stops cleanly on Ctrl-C;
- four CLI processes looping over every command while the daemon ingests cost it no
  commit failure and do not stop the controller's ACKs.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from agent.cli import cli, main
from agent.cliaccess import open_readonly
from agent.store import EventStore

from simharness import AgentProcess, Broker, Sim, TruthReader, live
from support import wait_for

IRONFLEET = str(Path(sys.executable).with_name("ironfleet"))
OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]

# Arguments that make each command run (query needs its SQL).
COMMAND_ARGS: dict[str, list[str]] = {"query": ["query", "SELECT count(*) AS n FROM streams"]}
SLOW_SQL = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ironfleet ARGS` as a process; IRONFLEET_DB from the test environment is ignored."""
    base = {k: v for k, v in os.environ.items() if k != "IRONFLEET_DB"}
    return subprocess.run(
        [IRONFLEET, *args], capture_output=True, text=True, env={**base, **(env or {})},
        timeout=60, check=False,
    )  # fmt: skip


def ok(*args: str) -> str:
    """stdout of a command that must succeed."""
    result = run(*args)
    assert result.returncode == 0, f"ironfleet {' '.join(args)}: {result.stderr}"
    return result.stdout


def as_json(*args: str) -> Any:
    return json.loads(ok(*args, "--json"))


def sql(db: Path, query: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Direct read-only SQL: the reference the CLI output is checked against."""
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def fresh_store(tmp_path: Path) -> Path:
    """A migrated, empty agent database made by the real store."""
    path = tmp_path / "agent.db"
    EventStore(path).close()
    return path


# -- no daemon needed ------------------------------------------------------------------------


def test_every_command_has_help() -> None:
    top = ok("--help")
    assert cli.commands, "the group has commands"
    for name, command in cli.commands.items():
        assert name in top, f"`ironfleet --help` does not list {name}"
        result = run(name, "--help")
        assert result.returncode == 0, f"{name} --help: {result.stderr}"
        assert f"Usage: ironfleet {name}" in result.stdout
        assert command.help, f"{name} has no help text"
        assert "--json" in result.stdout, f"{name} has no --json"


def test_every_command_is_documented() -> None:
    text = OPERATIONS.read_text()
    for name in cli.commands:
        assert f"ironfleet {name}" in text, f"docs/operations.md never shows `ironfleet {name}`"


def test_missing_database_is_one_line_and_a_failure(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "agent.db"
    for name in cli.commands:
        if name == "doctor":
            continue  # doctor reports it among its checks, below
        result = run("--db", str(missing), *COMMAND_ARGS.get(name, [name]))
        assert result.returncode != 0, name
        assert result.stdout == "", name
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"{name}: {result.stderr!r}"
        assert str(missing) in lines[0], lines[0]
        assert "--db" in lines[0], lines[0]
    via_env = run("status", env={"IRONFLEET_DB": str(missing)})
    assert via_env.returncode == 1
    assert "(from IRONFLEET_DB)" in via_env.stderr
    no_config = run("--config", str(tmp_path / "agent.toml"), "status")
    assert no_config.returncode == 1
    assert len(no_config.stderr.strip().splitlines()) == 1
    assert "agent.toml" in no_config.stderr
    assert "--db" in no_config.stderr
    doctor = run("--db", str(missing), "--config", str(tmp_path / "agent.toml"), "doctor", "--json")
    assert doctor.returncode == 1
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["config"]["status"] == "fail"
    assert checks["database"]["status"] == "fail"


def test_doctor_warns_loudly_about_unsigned_fleet_messages(tmp_path: Path) -> None:
    db = fresh_store(tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{tmp_path}"\n[uplink]\nallow_unsigned = true\n')
    doctor = run("--db", str(db), "--config", str(config), "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["fleet trust"]["status"] == "warn"
    assert "allow_unsigned = true" in checks["fleet trust"]["detail"]
    assert "WARN  fleet trust" in run("--db", str(db), "--config", str(config), "doctor").stdout


@pytest.mark.parametrize(
    "args",
    [
        ["query", "SELECT '\udcff'"],  # the byte 0xff, as Python receives it from argv
        ["events", "--stream", "\udce9"],
        ["events", "--limit", str(2**63)],
        ["gaps", "--limit", "1000001"],
        ["--timeout", "nan", "status"],
        ["--timeout", "inf", "status"],
        ["--timeout", "1e308", "status"],
    ],
)
def test_hostile_arguments_are_usage_errors_not_tracebacks(
    tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by fuzzing (tests/chaos/fuzz_cli.py): each of these was a traceback."""
    db = fresh_store(tmp_path)
    try:
        code = main(["--db", str(db), *args])
    except SystemExit as exc:  # click's usage errors
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "not valid UTF-8" in err or "Invalid value" in err, err


@pytest.mark.parametrize(
    "pragma",
    ["PRAGMA wal_checkpoint(TRUNCATE)", "PRAGMA wal_checkpoint", "PRAGMA optimize",
     "PRAGMA user_version = 7", "PRAGMA journal_mode = DELETE", "PRAGMA query_only = 0",
     "PRAGMA incremental_vacuum"],
)  # fmt: skip
def test_query_refuses_pragmas_that_act(tmp_path: Path, pragma: str) -> None:
    """`PRAGMA wal_checkpoint(TRUNCATE)` on the read-only connection used to checkpoint
    and truncate the daemon's WAL (found by fuzzing): only reading PRAGMAs may run."""
    db = fresh_store(tmp_path)
    writer = sqlite3.connect(db)  # a live WAL, as under a running daemon
    writer.execute("INSERT INTO agent_state (key, value, updated_at) VALUES ('k', 'v', 0)")
    writer.commit()
    wal = db.with_name(db.name + "-wal")
    size = wal.stat().st_size
    result = run("--db", str(db), "query", pragma)
    assert result.returncode == 1, result.stdout
    assert "refused" in result.stderr, result.stderr
    assert wal.stat().st_size == size > 0
    writer.close()
    for read in ("PRAGMA page_count", "PRAGMA table_info(events)", "PRAGMA quick_check"):
        assert run("--db", str(db), "query", read).returncode == 0, read


def test_the_cli_connection_cannot_write(tmp_path: Path) -> None:
    db = fresh_store(tmp_path)
    conn = open_readonly(db, timeout=2.0)
    try:
        assert conn.execute("PRAGMA query_only").fetchone()[0] == 1
        for statement in (
            "DELETE FROM events",
            "INSERT INTO agent_state (key, value, updated_at) VALUES ('x', 'y', 0)",
            "CREATE TABLE scratch (x)",
            "BEGIN IMMEDIATE",  # not even the write lock
        ):
            with pytest.raises(sqlite3.OperationalError, match=r"readonly|attempt to write"):
                conn.execute(statement)
        for statement in (  # nor create or write any other file
            f"ATTACH DATABASE '{tmp_path / 'other.db'}' AS other",
            f"VACUUM INTO '{tmp_path / 'copy.db'}'",
            "PRAGMA query_only = 0",
        ):
            with pytest.raises(sqlite3.DatabaseError, match=r"not authorized|authorization"):
                conn.execute(statement)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "agent.db", "agent.db-shm", "agent.db-wal",
        ]  # fmt: skip
    finally:
        conn.close()
    result = run("--db", str(db), "query", "DELETE FROM agent_state")
    assert result.returncode == 1
    assert "read-only" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_timeout_stops_a_slow_query(tmp_path: Path) -> None:
    db = fresh_store(tmp_path)
    conn = open_readonly(db, timeout=0.2)
    try:
        with pytest.raises(sqlite3.OperationalError, match="interrupted"):
            conn.execute(SLOW_SQL).fetchall()
    finally:
        conn.close()
    result = run("--db", str(db), "--timeout", "0.3", "query", SLOW_SQL)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "ironfleet: query timed out after 0.3 s and was stopped "
        "(raise --timeout, or narrow the query)"
    )
    # The same query, bounded, answers under the same deadline.
    bounded = SLOW_SQL.replace("FROM c)", "FROM c WHERE x < 1000)")
    assert json.loads(ok("--db", str(db), "--timeout", "0.3", "query", bounded, "--json")) == [
        {"count(*)": 1000}
    ]


# -- against a real daemon ------------------------------------------------------------------


def wait_ingest(truth: TruthReader, more: int, what: str) -> None:
    truth.poll()
    target = len(truth.acked) + more
    wait_for(lambda: truth.poll() or len(truth.acked) >= target, 30, what)


def open_gaps(db: Path) -> list[tuple[Any, ...]]:
    return sql(db, "SELECT id FROM gaps WHERE closed_at IS NULL ORDER BY id")


def cause_open_gaps(sim_control: Path, db: Path, truth: TruthReader) -> None:
    """Reboot the controller under line noise until a gap stays open (events lost in RAM)."""
    for _ in range(5):
        with sim_control.open("a") as fh:
            fh.write("noise 2 0.002\n")
        wait_ingest(truth, 200, "ingest under noise")
        with sim_control.open("a") as fh:
            fh.write("reboot\n")
        wait_ingest(truth, 300, "ingest after the reboot")
        if open_gaps(db):
            return
    raise AssertionError("five reboots under noise left no open gap")


class FollowReader:
    """`ironfleet events --follow` in a process; its stdout lines land in a queue."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [IRONFLEET, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def take(self, count: int) -> list[str]:
        return [self.lines.get(timeout=20) for _ in range(count)]

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, err


def test_commands_on_a_live_daemon_database(
    tmp_path: Path, start_sim: StartSim, start_agent: StartAgent, broker: Broker
) -> None:
    control = tmp_path / "sim-control"
    sim = start_sim("--rate", "300", "--streams", "4", "--control", str(control))
    agent = start_agent(
        sim.devices["ecu0"],
        uplink={"enabled": True, "port": broker.port, "ack_mode": "broker",
                "breaker_failure_threshold": 2, "breaker_recovery_timeout": 120.0,
                "reconnect_min": 0.1, "reconnect_max": 0.2, "batch_max_delay_ms": 20.0},
    ).start()  # fmt: skip
    truth = TruthReader(sim.truth_path)
    wait_for(agent.started, 30, "the agent to start")
    wait_ingest(truth, 500, "ingest")
    cause_open_gaps(control, agent.db, truth)
    cfg = ("--config", str(agent.config))
    epoch = sql(agent.db, "SELECT max(boot_epoch) FROM stream_epochs")[0][0]
    assert epoch >= 2
    wait_for(
        lambda: sql(agent.db, "SELECT count(*) FROM checkpoints")[0][0] == 4,
        30,
        "a checkpoint for every stream",
    )

    # Live: is the controller talking, is the fleet acknowledging?
    status = as_json(*cfg, "status")
    assert status["database"] == str(agent.db)
    assert status["daemon"]["live"] is True
    assert agent.proc is not None
    assert status["daemon"]["pid"] == agent.proc.pid
    assert status["daemon"]["heartbeat_age_s"] < 5
    assert status["link"] | {"last_event_at": 0, "last_event_age_s": 0} == {
        "name": Path(sim.devices["ecu0"]).name, "state": "up", "controller": "ecu0",
        "boot_epoch": epoch, "port": "open", "device": sim.devices["ecu0"],
        "last_event_at": 0, "last_event_age_s": 0,
    }  # fmt: skip
    assert status["fleet"]["uplink"] == "connected"
    assert status["fleet"]["breaker"] == "closed"
    assert status["fleet"]["last_ack_age_s"] < 10
    assert status["buffer"]["streams"] == 4
    assert status["buffer"]["events"] > 1000
    assert status["gaps"]["open"] >= 1
    assert status["daemon"]["counters"]["commit_failures"] == 0
    # Flash wear from the daemon's own I/O counter: WAL frames and pages, so above the
    # payload's few bytes per event; no budget configured, so no projection.
    flash = status["flash"]
    assert flash["write_bytes"] > 0, flash
    assert flash["bytes_per_event"] > 20, flash
    assert flash["years_left"] is None
    text = ok(*cfg, "status")
    assert f"running, pid {agent.proc.pid}" in text
    assert f"ecu0, boot epoch {epoch}; serial link up" in text

    link = as_json("--db", str(agent.db), "link")
    assert (link["state"], link["controller"], link["boot_epoch"]) == ("up", "ecu0", epoch)
    assert link["device"] == sim.devices["ecu0"]
    assert link["counters"]["controller_reboots"] >= 1
    assert link["events_last_10s"] > 0
    assert link["last_event_stream"].startswith("ecu0/s00")
    assert f"ecu0 (boot epoch {epoch})" in ok(*cfg, "link")

    assert as_json(*cfg, "breaker")["state"] == "closed"
    doctor = run(*cfg, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert doctor.returncode == 0, checks
    assert checks["device"]["status"] == "ok"
    assert f"the agent has {sim.devices['ecu0']} open" in checks["device"]["detail"]
    assert checks["daemon"]["status"] == "ok"
    assert checks["fleet trust"]["status"] == "ok", checks["fleet trust"]
    assert checks["uplink"]["status"] == "ok", checks["uplink"]
    assert f"broker 127.0.0.1:{broker.port}" in checks["uplink"]["detail"]
    assert "closed" in ok(*cfg, "breaker")

    # events --follow: new rows keep coming; Ctrl-C stops it cleanly.
    follow = FollowReader(*cfg, "events", "--follow", "--json", "--stream", "ecu0/s001")
    rows = [json.loads(line) for line in follow.take(20 + 30)]  # 20 recent, then new ones
    code, err = follow.interrupt()
    assert code == 0
    assert err == ""
    assert {r["stream"] for r in rows} == {"ecu0/s001"}
    ids = [r["id"] for r in rows]
    assert ids == sorted(set(ids))
    assert all(set(r["signals"]) == {"v", "x", "ok"} for r in rows)
    text_follow = FollowReader(*cfg, "events", "-f", "--limit", "3")
    header, *lines = text_follow.take(1 + 10)
    assert text_follow.interrupt()[0] == 0
    assert header.split()[:3] == ["id", "received", "stream"]
    assert all("ecu0/s00" in line and "v=" in line for line in lines)

    # The broker dies: the breaker opens, and says why, naming the broker and the errno.
    broker.stop(signal.SIGKILL)
    wait_for(lambda: as_json(*cfg, "breaker")["state"] == "open", 30, "the breaker to open")
    view = as_json(*cfg, "breaker")
    address = f"127.0.0.1:{broker.port}"
    assert view["uplink"] == "disconnected"
    assert view["failures"] >= 2
    assert 0 < view["retry_in_s"] <= 120
    assert view["broker"] == address
    assert any("uplink disconnected" in why and address in why for why in view["why"])
    text = ok(*cfg, "breaker")
    assert "open (next probe in about" in text
    assert address in text
    # Which failure came last depends on timing (the connection's loss, a refused or an
    # unanswered reconnect): each names the broker's address.
    wait_for(lambda: address in as_json(*cfg, "breaker")["last_error"], 30, "a named failure")
    wait_ingest(truth, 300, "ingest goes on with the uplink down")
    status = as_json(*cfg, "status")
    assert status["backlog"]["unacked_events"] > 0
    assert status["fleet"]["broker"] == address
    assert address in status["fleet"]["last_error"]
    assert f"last error: {status['fleet']['last_error']}" in ok(*cfg, "status")
    # A heartbeat is not health: events wait and the fleet has not acked for longer than
    # the bound, so doctor fails on the uplink (and only warns within the bound).
    wait_for(lambda: as_json(*cfg, "status")["fleet"]["last_ack_age_s"] > 1.5, 30, "ack age")
    late = run(*cfg, "doctor", "--max-ack-age", "1", "--json")
    uplink = {c["name"]: c for c in json.loads(late.stdout)["checks"]}["uplink"]
    assert late.returncode == 1, uplink
    assert uplink["status"] == "fail"
    assert "events wait" in uplink["detail"]
    assert f"make {address} reachable" in uplink["detail"]
    assert f"last error: {status['fleet']['last_error']}" in uplink["detail"]
    within = run(*cfg, "doctor", "--json")
    assert {c["name"]: c for c in json.loads(within.stdout)["checks"]}["uplink"]["status"] == "warn"
    assert "FAIL  uplink" in run(*cfg, "doctor", "--max-ack-age", "1").stdout

    # Stopped: the database no longer changes, so every figure can be checked exactly.
    sim.signal(signal.SIGTERM)
    assert sim.wait(timeout=30) == 0
    assert agent.terminate() == 0
    db = agent.db
    truth.poll()

    status = as_json(*cfg, "status")
    cursor = int(sql(db, "SELECT value FROM agent_state WHERE key = 'uplink.cursor'")[0][0])
    assert status["buffer"]["events"] == sql(db, "SELECT count(*) FROM events")[0][0]
    assert (
        status["backlog"]["unacked_events"]
        == (sql(db, "SELECT count(*) FROM events WHERE id >= ?", (cursor,))[0][0])
    )
    assert status["fleet"]["cursor"] == cursor
    assert status["gaps"]["open"] == len(open_gaps(db))
    assert status["gaps"]["total"] == sql(db, "SELECT count(*) FROM gaps")[0][0]
    assert f"{status['buffer']['events']:,} events in 4 streams" in ok(*cfg, "status")

    names = [f"ecu0/s{k:03d}" for k in range(4)]
    latest = {
        name: (epoch, seq)
        for name, epoch, seq in sql(
            db,
            "SELECT s.name, e.boot_epoch, max(e.seq) FROM events e JOIN streams s "
            "ON s.id = e.stream_id WHERE e.boot_epoch = ? GROUP BY s.name",
            (epoch,),
        )
    }
    streams = as_json(*cfg, "streams")
    assert [s["stream"] for s in streams] == names
    for s in streams:
        assert (s["controller"], s["boot_epoch"]) == ("ecu0", epoch)
        assert s["high_seq"] == latest[s["stream"]][1]
    text = ok(*cfg, "streams")
    assert all(name in text for name in names)

    replay = as_json(*cfg, "replay")
    assert [r["stream"] for r in replay] == names  # one row per stream, sorted
    acked_top: dict[str, tuple[int, int]] = {}
    for stream, epoch, seq in truth.acked:
        acked_top[stream] = max(acked_top.get(stream, (0, 0)), (epoch, seq))
    for r in replay:
        assert (r["boot_epoch"], r["seq"]) == latest[r["stream"]]  # the highest stored
        assert (r["boot_epoch"], r["seq"]) >= acked_top[r["stream"]]
        payload = sql(db, "SELECT payload FROM events WHERE id = ?", (r["id"],))[0][0]
        assert r["signals"] == msgpack.unpackb(payload)
    text = ok(*cfg, "replay")
    for name in names:
        assert re.search(rf"^{name}\s+{epoch}\s+{latest[name][1]}\s+telemetry", text, re.M)

    gaps = as_json(*cfg, "gaps", "--limit", "10000")
    assert [g["id"] for g in gaps] == [r[0] for r in open_gaps(db)]
    assert all(g["open"] and g["missing"] > 0 for g in gaps)
    assert any(g["boot_epoch"] < epoch for g in gaps)  # lost in the controller's RAM
    every = as_json(*cfg, "gaps", "--all", "--limit", "10000")
    assert [g["id"] for g in every] == [r[0] for r in sql(db, "SELECT id FROM gaps ORDER BY id")]
    text = ok(*cfg, "gaps")
    first = gaps[0]
    assert f"{first['first_seq']}..{first['last_seq']}" in text
    assert f"{len(gaps)} open" in text

    recent = as_json(*cfg, "events", "--stream", "ecu0/s002", "--limit", "50")
    top_ids = sql(
        db,
        "SELECT e.id FROM events e JOIN streams s ON s.id = e.stream_id "
        "WHERE s.name = 'ecu0/s002' ORDER BY e.id DESC LIMIT 50",
    )
    assert [r["id"] for r in recent] == [r[0] for r in reversed(top_ids)]
    assert all(r["kind"] == "telemetry" and r["signals"]["ok"] is True for r in recent)
    assert len(as_json(*cfg, "events", "--stream", "ecu0/*", "--since", "1h", "--limit", "7")) == 7
    assert as_json(*cfg, "events", "--kind", "no-such-kind") == []
    assert as_json(*cfg, "events", "--until", "1d") == []  # nothing older than a day
    bad = run(*cfg, "events", "--stream", "ecu9/*")
    assert bad.returncode == 1
    assert "no stream matches" in bad.stderr

    checkpoints = as_json(*cfg, "checkpoints")
    stored = {
        name: (epoch, seq)
        for name, epoch, seq in sql(
            db, "SELECT s.name, c.boot_epoch, c.seq FROM checkpoints c JOIN streams s "
            "ON s.id = c.stream_id",
        )
    }  # fmt: skip
    assert {c["stream"]: (c["acked_boot_epoch"], c["acked_seq"]) for c in checkpoints} == stored
    assert f"events below id {cursor:,} acknowledged" in ok(*cfg, "checkpoints")

    assert as_json(*cfg, "shed") == []
    assert "nothing shed" in ok(*cfg, "shed")

    # The daemon has stopped: doctor says so and fails; what it can check is fine.
    doctor = run(*cfg, "doctor", "--json")
    assert doctor.returncode == 1
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["daemon"]["status"] == "fail"
    assert "stopped cleanly" in checks["daemon"]["detail"]  # daemon.stopped_at was set
    assert {checks[k]["status"] for k in ("config", "database", "disk", "clock")} == {"ok"}
    assert "quick_check ok" in checks["database"]["detail"]
    assert "FAIL  daemon" in run(*cfg, "doctor").stdout
    assert "daemon       stopped cleanly" in ok(*cfg, "status")  # status and doctor agree

    # A copy of a vehicle's database on a laptop: what another machine's daemon wrote (its
    # host name and boot id), with a pid that exists here, reads as a copy, not a live agent.
    copy = tmp_path / "copied.db"
    shutil.copy(db, copy)
    conn = sqlite3.connect(copy)
    with conn:
        conn.execute(
            "UPDATE agent_state SET value = json_set(value, '$.daemon.host', 'truck-0042', "
            "'$.daemon.boot_id', '11111111-2222-3333-4444-555555555555', '$.daemon.pid', ?, "
            "'$.daemon.stopped_at', NULL) WHERE key = 'live'",
            (os.getpid(),),
        )
    conn.close()
    daemon = as_json("--db", str(copy), "status")["daemon"]
    assert (daemon["condition"], daemon["live"], daemon["host"]) == ("copy", False, "truck-0042")
    assert "a COPY, not a live agent" in ok("--db", str(copy), "status")


def test_shed_lists_what_the_ladder_dropped(start_sim: StartSim, start_agent: StartAgent) -> None:
    sim = start_sim("--rate", "3000", "--streams", "8", "--events", "20000")
    agent = start_agent(
        sim.devices["ecu0"], store={"max_buffer_bytes": 2**20, "min_free_bytes": 0}
    ).start()
    assert sim.wait(timeout=90) == 0
    assert agent.terminate() == 0
    db = str(agent.db)
    rows = as_json("--db", db, "shed", "--limit", "10000")
    reference = sql(agent.db, "SELECT id, reason, count FROM shed ORDER BY id")
    assert reference, "a 1 MiB buffer must have shed"
    assert [(r["id"], r["reason"], r["count"]) for r in rows] == reference
    assert {r["stream"] for r in rows} <= {f"ecu0/s{k:03d}" for k in range(8)}
    total = sum(r[2] for r in reference)
    assert as_json("--db", db, "status")["shed"] == {"records": len(reference), "events": total}
    text = ok("--db", db, "shed")
    for reason in {r[1] for r in reference}:
        count = sum(r[2] for r in reference if r[1] == reason)
        assert f"{reason}: {count:,} events" in text


def test_readers_looping_over_every_command_do_not_disturb_ingest(
    start_sim: StartSim, start_agent: StartAgent
) -> None:
    sim = start_sim("--rate", "1000", "--streams", "4")
    agent = start_agent(sim.devices["ecu0"]).start()
    truth = TruthReader(sim.truth_path)
    wait_for(agent.started, 30, "the agent to start")
    wait_ingest(truth, 500, "ingest")
    truth.poll()
    acked_before = len(truth.acked)
    failures: list[str] = []

    names = list(cli.commands)

    def reader(start: int) -> None:
        for name in names[start:] + names[:start]:  # each reader in its own order
            args = COMMAND_ARGS.get(name, [name])
            result = run("--config", str(agent.config), *args, "--json")
            # doctor's exit status also reflects this machine (disk, clock): not ours.
            if result.returncode != 0 and name != "doctor":
                failures.append(f"{name}: {result.returncode} {result.stderr.strip()}")
            elif not result.stdout:
                failures.append(f"{name}: no output")

    threads = [threading.Thread(target=reader, args=(k * 3,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=110)
    assert not failures, failures
    truth.poll()
    assert len(truth.acked) > acked_before + 1000, "the controller's ACKs went on"
    assert agent.terminate() == 0
    state = live(agent.db)
    assert state.daemon.counters["commit_failures"] == 0
    assert state.store["commit_failures"] == 0
    log = agent.log.read_text()
    assert "commit_failed" not in log
    assert "publish_failed" not in log
