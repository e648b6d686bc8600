"""Disk faults under the running agent: real tmpfs and ext4 mounts, strace for the rest.

What DESIGN.md ("Disk full"), operations.md (section 7) and configuration.md ([store])
ask of the agent when its disk fails: a failed commit is never ACKed (the controller keeps
the events in its ring buffer and resends them), the agent stays up and says so, the
ladder sheds by policy before the store reaches its cap or the free-space floor, and
once the disk is back, ingest resumes on the same process and delivers everything the
controller held.

Scenarios (the agent's state_dir on a file system of the test's own: tests/diskharness.py):
1a. a 6 MiB tmpfs filled by the agent's own growth ([store] caps larger than the tmpfs),
    space given back by growing the tmpfs;
1b. an 8 MiB tmpfs filled by another process (dd) until ENOSPC, then the filler deleted;
2.  a file system turning read-only under the agent: ext4 with errors=remount-ro, made
    read-only by the kernel (a plain `mount -o remount,ro` is refused with EBUSY while
    SQLite holds its files open for writing; the test checks that too);
3.  ENOSPC and EIO "forever" from pwrite64 or fdatasync/fsync (strace), then SIGTERM and
    a restart without the fault;
4.  O8, sampled every 20 ms: database under max_buffer_bytes, WAL under the store's
    journal_size_limit, free space over min_free_bytes (a cap that binds, on a roomy tmpfs);
5.  the control: 1b with ACK-after-failed-commit patched in, which the oracle must catch.
Oracle: every ACKed event is stored once, byte-equal, or lies in a `shed` record (the
ladder's recorded loss); nothing is stored that was never sent; integrity_check is ok;
after healing, every event the controller held is delivered.

Product findings are strict xfails: the test shows the bug, and XPASSes (so fails) once
the product is fixed. Root is needed for the mounts (CI runs as root); without it the
tests fail saying what is missing. CI tier: one fault cycle per scenario;
IRONFLEET_LONG=1 repeats the fill/heal cycles and runs every strace variant.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from diskharness import (
    CLI,
    Disks,
    Ledger,
    MiB,
    Sizes,
    SizeSampler,
    account,
    cli_status,
    fill,
    force_read_only,
    log_count,
    metric,
    remount_ext4,
    require_root,
    resize_tmpfs,
    run,
    throttled,
    wait_acked,
)
from simharness import AgentProcess, Sim, TruthReader, Verdict, verdict
from support import scaled, wait_for

StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]
LONG = bool(os.environ.get("IRONFLEET_LONG"))
CYCLES = 4 if LONG else 1  # fill/heal cycles per scenario
HOLD = 3.0  # seconds a fault is held before the disk comes back
RING = 65536  # controller ring buffer, frames: 16 s at 4,000 events/s, far above any hold
FLOOR = 1 * MiB  # [store] min_free_bytes
BIG_CAP = 64 * MiB  # [store] max_buffer_bytes above every tmpfs here: the file system runs out
WAL_CAP = 64 * MiB  # StoreSection.journal_size_limit: the WAL is truncated back to this
LADDER = {"compact_low_priority", "drop_oldest"}
COMMIT_FAILURES = "ironfleet_commit_failures_total"
STRACE = shutil.which("strace") or "/usr/bin/strace"
# The long tier's repeated cycles take longer than the suite's 120 s per test.
pytestmark = pytest.mark.timeout(300 if LONG else 120)


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[Disks]:
    """Mounts for one test; at teardown the agents on them are killed, then unmounted."""
    require_root()
    made = Disks(tmp_path)
    try:
        yield made
    finally:
        made.close()


@dataclass
class Rig:
    """One scenario's simulator, agent, ground truth and metrics textfile."""

    sim: Sim
    agent: AgentProcess
    truth: TruthReader
    textfile: Path  # outside the faulted file system: a report channel that still works
    heals: list[Heal] = field(default_factory=list)
    failures_seen: float = 0.0  # highest commit-failure count read (a restart resets it)

    def acked(self) -> int:
        self.truth.poll()
        return len(self.truth.acked)

    def failures_reported(self) -> float:
        """The agent's commit-failure counter as its metrics textfile last showed it."""
        now = metric(self.textfile, COMMIT_FAILURES) or 0.0
        self.failures_seen = max(self.failures_seen, now)
        return now


@dataclass(frozen=True)
class Heal:
    """How fast the agent came back once the disk did."""

    resume_s: float  # disk back -> the first event the controller held is ACKed
    deliver_s: float | None  # disk back -> every event sent so far is ACKed (if waited for)


def make_rig(
    start_sim: StartSim,
    start_agent: StartAgent,
    tmp_path: Path,
    rate: int,
    store: dict[str, object] | None = None,
    *,
    agent: dict[str, object] | None = None,
) -> Rig:
    sim = start_sim("--rate", str(rate), "--streams", "8", "--ring", str(RING))
    textfile = tmp_path / "metrics.prom"
    process = start_agent(
        sim.devices["ecu0"],
        store={"max_buffer_bytes": BIG_CAP, "min_free_bytes": FLOOR, **(store or {})},
        metrics={"textfile": str(textfile), "textfile_interval": 1.0},
        **({"agent": agent} if agent else {}),
    )
    return Rig(sim, process, TruthReader(sim.truth_path), textfile)


def log_tail(agent: AgentProcess, lines: int = 15) -> str:
    return "\n".join(agent.log.read_text(errors="replace").splitlines()[-lines:])


def start(rig: Rig, **kwargs: Any) -> int:
    """Start the agent, wait until it is up and has ACKed 2,000 events; its pid."""
    rig.agent.start(**kwargs)
    wait_for(rig.agent.started, 30, "the agent to start")
    target = rig.acked() + 2000
    wait_for(lambda: rig.acked() >= target, 30, "2,000 events ACKed before the fault")
    return rig.agent.agent_pid()


def wait_ingest(rig: Rig, events: int, timeout: float, what: str) -> None:
    target = rig.acked() + events
    wait_for(lambda: rig.acked() >= target, timeout, what)


def settled_acked(rig: Rig, quiet: float = 0.5, timeout: float = 10.0) -> int:
    """The ACK count once it has not moved for `quiet` s (ACKs of the commits that
    succeeded before the fault have arrived); fails if ACKs never stop."""
    deadline = time.monotonic() + scaled(timeout)
    last, since = rig.acked(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = rig.acked()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
    raise AssertionError(f"events were still ACKed {timeout} s after every write began to fail")


def hold(rig: Rig, seconds: float, frozen: int | None = None) -> None:
    """Keep the fault for `seconds`, checking throughout that the agent stays up and,
    with `frozen`, that not one more event is ACKed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert rig.agent.alive(), f"the agent died during the fault:\n{log_tail(rig.agent)}"
        if frozen is not None:
            assert rig.acked() == frozen, "an event was ACKed while every write failed"
        time.sleep(0.05)


def wait_for_fault(rig: Rig, failed_before: int, shed_before: int, what: str) -> bool:
    """Wait until a commit failed or the ladder shed; True if a commit failed.

    On a commit failure, also wait for it in the metrics textfile: the report that works
    while the database cannot be written (see the alarm test for the CLI's view).
    """
    reported = rig.failures_reported()
    wait_for(
        lambda: (
            log_count(rig.agent, "commit_failed") > failed_before
            or log_count(rig.agent, " shed=") > shed_before
        ),
        90,
        what,
    )
    if log_count(rig.agent, "commit_failed") == failed_before:
        return False  # the ladder made room instead: no failure to report
    wait_for(lambda: rig.failures_reported() > reported, 10, f"{COMMIT_FAILURES} to rise")
    return True


def heal(
    rig: Rig, restore: Callable[[], object], timeout: float = 60, deliver: bool = True
) -> Heal:
    """Give the disk back; time until the held events flow again and (with `deliver`)
    until every event sent so far is ACKed."""
    rig.truth.poll()
    everything = set(rig.truth.sent)
    held = everything - rig.truth.acked.keys()
    rig.failures_reported()
    restore()
    start_at = time.monotonic()
    wait_for(
        lambda: rig.truth.poll() or not held or any(k in rig.truth.acked for k in held),
        timeout,
        "ingest to resume once the disk is back",
    )
    resume = time.monotonic() - start_at
    delivered = None
    if deliver:
        wait_acked(rig.truth, everything, timeout, "every event the controller held to be ACKed")
        delivered = round(time.monotonic() - start_at, 2)
    found = Heal(round(resume, 2), delivered)
    rig.heals.append(found)
    return found


def finish(rig: Rig) -> tuple[Verdict, Ledger]:
    """Stop the simulator, then the agent (SIGTERM: exit 0); the oracle with the shed
    records, once the simulator's truth is complete."""
    rig.sim.signal(signal.SIGTERM)
    assert rig.sim.wait(timeout=30) == 0
    assert rig.agent.terminate(timeout=30) == 0, log_tail(rig.agent)
    rig.failures_reported()  # the textfile is written once more at the stop
    found = verdict(rig.truth, rig.agent.db, complete=True)
    return found, account(found.lost, rig.agent.db)


def check(found: Verdict, ledger: Ledger) -> None:
    """Nothing ACKed is missing unless the ladder recorded it; no duplicate, altered or
    foreign event; a sound database."""
    assert not ledger.silent, f"ACKed events lost without a shed record: {found.describe()}"
    assert len(found.lost) <= ledger.shed_events
    assert not found.duplicates, found.describe()
    assert not found.altered, found.describe()
    assert not found.foreign, found.describe()
    assert found.integrity == "ok", found.integrity
    assert {s.reason for s in ledger.shed} <= LADDER


def record(chaos_report: Any, fault: str, injected: int, found: Verdict, ledger: Ledger) -> None:
    chaos_report.record(
        fault,
        injected=injected,
        acked=found.acked,
        lost=len(ledger.silent),
        duplicates=len(found.duplicates),
        integrity_failures=int(found.integrity != "ok"),
    )


def figures(name: str, rig: Rig, found: Verdict, ledger: Ledger, sizes: Sizes | None) -> None:
    """One line per scenario for the report (pytest -s shows it)."""
    line = (
        f"\n[{name}] acked={found.acked} stored={found.stored} silent_loss={len(ledger.silent)} "
        f"shed={ledger.shed_events} commit_failures={rig.failures_seen:.0f} "
        f"resume_s={[h.resume_s for h in rig.heals]} deliver_s={[h.deliver_s for h in rig.heals]}"
    )
    if sizes is not None:
        line += (
            f" peak db={sizes.db} wal={sizes.wal} db+wal={sizes.total} "
            f"min_free={sizes.min_free} samples={sizes.samples}"
        )
    print(line)


def check_caps(sizes: Sizes, max_buffer_bytes: int) -> None:
    """O8: the database file never passed its cap, nor the WAL the journal size limit."""
    assert sizes.samples >= 20, "the size sampler barely ran"
    assert sizes.db <= max_buffer_bytes, f"database reached {sizes.db} B, cap {max_buffer_bytes}"
    assert sizes.wal <= WAL_CAP, f"WAL reached {sizes.wal} B, limit {WAL_CAP}"


# -- 1a: the agent fills its own file system -----------------------------------------------


def test_tmpfs_filled_by_the_agents_own_growth(
    start_sim: StartSim, start_agent: StartAgent, disks: Disks, tmp_path: Path, chaos_report: Any
) -> None:
    """The file system, not the cap, runs out: whatever the ladder does, nothing ACKed may
    be lost, the agent stays up and says so, and when the tmpfs grows (space returns) the
    same process resumes and delivers everything the controller held."""
    rig = make_rig(start_sim, start_agent, tmp_path, rate=4000)
    size = 6 * MiB
    mount = disks.tmpfs(rig.agent, size)
    failures = 0
    with SizeSampler(rig.agent.db, mount) as sampler:
        pid = start(rig)
        for cycle in range(CYCLES):
            failed = log_count(rig.agent, "commit_failed")
            shed = log_count(rig.agent, " shed=")
            failures += wait_for_fault(rig, failed, shed, "the agent to fill its tmpfs")
            hold(rig, HOLD)
            # Before the last cycle, 2 MiB: about 8 s of growth, so the agent fills it
            # again (catching up included) before it has delivered the backlog; what it
            # held is then delivered after the last, roomy, heal.
            last = cycle == CYCLES - 1
            size += 32 * MiB if last else 2 * MiB
            heal(rig, functools.partial(resize_tmpfs, mount, size), deliver=last)
            assert rig.agent.agent_pid() == pid, "recovered by a restart, not on the same process"
        found, ledger = finish(rig)
    record(chaos_report, "tmpfs full (agent growth)", CYCLES, found, ledger)
    figures("tmpfs full (agent growth)", rig, found, ledger, sampler.sizes)
    check(found, ledger)
    check_caps(sampler.sizes, BIG_CAP)
    if failures:
        assert log_count(rig.agent, "commit_recovered") >= failures


def test_agent_growth_keeps_the_free_space_floor_by_shedding(
    start_sim: StartSim, start_agent: StartAgent, disks: Disks, tmp_path: Path
) -> None:
    """configuration.md: min_free_bytes is 'space always left free on the file system';
    the ladder starts earlier to keep it. On an 8 MiB tmpfs with a 1 MiB floor and no
    uplink, the policy says: shed (low priority first), keep the floor, keep ACKing.
    (6 MiB left the store 22 pages once the WAL's ~5 MB reserve was counted: less than
    its schema, 15 pages since the stream-cache and epoch migrations, plus one batch.)"""
    rig = make_rig(start_sim, start_agent, tmp_path, rate=4000)
    mount = disks.tmpfs(rig.agent, 8 * MiB)
    with SizeSampler(rig.agent.db, mount) as sampler:
        start(rig)
        wait_for(
            lambda: (
                log_count(rig.agent, " shed=") > 0
                or log_count(rig.agent, "commit_failed") > 0
                or sampler.sizes.min_free < FLOOR // 2
            ),
            90,
            "the agent to reach its free-space floor",
        )
        assert sampler.sizes.min_free >= FLOOR // 2, (
            f"free space fell to {sampler.sizes.min_free} B under a {FLOOR} B floor "
            f"(database {sampler.sizes.db} B, WAL {sampler.sizes.wal} B); the ladder shed "
            f"{log_count(rig.agent, ' shed=')} times"
        )
        assert log_count(rig.agent, "commit_failed") == 0, log_tail(rig.agent)
        wait_ingest(rig, 4000, 30, "ingest to go on after shedding, no space given back")
        assert sampler.sizes.min_free >= FLOOR // 2
        assert log_count(rig.agent, "commit_failed") == 0, log_tail(rig.agent)


# -- 1b: another process fills the file system ---------------------------------------------


def test_tmpfs_filled_by_another_process(
    start_sim: StartSim, start_agent: StartAgent, disks: Disks, tmp_path: Path, chaos_report: Any
) -> None:
    """dd fills the agent's tmpfs until ENOSPC: no ACK for what did not commit, the agent
    stays up and reports it; deleting the filler brings ingest back on the same process,
    and every event the controller held is delivered."""
    rig = make_rig(start_sim, start_agent, tmp_path, rate=3000)
    mount = disks.tmpfs(rig.agent, (6 + 3 * CYCLES) * MiB)  # the agent grows ~1 MiB a cycle
    failures = 0
    with SizeSampler(rig.agent.db, mount) as sampler:
        pid = start(rig)
        for _ in range(CYCLES):
            failed = log_count(rig.agent, "commit_failed")
            shed = log_count(rig.agent, " shed=")
            filler, _ = fill(mount.path)
            failures += wait_for_fault(rig, failed, shed, "a commit to meet the full disk")
            hold(rig, HOLD)
            heal(rig, filler.unlink)
            assert rig.agent.agent_pid() == pid, "recovered by a restart, not on the same process"
        found, ledger = finish(rig)
    record(chaos_report, "tmpfs full (filler file)", CYCLES, found, ledger)
    figures("tmpfs full (filler file)", rig, found, ledger, sampler.sizes)
    check(found, ledger)
    check_caps(sampler.sizes, BIG_CAP)
    assert log_count(rig.agent, "commit_recovered") >= failures


def test_status_shows_the_alarm_while_the_disk_is_full(
    start_sim: StartSim, start_agent: StartAgent, disks: Disks, tmp_path: Path
) -> None:
    """operations.md: the `alarm` line shows 'a failed commit, store full'. A technician
    running `ironfleet status --json` during a full disk must see it, and see a live
    daemon, for longer than the CLI's 5 s heartbeat staleness limit: the snapshot in the
    runtime directory (tmpfs, not the full disk) keeps updating."""
    rig = make_rig(start_sim, start_agent, tmp_path, rate=3000)
    mount = disks.tmpfs(rig.agent, 8 * MiB)
    start(rig)
    fill(mount.path)
    wait_for(lambda: log_count(rig.agent, "commit_failed") > 0, 30, "a commit to fail")
    deadline = time.monotonic() + 7.0
    samples = []
    while time.monotonic() < deadline:
        samples.append(cli_status(rig.agent.db)["daemon"])
        time.sleep(0.5)
    assert rig.agent.alive()
    late = samples[2:]  # a second of grace for the next publish
    assert all(s["alarm"] for s in late), f"alarms shown: {[s['alarm'] for s in late]}"
    assert all(s["live"] for s in late), f"heartbeat ages: {[s['heartbeat_age_s'] for s in late]}"


def test_status_says_the_daemon_runs_but_cannot_write(
    start_sim: StartSim, start_agent: StartAgent, disks: Disks, tmp_path: Path
) -> None:
    """Without the runtime file ([agent] runtime_dir = ""), what a technician sees while
    the disk is full: not 'stopped', but a running process that cannot write its database."""
    rig = make_rig(start_sim, start_agent, tmp_path, rate=3000, agent={"runtime_dir": ""})
    mount = disks.tmpfs(rig.agent, 8 * MiB)
    start(rig)
    fill(mount.path)
    wait_for(lambda: log_count(rig.agent, "commit_failed") > 0, 30, "a commit to fail")
    wait_for(lambda: not cli_status(rig.agent.db)["daemon"]["live"], 30, "the heartbeat to age")
    daemon = cli_status(rig.agent.db)["daemon"]
    assert daemon["process_alive"], daemon
    assert rig.agent.alive()
    text = run(CLI, "--db", str(rig.agent.db), "status").stdout
    assert "but NOT PUBLISHING" in text, text
    assert "disk full or read-only" in text, text


# -- 4: the caps, sampled, where a cap binds ---------------------------------------------


def test_store_caps_hold_while_the_ladder_sheds(
    start_sim: StartSim, start_agent: StartAgent, disks: Disks, tmp_path: Path
) -> None:
    """O8 where the cap, not the file system, binds: a 2 MiB max_buffer_bytes on a 32 MiB
    tmpfs. Sampled every 20 ms: the database never passes 2 MiB, the WAL never passes
    its limit, the 1 MiB floor is never touched; the ladder sheds, ingest goes on."""
    cap = 2 * MiB
    rig = make_rig(start_sim, start_agent, tmp_path, rate=4000, store={"max_buffer_bytes": cap})
    mount = disks.tmpfs(rig.agent, 32 * MiB)
    with SizeSampler(rig.agent.db, mount) as sampler:
        start(rig)
        wait_for(lambda: log_count(rig.agent, " shed=") > 0, 60, "the ladder to shed at the cap")
        wait_ingest(rig, 4000, 30, "ingest to go on after shedding")
        found, ledger = finish(rig)
    figures("store cap 2 MiB on a 32 MiB tmpfs", rig, found, ledger, sampler.sizes)
    check(found, ledger)
    check_caps(sampler.sizes, cap)
    assert sampler.sizes.min_free >= FLOOR
    assert ledger.shed, "the cap was reached, so the ladder must have shed"


# -- 2: the file system turns read-only under the agent -----------------------------------


def test_read_only_file_system_under_the_running_agent(
    start_sim: StartSim, start_agent: StartAgent, disks: Disks, tmp_path: Path, chaos_report: Any
) -> None:
    """`mount -o remount,ro` is refused (EBUSY) while SQLite holds agent.db open for
    writing, so the read-only file system an agent meets is the kernel's: ext4 with
    errors=remount-ro after a metadata error. Nothing may be ACKed from then on, the agent
    stays up and reports it. If `remount,rw` makes the file system writable again, the same
    process must resume; if not (ext4 on Linux >= 6.6 keeps `emergency_ro` until unmounted),
    SIGTERM must still stop it with status 0, and after unmount, e2fsck, mount and a
    restart it must deliver everything the controller held.

    The kernel can report a commit durable that its aborted journal threw away (the last
    ACKed group went missing in one loaded run in six until agent/fsprobe.py): this test
    is what shows the agent no longer ACKs on that word alone."""
    rig = make_rig(start_sim, start_agent, tmp_path, rate=2000)
    mount = disks.ext4(rig.agent, 64 * MiB)
    pid = start(rig)
    refused = run("mount", "-o", "remount,ro", str(mount.path), check=False)
    assert refused.returncode != 0, "a read-only remount under open writers was accepted"
    assert "busy" in refused.stderr, refused.stderr
    wait_ingest(rig, 500, 20, "ingest to go on after the refused remount")

    force_read_only(mount)
    assert not mount.writable(), f"still writable after the error: {mount.options()}"
    wait_for_fault(rig, 0, 0, "a commit to meet the read-only file system")
    frozen = settled_acked(rig)
    hold(rig, HOLD, frozen=frozen)
    if run("mount", "-o", "remount,rw", str(mount.path), check=False).returncode != 0:
        # util-linux repeats the kernel's `emergency_ro` flag back, which mount(2) rejects.
        run("mount", "--options-mode", "ignore", "-o", "remount,rw", str(mount.path))
    if mount.writable():
        heal(rig, lambda: None)
        assert rig.agent.agent_pid() == pid, "recovered by a restart, not on the same process"
        path = "remount,rw on the same process"
    else:
        stopping = time.monotonic()
        assert rig.agent.terminate(timeout=30) == 0, log_tail(rig.agent)
        stop_s = time.monotonic() - stopping
        rig.failures_reported()  # written at the stop; the restart starts from 0
        run("umount", str(mount.path))
        fsck = run("e2fsck", "-fy", str(mount.image), check=False)
        print(f"e2fsck exit {fsck.returncode}:\n{fsck.stdout[-3000:]}{fsck.stderr[-3000:]}")
        assert fsck.returncode in (0, 1), fsck.stdout  # 1: errors corrected
        remount_ext4(mount)
        assert mount.writable()
        heal(rig, rig.agent.start)
        assert rig.agent.started()
        path = f"SIGTERM (exit 0 in {stop_s:.1f} s), umount, e2fsck, mount, restart"
    found, ledger = finish(rig)
    record(chaos_report, "read-only remount", 1, found, ledger)
    figures(f"read-only ext4 ({path})", rig, found, ledger, None)
    check(found, ledger)
    assert not ledger.shed


# -- 3: ENOSPC and EIO forever ------------------------------------------------------------

# (errno, system calls, first failing call per thread: about a second into ingest)
FOREVER = [
    ("ENOSPC", "pwrite64", 1500),
    ("EIO", "fdatasync,fsync", 300),
]
if LONG:
    FOREVER += [("ENOSPC", "fdatasync,fsync", 300), ("EIO", "pwrite64", 1500)]


@pytest.mark.parametrize("fault", FOREVER, ids=[f"{e}-{c}" for e, c, _ in FOREVER])
def test_write_errors_forever_then_restart(
    start_sim: StartSim,
    start_agent: StartAgent,
    tmp_path: Path,
    chaos_report: Any,
    fault: tuple[str, str, int],
) -> None:
    """From the `first`-th call on (per thread), every `calls` returns `errno`: nothing
    is ACKed after the errors start, the agent stays up and reports it, SIGTERM still
    stops it with status 0 (the unit file's documented clean stop), and a restart without
    the fault delivers every event the controller held."""
    assert Path(STRACE).exists(), "strace is needed: make test installs it"
    errno, calls, first = fault
    rig = make_rig(start_sim, start_agent, tmp_path, rate=2000)
    inject = f"{calls}:error={errno}:when={first}+"
    wrapper = [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={calls}",
               "-e", f"inject={inject}"]  # fmt: skip
    rig.agent.start(wrapper=wrapper)
    wait_for(rig.agent.started, 30, "the agent to start under strace")
    wait_for_fault(rig, 0, 0, f"the {errno} on {calls} to fail a commit")
    frozen = settled_acked(rig)
    hold(rig, HOLD, frozen=frozen)
    stopping = time.monotonic()
    status = rig.agent.terminate(timeout=30)
    stop_s = time.monotonic() - stopping
    assert status == 0, f"SIGTERM under {inject}: exit {status}\n{log_tail(rig.agent)}"
    failures = rig.failures_reported()
    heal(rig, rig.agent.start)
    assert rig.agent.started()
    found, ledger = finish(rig)
    record(chaos_report, f"{errno} forever (strace)", 1, found, ledger)
    figures(f"{errno} forever on {calls} (stop {stop_s:.1f} s)", rig, found, ledger, None)
    check(found, ledger)
    assert not ledger.shed
    assert failures > 0
    print(f"ACK count frozen at {frozen} from the first failure; {failures:.0f} failed commits")


# -- 5: the control ----------------------------------------------------------------------


def test_control_ack_after_failed_commit_is_caught(
    start_sim: StartSim, start_agent: StartAgent, disks: Disks, tmp_path: Path, chaos_report: Any
) -> None:
    """Scenario 1b with the agent patched to report a failed commit as durable: the oracle
    must find ACKed events missing from the store, or it could not catch the real bug."""
    rig = make_rig(start_sim, start_agent, tmp_path, rate=3000)
    mount = disks.tmpfs(rig.agent, 8 * MiB)
    start(rig, broken="ack_after_failed_commit")
    filler, _ = fill(mount.path)
    wait_for(
        throttled(lambda: verdict(rig.truth, rig.agent.db).lost, 0.5),
        30,
        "the oracle to see ACKed events missing from the full store",
    )
    filler.unlink()
    rig.sim.signal(signal.SIGTERM)
    assert rig.sim.wait(timeout=30) == 0
    rig.agent.terminate(timeout=30)
    found = verdict(rig.truth, rig.agent.db, complete=True)
    ledger = account(found.lost, rig.agent.db)
    print(f"\n[control] {found.describe()} unrecorded={len(ledger.silent)}")
    assert found.lost, "the oracle missed the ACK of a failed commit"
    assert ledger.silent, "the lost events were not lost silently: the control tests nothing"
    chaos_report.record("control: ACK after failed commit (disk full)", controls_failed=1)
