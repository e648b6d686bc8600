"""The commit probe (agent/fsprobe.py) on real file systems: a live ext4 answers, an ext4
whose journal the kernel aborted refuses every later ACK (duplicates too), a tmpfs
answers, and a file system that cannot answer switches the probe off without failing
commits."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import CommitFailed
from agent.fleet import Batch, topic
from agent.fsprobe import PROBE_XATTR, JournalProbe
from agent.resilience import Event
from agent.store import EventStore
from firmware_bridge.link import ControllerEvent, Received, TimeQuality
from fleet.collector import Collector, CollectorStore

from diskharness import MiB, Mount, force_read_only, mount_ext4, mount_tmpfs, require_root


def arrivals(seqs: range) -> list[Received]:
    """Events of one stream as the link hands them over (real bridge types)."""
    quality = TimeQuality(3)
    events = (ControllerEvent("probe/s0", seq, 1, float(seq), "sample", 1, b"\x80") for seq in seqs)
    return [Received((0, e.seq), e, quality, "ecu0") for e in events]


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Mount]:
    require_root()
    mount = mount_ext4(tmp_path / "ext4.img", tmp_path / "state", 32 * MiB)
    try:
        yield mount
    finally:
        mount.unmount()


def test_a_live_ext4_answers_and_the_store_commits(ext4: Mount) -> None:
    store = EventStore(ext4.path / "agent.db")
    try:
        assert store.append(arrivals(range(1, 11))).stored == 10
        assert store._probe.enabled
        assert os.getxattr(ext4.path / "agent.db", PROBE_XATTR) == b"1"
        assert store.counters["commits_unconfirmed"] == 0
    finally:
        store.close()


def test_an_aborted_journal_refuses_new_events_and_resent_duplicates(ext4: Mount) -> None:
    """A resent batch whose events are already in the (page-cached) database commits
    nothing and so never reaches the disk: without the probe it would be ACKed again,
    though the commit that stored it may be the one the aborted journal threw away."""
    store = EventStore(ext4.path / "agent.db")
    try:
        store.append(arrivals(range(1, 11)))
        force_read_only(ext4)
        with pytest.raises(OSError, match=r"file system|Input/output") as raised:
            store._probe.check()
        assert raised.value.errno in (errno.EROFS, errno.EIO)
        with pytest.raises(CommitFailed, match="file system failed right after"):
            store.append(arrivals(range(1, 11)))  # duplicates only: SQLite writes nothing
        assert store.counters["commits_unconfirmed"] == 1
        with pytest.raises(CommitFailed):
            store.append(arrivals(range(11, 21)))  # new events: SQLite's own write fails
    finally:
        store.conn.close()
        store._probe.close()


def test_a_tmpfs_answers(tmp_path: Path) -> None:
    require_root()
    mount = mount_tmpfs(tmp_path / "tmpfs", 16 * MiB)
    try:
        probe = JournalProbe(_touch(mount.path / "agent.db"))
        probe.check()
        assert probe.enabled
        probe.close()
    finally:
        mount.unmount()


def test_a_file_system_without_user_xattrs_turns_the_probe_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """FUSE file systems without setxattr (the power-cut suite's) answer ENOTSUP: the
    probe says so once and commits go on (those have no journal to abort)."""
    probe = JournalProbe(_touch(tmp_path / "agent.db"))

    def unsupported(*_: object) -> None:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    monkeypatch.setattr(os, "setxattr", unsupported)
    with caplog.at_level(logging.WARNING, logger="agent.fsprobe"):
        probe.check()
        probe.check()
    assert not probe.enabled
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "commit_probe_off" in caplog.records[0].message
    probe.close()


def test_a_full_disk_is_not_a_dead_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = JournalProbe(_touch(tmp_path / "agent.db"))

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "setxattr", full)
    probe.check()  # no answer this time, and no verdict on the commit before it
    assert probe.enabled
    probe.close()


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def test_the_collector_acks_nothing_after_its_journal_aborted(ext4: Mount) -> None:
    """The fleet side commits before it acks, and the vehicle prunes what is acked: the
    same probe stands between the collector's commit and its ack."""
    acks: list[bytes] = []

    class Sink:
        def ack(self, _vehicle: str, payload: bytes) -> None:
            acks.append(payload)

    collector = Collector(CollectorStore(ext4.path / "fleet.db"), Sink())
    events = tuple((Event("ecu0/s0", seq, boot_epoch=1, ts=float(seq)), 3) for seq in (1, 2))
    payload = Batch("veh-1", 1, "events", False, events).encode()
    collector.handle(topic("veh-1", "events"), payload)
    assert (len(acks), collector.commit_failures) == (1, 0)
    force_read_only(ext4)
    collector.handle(topic("veh-1", "events"), payload)  # the vehicle resends: no ack now
    assert (len(acks), collector.commit_failures) == (1, 1)
