"""Fleet protocol: topics and the msgpack documents exchanged with the collector.

Shared by the agent (uplink, resync) and the reference collector, and free of MQTT so
both sides and the tests can use it directly. docs/fleet-protocol.md describes it byte by
byte; agent/fleet_auth.py holds the signatures over acks and commands.

Topics under `ironfleet/v1/<vehicle>/`:
  events  agent -> fleet  live batches, and the backlog by priority (QoS 1)
  state   agent -> fleet  compacted replay: latest event per stream (QoS 1)
  status  agent -> fleet  retained; "online" on connect, "offline" as last will
  ack     fleet -> agent  a batch is durably stored by the collector (QoS 1, signed)
  cmd     fleet -> agent  replay request, ping (QoS 1, signed)

Every decoder here is total: for any bytes it returns a typed value or raises
FleetMessageError, and nothing else (a broker delivers whatever anyone published).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from agent.errors import AgentError
from agent.resilience import Event
from agent.wirecodec import ColumnarError, decode_columns, encode_columns

FLEET_VERSION: Final = 1
TOPIC_ROOT: Final = "ironfleet/v1"
CODEC_RAW: Final = 0
CODEC_ZLIB: Final = 1
CODEC_COLUMNAR: Final = 2  # batches only: events as columns, then zlib (agent/wirecodec.py)
# `[uplink] codec` names: what a batch is published with.
CODECS: Final = {"raw": CODEC_RAW, "zlib": CODEC_ZLIB, "columnar": CODEC_COLUMNAR}
COLUMNAR_LEVEL: Final = 6  # zlib after the columns (level 1: ~4 % more bytes, same CPU)
COMPRESS_ABOVE: Final = 1024  # bytes; smaller documents do not gain from zlib
# What a row costs beyond its payload, stream and kind names, before compression: the
# estimate batches, state pages and export runs are cut by (bytes a row = those + this).
ROW_OVERHEAD: Final = 40
BATCH_KINDS: Final = ("state", "events")
COMMAND_OPS: Final = ("replay", "ping")
# Bounds on what a peer may send us (the collector parses agents' batches, the agent
# parses acks and commands); a broker can deliver anything published on these topics.
MAX_DOCUMENT_BYTES: Final = 16 * 2**20  # a batch: batch_max_bytes caps at 8 MiB, x2 margin
MAX_BATCH_EVENTS: Final = 100_000  # batch_max_events caps at 50,000; x2 margin
MAX_WATERMARKS: Final = 100_000
MAX_NAME_BYTES: Final = 1 << 16  # stream / kind / vehicle names; serial caps are far lower
# An ack packs to ~190 bytes and a command to ~110 (docs/fleet-protocol.md 3): 1 KiB
# bounds the work any message on `ack` / `cmd` can cost before it is refused.
MAX_CONTROL_BYTES: Final = 1024
MAX_CONTROL_FIELDS: Final = 8  # the ack has 7 keys; a map past 8 is refused while unpacking
MAX_CONTROL_STR: Final = 64  # op and kind are short words
DIGEST_BYTES: Final = 32  # SHA-256
SIGNATURE_BYTES: Final = 64  # Ed25519
MAX_SQL_INT: Final = 2**63 - 1  # batch ids, sequences and epochs are SQLite INTEGERs
MAX_SMALL_INT: Final = 255  # priority and time quality fit a byte (serial protocol)

_UNPACK: Final[dict[str, Any]] = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": MAX_NAME_BYTES,
    "max_bin_len": MAX_DOCUMENT_BYTES,
    "max_array_len": MAX_BATCH_EVENTS,
    "max_map_len": MAX_WATERMARKS,
    "max_ext_len": 0,
}
_CONTROL_UNPACK: Final[dict[str, Any]] = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": MAX_CONTROL_STR,
    "max_bin_len": MAX_CONTROL_BYTES,
    "max_array_len": 3,  # the envelope
    "max_map_len": MAX_CONTROL_FIELDS,
    "max_ext_len": 0,
}


class FleetMessageError(AgentError):
    """A fleet document could not be decoded or has the wrong shape."""


def topic(vehicle: str, kind: str) -> str:
    """Topic of `kind` (events, state, status, ack, cmd) for `vehicle`."""
    return f"{TOPIC_ROOT}/{vehicle}/{kind}"


def parse_topic(name: str) -> tuple[str, str]:
    """(vehicle, kind) of a fleet topic; FleetMessageError for anything else."""
    parts = name.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != TOPIC_ROOT:
        raise FleetMessageError(f"not a fleet topic: {name[:120]!r}")
    return parts[2], parts[3]


def batch_digest(payload: bytes) -> bytes:
    """SHA-256 of a batch exactly as published: what a signed ack vouches for."""
    return hashlib.sha256(payload).digest()


def _pack(doc: Any, compress: bool, codec: int = CODEC_RAW) -> bytes:
    """The envelope of `doc`: raw, zlib (compress, when that pays) or, with a `columns`
    document (Batch.encode), columnar."""
    body: bytes = msgpack.packb(doc, use_bin_type=True)
    if codec == CODEC_COLUMNAR:
        deflated = zlib.compress(body, COLUMNAR_LEVEL)
        return msgpack.packb([FLEET_VERSION, CODEC_COLUMNAR, deflated])  # type: ignore[no-any-return]
    if compress and len(body) > COMPRESS_ABOVE:
        packed: bytes = msgpack.packb([FLEET_VERSION, CODEC_ZLIB, zlib.compress(body, 1)])
        return packed
    raw: bytes = msgpack.packb([FLEET_VERSION, CODEC_RAW, body], use_bin_type=True)
    return raw


def _rows_from_columns(doc: object) -> None:
    """Put the rows a columnar batch describes where the row layout has them."""
    if type(doc) is not dict or "columns" not in doc or "events" in doc:
        raise FleetMessageError("a columnar document has columns, not events")
    try:
        doc["events"] = decode_columns(doc.pop("columns"), MAX_BATCH_EVENTS)
    except ColumnarError as exc:
        raise FleetMessageError(f"bad columns: {exc}") from None


def _unpack(data: object, *, control: bool = False) -> dict[str, Any]:
    """The document map inside a fleet envelope. Control messages (ack, cmd) have tighter
    limits and are never compressed."""
    if not isinstance(data, bytes | bytearray):
        raise FleetMessageError(f"a fleet document is bytes, not {type(data).__name__}")
    cap = MAX_CONTROL_BYTES if control else MAX_DOCUMENT_BYTES
    if len(data) > cap:
        raise FleetMessageError(f"document of {len(data)} bytes is over the cap of {cap}")
    limits = _CONTROL_UNPACK if control else _UNPACK
    try:
        envelope = msgpack.unpackb(data, **limits)
        if not isinstance(envelope, list) or len(envelope) != 3:
            raise FleetMessageError("the envelope must be [version, codec, body]")
        version, codec, body = envelope
        if type(version) is not int or version != FLEET_VERSION:
            raise FleetMessageError(f"unsupported fleet protocol version {version!r:.40}")
        if not isinstance(body, bytes):
            raise FleetMessageError("the envelope's body must be bin")
        if type(codec) is int and codec in (CODEC_ZLIB, CODEC_COLUMNAR) and not control:
            inflater = zlib.decompressobj()
            body = inflater.decompress(body, MAX_DOCUMENT_BYTES)
            if inflater.unconsumed_tail:
                raise FleetMessageError("compressed document inflates past the cap")
        elif type(codec) is not int or codec != CODEC_RAW:
            raise FleetMessageError(f"unknown or refused codec {codec!r:.40}")
        doc = msgpack.unpackb(body, **limits)
        if codec == CODEC_COLUMNAR:
            _rows_from_columns(doc)
    except FleetMessageError:
        raise
    except Exception as exc:  # msgpack's and zlib's many errors, MemoryError, nesting
        why = f"{type(exc).__name__}: {str(exc)[:120]}"
        raise FleetMessageError(f"undecodable fleet document: {why}") from None
    if not isinstance(doc, dict):
        raise FleetMessageError(f"a fleet document is a map, not {type(doc).__name__}")
    return doc


# -- field checks: explicit types (bool is an int in Python; floats may be inf or nan) --------


def _fields(doc: dict[str, Any], what: str, required: set[str], optional: set[str]) -> None:
    missing = required - doc.keys()
    if missing:
        raise FleetMessageError(f"{what}: missing {sorted(missing)}")
    unknown = doc.keys() - required - optional
    if unknown:
        raise FleetMessageError(f"{what}: unknown keys {sorted(unknown)[:4]!r:.80}")


def _int(value: object, what: str, high: int = MAX_SQL_INT) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise FleetMessageError(f"{what} must be an integer in [0, {high}]")
    return value


def _str(value: object, what: str) -> str:
    if type(value) is not str or not value:
        raise FleetMessageError(f"{what} must be a non-empty string")
    return value


def _bin(value: object, what: str, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise FleetMessageError(f"{what} must be {size} bytes of bin")
    return value


def _number(value: object, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise FleetMessageError(f"{what} must be a finite number")
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond the float range
        raise FleetMessageError(f"{what} must be a finite number") from None


WireRow = tuple[str, int, int, float, int, str, int, bytes]  # an event as a batch carries it


def encode_rows(
    vehicle: str,
    batch_id: int,
    kind: str,
    historical: bool,
    rows: Sequence[WireRow],
    *,
    compress: bool = True,
    codec: str = "",
) -> bytes:
    """`Batch.encode` from rows already in wire order (stream, boot_epoch, seq, ts,
    ts_quality, kind, priority, payload): the uplink reads them so from the store and
    skips an `Event` per row (12% of a drain's time, bench_uplink.py section 1)."""
    head = {"vehicle": vehicle, "batch": batch_id, "type": kind, "historical": historical}
    if codec:
        compress = CODECS[codec] != CODEC_RAW
    if codec == "columnar" and rows:
        columns = encode_columns(rows)
        if columns is not None:
            return _pack({**head, "columns": columns}, True, CODEC_COLUMNAR)
    return _pack({**head, "events": rows}, compress)


@dataclass(frozen=True, slots=True)
class Batch:
    """A group of events sent in one MQTT message."""

    vehicle: str
    batch_id: int
    kind: str  # "state" (compacted replay) or "events" (backlog / live)
    historical: bool  # backlog stored before this connection: never overwrites state
    events: tuple[tuple[Event, int], ...]  # (event, ts_quality)

    def encode(self, compress: bool = True, codec: str = "") -> bytes:
        """The published bytes. `codec` (a CODECS name) wins over `compress`, which picks
        zlib (above COMPRESS_ABOVE) or raw; the columnar layout falls back to zlib for a
        batch it cannot hold (more streams than a uint16 counts)."""
        rows = [
            (e.stream, e.boot_epoch, e.seq, e.ts, tq, e.kind, e.priority, e.payload)
            for e, tq in self.events
        ]
        return encode_rows(self.vehicle, self.batch_id, self.kind, self.historical, rows,
                           compress=compress, codec=codec)  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        """The batch in `data`; FleetMessageError for anything else."""
        doc = _unpack(data)
        _fields(doc, "batch", {"vehicle", "batch", "type", "historical", "events"}, set())
        kind = doc["type"]
        if kind not in BATCH_KINDS:
            raise FleetMessageError(f"unknown batch type {kind!r:.40}")
        historical = doc["historical"]
        if type(historical) is not bool:
            raise FleetMessageError("batch historical must be a boolean")
        rows = doc["events"]
        if type(rows) is not list:
            raise FleetMessageError("batch events must be an array")
        events = []
        for row in rows:
            if type(row) is not list or len(row) != 8:
                raise FleetMessageError("an event is an array of 8 fields")
            stream, epoch, seq, ts, tq, ekind, priority, payload = row
            if type(payload) is not bytes:
                raise FleetMessageError("event payload must be bin")
            event = Event.trusted(
                _str(stream, "event stream"), _int(seq, "event seq"),
                _int(epoch, "event boot_epoch"), _number(ts, "event ts"), _str(ekind, "event kind"),
                _int(priority, "event priority", MAX_SMALL_INT), payload,
            )  # fmt: skip
            events.append((event, _int(tq, "event time quality", MAX_SMALL_INT)))
        return cls(
            _str(doc["vehicle"], "batch vehicle"), _int(doc["batch"], "batch id"), kind,
            historical, tuple(events),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Ack:
    """The collector's word that batch `batch_id`, whose published bytes hash to `digest`,
    is durably stored; `signature` is the fleet's (agent/fleet_auth.py), b"" if unsigned."""

    batch_id: int
    kind: str
    stored: int
    duplicates: int
    digest: bytes = b""  # SHA-256 of the batch payload (batch_digest); b"": not given
    issued: int = 0  # collector's wall clock, ms since the epoch (bound in the signature)
    signature: bytes = b""

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"batch": self.batch_id, "type": self.kind,
                               "stored": self.stored, "duplicates": self.duplicates,
                               "issued": self.issued}  # fmt: skip
        if self.digest:
            doc["digest"] = self.digest
        if self.signature:
            doc["sig"] = self.signature
        return _pack(doc, False)

    @classmethod
    def decode(cls, data: bytes) -> Ack:
        """The ack in `data`; FleetMessageError for anything else."""
        doc = _unpack(data, control=True)
        _fields(doc, "ack", {"batch", "type", "stored", "duplicates"},
                {"issued", "digest", "sig"})  # fmt: skip
        kind = doc["type"]
        if kind not in BATCH_KINDS:
            raise FleetMessageError(f"unknown ack type {kind!r:.40}")
        return cls(
            _int(doc["batch"], "ack batch"), kind,
            _int(doc["stored"], "ack stored", MAX_BATCH_EVENTS),
            _int(doc["duplicates"], "ack duplicates", MAX_BATCH_EVENTS),
            _bin(doc["digest"], "ack digest", DIGEST_BYTES) if "digest" in doc else b"",
            _int(doc.get("issued", 0), "ack issued"),
            _bin(doc["sig"], "ack sig", SIGNATURE_BYTES) if "sig" in doc else b"",
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Command:
    """A request from the fleet: `replay` (resend state and backlog) or `ping`.

    `cmd_id` is also the replay counter: a signed command is accepted only if its id is
    above the last accepted one (the collector uses its clock in milliseconds)."""

    op: str
    cmd_id: int = 0
    signature: bytes = b""

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"op": self.op, "id": self.cmd_id}
        if self.signature:
            doc["sig"] = self.signature
        return _pack(doc, False)

    @classmethod
    def decode(cls, data: bytes) -> Command:
        """The command in `data`; FleetMessageError for anything else."""
        doc = _unpack(data, control=True)
        _fields(doc, "command", {"op"}, {"id", "sig"})
        op = doc["op"]
        if op not in COMMAND_OPS:
            raise FleetMessageError(f"unknown command {op!r:.40}")
        return cls(
            op, _int(doc.get("id", 0), "command id"),
            _bin(doc["sig"], "command sig", SIGNATURE_BYTES) if "sig" in doc else b"",
        )  # fmt: skip


def status_document(state: str, **fields: Any) -> bytes:
    """The retained status message (`online` / `offline`, plus figures)."""
    return _pack({"state": state, **fields}, False)


def decode_status(data: bytes) -> dict[str, Any]:
    """A vehicle's status map (its `state` a string); FleetMessageError otherwise."""
    doc = _unpack(data, control=True)
    if type(doc.get("state")) is not str:
        raise FleetMessageError("status state must be a string")
    return doc
