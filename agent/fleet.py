"""Fleet protocol: topics and the msgpack documents exchanged with the collector.

Shared by the agent (uplink, resync) and the reference collector, and free of MQTT so
both sides and the tests can use it directly. docs/fleet-protocol.md describes it.

Topics under `ironfleet/v1/<vehicle>/`:
  events  agent -> fleet  backlog batches, oldest first (QoS 1)
  state   agent -> fleet  compacted replay: latest event per stream (QoS 1)
  status  agent -> fleet  retained; "online" on connect, "offline" as last will
  ack     fleet -> agent  a batch is durably stored by the collector (QoS 1)
  cmd     fleet -> agent  replay request, ping (QoS 1)
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from agent.errors import AgentError
from agent.resilience import Event

FLEET_VERSION: Final = 1
TOPIC_ROOT: Final = "ironfleet/v1"
CODEC_RAW: Final = 0
CODEC_ZLIB: Final = 1
COMPRESS_ABOVE: Final = 1024  # bytes; smaller documents do not gain from zlib
# Bounds on what a peer may send us (the collector parses agents' batches, the agent
# parses acks and commands); a broker can deliver anything published on these topics.
MAX_DOCUMENT_BYTES: Final = 16 * 2**20
MAX_BATCH_EVENTS: Final = 100_000
MAX_WATERMARKS: Final = 100_000

_UNPACK: Final[dict[str, Any]] = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": 1 << 16,
    "max_bin_len": MAX_DOCUMENT_BYTES,
    "max_array_len": MAX_BATCH_EVENTS,
    "max_map_len": MAX_WATERMARKS,
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
        raise FleetMessageError(f"not a fleet topic: {name!r}")
    return parts[2], parts[3]


def _pack(doc: Any, compress: bool) -> bytes:
    body: bytes = msgpack.packb(doc, use_bin_type=True)
    if compress and len(body) > COMPRESS_ABOVE:
        packed: bytes = msgpack.packb([FLEET_VERSION, CODEC_ZLIB, zlib.compress(body, 1)])
        return packed
    raw: bytes = msgpack.packb([FLEET_VERSION, CODEC_RAW, body], use_bin_type=True)
    return raw


def _unpack(data: bytes) -> Any:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise FleetMessageError(f"document of {len(data)} bytes is over the cap")
    try:
        version, codec, body = msgpack.unpackb(data, **_UNPACK)
        if version != FLEET_VERSION:
            raise FleetMessageError(f"unsupported fleet protocol version {version!r}")
        if codec == CODEC_ZLIB:
            inflater = zlib.decompressobj()
            body = inflater.decompress(body, MAX_DOCUMENT_BYTES)
            if inflater.unconsumed_tail:
                raise FleetMessageError("compressed document inflates past the cap")
        elif codec != CODEC_RAW:
            raise FleetMessageError(f"unknown codec {codec!r}")
        return msgpack.unpackb(body, **_UNPACK)
    except FleetMessageError:
        raise
    except Exception as exc:  # msgpack, zlib, unpacking a wrong shape
        why = f"{type(exc).__name__}: {exc}"
        raise FleetMessageError(f"undecodable fleet document: {why}") from None


@dataclass(frozen=True, slots=True)
class Batch:
    """A group of events sent in one MQTT message."""

    vehicle: str
    batch_id: int
    kind: str  # "state" (compacted replay) or "events" (backlog / live)
    historical: bool  # backlog stored before this connection: never overwrites state
    events: tuple[tuple[Event, int], ...]  # (event, ts_quality)

    def encode(self, compress: bool = True) -> bytes:
        return _pack(
            {
                "vehicle": self.vehicle,
                "batch": self.batch_id,
                "type": self.kind,
                "historical": self.historical,
                "events": [
                    [e.stream, e.boot_epoch, e.seq, e.ts, tq, e.kind, e.priority, e.payload]
                    for e, tq in self.events
                ],
            },
            compress,
        )

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        doc = _unpack(data)
        try:
            kind = doc["type"]
            if kind not in ("state", "events"):
                raise FleetMessageError(f"unknown batch type {kind!r}")
            events = []
            for stream, epoch, seq, ts, tq, ekind, priority, payload in doc["events"]:
                if not isinstance(ts, float | int) or not math.isfinite(ts):
                    raise FleetMessageError("event ts must be a finite number")
                if not isinstance(payload, bytes):
                    raise FleetMessageError("event payload must be bytes")
                event = Event(
                    stream, seq, boot_epoch=epoch, ts=float(ts), kind=ekind, priority=priority,
                    payload=payload,
                )  # fmt: skip
                events.append((event, int(tq)))
            return cls(doc["vehicle"], int(doc["batch"]), kind, bool(doc["historical"]),
                       tuple(events))  # fmt: skip
        except FleetMessageError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise FleetMessageError(f"malformed batch: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Ack:
    """The collector's word that batch `batch_id` is durably stored."""

    batch_id: int
    kind: str
    stored: int
    duplicates: int

    def encode(self) -> bytes:
        return _pack(
            {"batch": self.batch_id, "type": self.kind, "stored": self.stored,
             "duplicates": self.duplicates},
            False,
        )  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Ack:
        doc = _unpack(data)
        try:
            return cls(int(doc["batch"]), str(doc["type"]), int(doc["stored"]),
                       int(doc["duplicates"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise FleetMessageError(f"malformed ack: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Command:
    """A request from the fleet: `replay` (resend state and backlog) or `ping`."""

    op: str
    cmd_id: int = 0

    def encode(self) -> bytes:
        return _pack({"op": self.op, "id": self.cmd_id}, False)

    @classmethod
    def decode(cls, data: bytes) -> Command:
        doc = _unpack(data)
        try:
            op = str(doc["op"])
        except (KeyError, TypeError) as exc:
            raise FleetMessageError(f"malformed command: {exc}") from None
        if op not in ("replay", "ping"):
            raise FleetMessageError(f"unknown command {op!r}")
        return cls(op, int(doc.get("id", 0)))


def status_document(state: str, **fields: Any) -> bytes:
    """The retained status message (`online` / `offline`, plus figures)."""
    return _pack({"state": state, **fields}, False)


def decode_status(data: bytes) -> dict[str, Any]:
    doc = _unpack(data)
    if not isinstance(doc, dict):
        raise FleetMessageError("status must be a map")
    return doc
