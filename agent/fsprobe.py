"""After a commit and before its ACK, ask the file system whether its journal still lives.

Why: ext4 can report `fdatasync` success for data its journal never got. When the kernel
aborts the journal (a metadata error under `errors=remount-ro`) while a commit waits in
`fdatasync`, the transaction holding the file's new size is thrown away, yet the waiter
can still be told 0: measured on Linux 6.18 with `bench/bench_fsync_abort.py`, a plain
append + `fdatasync` loop lost a record it had been told was durable in 5 of 80 trials.
In the agent this lost the last ACKed group (5 to 16 events) in about one loaded run of
`test_read_only_file_system_under_the_running_agent` in six; SQLite cannot see it, since
SQLite trusts `fdatasync` too.

The lie needs the journal to be aborted before `fdatasync` returns. Every ext4 operation
that starts a journal handle checks the abort flag first and fails with EROFS (it is
set before anything else the abort does), so one such operation after the commit returns
tells the truth, without a race. Setting a small extended attribute on the database file
is the cheapest one that reports its error to the caller (4 µs; `utime` swallows it). A
file system that has no user xattrs (FUSE, vfat, old tmpfs) cannot be asked: the probe
then switches itself off and says so once; those do not have this journal either.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

PROBE_XATTR: Final = "user.ironfleet.commit-probe"
# The journal (or the whole file system) is gone: the last commit may not be durable.
DEAD: Final = frozenset({errno.EROFS, errno.EIO})
# The file system cannot answer this question (no user xattrs, not allowed): stop asking.
UNSUPPORTED: Final = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM,
                                errno.EACCES})  # fmt: skip


class JournalProbe:
    """`check()` raises OSError (EROFS or EIO) when the file system holding `path` has
    stopped journalling; otherwise returns. Owned by the single writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.enabled = True
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def check(self) -> None:
        """One journalled no-op on the database file; its error is the journal's state."""
        if not self.enabled or self._fd is None:
            return
        try:
            os.setxattr(self._fd, PROBE_XATTR, b"1")
        except OSError as exc:
            if exc.errno in DEAD:
                raise
            if exc.errno in UNSUPPORTED:
                self.enabled = False
                log.warning(
                    "commit_probe_off path=%s error=%r (this file system cannot say whether"
                    " its journal aborted after a commit)", self.path, os.strerror(exc.errno or 0),
                )  # fmt: skip
            # ENOSPC, EDQUOT and the like: this probe could not be stored, which says
            # nothing about the commit before it; ask again next time.

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
