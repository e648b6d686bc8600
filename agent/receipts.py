"""Offline delivery, the way back: the fleet's receipt for a bundle, checked and applied.

`ironfleet-collector import` answers a bundle (agent/export.py) with a receipt: the
signed acks it would have published on MQTT, one per chunk. The agent accepts them in
two steps, each checking everything itself:

1. `ironfleet import-receipt FILE` (the CLI, which never writes the database): decodes
   the receipt, checks each ack against the fleet's public key and the export's ledger
   entry (`<state dir>/exports/<export>.json`: the ack's digest must be that chunk's),
   then queues the file in `<state dir>/inbox/`.
2. The daemon (`ReceiptInbox`, stepped on the uplink thread) does the same checks again,
   since the inbox and the ledger are writable by the `ironfleet` group and so are not
   trusted, and one more: it rebuilds each events chunk from its own rows and compares
   the digest, so an ack moves the cursor only over rows whose exact bytes the fleet
   signed for (a forged or stale ledger, a database replaced since, or rows shed since
   cannot pass). Then it applies the run through the uplink's delivery cursor, exactly as
   an MQTT ack (the writer persists it; only then may the ladder evict those rows).

A receipt is a msgpack array `["ironfleet-receipt", 1, vehicle, export, [ack, ...]]`,
each ack the exact bytes of an `ack` message (docs/fleet-protocol.md 3.2 and 9). Every
decoder here is total: any bytes give a value or a ReceiptError.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import msgpack

from agent.errors import AgentError
from agent.export import (
    MAX_CHUNK_FILE_BYTES,
    MAX_CHUNKS,
    BundleError,
    Chunk,
    Manifest,
    events_payload,
    list_names,
    read_bounded,
    read_run,
    shared_dir,
    write_atomic,
)
from agent.fleet import MAX_CONTROL_BYTES, Ack, FleetMessageError, batch_digest
from agent.fleet_auth import FleetAuth
from agent.render import pairs, table
from agent.resilience.cursor import AckedRun
from agent.resilience.ratelimit import LogThrottle
from agent.store import read_cursor
from agent.storedb import EXPORTS_DIR

log = logging.getLogger(__name__)

RECEIPT_MAGIC: Final = "ironfleet-receipt"
RECEIPT_VERSION: Final = 1
RECEIPT_NAME: Final = "receipt.msgpack"  # in the bundle directory, by default
INBOX_DIR: Final = "inbox"
RECEIPT_SUFFIX: Final = ".receipt"
# One ack per chunk, each at most MAX_CONTROL_BYTES (a signed ack packs to ~180): the
# largest receipt a genuine collector writes, plus the array's headers.
MAX_RECEIPT_BYTES: Final = MAX_CHUNKS * (MAX_CONTROL_BYTES + 3) + 1024
MAX_LEDGERS: Final = 64  # exports awaiting a receipt; more and `export` refuses
MAX_LEDGER_BYTES: Final = 2 * 2**20  # a ledger entry is a manifest (export.MAX_MANIFEST_BYTES)
MAX_INBOX_FILES: Final = 64  # receipts the daemon tracks at once (waiting to be persisted)
MAX_SCAN: Final = 1024  # directory entries looked at per scan (the group can fill it)
SCAN_INTERVAL: Final = 1.0  # seconds between two looks at the inbox; one file per look
# Acks checked per uplink step: each events ack rebuilds one chunk (~5,000 rows, ~15 ms),
# and the uplink thread must keep serving MQTT and the watchdog.
STEP_ACKS: Final = 2
LOG_INTERVAL: Final = 60.0

# Why a receipt file or one of its acks was refused (a fixed set: counters stay bounded).
REASONS: Final = (
    "unreadable",  # the file could not be read, or is over MAX_RECEIPT_BYTES
    "undecodable",  # not a receipt, or an ack in it is not an ack
    "wrong_vehicle",  # a receipt for another vehicle
    "unknown_export",  # no ledger entry: an export this database did not make, or pruned
    "unknown_batch",  # an ack for no chunk of that export
    "unsigned",  # no signature while a fleet key is configured
    "digest_mismatch",  # the ack's digest is not that of the chunk exported
    "bad_signature",  # not the fleet's signature over these fields
    "store_mismatch",  # the rows no longer rebuild the chunk the fleet acked
    "bug",  # caught by the last-resort guard
)


class ReceiptError(AgentError):
    """A receipt is not one, or does not hold for this agent; the message says why."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """The fleet's acks for the chunks of one export."""

    vehicle: str
    export: int
    acks: tuple[Ack, ...]

    def encode(self) -> bytes:
        acks = [ack.encode() for ack in self.acks]
        packed: bytes = msgpack.packb(
            [RECEIPT_MAGIC, RECEIPT_VERSION, self.vehicle, self.export, acks], use_bin_type=True
        )
        return packed

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        """The receipt in `data`; ReceiptError for anything else."""
        if len(data) > MAX_RECEIPT_BYTES:
            raise ReceiptError(f"{len(data)} bytes, over the cap of {MAX_RECEIPT_BYTES}")
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=256,
                                  max_bin_len=MAX_CONTROL_BYTES, max_array_len=MAX_CHUNKS,
                                  max_map_len=0, max_ext_len=0)  # fmt: skip
        except Exception as exc:  # msgpack's many errors, nesting, MemoryError
            raise ReceiptError(f"not a receipt: {type(exc).__name__}: {str(exc)[:80]}") from None
        if type(doc) is not list or len(doc) != 5 or doc[0] != RECEIPT_MAGIC:
            raise ReceiptError(f"not a receipt (no {RECEIPT_MAGIC!r} header)")
        _, version, vehicle, export, raw = doc
        if type(version) is not int or version != RECEIPT_VERSION:
            raise ReceiptError(f"unsupported receipt version {version!r:.20}")
        if type(vehicle) is not str or not vehicle or type(export) is not int or export < 1:
            raise ReceiptError("the receipt's vehicle or export is malformed")
        if type(raw) is not list or not all(type(a) is bytes for a in raw):
            raise ReceiptError("the receipt's acks must be a list of bin")
        try:
            acks = tuple(Ack.decode(a) for a in raw)
        except FleetMessageError as exc:
            raise ReceiptError(f"an ack in the receipt is undecodable: {exc}") from None
        if len({a.batch_id for a in acks}) != len(acks):
            raise ReceiptError("the receipt acks a batch twice")
        return cls(vehicle, export, acks)


# -- the ledger ------------------------------------------------------------------------------


def load_ledger(state_dir: Path, export: int) -> Manifest | None:
    """The ledger entry (manifest) of export `export`, or None if there is none or it is
    unreadable (an unreadable one is logged)."""
    path = state_dir / EXPORTS_DIR / f"{export}.json"
    if not path.exists():
        return None
    try:
        manifest = Manifest.from_json(read_bounded(path, MAX_LEDGER_BYTES, "a ledger"), str(path))
    except BundleError as exc:
        log.warning("ledger_unreadable %s", exc)
        return None
    return manifest if manifest.export == export else None


def list_ledgers(state_dir: Path) -> list[Manifest]:
    """Readable ledger entries, oldest export first (at most MAX_LEDGERS + 1)."""
    folder = state_dir / EXPORTS_DIR
    found: list[Manifest] = []
    if not folder.is_dir():
        return found
    for name in list_names(folder, MAX_SCAN):
        stem = name.removesuffix(".json")
        if name.endswith(".json") and stem.isdigit() and len(found) <= MAX_LEDGERS:
            manifest = load_ledger(state_dir, int(stem))
            if manifest is not None:
                found.append(manifest)
    return sorted(found, key=lambda m: m.created_ms)


def prune_ledgers(state_dir: Path, cursor: int) -> list[Manifest]:
    """Remove the ledger entries of exports the fleet now holds entirely (their top is
    below `cursor`); the entries left, oldest first."""
    left = []
    for manifest in list_ledgers(state_dir):
        if manifest.top < cursor:  # a state-only export (no events) included
            with contextlib.suppress(OSError):
                os.unlink(state_dir / EXPORTS_DIR / f"{manifest.export}.json")
        else:
            left.append(manifest)
    return left


# -- checks shared by the CLI and the daemon -------------------------------------------------


def ack_refusal(ack: Ack, auth: FleetAuth, chunk: Chunk | None) -> str | None:
    """Why `ack` does not hold for `chunk` of a ledger entry, or None (cheapest first)."""
    if chunk is None or ack.kind != chunk.kind:
        return "unknown_batch"
    if auth.signed and not ack.signature:
        return "unsigned"
    if ack.digest.hex() != chunk.sha256:
        return "digest_mismatch"
    if not auth.ack_ok(ack):
        return "bad_signature"
    return None


def check_receipt(
    data: bytes, where: str, auth: FleetAuth, state_dir: Path
) -> tuple[Receipt, Manifest]:
    """The receipt in `data` and its ledger entry, if every ack in it holds; else a
    ReceiptError naming `where` and the reasons (for `ironfleet import-receipt`)."""
    try:
        receipt = Receipt.decode(data)
    except ReceiptError as exc:
        raise ReceiptError(f"{where}: {exc}") from None
    if receipt.vehicle != auth.vehicle:
        raise ReceiptError(f"{where}: a receipt for vehicle {receipt.vehicle!r:.80}; this "
                           f"agent is {auth.vehicle!r}")  # fmt: skip
    ledger = load_ledger(state_dir, receipt.export)
    if ledger is None:
        raise ReceiptError(
            f"{where}: no export {receipt.export} in {state_dir / EXPORTS_DIR}: this "
            "database did not make it (another vehicle's stick?), or its ledger was removed"
        )
    reasons = Counter(
        r for r in (ack_refusal(a, auth, ledger.chunk(a.batch_id)) for a in receipt.acks) if r
    )
    if reasons:
        why = ", ".join(f"{k}={n}" for k, n in sorted(reasons.items()))
        raise ReceiptError(f"{where}: {sum(reasons.values())} of {len(receipt.acks)} acks "
                           f"refused ({why}); nothing queued")  # fmt: skip
    return receipt, ledger


def queue_receipt(path: Path, state_dir: Path, auth: FleetAuth) -> dict[str, Any]:
    """Check the receipt at `path` (a file, or a bundle directory holding RECEIPT_NAME)
    and queue it for the daemon in the inbox; what it covers."""
    if path.is_dir():
        path = path / RECEIPT_NAME
    data = read_bounded(path, MAX_RECEIPT_BYTES, "a receipt")
    receipt, ledger = check_receipt(data, str(path), auth, state_dir)
    inbox = shared_dir(state_dir / INBOX_DIR)
    target = inbox / f"{receipt.export}-{time.time_ns() // 1_000_000}{RECEIPT_SUFFIX}"
    try:
        write_atomic(target, data, 0o640)
    except OSError as exc:
        raise ReceiptError(f"{target}: cannot queue the receipt: {exc.strerror or exc}") from None
    runs = [c for a in receipt.acks if (c := ledger.chunk(a.batch_id)) and c.kind == "events"]
    return {
        "queued": str(target), "export": receipt.export, "acks": len(receipt.acks),
        "events": sum(c.events for c in runs),
        "first": min((c.first for c in runs), default=0),
        "last": max((c.last for c in runs), default=0),
        "stored": sum(a.stored for a in receipt.acks),
        "duplicates": sum(a.duplicates for a in receipt.acks),
        "whole_export": len(receipt.acks) == len(ledger.chunks),
    }  # fmt: skip


def exports_view(conn: sqlite3.Connection, state_dir: Path) -> dict[str, Any]:
    """The exports in the ledger, whether the fleet holds each, and the receipts queued."""
    cursor = read_cursor(conn)
    inbox = state_dir / INBOX_DIR
    queued = sorted(_receipt_names(inbox)) if inbox.is_dir() else []
    exports = [
        {"export": m.export, "created_ms": m.created_ms, "events": m.events,
         "first": m.cursor, "top": m.top, "chunks": len(m.chunks), "complete": m.complete,
         "delivered": m.top < cursor}
        for m in list_ledgers(state_dir)
    ]  # fmt: skip
    return {"cursor": cursor, "exports": exports, "inbox": queued}


def _receipt_names(inbox: Path) -> list[str]:
    return [n for n in list_names(inbox, MAX_SCAN)
            if n.endswith(RECEIPT_SUFFIX) and not n.startswith(".")]  # fmt: skip


def receipt_text(done: dict[str, Any]) -> str:
    """What `ironfleet import-receipt FILE` prints of `queue_receipt`'s answer."""
    part = "" if done["whole_export"] else " (part of the export)"
    return pairs([
        ("receipt", f"export {done['export']}: {done['acks']} acks checked; the fleet stored "
                    f"{done['stored']:,} events new and already held {done['duplicates']:,}"),
        ("covers", f"{done['events']:,} events, rows {done['first']:,} to {done['last']:,}{part}"),
        ("queued", f"{done['queued']}: the agent applies it within seconds, or at its next "
                   "start; `ironfleet status` then shows the fleet ack"),
    ])  # fmt: skip


def exports_text(view: dict[str, Any]) -> str:
    """What `ironfleet import-receipt` without a file prints of `exports_view`."""
    rows = [[e["export"], e["events"], f"{e['first']}-{e['top']}", e["chunks"],
             "yes" if e["delivered"] else "no"] for e in view["exports"]]  # fmt: skip
    listing = table(["export", "events", "rows", "chunks", "fleet holds it"], rows)
    return (f"{listing}\nreceipts queued: {len(view['inbox'])} (the agent removes each once "
            "the cursor it moved is saved)")  # fmt: skip


# -- the daemon's side -----------------------------------------------------------------------


class Cursor(Protocol):
    """What the inbox needs of the uplink's resync (agent/resync.py `Resync`)."""

    @property
    def delivered(self) -> int: ...

    def apply_run(self, run: AckedRun) -> bool: ...


@dataclass
class _Tally:
    name: str
    export: int
    acks: int
    applied: int = 0
    stale: int = 0
    state: int = 0
    refused: int = 0
    upto: int = 0  # highest rowid applied: the file goes once the persisted cursor passes it


class ReceiptInbox:
    """Receipts queued in `<state dir>/inbox/`, checked again and applied through the
    uplink's cursor; steppable (`run_once(now)`), never raises.

    One file is taken per SCAN_INTERVAL, its acks are checked STEP_ACKS per step. A file
    is removed once what it moved is persisted (`uplink.cursor` passed it), or at once if
    it moved nothing; if the agent stops before that, the next start applies it again
    (harmless: the cursor only moves forwards).
    """

    def __init__(
        self, state_dir: Path, reader: sqlite3.Connection, auth: FleetAuth, cursor: Cursor
    ) -> None:
        self.state_dir = state_dir
        self.inbox = state_dir / INBOX_DIR
        self.reader = reader
        self.auth = auth
        self.cursor = cursor
        self.counters: dict[str, int] = dict.fromkeys(
            ("files", "acks_applied", "acks_stale", "acks_state", *REASONS), 0
        )
        self._work: deque[tuple[Ack, Chunk | None]] = deque()
        self._tally: _Tally | None = None
        self._waiting: dict[str, int] = {}  # file name -> rowid the persisted cursor must pass
        self._skip: set[str] = set()  # files a bug stopped: not retried by this process
        self._next_scan = 0.0
        self._throttle = LogThrottle(LOG_INTERVAL, max_keys=2 * len(REASONS))
        for folder in (self.inbox, state_dir / EXPORTS_DIR):
            try:
                shared_dir(folder)
            except OSError as exc:
                log.warning("receipt_inbox_unusable path=%s error=%r", folder, str(exc))

    def run_once(self, now: float) -> None:
        """Check the next acks of the current receipt, or look for a new one when due."""
        try:
            if self._work:
                self._step()
            elif now >= self._next_scan:
                self._next_scan = now + SCAN_INTERVAL
                self._release()
                self._load(now)
        except Exception as exc:  # last resort: the uplink thread must go on
            self.counters["bug"] += 1
            if self._tally is not None and len(self._skip) < MAX_INBOX_FILES:
                self._skip.add(self._tally.name)
            self._work.clear()
            self._tally = None
            if self._throttle.check("bug", now).log:
                log.error("receipt_handler_bug error=%r", f"{type(exc).__name__}: {exc}",
                          exc_info=(type(exc), exc, exc.__traceback__))  # fmt: skip

    def _load(self, now: float) -> None:
        if not self.inbox.is_dir() or len(self._waiting) >= MAX_INBOX_FILES:
            return
        names = [n for n in _receipt_names(self.inbox)
                 if n not in self._waiting and n not in self._skip]  # fmt: skip
        if not names:
            return
        name = min(names)
        try:
            data = read_bounded(self.inbox / name, MAX_RECEIPT_BYTES, "a receipt")
            receipt = Receipt.decode(data)
        except BundleError as exc:
            self._refuse_file(name, "unreadable", str(exc), now)
            return
        except ReceiptError as exc:
            self._refuse_file(name, "undecodable", str(exc), now)
            return
        if receipt.vehicle != self.auth.vehicle:
            self._refuse_file(name, "wrong_vehicle", f"vehicle {receipt.vehicle!r:.80}", now)
            return
        ledger = load_ledger(self.state_dir, receipt.export)
        if ledger is None:
            self._refuse_file(name, "unknown_export", f"export {receipt.export}", now)
            return
        self._work.extend((ack, ledger.chunk(ack.batch_id)) for ack in receipt.acks)
        self._tally = _Tally(name, receipt.export, len(receipt.acks))
        if not self._work:
            self._finish()

    def _step(self) -> None:
        for _ in range(STEP_ACKS):
            if not self._work:
                break
            self._check(*self._work.popleft())
        if not self._work:
            self._finish()

    def _check(self, ack: Ack, chunk: Chunk | None) -> None:
        tally = self._tally
        assert tally is not None
        reason = ack_refusal(ack, self.auth, chunk)
        if reason is not None or chunk is None:
            self._refuse_ack(tally, reason or "unknown_batch")
            return
        if chunk.kind == "state":  # the fleet view; moves no cursor (as over MQTT)
            self.counters["acks_state"] += 1
            tally.state += 1
            return
        if chunk.last <= self.cursor.delivered:
            self.counters["acks_stale"] += 1
            tally.stale += 1
            return
        # The rows must still be exactly what the fleet signed for: rebuild the chunk.
        run = read_run(self.reader, chunk.first - 1, chunk.last, chunk.events + 1,
                       MAX_CHUNK_FILE_BYTES)  # fmt: skip
        payload = events_payload(self.auth.vehicle, chunk.batch, run.events)
        if run.last != chunk.last or batch_digest(payload) != ack.digest:
            self._refuse_ack(tally, "store_mismatch")
            return
        self.cursor.apply_run(AckedRun(chunk.first, chunk.last, run.positions))
        self.counters["acks_applied"] += 1
        tally.applied += 1
        tally.upto = max(tally.upto, chunk.last)

    def _refuse_ack(self, tally: _Tally, reason: str) -> None:
        self.counters[reason] += 1
        tally.refused += 1

    def _finish(self) -> None:
        tally = self._tally
        assert tally is not None
        self._tally = None
        self.counters["files"] += 1
        level = logging.WARNING if tally.refused else logging.INFO
        log.log(level, "receipt_applied file=%s export=%d acks=%d applied=%d stale=%d state=%d "
                "refused=%d delivered=%d", tally.name, tally.export, tally.acks, tally.applied,
                tally.stale, tally.state, tally.refused, self.cursor.delivered)  # fmt: skip
        if tally.upto:
            self._waiting[tally.name] = tally.upto
        else:
            self._remove(tally.name)

    def _release(self) -> None:
        """Remove the receipts whose effect the writer has persisted."""
        if not self._waiting:
            return
        persisted = read_cursor(self.reader)
        for name, upto in list(self._waiting.items()):
            if persisted > upto:
                del self._waiting[name]
                self._remove(name)

    def _refuse_file(self, name: str, reason: str, detail: str, now: float) -> None:
        self.counters[reason] += 1
        self.counters["files"] += 1
        if self._throttle.check(reason, now).log:
            log.warning("receipt_refused file=%s reason=%s detail=%r", name, reason, detail[:160])
        self._remove(name)

    def _remove(self, name: str) -> None:
        try:
            os.unlink(self.inbox / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("receipt_not_removed file=%s error=%r", name, str(exc))
            if len(self._skip) < MAX_INBOX_FILES:
                self._skip.add(name)
