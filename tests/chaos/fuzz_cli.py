"""Coverage-guided fuzzing of the technician CLI's argument handling, in-process.

    python tests/chaos/fuzz_cli.py [libFuzzer flags] CORPUS_DIR
    python tests/chaos/fuzz_cli.py --write-seeds CORPUS_DIR

Each input becomes an argv for `agent.cli.main`, run against a small real agent database
that `agent.store.EventStore` wrote (events in two boot epochs, gaps, shed records,
checkpoints, published daemon state) and still holds open, as the running daemon does.
The oracle: `main` ends in SystemExit 0, 1 or 2, never another exception; no file of the
world directory changes (the database, its WAL, the configurations) and no new file
appears, apart from SQLite's own -wal/-shm/-journal companions; `PRAGMA data_version` of
the writer's connection does not move. `check(world, data)` is the whole oracle;
tests/chaos/test_fuzz.py replays the corpus through it.

Input layout: the bytes are split at 0x00 (argv strings cannot hold NUL) into at most
MAX_ARGS tokens. A 1-byte token picks VOCAB[byte % len(VOCAB)]; a token starting with
0x01 is VOCAB[second byte] followed by the rest of the token (`--limit=` + digits); any
other token is its bytes decoded as Python decodes a real argv (UTF-8, surrogateescape).

What the harness changes so a run stays inside its world and cannot block:
- `--config WORLD/agent.toml --timeout 0.5` come first (a later option overrides them),
  so no input reads /etc/ironfleet and the default read deadline is short;
- a value of --db or --config is mapped to a name inside the world directory ('/' becomes
  '_'), and the process runs with the world directory as its working directory;
- a finite --timeout value above MAX_TIMEOUT is lowered to it: the CLI's own deadline is
  what stops slow SQL, and one input must not hold the fuzzer for minutes (so 1e308,
  which overflows like inf, is only reached as inf);
- `events --follow` is kept, but its poll loop is replaced by one real poll followed by
  Ctrl-C (KeyboardInterrupt), which the command handles as a technician's stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shlex
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import atheris
import msgpack

# Instrumented so libFuzzer sees the CLI's branches and click's parser; pytest imports
# these before it loads this file, which leaves them uninstrumented there.
with atheris.instrument_imports(include=["agent", "click"]):
    from agent import cli, views
    from agent.resilience import Event
    from agent.store import EventStore, StoreSection
    from firmware_bridge.link import Received
    from firmware_bridge.protocol import TimeQuality

MAX_ARGS = 24
MAX_TIMEOUT = 0.5  # seconds
VOCAB_PREFIX = 0x01
PATH_OPTIONS = ("--db", "--config")
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")  # files SQLite itself may create
# Subcommands, options and values the CLI understands, so short inputs reach deep code
# (fewer than 255 words: a vocabulary token is one byte).
VOCAB: tuple[str, ...] = (
    *sorted(cli.cli.commands),
    "--json", "--help", "-h", "--version", "--db", "--config", "--timeout",
    "--stream", "--kind", "--since", "--until", "--limit", "--follow", "-f", "--all",
    "--db=", "--config=", "--timeout=", "--limit=", "--since=", "--until=", "--stream=",
    "--", "-", "", " ",
    "agent.db", "agent.toml", "missing.db", "empty.db", "garbage.db", "notagent.db",
    "adir", "bad.toml", "unknown-key.toml", "elsewhere.toml", "missing.toml",
    "ecu0/*", "ecu0/bulk", "ecu1/gps", "ecu9/none", "*", "[", "telemetry", "alarm",
    "0", "1", "-1", "3", "1000", "9223372036854775808", "1e3", "0.001", "nan", "inf",
    "10m", "2h", "1d", "30s", "5 min", "14:05", "25:61", "23:59:59",
    "2024-06-01T08:00:00", "2024-06-01T08:00:00+02:00", "0001-01-01", "9999-12-31T23:59:59",
    "SELECT count(*) AS n FROM streams", "SELECT * FROM events", "SELECT x'00ff'",
    "SELECT 1.5, NULL, 'é', 9223372036854775807", "SELECT * FROM agent_state",
    "DELETE FROM events", "INSERT INTO agent_state VALUES ('k', 'v', 0)",
    "UPDATE streams SET priority = 0", "CREATE TABLE t (x)", "DROP TABLE events",
    "PRAGMA query_only = 0", "PRAGMA journal_mode = DELETE", "PRAGMA wal_checkpoint(TRUNCATE)",
    "PRAGMA user_version = 5", "ATTACH 'x.db' AS x", "VACUUM", "VACUUM INTO 'copy.db'",
    "SELECT load_extension('x')", "BEGIN IMMEDIATE", "COMMIT", "SELECT 1; SELECT 2",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "SELECT randomblob(100000000)", "SELECT zeroblob(2000000000)",
)  # fmt: skip


class OracleViolation(AssertionError):
    """The CLI did something its contract forbids (traceback, bad exit code, a write)."""


@dataclass(frozen=True)
class KnownBug:
    """A product bug already reported: recognised so a fuzz run can look past it."""

    name: str
    reason: str
    matches: Callable[[BaseException], bool]


# While a bug is open its crasher stays in the corpus (crash-<name>, an xfail(strict=True)
# regression test); the fuzz run counts further hits instead of stopping at the first.
KNOWN_BUGS: tuple[KnownBug, ...] = ()  # none open: the three crashers below are fixed
# (crash-cli-non-utf8-argument, crash-cli-limit-overflow, crash-cli-timeout-not-finite now
# end in a usage error, exit 2) and stay in the corpus as regression inputs.


@dataclass
class World:
    """A directory with a live agent database, configurations and decoy files."""

    root: Path
    store: EventStore
    snapshot: dict[str, str] = field(default_factory=dict)

    @property
    def database(self) -> Path:
        """The live agent database (its writer, `store`, stays open)."""
        return self.root / "agent.db"

    def close(self) -> None:
        """Close the writer; the directory is the caller's to remove."""
        self.store.close()


@dataclass
class Outcome:
    """How one argv ended: exit code, what it printed, and a known bug if it hit one."""

    argv: list[str]
    code: int
    stdout: bytes
    stderr: bytes
    known_bug: str | None = None


def make_world(root: Path) -> World:
    """Build the world in `root` (created if missing) with the real EventStore."""
    root.mkdir(parents=True, exist_ok=True)
    store = _populate(root / "agent.db")
    (root / "agent.toml").write_text(
        f'[agent]\nstate_dir = "{root}"\n[serial]\ndevice = "{root}/ttyIronFleet*"\n'
        "[store]\nmin_free_bytes = 0\n[uplink]\nenabled = false\n"
    )
    (root / "bad.toml").write_text("[agent\nstate_dir = \n")
    (root / "unknown-key.toml").write_text("[agent]\nstate_dirr = '/tmp'\n")
    (root / "elsewhere.toml").write_text(f'[agent]\nstate_dir = "{root}/nowhere"\n')
    (root / "empty.db").write_bytes(b"")
    (root / "garbage.db").write_bytes(b"this is not an SQLite database\n" * 64)
    (root / "adir").mkdir(exist_ok=True)
    other = sqlite3.connect(root / "notagent.db")  # a valid SQLite file of another schema
    other.execute("CREATE TABLE IF NOT EXISTS t (x)")
    other.commit()
    other.close()
    world = World(root, store)
    world.snapshot = _snapshot(root)
    return world


def decode_argv(data: bytes) -> list[str]:
    """The argv (without program name) an input stands for; see the module docstring."""
    argv: list[str] = []
    for raw in data.split(b"\x00")[:MAX_ARGS]:
        if len(raw) == 1:
            argv.append(VOCAB[raw[0] % len(VOCAB)])
        elif len(raw) >= 2 and raw[0] == VOCAB_PREFIX:
            argv.append(VOCAB[raw[1] % len(VOCAB)] + _text(raw[2:]))
        else:
            argv.append(_text(raw))
    return argv


def confine(world: World, argv: list[str]) -> list[str]:
    """The argv actually run: defaults first, paths kept inside the world, timeout capped."""
    out = ["--config", str(world.root / "agent.toml"), "--timeout", str(MAX_TIMEOUT)]
    expect_path = expect_timeout = False
    for given in argv:
        arg = given
        if expect_path:
            arg = _inside(world, given)
        elif expect_timeout:
            arg = _capped(given)
        else:
            for option in PATH_OPTIONS:
                if given.startswith(option + "="):
                    arg = f"{option}={_inside(world, given[len(option) + 1 :])}"
            if given.startswith("--timeout="):
                arg = "--timeout=" + _capped(given[len("--timeout=") :])
        expect_path, expect_timeout = arg in PATH_OPTIONS, arg == "--timeout"
        out.append(arg)
    return out


def run(world: World, argv: list[str]) -> Outcome:
    """Run `agent.cli.main(argv)` in the world; returns how it ended, raises what escaped."""
    stdout, stderr = io.BytesIO(), io.BytesIO()
    # As Python sets them up under a UTF-8 locale: strict stdout, backslashreplace stderr.
    out = io.TextIOWrapper(stdout, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(stderr, encoding="utf-8", errors="backslashreplace",
                           write_through=True)  # fmt: skip
    code: int | str | None = 0
    with _inside_world(world), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as stop:
            code = stop.code
    if code is None:
        code = 0
    if not isinstance(code, int):
        raise OracleViolation(f"exit with a non-integer status {code!r}")
    return Outcome(argv, code, stdout.getvalue(), stderr.getvalue())


def check(world: World, data: bytes, *, tolerate_known: bool = False) -> Outcome:
    """Run every oracle on one input; raise OracleViolation on the first failure."""
    argv = confine(world, decode_argv(data))
    version = _data_version(world)
    try:
        outcome = run(world, argv)
    except OracleViolation:
        raise
    except Exception as exc:
        known = known_bug(exc) if tolerate_known else None
        if known is None:
            raise OracleViolation(f"ironfleet {argv!r} raised {exc!r}") from exc
        outcome = Outcome(argv, -1, b"", b"", known)
    if outcome.known_bug is None and outcome.code not in (0, 1, 2):
        raise OracleViolation(f"ironfleet {argv!r} exited {outcome.code}")
    if _data_version(world) != version:
        raise OracleViolation(f"ironfleet {argv!r} committed to the database")
    after = _snapshot(world.root)
    if after != world.snapshot:
        changed = sorted(set(after.items()) ^ set(world.snapshot.items()))
        raise OracleViolation(f"ironfleet {argv!r} changed files: {changed}")
    return outcome


def known_bug(exc: BaseException) -> str | None:
    """Name of the open bug `exc` is an instance of, if any."""
    return next((bug.name for bug in KNOWN_BUGS if bug.matches(exc)), None)


def seeds() -> dict[str, bytes]:
    """Seed inputs: every command with its options, as vocabulary tokens."""

    def tokens(*words: str) -> bytes:
        return b"\x00".join(_token(w) for w in words)

    out = {f"cmd-{name}": tokens(name) for name in sorted(cli.cli.commands)}
    out |= {f"json-{name}": tokens(name, "--json") for name in sorted(cli.cli.commands)}
    out |= {
        "help": tokens("--help"),
        "version": tokens("--version"),
        "events-filters": tokens("events", "--stream", "ecu0/*", "--kind", "telemetry",
                                 "--since", "1d", "--until", "14:05", "--limit", "3"),
        "events-iso-follow-json": tokens("events", "--since", "2024-06-01T08:00:00", "-f",
                                         "--json"),
        "events-bad-limit": tokens("events", "--limit", "0"),
        "gaps-all": tokens("gaps", "--all", "--limit", "1", "--json"),
        "shed-limit": tokens("shed", "--limit", "1"),
        "query-json": tokens("query", "SELECT * FROM agent_state", "--json"),
        "query-write": tokens("query", "DELETE FROM events"),
        "query-slow": tokens("--timeout", "0.001", "query",
                             "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                             "SELECT count(*) FROM c"),
        "db-garbage": tokens("--db", "garbage.db", "status"),
        "db-dir": tokens("--db", "adir", "streams"),
        "db-notagent": tokens("--db=notagent.db", "replay"),
        "config-bad-doctor": tokens("--config", "bad.toml", "doctor", "--json"),
        "config-elsewhere": tokens("--config", "elsewhere.toml", "link"),
        "unknown-command": b"stat\x00--jsn",
        # Bytes that are not UTF-8, as a shell passes them (Latin-1 terminal, pasted binary).
        "crash-cli-non-utf8-argument": tokens("query") + b"\x00SELECT '\xe9'",
        "crash-cli-limit-overflow": tokens("events", "--limit", "9223372036854775808"),
        "crash-cli-timeout-not-finite": tokens("--timeout", "nan", "status"),
    }  # fmt: skip
    return out


def write_seeds(directory: Path) -> None:
    """Write `seeds()` into `directory` (file name = seed name)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (directory / name).write_bytes(data)


def main(argv: list[str]) -> None:
    """libFuzzer entry; known bugs are counted on stderr, anything else is a crash.

    The world lives in IRONFLEET_FUZZ_WORKDIR if set (the test passes its tmp_path),
    else in a new directory under the system temp dir, left behind for inspection.
    """
    if len(argv) == 3 and argv[1] == "--write-seeds":
        write_seeds(Path(argv[2]))
        return
    logging.disable(logging.WARNING)
    os.environ.pop(cli.DB_ENV, None)
    workdir = os.environ.get("IRONFLEET_FUZZ_WORKDIR")
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ironfleet-fuzz-cli-"))
    world = make_world(root)
    hits: dict[str, int] = {}

    def one_input(data: bytes) -> None:
        name = check(world, data, tolerate_known=True).known_bug
        if name is not None:
            hits[name] = hits.get(name, 0) + 1
            if hits[name] == 1:
                print(f"KNOWN-BUG {name}: first hit, input {data.hex()}", file=sys.stderr)

    # -merge=1, -fork and -minimize_crash re-run argv[0] through sh: make it the interpreter
    # and this script, as this file is not executable itself.
    atheris.Setup([shlex.join([sys.executable, argv[0]]), *argv[1:]], one_input)
    atheris.Fuzz()


# -- private ---------------------------------------------------------------------------------


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="surrogateescape")


def _token(word: str) -> bytes:
    """The 1-byte token of a vocabulary word (never 0x00, the separator), else its bytes."""
    if word in VOCAB:
        return bytes([VOCAB.index(word) or len(VOCAB)])  # len(VOCAB) % len(VOCAB) == 0
    return word.encode()


def _inside(world: World, value: str) -> str:
    if not value:
        return value
    name = value.replace("/", "_").lstrip(".") or "missing"
    return str(world.root / name)


def _capped(value: str) -> str:
    try:
        seconds = float(value)
    except ValueError:
        return value  # let the CLI reject it
    # nan and inf pass: they fail at open today, before any statement could run long.
    return str(MAX_TIMEOUT) if MAX_TIMEOUT < seconds < float("inf") else value


def _snapshot(root: Path) -> dict[str, str]:
    """Digest of every file under `root` but SQLite's companions (the live WAL included)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if name.endswith(SQLITE_COMPANIONS) and name != "agent.db-wal":
            continue  # -shm holds readers' marks; others SQLite may make for a decoy file
        out[name] = "dir" if path.is_dir() else _digest(path)
    return out


def _digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _data_version(world: World) -> int:
    version: int = world.store.conn.execute("PRAGMA data_version").fetchone()[0]
    return version


@contextlib.contextmanager
def _inside_world(world: World) -> Iterator[None]:
    """Working directory = the world; `events --follow` polls once, then gets Ctrl-C
    (the flag its SIGINT handler sets)."""
    real_poll = cli.poll_events

    def poll_once(
        opts: cli.Options, flt: views.EventFilter, after_id: int, stop: threading.Event
    ) -> Iterator[list[Any]]:
        rows = opts.read(lambda conn: views.read_events_after(conn, flt, after_id, time.time()))
        stop.set()
        if rows:
            yield rows

    before = os.getcwd()
    os.chdir(world.root)
    cli.poll_events = poll_once
    try:
        yield
    finally:
        cli.poll_events = real_poll
        os.chdir(before)


def _populate(path: Path) -> EventStore:
    """Events in two boot epochs with a gap, shed records, checkpoints, live state."""
    store = EventStore(path, StoreSection(max_buffer_bytes=96 * 2**10, min_free_bytes=0))
    now = time.time()

    def event(stream: str, seq: int, epoch: int, *, prio: int, tq: int, data: bytes) -> Received:
        body = Event.trusted(stream, seq, epoch, now - 100 + seq, "telemetry", prio, data)
        return Received((epoch, seq), body, TimeQuality(tq), stream.split("/", maxsplit=1)[0])

    for batch in range(12):  # a low-priority bulk stream overflows the 96 KiB cap: shed
        bulk = msgpack.packb({"blob": "x" * 120, "i": batch})
        fix = msgpack.packb({"lat": 48.1, "lon": -2.25, "ok": True, "note": None})
        seqs = range(batch * 20 + 1, batch * 20 + 21)
        arrivals = [event("ecu0/bulk", n, 7, prio=0, tq=3, data=bulk) for n in seqs]
        arrivals += [event("ecu1/gps", n, 3, prio=5, tq=1, data=fix) for n in seqs]
        store.append(arrivals, now - 60 + batch)
        if store.needs_room():
            store.make_room(now - 40)
    # A gap (seq 3..4 missing), a reboot (epoch 9), an undecodable payload, odd clocks.
    big = msgpack.packb({"x": 2**63 - 1})
    alarms = [(1, 0, b"\xc1"), (2, 2, b""), (5, 3, big)]
    store.append([event("ecu2/alarm", n, 8, prio=7, tq=tq, data=d) for n, tq, d in alarms], now - 5)
    unicode = msgpack.packb({"é": "ü" * 40})
    store.append([event("ecu2/alarm", 1, 9, prio=7, tq=3, data=unicode)], now - 1)
    store.mark_delivered(store.cursor + 5, {"ecu0/bulk": (7, 200), "ecu1/gps": (3, 2)}, now)
    # The live snapshot, with one field of the wrong type (decoded as its default).
    store.publish(json.dumps({
        "version": 1,
        "daemon": {"pid": 4242, "heartbeat": round(now, 3), "counters": {"commits": 3}},
        "link": {"state": "up", "controller": "ecu2", "boot_epoch": 9, "port": "open",
                 "device": "/dev/ttyIronFleet0", "counters": {"gaps": 1, "events_accepted": 500},
                 "rejects": {"crc": 2}},
        "uplink": {"state": "disconnected", "phase": "resync", "in_flight": 2,
                   "counters": {"ack_timeouts": 3}},
        "breaker": {"state": "open", "failures": 5, "successes": 0, "retry_in": 12.5,
                    "transitions": "not a number"},
    }), now)  # fmt: skip
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # less to digest per input
    return store


if __name__ == "__main__":
    main(sys.argv)
