"""Offline delivery, vehicle side: the unacknowledged backlog as a bundle on a USB stick.

A vehicle that cannot reach its broker for days still has a technician who can carry
its backlog home. `ironfleet export DIR` writes a bundle (a directory) that the
collector loads with `ironfleet-collector import DIR` (fleet/importer.py), which
answers with a receipt of signed acks (agent/receipts.py). Nothing is deleted here:
rows leave the vehicle only once the fleet's acks move the delivery cursor.

A bundle holds (docs/fleet-protocol.md section 9):

    0001-state.msgpack ...    `state` batches: the latest event per stream (written first)
    0002-events.msgpack ...   `events` batches: the backlog above the cursor, oldest first
    manifest.json             format, vehicle, export id, per chunk: batch id, rowid run,
                              events, bytes, SHA-256
    SHA256SUMS                sha256sum(1) lines for manifest.json and every chunk;
                              written last, so a bundle without it is incomplete

Each chunk file is byte for byte the payload `Batch.encode(compress=False)` would publish
on MQTT, so the collector's ingest, dedup and ack digests apply unchanged. Chunks are raw
(codec 0) so that the daemon can rebuild a chunk from its own rows and compare digests
before it trusts an ack for it (agent/receipts.py); zlib's output may change with the
library, msgpack's smallest-encoding rule does not.

Reading: one short read-only transaction per chunk through a reader the caller supplies
(the CLI's guarded `cliaccess.reading`), so no snapshot is held longer than one chunk
(DESIGN.md: a reader held for 5 s grew the WAL from 4 to 77 MB). Writing: every file via
a temporary name, fsync, rename, fsync of the directory, because a stick gets pulled.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundlesig import SIGNATURE_NAME, signature_file
from agent.errors import AgentError
from agent.fleet import ROW_OVERHEAD, Batch
from agent.resilience import Event
from agent.store import read_cursor, read_latest
from agent.version import agent_version

BUNDLE_FORMAT: Final = "ironfleet-bundle"
BUNDLE_VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"
SUMS_NAME: Final = "SHA256SUMS"
# Batch ids of a bundle are `export << CHUNK_BITS | index` with export < 2**20, so all lie
# below 2**32; the live uplink's are `run_id << 32 | n` with run_id >= 1, all at or above
# 2**32 (agent/resync.py): the two ranges never meet.
CHUNK_BITS: Final = 12
MAX_CHUNKS: Final = 2**CHUNK_BITS - 1  # chunk files per bundle (index 0 is unused)
MAX_EXPORT_ID: Final = 2**20 - 1
CHUNK_EVENTS: Final = 5000  # default events per chunk (like the uplink's state batches)
# Events per chunk at most: also what a ledger may claim, since the daemon rebuilds a
# chunk in memory to check its digest (10,000 events of at most one 512-byte frame each).
MAX_CHUNK_EVENTS: Final = 10_000
CHUNK_BYTES: Final = 4 * 2**20  # a chunk closes before the next event would pass this
# A chunk file a reader accepts: CHUNK_BYTES plus one event and the envelope, x2 margin;
# below the collector's MAX_DOCUMENT_BYTES.
MAX_CHUNK_FILE_BYTES: Final = 8 * 2**20
MAX_MANIFEST_BYTES: Final = 2 * 2**20  # MAX_CHUNKS entries of ~230 bytes, x2 margin
MAX_SUMS_BYTES: Final = 512 * 1024  # MAX_CHUNKS + 1 lines of ~85 bytes, x1.5 margin
MAX_VEHICLE_BYTES: Final = 64  # as [agent] vehicle_id
SPACE_RESERVE: Final = 2**20  # bytes left free on the stick for manifest, sums, receipt
EXPORT_NICE: Final = 10  # `ironfleet export` yields the CPU to the daemon's ingest
STATE_CHUNK_EVENTS: Final = 5000  # streams per state chunk (agent/resync.py's page size)

_CHUNK_FILE: Final = re.compile(r"\A(\d{4})-(state|events)\.msgpack\Z")
_SHA256: Final = re.compile(r"\A[0-9a-f]{64}\Z")
_TOP_KEYS: Final = frozenset({
    "format", "version", "vehicle", "export", "created_ms", "agent_version", "codec",
    "cursor", "top", "events", "state_events", "complete", "stopped", "chunks",
})  # fmt: skip
_CHUNK_KEYS: Final = frozenset({"file", "type", "batch", "first", "last", "events", "bytes",
                                "sha256"})  # fmt: skip
STOP_REASONS: Final = ("", "max_events", "max_chunks", "space")

Reader = Callable[[], AbstractContextManager[sqlite3.Connection]]


class BundleError(AgentError):
    """A bundle, its manifest or a ledger is unreadable, incomplete or damaged, or cannot be
    written; the message names the file."""


def batch_id(export: int, index: int) -> int:
    """The batch id of chunk `index` (1-based) of export `export`."""
    return (export << CHUNK_BITS) | index


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk file: a batch, the rowid run it covers (events) and its digest."""

    file: str
    kind: str  # "state" or "events"
    batch: int
    first: int  # events: every stored row in [first, last]; state: 0, 0
    last: int
    events: int
    size: int
    sha256: str  # hex, of the file's bytes: what the collector's ack names as `digest`

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "type": self.kind, "batch": self.batch, "first": self.first,
                "last": self.last, "events": self.events, "bytes": self.size,
                "sha256": self.sha256}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a bundle holds; also the agent's ledger entry for the export."""

    vehicle: str
    export: int
    created_ms: int
    cursor: int  # the agent's delivery cursor when the export began (first rowid not acked)
    top: int  # last rowid the events chunks cover (cursor - 1 if none)
    chunks: tuple[Chunk, ...]
    complete: bool  # every row from cursor to the top at the start is in it
    stopped: str = ""  # why not complete: one of STOP_REASONS
    agent_version: str = ""

    @property
    def events(self) -> int:
        return sum(c.events for c in self.chunks if c.kind == "events")

    @property
    def state_events(self) -> int:
        return sum(c.events for c in self.chunks if c.kind == "state")

    @property
    def size(self) -> int:
        return sum(c.size for c in self.chunks)

    def chunk(self, batch: int) -> Chunk | None:
        """The chunk with batch id `batch`, or None."""
        index = batch - (self.export << CHUNK_BITS)
        if 1 <= index <= len(self.chunks):
            return self.chunks[index - 1]
        return None

    def to_json(self) -> bytes:
        doc = {
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "vehicle": self.vehicle,
            "export": self.export, "created_ms": self.created_ms,
            "agent_version": self.agent_version, "codec": 0, "cursor": self.cursor,
            "top": self.top, "events": self.events, "state_events": self.state_events,
            "complete": self.complete, "stopped": self.stopped,
            "chunks": [c.as_json() for c in self.chunks],
        }  # fmt: skip
        return json.dumps(doc, indent=1, ensure_ascii=True).encode("ascii") + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """The manifest in `data`; BundleError naming `where` for anything else."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{where}: over {MAX_MANIFEST_BYTES} bytes, not a manifest")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BundleError(f"{where}: not JSON ({str(exc)[:80]}): truncated?") from None
        try:
            return _manifest(doc)
        except _Bad as exc:
            raise BundleError(f"{where}: {exc}") from None


class _Bad(Exception):
    """A field of a manifest is wrong (becomes a BundleError naming the file)."""


def _int(value: object, what: str, low: int = 0, high: int = 2**63 - 1) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _Bad(f"{what} must be an integer in [{low}, {high}]")
    return value


def _text(value: object, what: str, high: int = 64) -> str:
    if type(value) is not str or len(value) > high:
        raise _Bad(f"{what} must be a string of at most {high} characters")
    return value


def _keys(doc: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    if type(doc) is not dict:
        raise _Bad(f"{what} must be an object")
    if set(doc) != keys:
        diff = sorted(set(doc) ^ keys)[:3]
        raise _Bad(f"{what}: missing or unknown keys {diff!r:.80}")
    return doc


def _manifest(raw: object) -> Manifest:
    doc = _keys(raw, _TOP_KEYS, "the manifest")
    if doc["format"] != BUNDLE_FORMAT:
        raise _Bad(f"format is {doc['format']!r:.40}, not {BUNDLE_FORMAT!r}")
    if type(doc["version"]) is not int or doc["version"] != BUNDLE_VERSION:
        raise _Bad(f"unsupported version {doc['version']!r:.20} (this agent reads 1)")
    vehicle = _text(doc["vehicle"], "vehicle")
    if not vehicle or len(vehicle.encode("utf-8")) > MAX_VEHICLE_BYTES or "/" in vehicle:
        raise _Bad("vehicle must be a vehicle id")
    export = _int(doc["export"], "export", 1, MAX_EXPORT_ID)
    if doc["codec"] != 0 or type(doc["codec"]) is not int:
        raise _Bad("codec must be 0 (raw)")
    cursor = _int(doc["cursor"], "cursor", 1)
    top = _int(doc["top"], "top", cursor - 1)
    complete = doc["complete"]
    stopped = doc["stopped"]
    if type(complete) is not bool or stopped not in STOP_REASONS or complete == bool(stopped):
        raise _Bad("complete and stopped disagree")
    chunks = _chunks(doc["chunks"], export, cursor, top)
    manifest = Manifest(vehicle, export, _int(doc["created_ms"], "created_ms"), cursor, top,
                        chunks, complete, stopped,
                        _text(doc["agent_version"], "agent_version"))  # fmt: skip
    totals = (_int(doc["events"], "events"), _int(doc["state_events"], "state_events"))
    if totals != (manifest.events, manifest.state_events):
        raise _Bad("events and state_events disagree with the chunks")
    return manifest


def _chunks(rows: object, export: int, cursor: int, top: int) -> tuple[Chunk, ...]:
    """The manifest's chunks: state first, then events runs that follow on from the
    cursor without a hole up to `top`, named and numbered by their place."""
    if type(rows) is not list or len(rows) > MAX_CHUNKS:
        raise _Bad(f"chunks must be a list of at most {MAX_CHUNKS}")
    chunks = []
    after = cursor - 1
    for index, row in enumerate(rows, 1):
        c = _keys(row, _CHUNK_KEYS, f"chunk {index}")
        kind = c["type"]
        if kind not in ("state", "events") or c["file"] != f"{index:04d}-{kind}.msgpack":
            raise _Bad(f"chunk {index}: file and type must be {index:04d}-<type>.msgpack")
        if c["batch"] != batch_id(export, index) or type(c["batch"]) is not int:
            raise _Bad(f"chunk {index}: batch must be {batch_id(export, index)}")
        if kind == "state":
            if _int(c["first"], "first", 0, 0) or _int(c["last"], "last", 0, 0) or after >= cursor:
                raise _Bad(f"chunk {index}: state chunks come first and cover no rows")
        else:
            first = _int(c["first"], f"chunk {index} first", 1)
            if first != after + 1 or _int(c["last"], f"chunk {index} last", first) > top:
                raise _Bad(f"chunk {index}: rows must follow on from {after + 1} up to {top}")
            after = c["last"]
        sha = c["sha256"]
        if type(sha) is not str or not _SHA256.match(sha):
            raise _Bad(f"chunk {index}: sha256 must be 64 lowercase hex digits")
        chunks.append(Chunk(
            c["file"], kind, c["batch"], c["first"], c["last"],
            _int(c["events"], f"chunk {index} events", 1, MAX_CHUNK_EVENTS),
            _int(c["bytes"], f"chunk {index} bytes", 1, MAX_CHUNK_FILE_BYTES), sha,
        ))  # fmt: skip
    if after != top:
        raise _Bad(f"top is {top} but the chunks end at {after}")
    return tuple(chunks)


# -- files -----------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (vfat on a few kernels) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that it is either absent or whole after a crash or a
    pulled stick: a temporary name, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def read_bounded(path: Path, cap: int, what: str) -> bytes:
    """A regular file's bytes (no symlink followed), at most `cap`; BundleError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise BundleError(f"{path}: cannot open {what}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise BundleError(f"{path}: {what} is not a regular file")
            data = fh.read(cap + 1)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise BundleError(f"{path}: {what} is over {cap} bytes")
    return data


def list_names(folder: Path, limit: int = 1024) -> list[str]:
    """Names of at most `limit` entries of `folder` (a peer may have filled it)."""
    with os.scandir(folder) as entries:
        return [entry.name for entry in itertools.islice(entries, limit)]


def shared_dir(path: Path) -> Path:
    """Make `path` (exports or inbox beside the database) if missing: setgid and group
    writable (0o2770), in the database directory's group, so technicians of the
    `ironfleet` group and the agent's user can both write and read what is in it."""
    if not path.is_dir():
        path.mkdir(mode=0o2770, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o2770)  # mkdir's mode passes through the umask
            os.chown(path, -1, path.parent.stat().st_gid)
    return path


# -- reading the store -----------------------------------------------------------------------

_RUN_SQL: Final = """
    SELECT e.id, s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind, e.priority, e.payload
    FROM events AS e JOIN streams AS s ON s.id = e.stream_id
    WHERE e.id > ? AND e.id <= ? ORDER BY e.id LIMIT ?"""


@dataclass
class Run:
    """Stored events in rowid order, with each stream's highest position among them."""

    events: list[tuple[Event, int]] = field(default_factory=list)  # (event, ts_quality)
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    last: int = 0  # rowid of the last event read


def read_run(conn: sqlite3.Connection, after: int, top: int, max_events: int,
             max_bytes: int) -> Run:  # fmt: skip
    """Events with rowid in (after, top], oldest first: at most `max_events`, and no more
    once their size (as agent/resync.py counts it) would pass `max_bytes`."""
    run = Run(last=after)
    size = 0
    for rowid, name, epoch, seq, ts, tq, kind, priority, payload in conn.execute(
        _RUN_SQL, (after, top, max_events)
    ).fetchall():
        size += len(payload) + len(name) + len(kind) + ROW_OVERHEAD
        if run.events and size > max_bytes:
            break
        run.events.append((Event.trusted(name, seq, epoch, ts, kind, priority, bytes(payload)), tq))
        if (epoch, seq) > run.positions.get(name, (-1, -1)):
            run.positions[name] = (epoch, seq)
        run.last = rowid
    return run


def events_payload(vehicle: str, batch: int, events: list[tuple[Event, int]]) -> bytes:
    """An events chunk exactly as written: a historical `events` batch, raw codec."""
    return Batch(vehicle, batch, "events", True, tuple(events)).encode(compress=False)


def plan(conn: sqlite3.Connection) -> dict[str, int]:
    """What an export would carry now (for `ironfleet export` without DIR)."""
    cursor = read_cursor(conn)
    top = int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])
    events, payload = conn.execute(
        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM events WHERE id >= ?",
        (cursor,),
    ).fetchone()
    streams = int(conn.execute("SELECT count(*) FROM streams").fetchone()[0])
    return {"cursor": cursor, "top": top, "events": int(events), "streams": streams,
            "chunks": -(-int(events) // CHUNK_EVENTS),
            # measured: the msgpack event around the payload is ~45 bytes for short names
            "bytes_estimate": int(payload) + 45 * (int(events) + streams)}  # fmt: skip


# -- writing a bundle ------------------------------------------------------------------------


def prepare_directory(directory: Path, database: Path | None = None) -> Path:
    """`directory`, made if missing (its parent must exist: a stick that is not mounted
    is not silently replaced by a folder on the vehicle's disk); BundleError if it holds a
    bundle already, or if it is on the file system of `database`, whose free space the
    agent keeps for its buffer (a full disk there makes the ladder shed unacked rows)."""
    if not directory.parent.is_dir():
        raise BundleError(f"{directory.parent} does not exist: is the stick mounted?")
    try:
        # Checked before anything is made: where `directory` is, or would be made.
        where = directory if directory.exists() else directory.parent
        same = database is not None and where.stat().st_dev == database.stat().st_dev
        if same:
            raise BundleError(f"{directory} is on the file system of {database}: the agent "
                              "keeps that free space for its buffer; export to a USB stick "
                              "(or pass --same-filesystem on a copy, off the vehicle)")  # fmt: skip
        directory.mkdir(exist_ok=True)
        names = list_names(directory)
    except OSError as exc:
        raise BundleError(f"{directory}: cannot use it: {exc.strerror or exc}") from None
    if any(n in (MANIFEST_NAME, SUMS_NAME, SIGNATURE_NAME) or _CHUNK_FILE.match(n) for n in names):
        raise BundleError(f"{directory} already holds a bundle: give a new directory")
    return directory


def new_export_id(ledger_dir: Path, rng: random.Random | None = None) -> int:
    """A random export id without a ledger entry yet."""
    pick = rng or random.SystemRandom()
    for _ in range(64):
        export = pick.randrange(1, MAX_EXPORT_ID + 1)
        if not (ledger_dir / f"{export}.json").exists():
            return export
    raise BundleError(f"{ledger_dir}: no free export id (clear old ledgers)")


class _Bundle:
    """Chunk files written so far, each atomically, with the stick's free space checked."""

    def __init__(self, directory: Path, vehicle: str, export: int) -> None:
        self.directory = directory
        self.vehicle = vehicle
        self.export = export
        self.chunks: list[Chunk] = []

    @property
    def full(self) -> bool:
        return len(self.chunks) >= MAX_CHUNKS

    def fits(self, size: int) -> bool:
        return shutil.disk_usage(self.directory).free >= size + SPACE_RESERVE

    def add(self, kind: str, payload: bytes, events: int, first: int, last: int) -> None:
        index = len(self.chunks) + 1
        name = f"{index:04d}-{kind}.msgpack"
        try:
            write_atomic(self.directory / name, payload)
        except OSError as exc:
            why = exc.strerror or exc
            raise BundleError(f"{self.directory / name}: cannot write: {why}") from None
        self.chunks.append(Chunk(name, kind, batch_id(self.export, index), first, last, events,
                                 len(payload), hashlib.sha256(payload).hexdigest()))  # fmt: skip


def export_bundle(
    read: Reader,
    directory: Path,
    ledger_dir: Path,
    vehicle: str,
    *,
    chunk_events: int = CHUNK_EVENTS,
    max_events: int | None = None,
    database: Path | None = None,
    rng: random.Random | None = None,
    signing_key: Ed25519PrivateKey | None = None,
) -> Manifest:
    """Write the latest state and the unacknowledged backlog into `directory` as a bundle,
    and its manifest into `ledger_dir` (the ledger); return the manifest.

    `read()` gives one short read transaction (a context manager); it is entered once per
    chunk. Rows stored after the start are left for the next export or the uplink. Stops
    early, with a complete and valid but shorter bundle (`stopped` says why), at
    `max_events`, at MAX_CHUNKS files, or when the stick is nearly full. With `database`,
    a `directory` on that database's file system is refused (`prepare_directory`). With
    `signing_key` (the vehicle's), the bundle is signed (agent/bundlesig.py).
    """
    if not 1 <= chunk_events <= MAX_CHUNK_EVENTS:
        raise BundleError(f"chunk_events must be in [1, {MAX_CHUNK_EVENTS}]")
    limit = MAX_CHUNKS * MAX_CHUNK_EVENTS if max_events is None else max_events
    prepare_directory(directory, database)
    with read() as conn:
        cursor = read_cursor(conn)
        top = int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])
    shared_dir(ledger_dir)
    bundle = _Bundle(directory, vehicle, new_export_id(ledger_dir, rng))
    stopped = _add_state(read, bundle)
    after = cursor - 1
    exported = 0
    while not stopped and after < top:
        if exported >= limit:
            stopped = "max_events"
            break
        if bundle.full:
            stopped = "max_chunks"
            break
        with read() as conn:
            run = read_run(conn, after, top, min(chunk_events, limit - exported), CHUNK_BYTES)
        if not run.events:
            break  # the rows left up to `top` were evicted meanwhile: the fleet acked them
        payload = events_payload(vehicle, batch_id(bundle.export, len(bundle.chunks) + 1),
                                 run.events)  # fmt: skip
        if not bundle.fits(len(payload)):
            stopped = "space"
            break
        bundle.add("events", payload, len(run.events), after + 1, run.last)
        after = run.last
        exported += len(run.events)
    if not bundle.chunks:
        raise BundleError(f"{directory}: nothing written: no room on it, or an empty store")
    manifest = Manifest(vehicle, bundle.export, int(time.time() * 1000), cursor, after,
                        tuple(bundle.chunks), not stopped, stopped, agent_version())  # fmt: skip
    data = manifest.to_json()
    sums = [f"{hashlib.sha256(data).hexdigest()}  {MANIFEST_NAME}\n"]
    sums += [f"{c.sha256}  {c.file}\n" for c in manifest.chunks]
    sums_bytes = "".join(sums).encode("ascii")
    try:
        write_atomic(directory / MANIFEST_NAME, data)
        # The ledger before the commit point: any bundle the collector can import has one.
        write_atomic(ledger_dir / f"{manifest.export}.json", data, 0o640)
        if signing_key is not None:
            write_atomic(directory / SIGNATURE_NAME, signature_file(signing_key, sums_bytes))
        write_atomic(directory / SUMS_NAME, sums_bytes)
    except OSError as exc:
        raise BundleError(f"{directory}: cannot finish the bundle: {exc.strerror or exc}") from None
    return manifest


def _add_state(read: Reader, bundle: _Bundle) -> str:
    """Write the latest event of every stream, a page per chunk; '' or why it stopped."""
    after = ""
    while True:
        with read() as conn:
            page = read_latest(conn, after=after, limit=STATE_CHUNK_EVENTS)
        if not page:
            return ""
        if bundle.full:
            return "max_chunks"
        index = len(bundle.chunks) + 1
        events = tuple((event, tq) for _, event, tq, _ in page)
        payload = Batch(bundle.vehicle, batch_id(bundle.export, index), "state", False,
                        events).encode(compress=False)  # fmt: skip
        if not bundle.fits(len(payload)):
            return "space"
        bundle.add("state", payload, len(page), 0, 0)
        if len(page) < STATE_CHUNK_EVENTS:
            return ""
        after = page[-1][1].stream
