"""Real file systems under a running agent: tmpfs and ext4 mounts, filler files, sizes.

The disk-fault tests put the agent's `state_dir` on a file system of their own, in the
initial mount namespace, so every process (the agent, the simulator, the oracle reading
the database, the `ironfleet` CLI) sees the same mount without joining anything. That
needs root (CAP_SYS_ADMIN for mount, a loop device for ext4): `require_root` fails with
what is missing instead of skipping, as the test policy asks. Not `unshare -rm`: a user
namespace may mount tmpfs but not ext4 on a loop device, and every process above (and
each CLI call) would have to join the namespace to see the mount.

Why ext4 for the read-only case: Linux refuses `mount -o remount,ro` while any process
holds a file open for writing (EBUSY), and SQLite keeps `agent.db`, `-wal` and `-shm`
open read-write, so the only way a file system turns read-only under a running agent is
the kernel's own error handling (`errors=remount-ro`), triggered here through ext4's
`trigger_fs_error` sysfs file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simharness import AgentProcess, Key, TruthReader
from support import wait_for

MiB = 2**20
CLI = str(Path(sys.executable).with_name("ironfleet"))
MOUNT_TOOLS = ("mount", "umount", "mkfs.ext4", "e2fsck", "findmnt", "dd")


def require_root() -> None:
    """Fail (never skip) naming what the disk-fault tests need when it is missing."""
    missing = [tool for tool in MOUNT_TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        raise AssertionError(
            "the disk-fault tests mount real file systems (tmpfs, ext4 on a loop device): "
            "run them as root (CAP_SYS_ADMIN and /dev/loop-control, as in CI)"
            + (f"; missing tools: {', '.join(missing)} (util-linux, e2fsprogs)" if missing else "")
            + f"; euid is {os.geteuid()}"
        )


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a system tool; on failure the assertion carries its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass
class Mount:
    """A file system mounted by a test on `path`; `unmount` always gets rid of it."""

    path: Path
    fstype: str
    image: Path | None = None  # the ext4 image behind a loop mount

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def options(self) -> list[str]:
        return run("findmnt", "-no", "OPTIONS", str(self.path)).stdout.strip().split(",")

    def mounted(self) -> bool:
        return run("findmnt", "-no", "TARGET", str(self.path), check=False).returncode == 0

    def writable(self) -> bool:
        """True if a new file can be written and synced here right now."""
        probe = self.path / ".write-probe"
        try:
            with probe.open("wb") as fh:
                fh.write(b"x")
                fh.flush()
                os.fsync(fh.fileno())
            probe.unlink()
        except OSError:
            return False
        return True

    def unmount(self) -> None:
        """Unmount; lazily if something still holds it (the loop device then goes too)."""
        if not self.mounted():
            return
        if run("umount", str(self.path), check=False).returncode != 0:
            run("umount", "-l", str(self.path), check=False)


def mount_tmpfs(path: Path, size: int) -> Mount:
    """A tmpfs of `size` bytes on `path` (created if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    return Mount(path, "tmpfs")


def resize_tmpfs(mount: Mount, size: int) -> None:
    """Give a live tmpfs more room (no read-only transition: allowed under writers)."""
    run("mount", "-o", f"remount,size={size}", str(mount.path))


def mount_ext4(image: Path, path: Path, size: int) -> Mount:
    """A fresh journaled ext4 in a sparse image, loop-mounted with errors=remount-ro."""
    path.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as fh:
        fh.truncate(size)
    run("mkfs.ext4", "-q", "-F", str(image))
    return remount_ext4(Mount(path, "ext4", image))


def remount_ext4(mount: Mount) -> Mount:
    """Mount the image of an (unmounted) ext4 `mount` again, read-write."""
    assert mount.image is not None
    run("mount", "-o", "loop,errors=remount-ro", str(mount.image), str(mount.path))
    return mount


def force_read_only(mount: Mount) -> None:
    """Make the kernel turn a mounted ext4 read-only, as it does on a metadata error."""
    source = run("findmnt", "-no", "SOURCE", str(mount.path)).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(source).name / "trigger_fs_error"
    assert trigger.exists(), f"{trigger} is missing: this kernel's ext4 cannot be faulted"
    trigger.write_text("ironfleet disk-fault test\n")


def fill(directory: Path, name: str = "filler") -> tuple[Path, int]:
    """Another process (dd) writes a file in `directory` until the disk is full."""
    target = directory / name
    done = run("dd", "if=/dev/zero", f"of={target}", "bs=64k", check=False)
    assert done.returncode != 0, "dd ended without the disk being full"
    assert "No space left" in done.stderr, done.stderr
    return target, target.stat().st_size


@dataclass
class Sizes:
    """Peaks of the store's files and the lowest free space seen by a `SizeSampler`."""

    db: int = 0
    wal: int = 0
    total: int = 0  # database + WAL in the same sample
    min_free: int = 2**63
    samples: int = 0


class SizeSampler:
    """Samples agent.db and agent.db-wal sizes and the free space every `interval` s.

    A thread, because the peaks come and go between the test's own steps (a WAL grows
    and is reset within a second); stopped by `stop()` or the context manager.
    """

    def __init__(self, db: Path, mount: Mount, interval: float = 0.02) -> None:
        self.db = db
        self.mount = mount
        self.interval = interval
        self.sizes = Sizes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="size-sampler", daemon=True)

    def __enter__(self) -> SizeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Sizes:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        return self.sizes

    def sample(self) -> None:
        s = self.sizes
        db = _size(self.db)
        wal = _size(Path(f"{self.db}-wal"))
        s.db, s.wal, s.total = max(s.db, db), max(s.wal, wal), max(s.total, db + wal)
        with contextlib.suppress(OSError):
            s.min_free = min(s.min_free, self.mount.free_bytes())
        s.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_count(agent: AgentProcess, needle: str) -> int:
    """Lines of the agent's log (all its runs) that contain `needle`."""
    if not agent.log.exists():
        return 0
    return agent.log.read_text(errors="replace").count(needle)


def metric(textfile: Path, name: str) -> float | None:
    """One unlabelled sample from the agent's node_exporter textfile (None if absent)."""
    try:
        text = textfile.read_text()
    except OSError:
        return None
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def cli_status(db: Path) -> dict[str, Any]:
    """`ironfleet --db DB status --json`, as a technician would run it."""
    done = run(CLI, "--db", str(db), "status", "--json")
    return dict(json.loads(done.stdout))


@dataclass(frozen=True)
class Shed:
    """One `shed` record: events the ladder removed, by stream, epoch and seq range."""

    stream: str
    boot_epoch: int
    first_seq: int
    last_seq: int
    reason: str
    count: int

    def covers(self, key: Key) -> bool:
        stream, epoch, seq = key
        return (stream, epoch) == (self.stream, self.boot_epoch) and (
            self.first_seq <= seq <= self.last_seq
        )


def shed_records(db: Path) -> list[Shed]:
    """The ladder's record of what it shed (read-only)."""
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT s.name, h.boot_epoch, h.first_seq, h.last_seq, h.reason, h.count "
            "FROM shed h JOIN streams s ON s.id = h.stream_id"
        ).fetchall()
    finally:
        conn.close()
    return [Shed(*row) for row in rows]


@dataclass
class Ledger:
    """The store oracle with the ladder's records: nothing is lost unless recorded."""

    silent: list[Key]  # ACKed (or sent, for `undelivered`) and neither stored nor shed
    shed: list[Shed] = field(default_factory=list)

    @property
    def shed_events(self) -> int:
        return sum(s.count for s in self.shed)


def account(missing: list[Key], db: Path) -> Ledger:
    """Split keys missing from the store into those the ladder recorded and the rest."""
    shed = shed_records(db)
    return Ledger([k for k in missing if not any(s.covers(k) for s in shed)], shed)


def wait_acked(truth: TruthReader, keys: set[Key], timeout: float, what: str) -> float:
    """Wait until the controller has seen every one of `keys` ACKed; seconds it took."""
    start = time.monotonic()
    wait_for(lambda: truth.poll() or keys <= truth.acked.keys(), timeout, what)
    return time.monotonic() - start


def throttled(condition: Callable[[], object], every: float) -> Callable[[], object]:
    """`condition`, evaluated at most once per `every` seconds (for costly checks in
    `wait_for`, which polls every 10 ms)."""
    last = [0.0]

    def check() -> object:
        now = time.monotonic()
        if now - last[0] < every:
            return False
        last[0] = now
        return condition()

    return check


class Disks:
    """The file systems one test mounts; `close` kills the agents using them, then unmounts.

    The order matters: an agent still holding agent.db open keeps a mount busy (and a
    lazily detached one alive), so agents go first.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mounts: list[Mount] = []
        self.agents: list[AgentProcess] = []

    def tmpfs(self, agent: AgentProcess, size: int) -> Mount:
        """A tmpfs of `size` bytes as `agent`'s state_dir (mount before the agent starts)."""
        mount = mount_tmpfs(agent.db.parent, size)
        self.mounts.append(mount)
        self.agents.append(agent)
        return mount

    def ext4(self, agent: AgentProcess, size: int) -> Mount:
        """A loop-mounted ext4 (errors=remount-ro) of `size` bytes as `agent`'s state_dir."""
        image = self.workdir / f"ext4-{len(self.mounts)}.img"
        mount = mount_ext4(image, agent.db.parent, size)
        self.mounts.append(mount)
        self.agents.append(agent)
        return mount

    def close(self) -> None:
        for agent in self.agents:
            agent.stop_quietly()
        for mount in reversed(self.mounts):
            mount.unmount()
