"""Wire captures: the raw bytes of a serial port, both ways, with their times.

A field engineer chasing a firmware bug turns `[serial] capture` on (SIGHUP applies it);
the agent then appends every read and write of the port to `<state_dir>/capture/<port>.ifcap`,
rotated to `.ifcap.1` at half of `[serial] capture_max_bytes` (and when a run starts, so
records are never appended after one torn by a kill), so the pair never holds more.
`ironfleet-sim --replay FILE` plays the controller's side of a capture back into a pty, at
the recorded pace or as fast as the agent reads, so a trace from a truck becomes a
reproducible test.

File format (all integers big-endian):

    header  b"IFCAP\\x00" ‖ u8 version (1)
    record  f64 time (seconds, monotonic clock of the capturing process)
            ‖ u8 direction (0: controller -> agent, 1: agent -> controller)
            ‖ u32 length ‖ length bytes

`read_records` is total: a truncated last record (the agent was killed mid-write) ends
the capture; anything else malformed raises `CaptureError` naming the offset.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

MAGIC: Final = b"IFCAP\x00"
VERSION: Final = 1
HEADER: Final = MAGIC + bytes([VERSION])
FROM_CONTROLLER: Final = 0
TO_CONTROLLER: Final = 1
MAX_RECORD: Final = 1 << 20  # a port read is at most [serial] read_size (<= 1 MiB)
_RECORD: Final = struct.Struct(">dBI")
SUFFIX: Final = ".ifcap"


class CaptureError(ValueError):
    """A capture file that is not one, or is damaged before its end."""


@dataclass(frozen=True, slots=True)
class Record:
    at: float
    direction: int
    data: bytes


class CaptureWriter:
    """Appends records to `path`, rotating to `path.1` at half of `max_bytes`.

    Buffered (the serial thread must not wait on the disk per read): `flush` is called by
    the owner about once a second and at close. A failing disk turns the capture off
    (`failed` holds why); the port itself never depends on it."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.limit = max(len(HEADER) + _RECORD.size + 1, max_bytes // 2)
        self.failed = ""
        self.records = 0
        self._fh: IO[bytes] | None = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        """A fresh file: a capture left by an earlier run (maybe ending in a record torn by
        a kill) becomes `.1`, so records are only ever appended to whole ones."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._fh = open(self.path, "xb", buffering=256 * 1024)  # noqa: SIM115 - kept open
        self._fh.write(HEADER)
        self._size = len(HEADER)

    def record(self, at: float, direction: int, data: bytes) -> None:
        if self._fh is None or not data:
            return
        try:
            if self._size + _RECORD.size + len(data) > self.limit:
                self._rotate()
            assert self._fh is not None
            self._fh.write(_RECORD.pack(at, direction, len(data)))
            self._fh.write(data)
            self._size += _RECORD.size + len(data)
            self.records += 1
        except OSError as exc:
            self._fail(exc)

    def _rotate(self) -> None:
        assert self._fh is not None
        self._fh.close()
        self._open()

    def flush(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as exc:
                self.failed = self.failed or str(exc)

    def _fail(self, exc: OSError) -> None:
        self.failed = f"{self.path}: {exc.strerror or exc}"
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()


def read_records(path: Path) -> Iterator[Record]:
    """The records of one capture file, in order (see the module docstring)."""
    with open(path, "rb") as fh:
        if fh.read(len(HEADER)) != HEADER:
            raise CaptureError(f"{path}: not an IronFleet capture (or another version)")
        offset = len(HEADER)
        while True:
            head = fh.read(_RECORD.size)
            if len(head) < _RECORD.size:
                return  # end, or a record cut by a kill: the capture ends there
            at, direction, length = _RECORD.unpack(head)
            bad_time = not math.isfinite(at)
            if bad_time or direction not in (FROM_CONTROLLER, TO_CONTROLLER) or length > MAX_RECORD:
                raise CaptureError(f"{path}: bad record at byte {offset}")
            data = fh.read(length)
            if len(data) < length:
                return
            yield Record(at, direction, data)
            offset += _RECORD.size + length


def capture_files(path: Path) -> list[Path]:
    """`path` and its rotated predecessor, oldest first, those that exist."""
    older = path.with_name(path.name + ".1")
    return [p for p in (older, path) if p.exists()]
