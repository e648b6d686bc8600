"""The envelope and frame bodies of the serial protocol, with a cap on every peer-set size.

Wire layout (see docs/protocol.md): an envelope is the msgpack array
`[version, type, session, link_seq, body]` where `body` is a map with short string keys.
`parse_envelope` turns bytes into a validated `Frame` or raises `FrameCorrupt`; it never
returns a partially checked value. Bodies validate themselves at construction, so a frame
built in Python cannot be encoded if the peer would reject it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final, TypeAlias

import msgpack

from firmware_bridge.errors import FrameCorrupt

PROTOCOL_VERSION: Final = 1

# -- caps on every size a peer controls ------------------------------------------------------
# CRC-32C detects every error of up to 5 bits for messages up to 655 bytes (Koopman);
# 512 keeps the guarantee with margin.
MAX_FRAME_BYTES: Final = 512
CRC_BYTES: Final = 4
MAX_ENVELOPE_BYTES: Final = MAX_FRAME_BYTES - CRC_BYTES
# COBS adds one byte per 254 data bytes plus one: 512 -> 515 bytes on the wire.
MAX_ENCODED_FRAME_BYTES: Final = MAX_FRAME_BYTES + MAX_FRAME_BYTES // 254 + 1
MAX_ID_LEN: Final = 64  # controller id in HELLO: a serial number or hostname
MAX_FIRMWARE_LEN: Final = 32  # firmware version string, e.g. "2.14.3-rc1+g1a2b3c4"
MAX_STREAM_LEN: Final = 64  # stream id, e.g. "ecu1/engine.rpm"
MAX_KIND_LEN: Final = 32  # event kind, e.g. "position"
MAX_NAME_LEN: Final = 32  # signal / command argument name
MAX_STR_VALUE_LEN: Final = 128  # a string signal value; longer text does not fit a frame well
MAX_SIGNALS: Final = 32  # entries in an event payload or command/response map
MAX_RANGES: Final = 8  # [lo, hi] ranges in one ACK or NACK
MAX_WINDOW: Final = 256  # EVENT frames a controller may have sent and not seen ACKed
MAX_PRIORITY: Final = 7  # 0 = lowest; 3 bits on the controller side
MAX_U32: Final = 2**32 - 1  # session (boot epoch), link sequence, command id
MAX_SEQ: Final = 2**63 - 1  # per-stream sequence: fits SQLite's signed 64-bit INTEGER
MAX_INT_VALUE: Final = 2**63 - 1  # integer signal values: signed 64-bit
MIN_INT_VALUE: Final = -(2**63)
_ENVELOPE_LEN: Final = 5

# Limits handed to msgpack so it refuses oversize headers before allocating anything.
UNPACK_LIMITS: Final[dict[str, int]] = {
    "max_str_len": MAX_STR_VALUE_LEN,
    "max_bin_len": 0,  # no binary values anywhere in the protocol
    "max_array_len": max(MAX_RANGES, _ENVELOPE_LEN),
    "max_map_len": MAX_SIGNALS,
    "max_ext_len": 0,  # no extension types either
}


class FrameType(IntEnum):
    """Frame types; the numbers are on the wire."""

    HELLO = 1
    EVENT = 2
    ACK = 3
    NACK = 4
    HEARTBEAT = 5
    COMMAND = 6
    RESPONSE = 7


class TimeQuality(IntEnum):
    """How far the controller's timestamp can be trusted."""

    UNKNOWN = 0  # no clock: ts is meaningless
    MONOTONIC = 1  # seconds since controller boot
    RTC = 2  # free-running real-time clock, never synced this boot
    SYNCED = 3  # disciplined by GNSS or NTP


Scalar: TypeAlias = int | float | bool | str | None
Ranges: TypeAlias = tuple[tuple[int, int], ...]


_finite = math.isfinite
_TIME_QUALITIES: Final = tuple(TimeQuality)


def _bad(detail: str) -> FrameCorrupt:
    return FrameCorrupt("schema", detail)


def _check_str(name: str, value: object, max_len: int, *, empty_ok: bool = False) -> str:
    if type(value) is not str:
        raise _bad(f"{name} must be a string, got {type(value).__name__}")
    if not value and not empty_ok:
        raise _bad(f"{name} must not be empty")
    # UTF-8 length equals len() for ASCII, the common case; encode only when it is not.
    if len(value) > max_len or (not value.isascii() and len(value.encode()) > max_len):
        raise _bad(f"{name} longer than {max_len} bytes")
    return value


def _check_uint(name: str, value: object, maximum: int, minimum: int = 0) -> int:
    if type(value) is not int:
        raise _bad(f"{name} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise _bad(f"{name} {value} outside [{minimum}, {maximum}]")
    return value


def _check_scalar(name: str, value: object) -> None:
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _bad(f"{name} is not a finite number")
    elif kind is int:
        if not MIN_INT_VALUE <= value <= MAX_INT_VALUE:  # type: ignore[operator]
            raise _bad(f"{name} outside the signed 64-bit range")
    elif kind is str:
        _check_str(name, value, MAX_STR_VALUE_LEN, empty_ok=True)
    elif kind is not bool and value is not None:
        raise _bad(f"{name} has unsupported type {kind.__name__}")


def _check_map(name: str, value: object) -> dict[str, Scalar]:
    if type(value) is not dict:
        raise _bad(f"{name} must be a map, got {type(value).__name__}")
    if len(value) > MAX_SIGNALS:
        raise _bad(f"{name} has more than {MAX_SIGNALS} entries")
    # Hot path (every event): a fast check per entry; the detailed checks below only
    # run to explain a failure.
    for key, item in value.items():
        kind = type(item)
        if (
            type(key) is str
            and 0 < len(key) <= MAX_NAME_LEN
            and key.isascii()
            and (
                (kind is float and _finite(item))
                or (kind is int and MIN_INT_VALUE <= item <= MAX_INT_VALUE)
                or kind is bool
                or item is None
                or (kind is str and len(item) <= MAX_STR_VALUE_LEN and item.isascii())
            )
        ):
            continue
        _check_str(f"{name} key", key, MAX_NAME_LEN)
        _check_scalar(f"{name}[{key!r}]", item)
    return value


def _check_ranges(name: str, value: object, *, empty_ok: bool) -> Ranges:
    if type(value) not in (list, tuple):
        raise _bad(f"{name} must be an array of [lo, hi] pairs")
    items: list[Any] = list(value)  # type: ignore[call-overload]
    if len(items) > MAX_RANGES:
        raise _bad(f"{name} has more than {MAX_RANGES} ranges")
    if not items and not empty_ok:
        raise _bad(f"{name} must not be empty")
    out: list[tuple[int, int]] = []
    previous_hi = -2
    for pair in items:
        if type(pair) not in (list, tuple) or len(pair) != 2:
            raise _bad(f"{name} entries must be [lo, hi] pairs")
        lo = _check_uint(f"{name} lo", pair[0], MAX_U32, 1)
        hi = _check_uint(f"{name} hi", pair[1], MAX_U32, 1)
        if lo > hi:
            raise _bad(f"{name} range [{lo}, {hi}] is reversed")
        if lo <= previous_hi + 1:
            raise _bad(f"{name} ranges must be sorted, disjoint and not adjacent")
        previous_hi = hi
        out.append((lo, hi))
    return tuple(out)


# -- bodies -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Start of a session. The envelope's `session` is the sender's boot epoch."""

    controller_id: str
    firmware: str

    def __post_init__(self) -> None:
        _check_str("hello.id", self.controller_id, MAX_ID_LEN)
        _check_str("hello.fw", self.firmware, MAX_FIRMWARE_LEN)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.controller_id, "fw": self.firmware}


@dataclass(frozen=True, slots=True)
class EventBody:
    """One telemetry event; identity is (stream, envelope session, seq)."""

    stream: str
    seq: int
    ts: float
    time_quality: TimeQuality
    kind: str
    priority: int
    signals: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str("event.s", self.stream, MAX_STREAM_LEN)
        _check_uint("event.q", self.seq, MAX_SEQ)
        if type(self.ts) is not float or not _finite(self.ts):
            raise _bad("event.t must be a finite float")
        if type(self.time_quality) is int:  # the raw wire value
            _check_uint("event.tq", self.time_quality, len(_TIME_QUALITIES) - 1)
            object.__setattr__(self, "time_quality", _TIME_QUALITIES[self.time_quality])
        elif not isinstance(self.time_quality, TimeQuality):
            raise _bad("event.tq must be an integer")
        _check_str("event.k", self.kind, MAX_KIND_LEN)
        _check_uint("event.p", self.priority, MAX_PRIORITY)
        _check_map("event.d", self.signals)

    def to_wire(self) -> dict[str, Any]:
        return {
            "s": self.stream,
            "q": self.seq,
            "t": self.ts,
            "tq": int(self.time_quality),
            "k": self.kind,
            "p": self.priority,
            "d": self.signals,
        }


@dataclass(frozen=True, slots=True)
class Ack:
    """Every link_seq <= cumulative, and each selective range, is durably stored.

    `epoch` is the controller session (boot epoch) being acknowledged: an ACK still in
    flight when the controller reboots must not free the new session's frames.
    """

    epoch: int
    cumulative: int
    ranges: Ranges = ()

    def __post_init__(self) -> None:
        _check_uint("ack.e", self.epoch, MAX_U32)
        _check_uint("ack.c", self.cumulative, MAX_U32)
        object.__setattr__(self, "ranges", _check_ranges("ack.r", self.ranges, empty_ok=True))
        if self.ranges and self.ranges[0][0] <= self.cumulative + 1:
            raise _bad("ack.r must start above ack.c + 1")

    def to_wire(self) -> dict[str, Any]:
        return {"e": self.epoch, "c": self.cumulative, "r": [list(r) for r in self.ranges]}


@dataclass(frozen=True, slots=True)
class Nack:
    """These link sequence ranges of controller session `epoch` are missing: resend them."""

    epoch: int
    missing: Ranges

    def __post_init__(self) -> None:
        _check_uint("nack.e", self.epoch, MAX_U32)
        object.__setattr__(self, "missing", _check_ranges("nack.m", self.missing, empty_ok=False))

    def to_wire(self) -> dict[str, Any]:
        return {"e": self.epoch, "m": [list(r) for r in self.missing]}


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness; the envelope's link_seq tells the peer what the sender sent last."""

    def to_wire(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class Command:
    """A request to the peer, answered by a RESPONSE with the same id."""

    cmd_id: int
    op: str
    args: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_uint("command.id", self.cmd_id, MAX_U32)
        _check_str("command.op", self.op, MAX_NAME_LEN)
        _check_map("command.a", self.args)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.cmd_id, "op": self.op, "a": self.args}


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to COMMAND `cmd_id`."""

    cmd_id: int
    ok: bool
    result: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_uint("response.id", self.cmd_id, MAX_U32)
        if type(self.ok) is not bool:
            raise _bad("response.ok must be a boolean")
        _check_map("response.r", self.result)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.cmd_id, "ok": self.ok, "r": self.result}


Body: TypeAlias = Hello | EventBody | Ack | Nack | Heartbeat | Command | Response

_BODY_TYPES: Final[dict[FrameType, type]] = {
    FrameType.HELLO: Hello,
    FrameType.EVENT: EventBody,
    FrameType.ACK: Ack,
    FrameType.NACK: Nack,
    FrameType.HEARTBEAT: Heartbeat,
    FrameType.COMMAND: Command,
    FrameType.RESPONSE: Response,
}
_FRAME_TYPES: Final[dict[int, FrameType]] = {int(t): t for t in FrameType}
_TYPE_OF_BODY: Final[dict[type, FrameType]] = {v: k for k, v in _BODY_TYPES.items()}

# Wire key -> constructor argument, per frame type. Exactly these keys, no more, no fewer.
_WIRE_KEYS: Final[dict[FrameType, dict[str, str]]] = {
    FrameType.HELLO: {"id": "controller_id", "fw": "firmware"},
    FrameType.EVENT: {
        "s": "stream",
        "q": "seq",
        "t": "ts",
        "tq": "time_quality",
        "k": "kind",
        "p": "priority",
        "d": "signals",
    },
    FrameType.ACK: {"e": "epoch", "c": "cumulative", "r": "ranges"},
    FrameType.NACK: {"e": "epoch", "m": "missing"},
    FrameType.HEARTBEAT: {},
    FrameType.COMMAND: {"id": "cmd_id", "op": "op", "a": "args"},
    FrameType.RESPONSE: {"id": "cmd_id", "ok": "ok", "r": "result"},
}


@dataclass(frozen=True, slots=True)
class Frame:
    """A validated envelope: who sent it (session), where it sits (link_seq), and what."""

    session: int
    link_seq: int
    body: Body

    @property
    def type(self) -> FrameType:
        return _TYPE_OF_BODY[type(self.body)]

    def __post_init__(self) -> None:
        _check_uint("session", self.session, MAX_U32)
        # An EVENT's link_seq is its place in the session, counted from 1; 0 would read
        # as "already acknowledged" to the agent and be dropped.
        _check_uint(
            "link_seq", self.link_seq, MAX_U32, 1 if isinstance(self.body, EventBody) else 0
        )


def _reject_ext(code: int, data: bytes) -> object:
    raise FrameCorrupt("msgpack", f"extension type {code} not allowed")


_set = object.__setattr__


def _fast_event(session: object, link_seq: object, body: object) -> Frame | None:
    """EVENT frames are nearly all the traffic: check the common, valid shape inline.

    Returns None for anything unusual, which then takes the general path and gets its
    precise error message there. Equivalent to the general path for what it accepts.
    """
    if not (
        type(body) is dict
        and len(body) == 7
        and type(session) is int
        and 0 <= session <= MAX_U32
        and type(link_seq) is int
        and 1 <= link_seq <= MAX_U32
    ):
        return None
    stream, seq, ts = body.get("s"), body.get("q"), body.get("t")
    tq, kind, priority, signals = body.get("tq"), body.get("k"), body.get("p"), body.get("d")
    if not (
        type(stream) is str
        and 0 < len(stream) <= MAX_STREAM_LEN
        and stream.isascii()
        and type(seq) is int
        and 0 <= seq <= MAX_SEQ
        and type(ts) is float
        and _finite(ts)
        and type(tq) is int
        and 0 <= tq < len(_TIME_QUALITIES)
        and type(kind) is str
        and 0 < len(kind) <= MAX_KIND_LEN
        and kind.isascii()
        and type(priority) is int
        and 0 <= priority <= MAX_PRIORITY
    ):
        return None
    _check_map("event.d", signals)
    event = object.__new__(EventBody)
    _set(event, "stream", stream)
    _set(event, "seq", seq)
    _set(event, "ts", ts)
    _set(event, "time_quality", _TIME_QUALITIES[tq])
    _set(event, "kind", kind)
    _set(event, "priority", priority)
    _set(event, "signals", signals)
    frame = object.__new__(Frame)
    _set(frame, "session", session)
    _set(frame, "link_seq", link_seq)
    _set(frame, "body", event)
    return frame


def pack_envelope(frame: Frame) -> bytes:
    """msgpack bytes of `frame`'s envelope (no CRC, no COBS)."""
    packed: bytes = msgpack.packb(
        [PROTOCOL_VERSION, int(frame.type), frame.session, frame.link_seq, frame.body.to_wire()],
        use_bin_type=True,
    )
    return packed


def parse_envelope(data: bytes) -> Frame:
    """Validate envelope bytes into a `Frame`; raise `FrameCorrupt` on any defect."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            **UNPACK_LIMITS,
        )
    except FrameCorrupt:
        raise
    except Exception as exc:  # msgpack raises ValueError, FormatError, StackError, ...
        raise FrameCorrupt("msgpack", f"{type(exc).__name__}: {exc}") from None
    if type(obj) is not list or len(obj) != _ENVELOPE_LEN:
        raise _bad(f"envelope must be an array of {_ENVELOPE_LEN}")
    version, ftype, session, link_seq, body = obj
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise _bad(f"unsupported protocol version {version!r}")
    frame_type = _FRAME_TYPES.get(ftype) if type(ftype) is int else None
    if frame_type is None:
        raise _bad(f"unknown frame type {ftype!r}")
    if frame_type is FrameType.EVENT:
        fast = _fast_event(session, link_seq, body)
        if fast is not None:
            return fast
    if type(body) is not dict:
        raise _bad("body must be a map")
    keys = _WIRE_KEYS[frame_type]
    if body.keys() != keys.keys():
        extra = sorted(body.keys() - keys.keys())
        missing = sorted(keys.keys() - body.keys())
        raise _bad(f"{frame_type.name} body keys: unknown {extra}, missing {missing}")
    try:
        parsed = _BODY_TYPES[frame_type](**{keys[k]: v for k, v in body.items()})
    except TypeError as exc:  # a field of the wrong shape caught by a constructor
        raise _bad(str(exc)) from None
    return Frame(session=session, link_seq=link_seq, body=parsed)
