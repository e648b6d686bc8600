"""The columnar layout of a batch's events on the wire (fleet codec 2, `[uplink] codec`).

Row by row, a batch repeats what a radio link pays for on every event: the stream name,
the boot epoch, a sequence that is the previous one plus one, a timestamp a few hundred
milliseconds after the last, and a payload map whose keys are the same on every event of
its stream and whose values move a little. The columnar layout sends each stream once:
its events' fields as columns, integers as deltas, floats at sensor precision as scaled
integer deltas, payload maps split into one column per signal; zlib then squeezes what
is left. On the simulator's vehicle profile that is 0.23-0.27x the bytes of zlib over rows
for 500-event batches (docs/decisions.md, bench/bench_uplink.py).

Lossless to the byte: a payload is split into columns only when re-packing its map
gives back its very bytes (msgpack's canonical form, which the controllers use), and a
float column is scaled only when every value comes back bit for bit; anything else is
sent as it is. The decoder is total and bounded: it rebuilds the rows of the row layout
(agent/fleet.py checks them as it checks any batch) or raises ColumnarError, and it never
builds more than MAX_CELLS values whatever the document claims.

Layout of `columns` (docs/fleet-protocol.md has it byte by byte):
    [streams, order, groups]
    streams  the batch's stream names, each once
    order    bin: for each event in batch order, its stream's index (uint16 little endian)
    groups   per stream: [epoch, seq, ts, time_quality, kind, priority, payload], columns
             holding that stream's events in batch order; a column is
             ["d", [first, delta, ...]]        integers, each the previous plus its delta
             ["f", e, [first, delta, ...]]     floats: the integer column divided by 10**e
             ["v", [value, ...]]               values as they are
             ["m", [key, ...], [column, ...]]  payloads only: msgpack maps of these keys
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence
from itertools import accumulate, pairwise
from typing import Any, Final

import msgpack

from agent.errors import AgentError

MAX_STREAMS: Final = 65_535  # a stream index is a uint16
MAX_SCALE: Final = 9  # 10**9: nanoseconds on a timestamp, 1e-9 degrees on a coordinate
MAX_VALUE_BYTES: Final = 1024  # a string signal split into a column (the serial cap is 128)
MAX_KEYS: Final = 64  # payload map keys split into columns (the serial protocol allows 32)
MAX_CELLS: Final = 2_000_000  # values rebuilt from one batch: bounds what a peer can cost
_EXACT: Final = float(2**53)  # scaled by at most 10**9 this stays far from the float range
_DELTA_BOUND: Final = 2**62  # |value| below it: a delta always fits msgpack's int64
_BIG_ENDIAN: Final = sys.byteorder == "big"
_FIELDS: Final = 7  # epoch, seq, ts, time quality, kind, priority, payload

Row = list[Any]  # [stream, epoch, seq, ts, tq, kind, priority, payload]: fleet.Batch rows


class ColumnarError(AgentError):
    """A columnar document that does not describe a batch's events."""


# -- encoding -----------------------------------------------------------------------------


def _int_column(values: list[Any]) -> list[Any] | None:
    if not all(type(v) is int and -_DELTA_BOUND < v < _DELTA_BOUND for v in values):
        return None
    return ["d", [values[0], *(b - a for a, b in pairwise(values))]]


def _float_column(values: list[Any]) -> list[Any] | None:
    """Scaled integer deltas when every float comes back bit for bit, else None."""
    if not all(type(v) is float and -_EXACT < v < _EXACT for v in values):
        return None  # nan, infinities and floats beyond 2**53 are sent as they are
    first = values[0]
    start = next((e for e in range(MAX_SCALE + 1) if round(first * 10**e) / 10**e == first), 0)
    for e in range(start, MAX_SCALE + 1):  # no scale below the first value's can hold all
        f = 10**e
        ints = [round(v * f) for v in values]
        if all(
            -_DELTA_BOUND < i < _DELTA_BOUND
            and i / f == v
            and (v != 0.0 or math.copysign(1.0, v) > 0)  # -0.0 would come back as 0.0
            for i, v in zip(ints, values, strict=True)
        ):
            return ["f", e, [ints[0], *(b - a for a, b in pairwise(ints))]]
    return None


def _column(values: list[Any]) -> list[Any]:
    return _int_column(values) or _float_column(values) or ["v", values]


def _plain(value: object) -> bool:
    """A signal value the columns may carry: a scalar or a short string. Anything else
    (ext types, long strings, nested containers) could exceed what a receiver's decoder
    accepts inside the document, where as an opaque payload it is just bytes."""
    kind = type(value)
    if kind in (str, bytes):
        return len(value) <= MAX_VALUE_BYTES  # type: ignore[arg-type]
    return kind in (int, float, bool, type(None))


def _payload_column(payloads: list[bytes]) -> list[Any]:
    """One column per signal when every payload is a canonical msgpack map with the same
    keys in the same order; the payloads as they are otherwise."""
    maps: list[dict[Any, Any]] = []
    keys: list[Any] | None = None
    try:
        for p in payloads:
            m = msgpack.unpackb(p, raw=False)
            if (
                type(m) is not dict
                or not all(_plain(v) for v in m.values())
                or msgpack.packb(m, use_bin_type=True) != p
            ):
                return ["v", payloads]
            if keys is None:
                keys = list(m)
                if not 0 < len(keys) <= MAX_KEYS or not all(type(k) is str for k in keys):
                    return ["v", payloads]
            elif list(m) != keys:
                return ["v", payloads]
            maps.append(m)
    except Exception:  # bytes that are not one msgpack object: sent as they are
        return ["v", payloads]
    assert keys is not None
    return ["m", keys, [_column([m[k] for m in maps]) for k in keys]]


def encode_columns(rows: Sequence[Sequence[Any]]) -> list[Any] | None:
    """The columnar form of a batch's rows, or None when it does not fit the layout (more
    than MAX_STREAMS streams): the caller then sends rows."""
    index: dict[str, int] = {}
    order = array("H")
    groups: list[list[Sequence[Any]]] = []
    for row in rows:
        i = index.get(row[0])
        if i is None:
            if len(index) >= MAX_STREAMS:
                return None
            i = index[row[0]] = len(index)
            groups.append([])
        order.append(i)
        groups[i].append(row)
    if _BIG_ENDIAN:  # pragma: no cover - the wire is little endian
        order.byteswap()
    out = []
    for g in groups:
        fields = list(zip(*g, strict=True))  # 8 tuples: stream, epoch, seq, ts, tq, ...
        out.append(
            [_column(list(fields[k])) for k in range(1, 7)] + [_payload_column(list(fields[7]))]
        )
    return [list(index), order.tobytes(), out]


# -- decoding -----------------------------------------------------------------------------


def _expand(col: object, n: int, budget: list[int]) -> list[Any]:
    """The n values of a column; ColumnarError for anything else."""
    if type(col) is not list or not col:
        raise ColumnarError("a column is a non-empty array")
    tag = col[0]
    budget[0] -= n
    if budget[0] < 0:
        raise ColumnarError(f"the batch rebuilds more than {MAX_CELLS} values")
    if tag == "v" and len(col) == 2 and type(col[1]) is list:
        values: list[Any] = col[1]
    elif tag == "d" and len(col) == 2 and type(col[1]) is list:
        if not all(type(v) is int for v in col[1]):
            raise ColumnarError("a delta column holds integers")
        values = list(accumulate(col[1]))
    elif tag == "f" and len(col) == 3 and type(col[1]) is int and type(col[2]) is list:
        if not 0 <= col[1] <= MAX_SCALE or not all(type(v) is int for v in col[2]):
            raise ColumnarError(f"a scaled column has a scale in [0, {MAX_SCALE}] and integers")
        f = 10 ** col[1]
        try:
            values = [i / f for i in accumulate(col[2])]
        except OverflowError:  # sums past the float range
            raise ColumnarError("a scaled column overflows a float") from None
    else:
        raise ColumnarError(f"unknown column {str(tag)[:20]!r}")
    if len(values) != n:
        raise ColumnarError(f"a column of {len(values)} values in a stream of {n} events")
    return values


def _payloads(col: object, n: int, budget: list[int]) -> list[Any]:
    if type(col) is list and len(col) == 3 and col[0] == "m":
        keys, columns = col[1], col[2]
        if type(keys) is not list or type(columns) is not list or len(keys) != len(columns):
            raise ColumnarError("a payload map column is [m, keys, columns] of equal lengths")
        if not 0 < len(keys) <= MAX_KEYS or not all(type(k) is str for k in keys):
            raise ColumnarError(f"a payload map has 1 to {MAX_KEYS} string keys")
        values = [_expand(c, n, budget) for c in columns]
        return [
            msgpack.packb(dict(zip(keys, cells, strict=True)), use_bin_type=True)
            for cells in zip(*values, strict=True)
        ]
    return _expand(col, n, budget)


def decode_columns(columns: object, max_events: int) -> list[Row]:
    """The rows of a columnar document, in batch order; ColumnarError for anything else."""
    if type(columns) is not list or len(columns) != 3:
        raise ColumnarError("columns must be [streams, order, groups]")
    streams, order_bytes, groups = columns
    if type(streams) is not list or type(order_bytes) is not bytes or type(groups) is not list:
        raise ColumnarError("columns must be [array, bin, array]")
    if len(streams) != len(groups) or len(streams) > MAX_STREAMS or len(order_bytes) % 2:
        raise ColumnarError("one group per stream, and a uint16 index per event")
    order = array("H")
    order.frombytes(order_bytes)
    if _BIG_ENDIAN:  # pragma: no cover - the wire is little endian
        order.byteswap()
    if len(order) > max_events:
        raise ColumnarError(f"more than {max_events} events")
    counts = [0] * len(streams)
    for i in order:
        if i >= len(streams):
            raise ColumnarError(f"stream index {i} of {len(streams)} streams")
        counts[i] += 1
    budget = [MAX_CELLS]
    expanded: list[list[list[Any]]] = []
    for group, n in zip(groups, counts, strict=True):
        if type(group) is not list or len(group) != _FIELDS or n == 0:
            raise ColumnarError("a stream's group has 7 columns and at least one event")
        cols = [_expand(c, n, budget) for c in group[:6]] + [_payloads(group[6], n, budget)]
        expanded.append(cols)
    cursor = [0] * len(streams)
    rows: list[Row] = []
    for i in order:
        k = cursor[i]
        cursor[i] = k + 1
        c = expanded[i]
        rows.append([streams[i], c[0][k], c[1][k], c[2][k], c[3][k], c[4][k], c[5][k], c[6][k]])
    return rows
