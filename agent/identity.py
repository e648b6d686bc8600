"""Which machine, and which boot of it, this process runs on.

The daemon publishes both with its heartbeat; the technician CLI compares them with its
own. A database copied to a laptop (or read from a mounted disk image) otherwise reads
as "running, pid N" when a process with that pid happens to exist there, and after a
power cut the old pid may belong to another process of the new boot.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Final

BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def boot_id() -> str:
    """The kernel's random id of this boot ("" where there is none: not Linux)."""
    try:
        return BOOT_ID_PATH.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def host_name() -> str:
    """This machine's host name (not cached: a technician may rename a laptop)."""
    return socket.gethostname()
