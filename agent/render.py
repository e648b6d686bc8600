"""What the technician CLI prints: controller text escaped, numbers and times that never raise.

Everything in a stream, kind or signal name, a payload string, a controller id or a
published state value came from a controller or a peer and may hold terminal control
sequences (`ESC [ 2 J` clears the screen, `ESC ] 0 ; ... BEL` sets the window title, a CR
overwrites the start of a line, U+202E reverses what follows). `escape` is the one function
that makes such text safe; `table`, `pairs` and `emit` apply it to every cell and line, so a
command cannot forget it. JSON output is exact instead: `json.dumps` with its default
`ensure_ascii` writes every control and non-ASCII character as a `\\uXXXX` escape.

Numbers and times come from the same peers: a timestamp of 1e300 or -inf, a sequence of
2**63 - 1. Every helper here renders them (`1e+300`, `out of range`) and never raises.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import click

CLOCK_BACK_TOLERANCE: Final = 2.0  # a time this far in the future: the clock moved back
SIGNALS_WIDTH: Final = 60  # characters of decoded signals shown in a table cell
# Seconds past which a duration is shown as a plain number: 1,000 years, far beyond any
# real age, and `span` would otherwise write a 300-digit day count for ts = 1e300.
SPAN_MAX: Final = 1000 * 365.25 * 86400
TIME_QUALITY: Final = ("unknown", "monotonic", "rtc", "synced")  # events.ts_quality 0..3
_NAMED: Final = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


def escape(text: str, *, newlines: bool = False, backslash: bool = True) -> str:
    """`text` with every character that is not printable written as a backslash escape.

    Escaped: C0 controls (ESC, BEL, CR, LF, TAB...), DEL, C1 controls (0x80-0x9F), Unicode
    format characters (bidi overrides and isolates, zero-width spaces and joiners, BOM,
    soft hyphen), line and paragraph separators, spaces other than ASCII space, surrogates,
    private-use and unassigned code points: exactly what `str.isprintable` refuses. They
    become `\\t \\n \\r \\xHH` (ASCII) or `\\uHHHH \\UHHHHHHHH` (code points, so C1 0x9B is
    `\\u009b`, not a byte), the syntax of bash's `$'...'` in a UTF-8 locale, and a
    backslash becomes `\\\\`, so an escaped name is never mistaken for another name.
    `newlines` keeps LF as is (for whole multi-line screens); `backslash=False` leaves
    backslashes alone, which makes a second pass over escaped text change nothing.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out: list[str] = []
    for ch in text:
        if ch == "\n" and newlines:
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\" if backslash else ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x80 else
                f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
            )  # fmt: skip
    return "".join(out)


def shell_arg(text: str) -> str:
    """`text` as one argument a technician can paste into bash (`$'...'` if it must be)."""
    if text.isprintable() and "\\" not in text:
        return shlex.quote(text)
    return "$'" + escape(text).replace("'", "\\'") + "'"


def number(value: float | int) -> str:
    """A number as text: integers exactly, floats in their shortest form, inf and nan too."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def n(value: Any) -> str:
    """A count with thousands separators ('-' when unknown, the number as is if not finite)."""
    if value is None:
        return "-"
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) < 2**63):
        return number(value)
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return escape(str(value))


def span(seconds: float) -> str:
    """A duration for people: 0.4 s, 12 s, 5 min, 3.0 h, 2.0 d; absurd ones as a number."""
    if not math.isfinite(seconds) or abs(seconds) > SPAN_MAX:
        return f"{number(float(seconds))} s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def age_of(ts: float | None, now: float) -> float | None:
    """Seconds from `ts` to `now` (ms precision); None for no time or an unset one (<= 0)."""
    return None if ts is None or ts <= 0 else round(now - ts, 3)


def ago(age: float | None) -> str:
    """An age for people: '12 s ago', 'never', or 'in 5 s' for a time in the future."""
    if age is None:
        return "never"
    if not math.isfinite(age):
        return f"at an impossible time ({number(float(age))} s ago)"
    if age < -CLOCK_BACK_TOLERANCE:
        return f"in {span(-age)} (clock moved back?)"
    return f"{span(age if age > 0 else 0.0)} ago"


def human_bytes(size: float) -> str:
    """Bytes in binary units: 512 B, 3.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _local(ts: float) -> datetime | None:
    """`ts` as a local datetime, or None where the platform cannot represent it."""
    try:
        return datetime.fromtimestamp(ts)
    except (OverflowError, ValueError, OSError):  # 1e300, inf, nan, years past 9999
        return None


def clock_time(ts: float | None, now: float) -> str:
    """Local time of day (with milliseconds) today, date and time otherwise."""
    if ts is None:
        return "-"
    when = _local(ts)
    if when is None:
        return f"{number(float(ts))} (out of range)"
    today = _local(now)
    if abs(now - ts) < 43_200 and today is not None and when.date() == today.date():
        return when.strftime("%H:%M:%S.%f")[:-3]
    return when.strftime("%Y-%m-%d %H:%M:%S")


def controller_time(ts: float, quality: int) -> str:
    """An event's controller timestamp as its time quality allows it to be read."""
    if quality >= TIME_QUALITY.index("rtc"):
        when = _local(ts)
        if when is None:
            return f"{number(float(ts))} (out of range)"
        text = when.strftime("%Y-%m-%d %H:%M:%S")
        return text if quality == TIME_QUALITY.index("synced") else f"{text} (rtc)"
    if quality == TIME_QUALITY.index("monotonic"):
        try:
            return f"+{timedelta(seconds=round(ts))} since boot"
        except (OverflowError, ValueError):
            return f"+{number(float(ts))} s since boot (out of range)"
    return "-"


# -- tables and screens ------------------------------------------------------------------------

_NUMERIC = re.compile(r"[-+]?[\d,]+(\.\d+)?")


def cell(value: object) -> str:
    """One table cell: '-' for None, numbers via `number`, text escaped."""
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return number(value)
    return escape(str(value))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: numeric columns right-aligned, '-' for missing, text escaped."""
    cells = [[cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = [
        any(r[i] != "-" for r in cells)
        and all(_NUMERIC.fullmatch(r[i]) or r[i] == "-" for r in cells)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def pairs(items: Sequence[tuple[str, str]]) -> str:
    """Label/value lines, labels aligned, values escaped."""
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k:<{width}}  {escape(v)}" for k, v in items)


def value_text(value: Any) -> str:
    """A decoded signal value, unescaped (the table escapes it): no repr, so no double escape."""
    if isinstance(value, str):
        text = f"'{value}'"
    elif isinstance(value, bytes | bytearray):
        text = f"<{len(value)} bytes>"
    elif isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, int | float):
        text = number(value)
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{value_text(k)}: {value_text(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(value_text(v) for v in value) + "]"
    else:
        text = f"<{type(value).__name__}>"
    return text


def signals_text(value: Any, width: int = SIGNALS_WIDTH) -> str:
    """Decoded signals as `name=value ...`, cut to `width` characters (escaped later)."""
    if isinstance(value, Mapping):
        text = " ".join(
            f"{k if isinstance(k, str) else value_text(k)}={value_text(v)}"
            for k, v in value.items()
        )
    else:
        text = value_text(value)
    return text if len(text) <= width else text[: width - 1] + "…"


# -- JSON ------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """`value` made strictly JSON-encodable, unchanged wherever JSON can hold it exactly.

    Non-finite floats become the strings "inf", "-inf", "nan" (strict JSON has no such
    numbers); bytes become hex; map keys that are not text become text (msgpack allows
    binary and integer keys); anything else unknown (a msgpack ExtType) becomes its repr.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else number(value)
    if value is None or isinstance(value, str | int):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {_json_key(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return repr(value)


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes | bytearray):
        return bytes(key).hex()
    if isinstance(key, float | int) and not isinstance(key, bool):
        return number(key)
    return repr(key)


def json_text(data: object, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity tokens), ASCII only: every control char is \\u-escaped."""
    return json.dumps(json_safe(data), indent=indent, allow_nan=False, ensure_ascii=True)


def emit(data: object, as_json: bool, render: Callable[[], str]) -> None:
    """Print `data` as JSON, or the text `render` makes of it (a last escape pass on it)."""
    if as_json:
        click.echo(json_text(data))
    else:
        click.echo(escape(render(), newlines=True, backslash=False))


def echo_hint(text: str, as_json: bool) -> None:
    """A continuation hint: after the table on stdout, or on stderr so JSON stays one value."""
    click.echo(escape(text, backslash=False), err=as_json)
