"""`ironfleet` on hostile data, as a real process against stores the real EventStore wrote.

Issue 12, part B (the technician terminal):
- controller text (stream, kind, signal names and values, controller id, published state)
  holding ESC/CSI, OSC, BEL, CR, C1 and bidi controls never reaches the terminal raw, in
  any command, as a table or as JSON; JSON keeps every value exact;
- ts = 1e300 / -1e300 / inf and seq 2**63 - 1 then 1 (two gaps of 2**63 - 3) render, never
  raise (`status`/`gaps` failed with "integer overflow", `replay` with OverflowError);
- `query` stops `zeroblob(1e9)` and a string-doubling CTE fast and in bounded memory (the
  subprocess's peak RSS, from wait4), runs under SQLite's heap limit, `--timeout` is capped;
- `streams`/`replay`/`checkpoints` page: capped rows, a hint naming the next page, and
  walking the pages returns every stream once (50,000 streams);
- against the real daemon ingesting, a read that holds its snapshot is cut once the WAL
  passed `readsafe.wal_limit`, and the WAL stays within that bound.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from agent.cliaccess import MAX_TIMEOUT
from agent.pages import PAGE_ROWS
from agent.readsafe import AUTOCHECKPOINT_BYTES, SQLITE_HEAP_BYTES, wal_bytes, wal_limit
from agent.render import escape, shell_arg
from agent.resilience import Event
from agent.store import EventStore
from firmware_bridge.link import Received
from firmware_bridge.protocol import TimeQuality

from simharness import AgentProcess, Sim, TruthReader
from support import wait_for

IRONFLEET = str(Path(sys.executable).with_name("ironfleet"))
StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]

# Peak RSS a CLI process may reach on hostile input: the 100 MiB budget of issue 12.
CLI_RSS_BOUND = 100 * 2**20
# The WAL may outgrow the budget by what the daemon commits between two guard checks and
# while the interrupted statement unwinds: a few of its group commits, far below 1 MiB.
WAL_SLACK = 2**20
HOSTILE_NAMES = [
    "ecu0/\x1b[2Jclear",  # CSI: clear the screen
    "ecu0/\x1b]0;pwned\x07title",  # OSC: set the window title, ended by BEL
    "ecu0/bell\x07",
    "ecu0/cr\roverwrite",
    "ecu0/lf\nnext line",
    "ecu0/c1\x9b31m",  # C1 CSI
    "ecu0/\x85nel",  # C1 next line
    "ecu0/\u202eevil",  # right-to-left override
    "ecu0/zero\u200bwidth",
    "ecu0/del\x7f",
    "ecu0/tab\there",
    "ecu0/back\\x1bslash",  # a literal backslash: must not look like an escaped ESC
]
HUGE = 2**63 - 1
SIGNALS = {"sig\x1b[2J": "val\x07\r\x1b]0;x\x07", "ok": True, "\u202ename": 1.5}
COMMANDS = [
    ["status"], ["streams"], ["events", "--limit", "100"], ["events", "--stream", "ecu0/*"],
    ["gaps", "--all"], ["replay"], ["checkpoints"], ["breaker"], ["link"], ["shed"],
    ["doctor"], ["query", "SELECT * FROM event_log"], ["query", "SELECT * FROM agent_state"],
]  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    """`ironfleet ARGS`, output as raw bytes (what a terminal would receive)."""
    env = {k: v for k, v in os.environ.items() if k != "IRONFLEET_DB"}
    return subprocess.run([IRONFLEET, *args], capture_output=True, env=env, timeout=120,
                          check=False)  # fmt: skip


# Peak RSS must be measured by a small parent: Linux carries the forking process's RSS
# high-water mark across exec into the child's ru_maxrss, so wait4 from this (large) test
# process would report pytest's size. This wrapper is small; it reports its child's peak.
MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.write(f"\\nmaxrss_kib={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(*args: str) -> tuple[int, str, str, int]:
    """`ironfleet ARGS`: exit status, stdout, stderr, peak RSS in bytes (its ru_maxrss)."""
    env = {k: v for k, v in os.environ.items() if k != "IRONFLEET_DB"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, IRONFLEET, *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    err, _, rss = result.stderr.rpartition("\nmaxrss_kib=")
    return result.returncode, result.stdout, err, int(rss) * 1024


def raw_controls(data: bytes) -> list[str]:
    """Characters a terminal would act on: C0 but LF, DEL, C1, Unicode format/bidi chars."""
    text = data.decode("utf-8")
    return sorted({repr(ch) for ch in text if ch != "\n" and not ch.isprintable()})


def arrival(
    name: str, seq: int, *, ts: float, tq: int = 3, kind: str = "telemetry",
    payload: object = None, epoch: int = 1,
) -> Received:  # fmt: skip
    body = Event.trusted(name, seq, epoch, ts, kind, 3, msgpack.packb(payload or {"v": 1}))
    return Received((epoch, seq), body, TimeQuality(tq), "ecu0\x1b[31m\u202e")


@pytest.fixture
def hostile_db(tmp_path: Path) -> Path:
    """A store with hostile names and values, absurd times and two 2**63 - 3 gaps."""
    path = tmp_path / "agent.db"
    store = EventStore(path)
    now = time.time()
    try:
        store.append(
            [arrival(n, 1, ts=now, kind="k\x1b[5m\u202e", payload=SIGNALS) for n in HOSTILE_NAMES],
            now,
        )
        store.append([
            arrival(HOSTILE_NAMES[0], 2, ts=1e300),
            arrival(HOSTILE_NAMES[1], 2, ts=-1e300, tq=1),  # monotonic: a timedelta
            arrival(HOSTILE_NAMES[2], 2, ts=math.inf),
            arrival(HOSTILE_NAMES[3], 2, ts=-math.inf, tq=2),
        ], now)  # fmt: skip
        # seq 1, then 2**63 - 1: a gap of 2**63 - 3 in each stream; two overflow sum().
        store.append([arrival("gap/a", 1, ts=now), arrival("gap/b", 1, ts=now)], now)
        store.append([arrival("gap/a", HUGE, ts=now), arrival("gap/b", HUGE, ts=now)], now)
        store.mark_delivered(2, {HOSTILE_NAMES[0]: (1, 1), HOSTILE_NAMES[4]: (1, 1)}, now)
        # The snapshot as raw JSON, as hostile as its format allows (1e999 parses as inf);
        # and a raw control sequence in a row of its own, for `query` to print.
        store.publish(
            '{"version": 1, "daemon": {"pid": '
            + str(os.getpid())
            + ', "heartbeat": '
            + f"{now:.3f}"
            + ', "alarm": "boom\\u001b]0;owned\\u0007\\u009b2J", '
            '"counters": {"commits": 1e999}}, "link": {"state": "up\\r\\u001b[2K", '
            '"controller": "ecu0\\u001b[2J\\u202e", "boot_epoch": 1, '
            '"device": "/dev/tty\\u001b[31m", "counters": {"gaps": 1}}, '
            '"links": [{"name": "eng\\u001b[2J", "state": "up\\r", "controller": '
            '"ecu0\\u001b[2J\\u202e", "counters": {"link_downs": 3}}, '
            '{"name": "nav\\u0007", "state": "down", "controller": "\\u009b2J", '
            '"rejects": {"crc\\u001b": 1}}], '
            '"breaker": {"state": "open\\u0007", "failures": 1e999, "retry_in": 1e300}}',
            now,
        )
        store.conn.execute(
            "INSERT INTO agent_state VALUES ('alarm.hostile', ?, ?)", ("boom\x1b]0;owned\x07", now)
        )
    finally:
        store.close()
    return path


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a)[:30])
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_no_raw_control_character_reaches_the_terminal(
    hostile_db: Path, args: list[str], as_json: bool
) -> None:
    result = run("--db", str(hostile_db), "--config", "/nonexistent.toml", *args,
                 *(["--json"] if as_json else []))  # fmt: skip
    # doctor fails here on the missing configuration: its exit status is not the point.
    assert result.returncode == (1 if args == ["doctor"] else 0), result.stderr.decode()
    assert b"Traceback" not in result.stderr
    assert raw_controls(result.stdout) == [], args
    assert raw_controls(result.stderr) == [], args
    if as_json:
        assert result.stdout.isascii()  # every control and non-ASCII character \u-escaped
        json.loads(result.stdout, parse_constant=pytest.fail)  # strict: no NaN/Infinity
    else:
        assert b"\\x1b" in result.stdout or args[0] in ("shed", "breaker") or "gaps" in args


def test_json_keeps_hostile_values_exact(hostile_db: Path) -> None:
    streams = json.loads(run("--db", str(hostile_db), "streams", "--json").stdout)
    assert sorted(s["stream"] for s in streams) == sorted([*HOSTILE_NAMES, "gap/a", "gap/b"])
    assert {s["controller"] for s in streams} == {"ecu0\x1b[31m\u202e"}
    replay = {r["stream"]: r for r in json.loads(run("--db", str(hostile_db), "replay",
                                                      "--json").stdout)}  # fmt: skip
    assert replay[HOSTILE_NAMES[0]]["ts"] == 1e300
    assert replay[HOSTILE_NAMES[1]]["ts"] == -1e300
    assert replay[HOSTILE_NAMES[2]]["ts"] == "inf"  # strict JSON has no infinity
    assert replay[HOSTILE_NAMES[3]]["ts"] == "-inf"
    assert replay[HOSTILE_NAMES[5]]["signals"] == SIGNALS
    assert replay[HOSTILE_NAMES[5]]["kind"] == "k\x1b[5m\u202e"
    assert replay["gap/a"]["seq"] == HUGE
    gaps = json.loads(run("--db", str(hostile_db), "gaps", "--json").stdout)
    assert [(g["stream"], g["first_seq"], g["last_seq"], g["missing"]) for g in gaps] == [
        ("gap/a", 2, HUGE - 1, HUGE - 2), ("gap/b", 2, HUGE - 1, HUGE - 2),
    ]  # fmt: skip
    status = json.loads(run("--db", str(hostile_db), "status", "--json").stdout)
    assert status["gaps"] == {"open": 2, "missing": 2 * (HUGE - 2), "total": 2}  # > 2**63
    link = json.loads(run("--db", str(hostile_db), "link", "--json").stdout)
    assert link["controller"] == "ecu0\x1b[2J\u202e"


def test_text_shows_escapes_and_absurd_values(hostile_db: Path) -> None:
    text = run("--db", str(hostile_db), "replay").stdout.decode()
    assert "ecu0/\\x1b[2Jclear" in text
    assert "ecu0/\\x1b]0;pwned\\x07title" in text
    assert "ecu0/\\u202eevil" in text
    assert "ecu0/back\\\\x1bslash" in text  # the literal backslash, doubled
    assert "1e+300 (out of range)" in text
    assert "inf (out of range)" in text
    status = run("--db", str(hostile_db), "status").stdout.decode()
    assert f"{2 * (HUGE - 2):,} events missing" in status
    assert "eng\\x1b[2J: ecu0\\x1b[2J\\u202e" in status  # one line per controller
    assert "nav\\x07: \\u009b2J" in status
    link = run("--db", str(hostile_db), "link").stdout.decode()
    assert "link_downs=3" in link
    assert "crc\\x1b=1" in link
    gaps = run("--db", str(hostile_db), "gaps").stdout.decode()
    assert f"2..{HUGE - 1}" in gaps


def test_escape_is_total_and_shell_arg_round_trips() -> None:
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    escaped = escape(every)
    assert escaped.isprintable()
    assert escape(escaped, backslash=False) == escaped  # a second pass changes nothing
    assert escape("a\nb", newlines=True) == "a\nb"
    utf8 = {**os.environ, "LC_ALL": "C.UTF-8"}  # bash writes $'\\uHHHH' in the locale's encoding
    for name in HOSTILE_NAMES:
        echoed = subprocess.run(
            ["bash", "-c", f"printf %s {shell_arg(name)}"],
            capture_output=True,
            check=True,
            env=utf8,
        ).stdout
        assert echoed.decode() == name


# -- query bounds ---------------------------------------------------------------------------

DOUBLING = (
    "WITH RECURSIVE c(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM c) SELECT length(s) FROM c"
)


@pytest.mark.parametrize(
    "sql", ["SELECT zeroblob(1e9)", "SELECT length(zeroblob(1e9))", DOUBLING,
            "SELECT group_concat(randomblob(1000)) FROM (WITH RECURSIVE c(x) AS "
            "(SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000) SELECT x FROM c)"],
    ids=["zeroblob", "zeroblob-length", "doubling-cte", "group-concat"],
)  # fmt: skip
def test_query_that_allocates_fails_fast_in_bounded_memory(hostile_db: Path, sql: str) -> None:
    code, out, err, rss = run_measured("--db", str(hostile_db), "--timeout", "10", "query", sql)
    assert code == 1, out
    assert out == ""
    assert err.startswith("ironfleet: query stopped: it built a value larger than 1.0 MiB"), err
    assert rss < CLI_RSS_BOUND, f"{rss / 2**20:.0f} MiB"


def test_query_runs_under_the_heap_limit_and_caps_fetched_bytes(hostile_db: Path) -> None:
    heap = json.loads(run("--db", str(hostile_db), "query", "PRAGMA hard_heap_limit",
                          "--json").stdout)  # fmt: skip
    assert heap == [{"hard_heap_limit": SQLITE_HEAP_BYTES}]
    assert run("--db", str(hostile_db), "query", "PRAGMA hard_heap_limit = 0").returncode == 1
    many = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) "
        "SELECT x, randomblob(1000) FROM c"
    )  # 100 MB of results asked for
    code, out, err, rss = run_measured("--db", str(hostile_db), "query", many, "--limit", "10000")
    assert code == 0, err
    assert "of results; select fewer columns or add LIMIT/OFFSET" in out
    assert rss < CLI_RSS_BOUND, f"{rss / 2**20:.0f} MiB"


@pytest.mark.parametrize("timeout", [str(MAX_TIMEOUT + 0.001), "60", "3600"])
def test_timeout_above_the_cap_is_a_usage_error(tmp_path: Path, timeout: str) -> None:
    db = tmp_path / "agent.db"
    EventStore(db).close()
    result = run("--db", str(db), "--timeout", timeout, "status")
    assert result.returncode == 2
    assert b"Invalid value for '--timeout'" in result.stderr
    assert run("--db", str(db), "--timeout", str(MAX_TIMEOUT), "status").returncode == 0


# -- pagination -----------------------------------------------------------------------------

STREAMS = 50_000


@pytest.fixture
def many_streams(tmp_path: Path) -> Path:
    """50,000 distinct streams, one event each, written by the real store."""
    path = tmp_path / "agent.db"
    store = EventStore(path)
    now = time.time()
    try:
        for first in range(0, STREAMS, 5000):
            store.append(
                [arrival(f"ecu{k % 7}/s{k:06d}", 1, ts=now) for k in range(first, first + 5000)],
                now,
            )
    finally:
        store.close()
    return path


def test_listings_page_and_the_pages_cover_every_stream(many_streams: Path) -> None:
    db = ("--db", str(many_streams))
    text = run(*db, "streams").stdout.decode().splitlines()
    assert len(text) == 2 + PAGE_ROWS + 1  # header, rule, one page, the hint
    assert text[-1].startswith(
        f"({PAGE_ROWS:,} streams shown, by name; next page: ironfleet streams"
    )
    seen: list[str] = []
    after: list[str] = []
    for _ in range(STREAMS // 10_000 + 2):
        result = run(*db, "streams", "--json", "--limit", "10000", *after)
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        seen += [r["stream"] for r in rows]
        if not result.stderr:
            break
        hint = result.stderr.decode().strip()
        assert hint.endswith(f"--after {shell_arg(rows[-1]['stream'])})"), hint
        after = ["--after", rows[-1]["stream"]]
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen)) == STREAMS
    for command in ("replay", "checkpoints"):
        page = json.loads(run(*db, command, "--json", "--after", seen[-5]).stdout)
        assert [r["stream"] for r in page] == seen[-4:]
        code, out, err, rss = run_measured(*db, command, "--json")
        assert code == 0, err
        assert len(json.loads(out)) == PAGE_ROWS
        assert rss < CLI_RSS_BOUND


# -- against the real daemon ------------------------------------------------------------------

SLOW_SQL = (  # reads a table first, so it holds a snapshot, then counts forever
    "WITH RECURSIVE c(x) AS (SELECT (SELECT count(*) FROM agent_state) UNION ALL "
    "SELECT x + 1 FROM c) SELECT count(*) FROM c"
)


def test_a_long_read_is_cut_before_the_wal_grows_past_its_bound(
    start_sim: StartSim, start_agent: StartAgent
) -> None:
    """The finding: `--timeout 40` grew the daemon's WAL from 4 MB to 298 MB at 1,500/s."""
    sim = start_sim("--rate", "1500", "--streams", "200")
    agent = start_agent(sim.devices["ecu0"]).start()
    truth = TruthReader(sim.truth_path)
    wait_for(agent.started, 30, "the agent to start")
    wait_for(lambda: truth.poll() or len(truth.acked) >= 3000, 60, "ingest")
    # The WAL without readers: it grows to one autocheckpoint, then is reused at that size.
    wait_for(lambda: wal_bytes(agent.db) >= AUTOCHECKPOINT_BYTES, 60, "the WAL at its size")
    peak: list[int] = [0]
    reading = threading.Event()
    done = threading.Event()

    def watch() -> None:  # the largest WAL size seen while the hostile read runs
        while not done.is_set():
            if reading.is_set():
                peak[0] = max(peak[0], wal_bytes(agent.db))
            done.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = wal_bytes(agent.db)
    reading.set()
    # Deadline at the cap: only the WAL bound can stop this read before it (a
    # technician's --timeout 3600 is refused now; see the test above).
    code, out, err, _ = run_measured("--db", str(agent.db), "--timeout", str(MAX_TIMEOUT),
                                     "query", SLOW_SQL)  # fmt: skip
    reading.clear()
    done.set()
    watcher.join()
    assert code == 1, out
    assert "read stopped: the agent's write-ahead log kept growing" in err, err
    assert peak[0] <= wal_limit(start) + WAL_SLACK, (start, peak[0])
    # Ingest went on and the next reader is served at once.
    acked = len(truth.acked)
    wait_for(lambda: truth.poll() or len(truth.acked) > acked + 1500, 60, "ingest after the read")
    assert run("--db", str(agent.db), "status").returncode == 0
    assert agent.terminate() == 0
