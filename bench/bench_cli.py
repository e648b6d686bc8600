"""Technician CLI against live ingest: ACK latency p99 and busy errors with four CLI loops.

Target (operations issue): four `ironfleet` processes looping over all commands while the
daemon ingests do not raise ingest's ACK latency p99 above twice its baseline, and cause
no SQLITE_BUSY in the daemon. Reported here, never asserted (wall-clock figures drift with
whatever else shares this machine's CPUs).

The agent is the real `ironfleet-agent run` process (uplink off: no broker here) on one
side of a pseudo-terminal; this process is the controller on the other side
(`firmware_bridge.controller.ControllerLink` through `store_e2e.Controller`, as in
bench_store section 2), paced at a fixed frame rate. ACK latency = the controller's first
send of a frame -> its ACK decoded by the controller (`ControllerLink.ack_latencies`). One
agent and one growing database serve every phase, in this order:

  A  baseline: ingest only;
  B  ingest + four loop processes, each running `ironfleet --db DB --config CONF CMD --json`
     for every CMD of the technician's list, back to back, as fast as they can;
  C  baseline again: drift between A and C (a growing database, other work on the machine)
     is the noise floor of the B/A ratio;
  D  control (unless --no-control): four loops of `ironfleet --version`, i.e. the same
     interpreter start-up and imports with no database access. B against D separates
     what the CLI costs ingest through SQLite from what it costs through the CPUs.

Busy/commit failures are read from what the daemon publishes (`agent_state` keys
`daemon.counters` and `store.stats`, field `commit_failures`) and from its log (lines with
`commit_failed`, `database is locked`, `busy`, or a failed writer task / checkpoint write).
Publishing failures are logged at DEBUG only, so the loops also record the largest
heartbeat age `status` reported: the daemon publishes every second, and a missed publish
shows as an age above ~2 s.

The loops stay in this process's session, so under the kernel's autogroup scheduling they
share one CPU group with the agent and the controller; `--nice N` lowers their priority
within it. `--own-sessions` gives each loop a session (an autogroup) of its own, as an ssh
login would have: the CPUs are then shared between the groups and nice no longer matters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from store_common import cpu_seconds_of, own_cpu_seconds, settle_heap
from store_e2e import Controller, make_bodies, start_real_agent, stop

from agent import livestate
from agent.livestate import LiveState

IRONFLEET = str(Path(sys.executable).with_name("ironfleet"))
THIS = str(Path(__file__).resolve())
WINDOW = 64  # controller window; never the limit at these rates
TARGET_RATIO = 2.0
SETTLE_SECONDS = 1.5  # after a phase: the daemon publishes its counters every second
RAMP_SECONDS = 1.0  # loops run this long before a phase's first frame
STOP_SECONDS = 30.0  # a loop process that has not exited by then is killed

# The technician's commands (agent/cli.py), each run with --json. `query` (arbitrary SQL)
# and `events --follow` (a long-running poll) are not one-shot views and are left out.
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("status",),
    ("streams",),
    ("events", "--limit", "50"),
    ("gaps",),
    ("replay",),
    ("checkpoints",),
    ("breaker",),
    ("link",),
    ("shed",),
    ("doctor",),
)
LOG_PATTERNS = {
    "commit_failed": re.compile(r"commit_failed"),
    "database is locked": re.compile(r"database is locked", re.IGNORECASE),
    "busy": re.compile(r"\bbusy\b", re.IGNORECASE),
    "writer_task_failed": re.compile(r"writer_task_failed"),
    "checkpoint_persist_failed": re.compile(r"checkpoint_persist_failed"),
}


# -- the CLI loop (a child process) ----------------------------------------------------------


def cli_loop(db: str, config: str, offset: int, version_only: bool, nice: int) -> None:
    """Run `ironfleet` invocations back to back until SIGTERM; print one JSON summary.

    The invocation running when SIGTERM arrives is completed and counted.
    """
    stopping = False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if nice:
        os.nice(nice)
    commands: Sequence[tuple[str, ...]] = (("--version",),) if version_only else COMMANDS
    runs: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    seconds: dict[str, float] = {}
    errors: Counter[str] = Counter()
    max_heartbeat_age = 0.0
    max_wal = 0
    wal = Path(f"{db}-wal")
    t0 = time.perf_counter()
    i = offset
    while not stopping:
        command = commands[i % len(commands)]
        i += 1
        argv = (
            [IRONFLEET, *command]
            if version_only
            else [IRONFLEET, "--db", db, "--config", config, *command, "--json"]
        )
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        name = command[0]
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        runs[name] += 1
        if proc.returncode != 0:
            failed[name] += 1
            detail = proc.stdout if name == "doctor" else proc.stderr
            errors[f"{name}: exit {proc.returncode}: {failure_line(name, detail)}"] += 1
        elif name == "status":
            with contextlib.suppress(ValueError, KeyError, TypeError):
                age = json.loads(proc.stdout)["daemon"]["heartbeat_age_s"]
                max_heartbeat_age = max(max_heartbeat_age, age or 0.0)
        with contextlib.suppress(OSError):
            max_wal = max(max_wal, wal.stat().st_size)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = {
        "elapsed": time.perf_counter() - t0,
        "runs": dict(runs),
        "failed": dict(failed),
        "seconds": dict(seconds),
        "errors": dict(errors),
        "max_heartbeat_age": max_heartbeat_age,
        "max_wal": max_wal,
        "cli_cpu": children.ru_utime + children.ru_stime,
    }
    print(json.dumps(summary), flush=True)


def failure_line(name: str, text: str) -> str:
    """What a failed invocation said: doctor's failed checks, otherwise its last line."""
    if name == "doctor":
        with contextlib.suppress(ValueError, KeyError, TypeError):
            checks = json.loads(text)["checks"]
            return "; ".join(f"{c['name']} {c['status']}: {c['detail']}" for c in checks
                             if c["status"] == "fail")  # fmt: skip
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else "(no output)"


@dataclass
class LoopSummary:
    """The loops of one phase, merged."""

    processes: int = 0
    elapsed: float = 0.0
    runs: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    max_heartbeat_age: float = 0.0
    max_wal: int = 0
    cli_cpu: float = 0.0

    def add(self, child: dict[str, Any]) -> None:
        self.processes += 1
        self.elapsed = max(self.elapsed, child["elapsed"])
        self.runs.update(child["runs"])
        self.failed.update(child["failed"])
        for name, secs in child["seconds"].items():
            self.seconds[name] = self.seconds.get(name, 0.0) + secs
        self.errors.update(child["errors"])
        self.max_heartbeat_age = max(self.max_heartbeat_age, child["max_heartbeat_age"])
        self.max_wal = max(self.max_wal, child["max_wal"])
        self.cli_cpu += child["cli_cpu"]


class Loops:
    """`count` CLI loop processes, each in its own process group (ours to clean up).

    By default they stay in this session, so with the kernel's autogroup scheduling they share
    one CPU group with the agent and the controller, and `nice` weighs them against both. With
    `own_session` each gets a session, hence an autogroup, of its own, as a technician's ssh
    login would: the scheduler then shares the CPUs fairly between the groups, whatever nice.
    """

    def __init__(
        self, count: int, db: Path, config: Path, *, version_only: bool, nice: int,
        own_session: bool,
    ) -> None:  # fmt: skip
        self.procs: list[subprocess.Popen[str]] = []
        for k in range(count):
            argv = [sys.executable, THIS, "--child", "loop", str(db), str(config), str(k),
                    "1" if version_only else "0", str(nice)]  # fmt: skip
            self.procs.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    process_group=None if own_session else 0, start_new_session=own_session,
                )
            )  # fmt: skip

    def signal_stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def running(self) -> bool:
        return any(proc.poll() is None for proc in self.procs)

    def collect(self) -> LoopSummary:
        summary = LoopSummary()
        for proc in self.procs:
            out, err = proc.communicate(timeout=STOP_SECONDS)
            if proc.returncode != 0 or not out.strip():
                raise RuntimeError(f"CLI loop {proc.pid} exited {proc.returncode}: {err[-2000:]}")
            summary.add(json.loads(out.strip().splitlines()[-1]))
        return summary

    def kill(self) -> None:
        """Last resort (an error elsewhere): the loop and its running `ironfleet`, by group."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# -- the controller side ---------------------------------------------------------------------


def idle(ctl: Controller, seconds: float) -> None:
    """Keep the link serviced (heartbeats, late ACKs) without offering events."""
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        ctl.link.poll(now)
        ctl.pending += ctl.link.outgoing()
        if ctl.pending:
            with contextlib.suppress(BlockingIOError):
                del ctl.pending[: os.write(ctl.master, ctl.pending)]
        readable, _, _ = select.select([ctl.master], [], [], max(0.0, min(0.05, end - now)))
        if readable:
            ctl.read()


def published(db: Path) -> LiveState:
    """The daemon's last published live snapshot (one brief read-only query)."""
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return livestate.read(conn)
    finally:
        conn.close()


def failures_of(state: LiveState) -> tuple[int, int]:
    """commit_failures in the daemon's counters (writer) and the store's (EventStore)."""
    daemon, store = state.daemon.counters, state.store
    return int(daemon.get("commit_failures", 0)), int(store.get("commit_failures", 0))


def scan_log(text: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for line in text.splitlines():
        for name, pattern in LOG_PATTERNS.items():
            if pattern.search(line):
                found[name] += 1
    return found


@dataclass
class Phase:
    key: str
    label: str
    frames: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    retransmits: int = 0
    agent_cpu: float = 0.0
    own_cpu: float = 0.0
    involuntary: int = 0  # this process's involuntary context switches: CPU contention
    loops: LoopSummary | None = None
    commit_failures: tuple[int, int] = (0, 0)  # deltas: daemon.counters, store.stats
    log_hits: Counter[str] = field(default_factory=Counter)
    wal_at_end: int = 0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def max_ms(self) -> float:
        return max(self.latencies) * 1000


def run_phase(
    phase: Phase,
    ctl: Controller,
    *,
    agent: subprocess.Popen[bytes],
    bodies: Sequence[Any],
    rate: float,
    db: Path,
    log: Path,
    loops: Loops | None,
) -> None:
    """Drive `bodies` paced at `rate` (with `loops` running); fill in `phase`."""
    before = failures_of(published(db))
    log_at = log.stat().st_size
    try:
        if loops is not None:
            idle(ctl, RAMP_SECONDS)
        ctl.link.ack_latencies.clear()
        resent = ctl.link.retransmits
        agent0, own0 = cpu_seconds_of(agent.pid), own_cpu_seconds()
        switches0 = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
        phase.seconds, _ring = ctl.drive(bodies, rate)
        phase.involuntary = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - switches0
        phase.agent_cpu = cpu_seconds_of(agent.pid) - agent0
        phase.own_cpu = own_cpu_seconds() - own0
        phase.latencies = list(ctl.link.ack_latencies)
        phase.retransmits = ctl.link.retransmits - resent
        phase.frames = len(bodies)
    finally:
        if loops is not None:
            loops.signal_stop()
            deadline = time.monotonic() + STOP_SECONDS
            while loops.running() and time.monotonic() < deadline:
                idle(ctl, 0.05)
    if loops is not None:
        phase.loops = loops.collect()
    idle(ctl, SETTLE_SECONDS)  # the daemon publishes its counters about once a second
    after = failures_of(published(db))
    phase.commit_failures = (after[0] - before[0], after[1] - before[1])
    with log.open("rb") as fh:
        fh.seek(log_at)
        phase.log_hits = scan_log(fh.read().decode("utf-8", "replace"))
    with contextlib.suppress(OSError):
        phase.wal_at_end = Path(f"{db}-wal").stat().st_size


# -- report ----------------------------------------------------------------------------------


def verdict(value: float, limit: float) -> str:
    return "meets" if value <= limit else "MISSES"


def report(phases: list[Phase], args: argparse.Namespace, log_total: Counter[str],
           final: tuple[int, int]) -> None:  # fmt: skip
    by = {p.key: p for p in phases}
    print(
        f"    {'phase':<44} {'frames':>7} {'frames/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'max ms':>7} {'resent':>6} {'agent CPU':>9} {'ctl CPU':>8} {'ctl preempt':>11}"
    )
    for p in phases:
        print(
            f"    {p.key + ' ' + p.label:<44} {p.frames:>7,} {p.frames / p.seconds:>8,.0f}"
            f" {p.pct(0.5):>7.2f} {p.pct(0.99):>7.2f} {p.max_ms:>7.1f} {p.retransmits:>6,}"
            f" {p.agent_cpu / p.seconds * 100:>8.0f}% {p.own_cpu / p.seconds * 100:>7.0f}%"
            f" {p.involuntary / p.seconds:>9,.0f}/s"
        )
    print(
        "    latency = first send of a frame -> its ACK decoded by the controller; CPU = share of"
        " one core over the phase; ctl preempt = involuntary context switches of this"
        " (controller) process"
    )
    print()
    a, b, c = by["A"].pct(0.99), by["B"].pct(0.99), by["C"].pct(0.99)
    print(
        f"    p99 B/A {b / a:.2f}x, B/C {b / c:.2f}x: target <= {TARGET_RATIO:.0f}x"
        f" -> {verdict(b / a, TARGET_RATIO)} against A, {verdict(b / c, TARGET_RATIO)} against C"
    )
    print(f"    p99 C/A {c / a:.2f}x (drift between the two baselines: the ratios' noise floor)")
    if "D" in by:
        d = by["D"].pct(0.99)
        print(
            f"    p99 D/A {d / a:.2f}x (CPU-only control), B/D {b / d:.2f}x (what the database"
            " reads add on top of the CPU the CLI processes take)"
        )
    print()
    for p in phases:
        if p.loops is None:
            continue
        s = p.loops
        runs, failed = sum(s.runs.values()), sum(s.failed.values())
        print(
            f"    {p.key}: {s.processes} loops, {runs:,} invocations completed"
            f" ({runs / s.elapsed:,.1f}/s), {failed:,} failed (non-zero exit);"
            f" CLI CPU {s.cli_cpu / s.elapsed:.2f} cores ({s.cli_cpu / max(runs, 1) * 1000:.0f}"
            " ms per invocation)"
        )
        if p.key == "B":
            cells = [
                f"{name} {s.runs[name]}/{s.seconds[name] / s.runs[name] * 1000:.0f} ms"
                + (f"/{s.failed[name]} failed" if s.failed[name] else "")
                for name in (c[0] for c in COMMANDS)
                if s.runs[name]
            ]
            print("       per command: invocations / mean wall time each (start-up included)")
            for start in range(0, len(cells), 5):
                print(f"         {', '.join(cells[start : start + 5])}")
            print(
                f"       largest heartbeat age seen by `status`: {s.max_heartbeat_age:.2f} s"
                f" (published every 1 s); largest WAL seen: {s.max_wal / 2**20:.1f} MiB"
            )
        for error, count in s.errors.most_common(5):
            print(f"       {count:,} x {error}")
    print()
    print("    daemon busy / commit failures (target 0):")
    for p in phases:
        hits = ", ".join(f"{k} {v}" for k, v in sorted(p.log_hits.items())) or "none"
        print(
            f"      {p.key}: daemon.counters commit_failures +{p.commit_failures[0]},"
            f" store.stats commit_failures +{p.commit_failures[1]}; log lines: {hits};"
            f" WAL at end {p.wal_at_end / 2**20:.1f} MiB"
        )
    total = ", ".join(f"{k} {v}" for k, v in sorted(log_total.items())) or "none"
    busy = final[0] + final[1] + log_total["database is locked"] + log_total["busy"]
    print(
        f"      whole run (after the agent's clean stop): daemon.counters commit_failures"
        f" {final[0]}, store.stats commit_failures {final[1]}; log lines: {total}"
        f" -> {'meets' if busy == 0 else 'MISSES'} target 0"
    )


# -- main ------------------------------------------------------------------------------------


def stop_bench(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="frames/s, paced")
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--loops", type=int, default=4, help="CLI loop processes in phase B")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--control", action=argparse.BooleanOptionalAction, default=True,
        help="phase D: the same loops running `ironfleet --version` (no database)",
    )  # fmt: skip
    parser.add_argument("--nice", type=int, default=0, help="niceness of the CLI loops")
    parser.add_argument(
        "--own-sessions", action="store_true",
        help="each CLI loop in a session (so an autogroup) of its own, like an ssh login",
    )  # fmt: skip
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _kind, db, config, offset, version_only, nice = args.child
        cli_loop(db, config, int(offset), version_only == "1", int(nice))
        return

    # SIGTERM (and SIGINT) unwind through the cleanup below instead of leaving the agent and
    # the loops running.
    signal.signal(signal.SIGTERM, stop_bench)
    signal.signal(signal.SIGINT, stop_bench)
    per_phase = int(args.rate * args.seconds)
    keys = ["A", "B", "C", *(["D"] if args.control else [])]
    warm = args.streams
    bodies = make_bodies(warm + per_phase * len(keys), args.streams, args.seed)
    settle_heap()
    print(
        f"IronFleet CLI-under-ingest benchmark · Python {sys.version.split()[0]} · SQLite "
        f"{sqlite3.sqlite_version} · {os.cpu_count()} CPUs · 1-min load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"    agent: `ironfleet-agent run` (uplink off, synchronous=FULL); controller = this"
        f" process over a pty, paced {args.rate:,.0f} frames/s for {args.seconds:g} s per"
        f" phase, window {WINDOW}, {args.streams:,} streams, {warm:,} warm-up frames (untimed)"
    )
    print(
        f"    CLI: {args.loops} loops, each `ironfleet --db DB --config CONF CMD --json` back to"
        f" back over {', '.join(' '.join(c) for c in COMMANDS)}"
        + (f"; nice {args.nice}" if args.nice else "")
        + ("; each loop in its own session (autogroup)" if args.own_sessions else "")
    )
    print()
    labels = {
        "A": "baseline (no CLI)",
        "B": f"{args.loops} CLI loops, all commands",
        "C": "baseline again",
        "D": f"control: {args.loops} `ironfleet --version` loops",
    }
    phases = [Phase(k, labels[k]) for k in keys]
    tmp = Path(tempfile.mkdtemp(prefix="bench-cli-", dir=os.environ.get("TMPDIR", "/tmp")))
    t0 = time.perf_counter()
    ctl = Controller(WINDOW)
    agent: subprocess.Popen[bytes] | None = None
    loops: Loops | None = None
    log = tmp / "agent.log"
    try:
        agent, db, log = start_real_agent(tmp, ctl.device)
        config = tmp / "agent.toml"
        ctl.drive(bodies[:warm], None)  # handshake, first sight of every stream
        idle(ctl, SETTLE_SECONDS)
        for i, phase in enumerate(phases):
            start = warm + i * per_phase
            if phase.key in ("B", "D"):
                loops = Loops(
                    args.loops, db, config, version_only=phase.key == "D", nice=args.nice,
                    own_session=args.own_sessions,
                )  # fmt: skip
            run_phase(
                phase, ctl, agent=agent, bodies=bodies[start : start + per_phase],
                rate=args.rate, db=db, log=log, loops=loops,
            )  # fmt: skip
            loops = None
        stop(agent, log)
        final = failures_of(published(db))
    except BaseException:
        if log.exists():
            print(f"failed; {log} ends with:\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        if loops is not None:
            loops.kill()
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        ctl.close()
        log_total = scan_log(log.read_text(errors="replace")) if log.exists() else Counter()
        shutil.rmtree(tmp, ignore_errors=True)
    report(phases, args, log_total, final)
    print()
    print(
        f"total {time.perf_counter() - t0:.0f} s; 1-min load average {os.getloadavg()[0]:.2f} at"
        f" end (2 CPUs: above ~1 means other work shared them)"
    )


if __name__ == "__main__":
    main()
