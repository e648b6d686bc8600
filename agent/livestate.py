"""The daemon's live state: one typed, versioned snapshot, written and read only here.

About once a second the writer thread builds a `LiveState` (serial link, uplink, breaker,
store figures, counters) and publishes it in two places:
- one row (`live`) of the database's `agent_state`, for `ironfleet` on this machine or on
  a copy of the database, and for the state after a clean stop;
- a file in the runtime directory (`/run/ironfleet/live.json`, tmpfs), which keeps
  updating when the database cannot be written (disk full, read-only file system), so a
  technician still sees a live daemon and its alarm then.

Every reader (status, link, breaker, doctor, metrics, the daemon's systemd status line)
takes one `LiveState`, so all the values one command shows come from the same instant, and
two commands read the same fields by the same names. `read` picks the newer of the row
and the file; the file counts only if it names the same database.

Decoding is total: any bytes give a `LiveState`. A field of the wrong type, a non-finite
number, an overlong text or a counter bag past its cap reads as its default and is named
in `problems`; a newer `version` is read for the fields this code knows. The database and
the runtime directory are untrusted like every other input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sqlite3
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agent.identity import boot_id

VERSION: Final = 1
KEY: Final = "live"  # the agent_state row
FILE_NAME: Final = "live.json"  # in [agent] runtime_dir
MAX_BYTES: Final = 256 * 1024  # a snapshot is ~3 KiB; larger is refused unread
MAX_TEXT: Final = 1024  # characters of one text field (an error message, a device path)
MAX_COUNTERS: Final = 256  # entries of one counter bag (every bag the daemon has is < 60)
MAX_NAME: Final = 64  # characters of a counter's name
MAX_LINKS: Final = 8  # controller links in one snapshot (config.MAX_CONTROLLERS)

Counters = Mapping[str, float]


def _counters() -> dict[str, float]:
    return {}


@dataclass(frozen=True, slots=True)
class DaemonLive:
    """Who published: process, host and boot (a copy of the database is told by them)."""

    pid: int = 0
    host: str = ""
    boot_id: str = ""
    heartbeat: float | None = None  # wall clock of this snapshot
    stopped_at: float | None = None  # set by a clean stop
    alarm: str = ""
    counters: Counters = field(default_factory=_counters)


@dataclass(frozen=True, slots=True)
class LinkLive:
    """The serial link to one controller (`name`: its [[serial]] entry's name)."""

    name: str = ""
    state: str = "unknown"
    controller: str = ""
    boot_epoch: int | None = None
    port: str = ""
    device: str = ""
    frames_accepted: int = 0
    counters: Counters = field(default_factory=_counters)
    rejects: Counters = field(default_factory=_counters)


@dataclass(frozen=True, slots=True)
class UplinkLive:
    """The uplink's connection and resync (`state` is `disabled` without an uplink)."""

    state: str = "unknown"
    phase: str = ""
    broker: str = ""
    fleet_key: str = ""  # fingerprint of the key acks are verified with, or "unsigned"
    last_error: str = ""
    delivered: int = 0
    in_flight: int = 0
    next_attempt_in: float | None = None
    counters: Counters = field(default_factory=_counters)
    rejected: Counters = field(default_factory=_counters)


@dataclass(frozen=True, slots=True)
class BreakerLive:
    """The uplink's circuit breaker."""

    state: str = "unknown"
    failures: int | None = None
    successes: int | None = None
    retry_in: float | None = None
    transitions: int | None = None


@dataclass(frozen=True, slots=True)
class LiveState:
    """One snapshot. `source` (not encoded) says where `read` found it."""

    version: int = VERSION
    database: str = ""  # the database this describes (os.path.realpath)
    database_id: str = ""  # "<st_dev>:<st_ino>" of that file: a copy elsewhere differs
    runtime_file: str = ""  # where the daemon also writes it
    daemon: DaemonLive = field(default_factory=DaemonLive)
    link: LinkLive = field(default_factory=LinkLive)  # the first controller's
    links: tuple[LinkLive, ...] = ()  # every controller's, the first included
    uplink: UplinkLive = field(default_factory=UplinkLive)
    breaker: BreakerLive = field(default_factory=BreakerLive)
    store: Counters = field(default_factory=_counters)  # EventStore.stats()
    source: str = ""  # "database", "runtime file", or "" (nothing published)
    problems: tuple[str, ...] = ()  # fields dropped while decoding

    @property
    def published(self) -> bool:
        return self.daemon.heartbeat is not None

    @property
    def controllers(self) -> tuple[LinkLive, ...]:
        """Every controller's link (a snapshot of an older agent has `link` only)."""
        return self.links or (self.link,)

    def stopped(self, at: float) -> LiveState:
        """This snapshot as a clean stop leaves it: loops gone, link and uplink down."""
        return dataclasses.replace(
            self,
            daemon=dataclasses.replace(self.daemon, stopped_at=at),
            link=dataclasses.replace(self.link, state="down", port="closed"),
            links=tuple(dataclasses.replace(k, state="down", port="closed") for k in self.links),
            uplink=dataclasses.replace(
                self.uplink,
                state="disconnected" if self.uplink.state != "disabled" else "disabled",
            ),
        )


# -- encoding ------------------------------------------------------------------------------

_SECTIONS: Final = {"daemon": DaemonLive, "link": LinkLive, "uplink": UplinkLive,
                    "breaker": BreakerLive}  # fmt: skip
_LOCAL: Final = ("source", "problems")  # never encoded
_LINKS: Final = "links"  # a list of LinkLive sections


def encode(live: LiveState) -> str:
    """Compact JSON of every field but `source` and `problems`."""
    doc = {f.name: getattr(live, f.name) for f in dataclasses.fields(live)
           if f.name not in _LOCAL}  # fmt: skip
    for name in _SECTIONS:
        section = doc[name]
        doc[name] = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    doc[_LINKS] = [{f.name: getattr(k, f.name) for f in dataclasses.fields(k)} for k in live.links]
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=dict)


def decode(data: str | bytes | None, source: str = "") -> LiveState:
    """A LiveState from whatever `data` holds (see the module docstring: total)."""
    if data is None:
        return LiveState()
    if len(data) > MAX_BYTES:
        return LiveState(source=source, problems=(f"snapshot larger than {MAX_BYTES} bytes",))
    try:
        doc = json.loads(data)  # NaN/Infinity parse as floats; _number refuses them by field
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return LiveState(source=source, problems=(f"not JSON: {str(exc)[:80]}",))
    if not isinstance(doc, dict):
        return LiveState(source=source, problems=("not a JSON object",))
    problems: list[str] = []
    values: dict[str, Any] = {}
    for f in dataclasses.fields(LiveState):
        if f.name in _LOCAL or f.name not in doc:
            continue
        raw = doc[f.name]
        if f.name == _LINKS:
            value = _links(raw, problems)
        elif f.name in _SECTIONS:
            value = _section(_SECTIONS[f.name], raw, f.name, problems)
        else:
            value = _field(str(f.type), raw)
        if value is _BAD:
            problems.append(f.name)
        else:
            values[f.name] = value
    return LiveState(**values, source=source, problems=tuple(problems))


def _links(raw: object, problems: list[str]) -> Any:
    """The controllers' links: a list of at most MAX_LINKS sections, else _BAD."""
    if not isinstance(raw, list) or len(raw) > MAX_LINKS:
        return _BAD
    links = tuple(_section(LinkLive, k, f"links[{i}]", problems) for i, k in enumerate(raw))
    return _BAD if any(k is _BAD for k in links) else links


def _section(cls: Any, raw: object, prefix: str, problems: list[str]) -> Any:
    """A section from its JSON object (a field of the wrong type stands at its default,
    named in `problems`), or _BAD if `raw` is not an object."""
    if not isinstance(raw, dict):
        return _BAD
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value = _field(str(f.type), raw[f.name])
        if value is _BAD:
            problems.append(f"{prefix}.{f.name}")
        else:
            values[f.name] = value
    return cls(**values)


_BAD: Final = object()


def _number(raw: object) -> float | None:
    """A finite int or float (never a bool), else None."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    if isinstance(raw, float) and not math.isfinite(raw):
        return None
    if isinstance(raw, int) and abs(raw) >= 2**63:
        return None
    return raw


def _text(raw: object) -> Any:
    return raw if isinstance(raw, str) and len(raw) <= MAX_TEXT else _BAD


def _int(raw: object) -> Any:
    number = _number(raw)
    return number if isinstance(number, int) else _BAD


def _float(raw: object) -> Any:
    number = _number(raw)
    return float(number) if number is not None else _BAD


def _bag(raw: object) -> Any:
    if not isinstance(raw, dict) or len(raw) > MAX_COUNTERS:
        return _BAD
    bag: dict[str, float] = {}
    for name, value in raw.items():
        number = _number(value)
        if len(name) > MAX_NAME or number is None:
            return _BAD
        bag[name] = number
    return bag


_KINDS: Final = {"str": _text, "int": _int, "float": _float, "Counters": _bag}


def _field(kind: str, raw: object) -> Any:
    """`raw` as the annotated `kind` (e.g. "int | None"), or _BAD."""
    if raw is None and kind.endswith(" | None"):
        return None
    return _KINDS[kind.removesuffix(" | None")](raw)


# -- publishing and reading ----------------------------------------------------------------


def write_row(conn: sqlite3.Connection, text: str, now: float) -> None:
    """Upsert the `live` row (inside the caller's transaction)."""
    conn.execute(
        "INSERT INTO agent_state (key, value, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (KEY, text, now),
    )


def write_file(path: Path, text: str) -> None:
    """Replace the runtime file atomically (a reader sees the old or the new one whole).

    No fsync: the runtime directory is tmpfs and the file describes this boot only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o640)
    except FileExistsError:  # left by a kill of a process with our pid: ours to replace
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o640)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_row(conn: sqlite3.Connection) -> LiveState:
    """The snapshot in the database (empty if none; never raises on its content)."""
    row = conn.execute(
        "SELECT CASE WHEN length(value) <= ? THEN value END FROM agent_state WHERE key = ?",
        (MAX_BYTES, KEY),
    ).fetchone()
    if row is None:
        return LiveState()
    if row[0] is None:
        return LiveState(source="database", problems=(f"snapshot larger than {MAX_BYTES} bytes",))
    value = row[0]
    return decode(value if isinstance(value, str | bytes) else None, "database")


def read_file(path: Path) -> LiveState:
    """The snapshot in a runtime file; empty if it is missing, unreadable or not a regular
    file. The path may come from an untrusted database row: never follow a link, never
    block on a FIFO or a device, read at most MAX_BYTES + 1."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return LiveState()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return LiveState()
        data = os.read(fd, MAX_BYTES + 1)
    except OSError:
        return LiveState()
    finally:
        os.close(fd)
    return decode(data, "runtime file")


def file_id(path: str | Path) -> str:
    """ "<st_dev>:<st_ino>" of a file, "" if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def database_of(conn: sqlite3.Connection) -> str:
    """The real path of the connection's main database file ("" in memory)."""
    for _seq, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return os.path.realpath(file) if file else ""
    return ""


def read(conn: sqlite3.Connection, runtime_file: Path | None = None) -> LiveState:
    """The newest snapshot of the connection's database: its own row, or the runtime file
    the row (or the caller, from the configuration) names, if that file describes the same
    database (a copy of the database on a laptop never reads the laptop's agent)."""
    stored = read_row(conn)
    path = runtime_file or (Path(stored.runtime_file) if stored.runtime_file else None)
    if path is None or not path.is_absolute() or path.name != FILE_NAME:
        return stored
    fresh = read_file(path)
    database = database_of(conn)
    if (
        not fresh.published
        or not fresh.database
        or fresh.database != database
        or (fresh.database_id and fresh.database_id != file_id(database))
        or fresh.daemon.boot_id != boot_id()  # this boot's daemon only
    ):
        return stored
    if stored.published and (stored.daemon.heartbeat or 0.0) >= (fresh.daemon.heartbeat or 0.0):
        return stored
    return fresh
