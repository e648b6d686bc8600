"""Reading a SQLite database file page by page, without SQLite (for salvage).

`PageFile` lays the last committed frames of the `-wal` over the main file, the way
SQLite would, but never trusts the file: a page past the end is None, a torn or stale
WAL frame is ignored (salt and checksum, as SQLite checks them), and `record` decodes a
cell's payload into values or returns None if it is not a well-formed record. On top,
the b-tree walks salvage needs: a table's rows from its root (with the rowid ranges of
children that cannot be read), an index's records, the free list, and the rows of leaf
pages no walk reached. Every page is visited at most once (`seen`), so a cycle in a damaged
tree ends. The format is SQLite's documented file format (sqlite.org/fileformat2.html).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

# Page size assumed when the file header is unreadable (the store's PAGE_SIZE).
DEFAULT_PAGE_SIZE: Final = 4096

_HEADER_MAGIC: Final = b"SQLite format 3\x00"
_WAL_MAGIC: Final = (0x377F0682, 0x377F0683)
_INT_SIZES: Final = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}
_DOUBLE: Final = struct.Struct(">d")
_LEAF, _INTERIOR = 0x0D, 0x05  # table b-tree page types
_INDEX_LEAF, _INDEX_INTERIOR = 0x0A, 0x02
# A table b-tree of 2**63 rows on 512-byte pages is under 20 deep; deeper is a cycle.
MAX_TREE_DEPTH: Final = 24
# SQLite's default SQLITE_MAX_LENGTH: no valid cell carries a larger payload.
MAX_PAYLOAD: Final = 1_000_000_000

Value = int | float | str | bytes | None


class PageFile:
    """Pages of a database file, with the WAL's last committed frames laid over them."""

    def __init__(self, path: Path) -> None:
        self.error = ""  # why the file could not be opened (it then reads as empty)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self.file_size = os.fstat(self.fd).st_size
        except OSError as exc:
            self.fd, self.file_size, self.error = -1, 0, f"{path}: {exc.strerror or exc}"
        head = os.pread(self.fd, 100, 0) if self.fd >= 0 else b""
        self.header_ok = len(head) == 100 and head[:16] == _HEADER_MAGIC
        size = DEFAULT_PAGE_SIZE
        reserved = 0
        if self.header_ok:
            raw = int.from_bytes(head[16:18], "big")
            size = 65536 if raw == 1 else raw
            reserved = head[20]
            if size < 512 or size & (size - 1) or reserved > size - 480:
                self.header_ok, size, reserved = False, DEFAULT_PAGE_SIZE, 0
        self.wal_fd: int | None = None
        self.wal: dict[int, int] = {}  # page number -> offset of its page data in the WAL
        wal_pages = self._read_wal(Path(f"{path}-wal"), size)
        if wal_pages is not None and not self.header_ok:
            size = self.wal_page_size
        self.page_size = size
        self.usable = size - reserved
        self.count = wal_pages if wal_pages is not None else self.file_size // size
        self.unreadable = 0  # pages a tree referenced that were missing or not b-tree pages
        self.seen = bytearray(self.count + 1)  # 1: reached by a tree, 2: on the free list
        self.max_key = 0  # highest rowid (key or cell) seen by walks that track `lost`

    def get(self, number: int) -> bytes | None:
        """Page `number` (1-based), or None if it is past the end of what was written."""
        if not 1 <= number <= self.count:
            return None
        at = self.wal.get(number)
        if at is not None and self.wal_fd is not None:
            data = os.pread(self.wal_fd, self.page_size, at)
        else:
            data = os.pread(self.fd, self.page_size, (number - 1) * self.page_size)
        return data if len(data) == self.page_size else None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        if self.wal_fd is not None:
            os.close(self.wal_fd)

    def index_records(self, root: int, expired: Callable[[], bool]) -> Iterator[list[Value]]:
        """Records of the index b-tree (or WITHOUT ROWID table) at `root`, unordered."""
        stack = [(root, 0)]
        while stack and not expired():
            number, depth = stack.pop()
            data = self.get(number) if 0 < number < len(self.seen) else None
            if (
                data is None
                or self.seen[number]
                or depth > MAX_TREE_DEPTH
                or data[0] not in (_INDEX_LEAF, _INDEX_INTERIOR)
            ):
                continue
            self.seen[number] = 1
            interior = data[0] == _INDEX_INTERIOR
            start = 12 if interior else 8
            n = int.from_bytes(data[3:5], "big")
            if start + 2 * n > self.usable:
                continue
            if interior:
                stack.append((int.from_bytes(data[8:12], "big"), depth + 1))
            for i in range(n):
                off = int.from_bytes(data[start + 2 * i : start + 2 * i + 2], "big")
                try:
                    if interior:
                        stack.append((int.from_bytes(data[off : off + 4], "big"), depth + 1))
                        off += 4
                    size, pos = varint(data, off)
                except IndexError:
                    continue
                payload = self._payload(data, pos, size, index=True)
                values = record(payload) if payload is not None else None
                if values is not None:
                    yield values

    def table_rows(
        self,
        root: int,
        expired: Callable[[], bool],
        lost: list[tuple[int, int | None]] | None = None,
    ) -> Iterator[tuple[int, list[Value]]]:
        """(rowid, values) of the table b-tree at `root`, lowest first; the rowid range of
        each unreadable child goes to `lost` (and the keys seen raise `max_key`)."""
        stack: list[tuple[int, int | None, int | None, int]] = [(root, None, None, 0)]
        while stack and not expired():
            number, lo, hi, depth = stack.pop()
            data = self.get(number) if 0 < number < len(self.seen) else None
            h = 100 if number == 1 else 0
            kind = data[h] if data is not None else -1
            if (
                data is None
                or self.seen[number]
                or depth > MAX_TREE_DEPTH
                or kind not in (_LEAF, _INTERIOR)
            ):
                self.unreadable += 1
                if lost is not None:
                    lost.append((lo if lo is not None else 1, hi))
                continue
            self.seen[number] = 1
            if kind == _LEAF:
                for rowid, values in self._cells(data, h):
                    if (lo is None or rowid >= lo) and (hi is None or rowid <= hi):
                        if lost is not None:
                            self.max_key = max(self.max_key, rowid)
                        yield rowid, values
                continue
            children = self._interior(data, h)
            if children is None:
                self.unreadable += 1
                if lost is not None:
                    lost.append((lo if lo is not None else 1, hi))
                continue
            below = lo
            for child, key in children:
                if key is not None and lost is not None:
                    self.max_key = max(self.max_key, key)
                stack.append((child, below, key if key is not None else hi, depth + 1))
                below = key + 1 if key is not None else below
            stack[-len(children) :] = reversed(stack[-len(children) :])  # lowest first

    def _interior(self, data: bytes, h: int) -> list[tuple[int, int | None]] | None:
        """(child page, highest rowid in it) of an interior page; the last key is None."""
        try:
            n = int.from_bytes(data[h + 3 : h + 5], "big")
            ptrs = h + 12
            if ptrs + 2 * n > self.usable:
                return None
            out: list[tuple[int, int | None]] = []
            last = None
            for i in range(n):
                off = int.from_bytes(data[ptrs + 2 * i : ptrs + 2 * i + 2], "big")
                if not ptrs + 2 * n <= off < self.usable - 4:
                    return None
                child = int.from_bytes(data[off : off + 4], "big")
                key, _ = varint(data, off + 4)
                key = key - 2**64 if key >= 2**63 else key
                if last is not None and key <= last:
                    return None
                out.append((child, key))
                last = key
            out.append((int.from_bytes(data[h + 8 : h + 12], "big"), None))
            return out
        except IndexError:
            return None

    def _cells(self, data: bytes, h: int) -> Iterator[tuple[int, list[Value]]]:
        """(rowid, values) of every well-formed cell of a table leaf page."""
        usable = self.usable
        n = int.from_bytes(data[h + 3 : h + 5], "big")
        ptrs = h + 8
        if ptrs + 2 * n > usable:
            return
        for i in range(n):
            off = int.from_bytes(data[ptrs + 2 * i : ptrs + 2 * i + 2], "big")
            if not ptrs + 2 * n <= off < usable:
                continue
            try:
                size, pos = varint(data, off)
                rowid, pos = varint(data, pos)
            except IndexError:
                continue
            rowid = rowid - 2**64 if rowid >= 2**63 else rowid
            payload = self._payload(data, pos, size)
            values = record(payload) if payload is not None else None
            if values is not None:
                yield rowid, values

    def _payload(self, data: bytes, pos: int, size: int, *, index: bool = False) -> bytes | None:
        """A cell's payload, its overflow chain followed (None if the chain is broken)."""
        usable = self.usable
        if size > MAX_PAYLOAD or size > self.count * usable:
            return None
        most = (usable - 12) * 64 // 255 - 23 if index else usable - 35
        if size <= most:
            return data[pos : pos + size] if pos + size <= usable else None
        least = (usable - 12) * 32 // 255 - 23
        local = least + (size - least) % (usable - 4)
        local = local if local <= most else least
        if pos + local + 4 > usable:
            return None
        parts = [data[pos : pos + local]]
        nxt = int.from_bytes(data[pos + local : pos + local + 4], "big")
        left = size - local
        hops = 0
        while left > 0:
            page = self.get(nxt)
            hops += 1
            if page is None or hops > self.count:
                return None
            self.seen[nxt] = max(self.seen[nxt], 1)
            take = min(left, usable - 4)
            parts.append(page[4 : 4 + take])
            left -= take
            nxt = int.from_bytes(page[:4], "big")
        return b"".join(parts)

    def mark_free_list(self) -> None:
        """Mark free pages: their stale rows must not come back as orphans."""
        if not self.header_ok:
            return
        first = self.get(1)
        if first is None:
            return
        trunk = int.from_bytes(first[32:36], "big")
        hops = 0
        while 0 < trunk < len(self.seen) and hops < len(self.seen):
            page = self.get(trunk)
            if page is None or self.seen[trunk] == 2:
                return
            self.seen[trunk] = 2
            hops += 1
            n = int.from_bytes(page[4:8], "big")
            for i in range(min(n, self.usable // 4 - 2)):
                leaf = int.from_bytes(page[8 + 4 * i : 12 + 4 * i], "big")
                if 0 < leaf < len(self.seen):
                    self.seen[leaf] = self.seen[leaf] or 2
            trunk = int.from_bytes(page[:4], "big")

    def orphan_rows(self, number: int) -> list[tuple[int, list[Value]]]:
        """Rows of page `number` if it is a table leaf no tree reached and not free."""
        data = self.get(number) if 0 < number < len(self.seen) else None
        h = 100 if number == 1 else 0
        if data is None or self.seen[number] or data[h] != _LEAF:
            return []
        return list(self._cells(data, h))

    def _read_wal(self, wal: Path, db_page_size: int) -> int | None:
        """Index the committed frames of a valid WAL; the database size they commit."""
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        head = os.pread(fd, 32, 0)
        if len(head) < 32 or int.from_bytes(head[:4], "big") not in _WAL_MAGIC:
            os.close(fd)
            return None
        big = bool(head[3] & 1)
        size = int.from_bytes(head[8:12], "big")
        salt = head[16:24]
        s = _wal_checksum(head[:24], 0, 0, big)
        if size < 512 or size & (size - 1) or s != struct.unpack(">II", head[24:32]):
            os.close(fd)
            return None
        if self.header_ok and size != db_page_size:
            os.close(fd)
            return None
        self.wal_page_size = size
        committed: int | None = None
        pending: dict[int, int] = {}
        offset = 32
        while True:
            frame = os.pread(fd, 24 + size, offset)
            if len(frame) < 24 + size or frame[8:16] != salt:
                break
            s = _wal_checksum(frame[:8], *s, big)
            s = _wal_checksum(frame[24:], *s, big)
            if s != struct.unpack(">II", frame[16:24]):
                break  # a torn frame: nothing after it was committed
            pending[int.from_bytes(frame[:4], "big")] = offset + 24
            db_size = int.from_bytes(frame[4:8], "big")
            if db_size:  # a commit frame
                self.wal.update(pending)
                pending.clear()
                committed = db_size
            offset += 24 + size
        if committed is None:
            os.close(fd)
            self.wal.clear()
            return None
        self.wal_fd = fd
        return committed


def _wal_checksum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        b = buf[pos + i]
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, pos + i + 1
    return (value << 8) | buf[pos + 8], pos + 9


def record(payload: bytes) -> list[Value] | None:
    """Decode one record (SQLite's row format); None if it is not a well-formed record."""
    # The salvage's hot loop: one-byte varints (every serial type of our rows but long
    # blobs) are read inline, values sliced without a call per column.
    try:
        size, pos = (payload[0], 1) if payload[0] < 0x80 else varint(payload, 0)
        end = len(payload)
        if not 1 <= size <= end:
            return None
        types = _serial_types(payload, pos, size)
        if types is None:
            return None
        at = size
        values: list[Value] = []
        for t in types:
            if t >= 12:
                n = (t - 12) >> 1
                chunk = payload[at : at + n]
                values.append(chunk.decode() if t & 1 else chunk)
            elif t in _INT_SIZES:
                n = _INT_SIZES[t]
                values.append(int.from_bytes(payload[at : at + n], "big", signed=True))
            elif t == 7:
                n = 8
                values.append(_DOUBLE.unpack_from(payload, at)[0])
            elif t in (0, 8, 9):
                n = 0
                values.append(None if t == 0 else t - 8)
            else:
                return None  # 10, 11: reserved
            at += n
            if at > end:
                return None
        return values if at == end else None
    except (IndexError, struct.error, UnicodeDecodeError):
        return None


def _serial_types(payload: bytes, pos: int, size: int) -> list[int] | None:
    """The record header's serial types (between `pos` and `size`), or None if malformed."""
    types = []
    while pos < size:
        t = payload[pos]
        if t < 0x80:
            pos += 1
        else:
            t, pos = varint(payload, pos)
        types.append(t)
    return types if pos == size else None
