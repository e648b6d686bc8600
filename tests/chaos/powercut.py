"""A FUSE file system that loses every write not yet fsynced when the power is "cut".

Run as `python powercut.py BACKING MOUNTPOINT`. Files live in BACKING; writes go to an
in-memory shadow of each file and reach BACKING only on fsync/fdatasync. Unmounting
(`fusermount -u`) after SIGKILLing the writer is the power cut: the shadows are dropped,
BACKING keeps exactly what was synced. Metadata (create, rename, unlink) is applied at
once, as a journaling file system would after its next commit; the loss is in data, which
is where SQLite's `synchronous` setting makes its promise.

Test-only: single-threaded, whole-file shadows, no attempt at speed.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from fuse import FUSE, FuseOSError, Operations


class PowerCutFS(Operations):  # type: ignore[misc]
    def __init__(self, root: str) -> None:
        self.root = root
        self.shadow: dict[str, bytearray] = {}  # path -> content including unsynced writes
        self.fds: dict[int, str] = {}
        self.next_fh = 1
        self.syncs = 0

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _content(self, path: str) -> bytearray:
        data = self.shadow.get(path)
        if data is None:
            try:
                with open(self._real(path), "rb") as fh:
                    data = bytearray(fh.read())
            except FileNotFoundError:
                raise FuseOSError(errno.ENOENT) from None
            self.shadow[path] = data
        return data

    # -- metadata ----------------------------------------------------------------------

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        try:
            st = os.lstat(self._real(path))
        except FileNotFoundError:
            raise FuseOSError(errno.ENOENT) from None
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size",
                "st_uid")  # fmt: skip
        attrs = {k: getattr(st, k) for k in keys}
        if path in self.shadow:
            attrs["st_size"] = len(self.shadow[path])
        return attrs

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def access(self, path: str, amode: int) -> None:
        if not os.path.exists(self._real(path)):
            raise FuseOSError(errno.ENOENT)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))
        self.shadow.pop(path, None)

    def rename(self, old: str, new: str) -> None:
        os.rename(self._real(old), self._real(new))
        if old in self.shadow:
            self.shadow[new] = self.shadow.pop(old)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        pass

    def utimens(self, path: str, times: Any = None) -> None:
        os.utime(self._real(path), times)

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self.root)
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize",
                                             "f_favail", "f_ffree", "f_files", "f_flag",
                                             "f_frsize", "f_namemax")}  # fmt: skip

    # -- data --------------------------------------------------------------------------

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        fd = os.open(self._real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.close(fd)
        self.shadow[path] = bytearray()
        return self._open_handle(path)

    def open(self, path: str, flags: int) -> int:
        if not os.path.exists(self._real(path)):
            raise FuseOSError(errno.ENOENT)
        if flags & os.O_TRUNC:
            self.shadow[path] = bytearray()
        return self._open_handle(path)

    def _open_handle(self, path: str) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.fds[fh] = path
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return bytes(self._content(path)[offset : offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        content = self._content(path)
        if offset > len(content):
            content.extend(b"\0" * (offset - len(content)))
        content[offset : offset + len(data)] = data
        return len(data)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        content = self._content(path)
        if length < len(content):
            del content[length:]
        else:
            content.extend(b"\0" * (length - len(content)))

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        """The only way data becomes durable: write the shadow through and fsync it."""
        data = self.shadow.get(path)
        if data is not None:
            tmp = self._real(path)
            with open(tmp, "r+b" if os.path.exists(tmp) else "wb") as out:
                out.write(data)
                out.truncate(len(data))
                out.flush()
                os.fsync(out.fileno())
        self.syncs += 1

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        pass

    def flush(self, path: str, fh: int) -> None:
        pass  # close() is not a sync: unsynced data stays volatile

    def release(self, path: str, fh: int) -> None:
        self.fds.pop(fh, None)


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    FUSE(PowerCutFS(backing), mountpoint, foreground=True, nothreads=True)


if __name__ == "__main__":
    main()
