"""Several controllers in one agent: zero loss and the healthy ports' ACK latency.

The issue's acceptance: four controllers on four ptys, one flooding garbage and one
unplugged and replugged, lose nothing on any of the four, and the healthy ones' ACK
latency stays within 2x of a single-controller run. Timing is measured, never asserted.

Three cases, each run --runs times, interleaved (baseline, faulty, clean, baseline, ...)
so that a change of the machine's load hits every case alike; the median of each figure
over the runs is printed:

  baseline  one `ironfleet-sim` (one controller) into `ironfleet-agent run` with a single
            [serial] table (streams stored under their names as sent);
  faulty    one agent, four [[serial]] entries: one sim with two healthy controllers
            (ok0, ok1), one flooding garbage (noisy0: --garbage-every 0.02 --garbage-bytes
            4096, 200 kB/s of it) and one unplugged and replugged (plug0: --unplug-every
            1.5 --unplug-for 0.5);
  clean     the same three simulators and four ports with no fault (ok0, ok1, calm0,
            still0): the reference that separates "more ports" from "faulty ports".

Every controller sends --events events at --rate events/s over --streams bare stream names
(s000...), so with several ports the agent stores them as `<controller>/s000`. Agent
settings are the defaults but those of tests/simharness.py: heartbeat_interval 0.2,
[store] min_free_bytes 0, uplink off. Its state_dir is in --tmp (the system's temporary
directory by default: a real disk, so each commit's fsync is in the latency).

ACK latency of an event = `acked_at - ts` of its `acked` record in the simulator's ground
truth (both wall clock, same host): production to the controller seeing the ACK, so it
holds the agent's read, decode, group commit (fsync) and the ACK's way back, plus the
simulator's own loop. The simulators start before the agent, so their first events wait
for it: events produced before every port of the case has its first ACK, plus --warmup
seconds, are left out of the latency figures (never out of the loss check).

Loss, per controller, once its simulator has finished (all events ACKed, or its 30 s
drain timed out) and the agent has stopped: `lost` = ACKed but not in the agent's SQLite
database (tables events + streams) with the same payload; `unacked` = sent and never
ACKed. The bench exits 1 if either is not zero in any run, never on a timing figure (and
with a message if a process fails or a simulator does not finish).

Reading the figures: the unplugged port's latency is mostly the agent's reconnect delay
(full-jitter backoff from [serial] reconnect_min 0.25 s, doubling: an unlucky draw can miss
several replugs), not the 0.5 s unplug. The simulators take CPU on the same (2-core)
machine as the agent, and their loop is inside every latency figure.

    python bench/bench_controllers.py                       # about 100 s
    python bench/bench_controllers.py --runs 1 --events 2000
    python bench/bench_controllers.py --tmp /dev/shm        # no disk in the latency

Every process it started is stopped and its temporary directory removed on any exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import benchprocs
from benchprocs import stop_process

AGENT = str(Path(sys.executable).with_name("ironfleet-agent"))
SIM = str(Path(sys.executable).with_name("ironfleet-sim"))
TARGET = 2.0  # the issue: healthy ports' ACK latency within 2x of one controller's
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
SIM_DRAIN = 30.0  # ironfleet-sim --drain-timeout default
POLL = 0.05
HEARTBEAT = 0.2  # [serial] heartbeat_interval, as tests/simharness.py
GARBAGE = ("--garbage-every", "0.02", "--garbage-bytes", "4096")
UNPLUG = ("--unplug-every", "1.5", "--unplug-for", "0.5")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")

Key = tuple[str, int, int]  # (stream as stored, boot_epoch, seq)


@dataclass(frozen=True)
class SimSpec:
    """One `ironfleet-sim` of a case: its controllers are `<prefix>0`..., in `role`."""

    prefix: str
    controllers: int
    role: str  # the group its controllers' latencies are pooled in
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    sims: tuple[SimSpec, ...]

    @property
    def ports(self) -> int:
        return sum(s.controllers for s in self.sims)


CASES = (
    Case("baseline", "1 port", (SimSpec("ctl", 1, "healthy"),)),
    Case("faulty", "4 ports, 1 garbage, 1 unplugged",
         (SimSpec("ok", 2, "healthy"), SimSpec("noisy", 1, "garbage", GARBAGE),
          SimSpec("plug", 1, "unplugged", UNPLUG))),
    Case("clean", "4 ports, no fault",
         (SimSpec("ok", 2, "healthy"), SimSpec("calm", 1, "healthy"),
          SimSpec("still", 1, "healthy"))),
)  # fmt: skip
FIGURES = ("p50", "p99", "max")


@dataclass
class Tally:
    """One controller's ground truth against the database."""

    sent: int = 0
    acked: int = 0
    stored: int = 0
    lost: int = 0  # ACKed, not stored (or stored with other bytes)
    unacked: int = 0  # sent, never ACKed


@dataclass
class RunResult:
    """One run of one case."""

    latencies: dict[str, list[float]]  # role -> seconds, pooled over its controllers
    tallies: dict[str, Tally]  # controller -> figures
    left_out: int  # warm-up events not in the latency figures
    wall: float  # first sim start to last sim exit
    agent_cpu: float
    sims_cpu: float
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # sim prefix -> summary

    @property
    def missing(self) -> int:
        return sum(t.lost + t.unacked for t in self.tallies.values())


def fail(message: str) -> SystemExit:
    return SystemExit(f"bench_controllers: {message}")


def wait_for(
    what: str, ready: Callable[[], bool], timeout: float, alive: Iterable[subprocess.Popen[bytes]]
) -> None:
    """benchprocs.wait_for, failing with this bench's name."""
    benchprocs.wait_for(what, ready, timeout, alive, fail=fail, poll=POLL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; only processes this bench started."""
    stop_process(proc, STOP_TIMEOUT)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def figures(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99),
            "max": ordered[-1] if ordered else float("nan")}  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Sim:
    """A running `ironfleet-sim` of a case, its ground truth and its stdout."""

    spec: SimSpec
    proc: subprocess.Popen[bytes]
    truth: Path
    out: Path

    def devices(self) -> list[str]:
        """The pty paths it announced (`DEVICE <controller> <path>`), first sight each."""
        found: dict[str, str] = {}
        for line in self.out.read_text(encoding="utf-8", errors="replace").splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "DEVICE":
                found.setdefault(words[1], words[2])
        return list(found.values())

    def announced(self) -> bool:
        return len(self.devices()) >= self.spec.controllers


def start_sim(
    work: Path, spec: SimSpec, seed: int, args: argparse.Namespace, cleanup: contextlib.ExitStack
) -> Sim:
    """A simulator whose ptys are `<work>/<prefix>/<prefix><k>`."""
    truth, out = work / f"{spec.prefix}.truth.jsonl", work / f"{spec.prefix}.out"
    cmd = [SIM, "--controllers", str(spec.controllers), "--controller-id", spec.prefix,
           "--link-dir", str(work / spec.prefix), "--link-name", f"{spec.prefix}{{index}}",
           "--bare-streams", "--streams", str(args.streams), "--rate", str(args.rate),
           "--events", str(args.events), "--truth", str(truth), "--seed", str(seed),
           *spec.extra]  # fmt: skip
    with out.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    cleanup.callback(stop, proc)
    return Sim(spec, proc, truth, out)


def agent_config(work: Path, devices: dict[str, str]) -> Path:
    """One [serial] table for one device (as a single-controller install has), else one
    [[serial]] entry per device, named after its controller."""
    q = json.dumps
    lines = ["[agent]", 'vehicle_id = "bench"', f"state_dir = {q(str(work / 'state'))}",
             f"runtime_dir = {q(str(work / 'run'))}",
             "[store]", "min_free_bytes = 0", "[uplink]", "enabled = false"]  # fmt: skip
    if len(devices) == 1:
        lines += ["[serial]", f"device = {q(next(iter(devices.values())))}",
                  f"heartbeat_interval = {HEARTBEAT}"]  # fmt: skip
    else:
        for name, device in devices.items():
            lines += ["[[serial]]", f"name = {q(name)}", f"device = {q(device)}",
                      f"heartbeat_interval = {HEARTBEAT}"]  # fmt: skip
    config = work / "agent.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def read_truth(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.endswith("\n")]


def stored_events(db: Path) -> dict[Key, set[str]]:
    """Every event in the agent's database: key -> payloads (hex), read-only."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        out: dict[Key, set[str]] = {}
        rows = conn.execute("SELECT s.name, e.boot_epoch, e.seq, e.payload FROM events e "
                            "JOIN streams s ON s.id = e.stream_id")  # fmt: skip
        for stream, epoch, seq, payload in rows:
            out.setdefault((stream, epoch, seq), set()).add(bytes(payload).hex())
        return out
    finally:
        conn.close()


def run_case(
    case: Case, run: int, args: argparse.Namespace, tmp: Path, cleanup: contextlib.ExitStack
) -> RunResult:
    """Start the case's simulators, then the agent; wait for the simulators to finish;
    stop the agent; compare the truth with the database."""
    work = tmp / f"{case.name}-{run}"
    work.mkdir()
    cpu0 = children_cpu()
    t0 = time.monotonic()
    sims = [start_sim(work, spec, 1000 * run + i, args, cleanup)
            for i, spec in enumerate(case.sims)]  # fmt: skip
    procs = [sim.proc for sim in sims]
    for sim in sims:
        wait_for(f"{sim.spec.prefix}'s DEVICE lines", sim.announced, START_TIMEOUT, procs)
    devices = {f"{sim.spec.prefix}{k}": device
               for sim in sims for k, device in enumerate(sim.devices())}  # fmt: skip
    config = agent_config(work, devices)
    log = work / "agent.log"
    with log.open("wb") as fh:
        agent = subprocess.Popen([AGENT, "run", "--config", str(config)], stdout=fh,
                                 stderr=subprocess.STDOUT)  # fmt: skip
    cleanup.callback(stop, agent)
    wait_for("agent_started in the agent's log", lambda: b"agent_started" in log.read_bytes(),
             START_TIMEOUT, [agent])  # fmt: skip
    budget = args.events / args.rate + SIM_DRAIN + START_TIMEOUT
    wait_for("the simulators' end", lambda: all(p.poll() is not None for p in procs),
             budget, [agent])  # fmt: skip
    wall = time.monotonic() - t0
    for sim in sims:
        if sim.proc.returncode:
            tail = sim.out.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise fail(f"{case.name} run {run}: {sim.spec.prefix}'s simulator exited with "
                       f"{sim.proc.returncode}: {tail}")  # fmt: skip
    agent_cpu = cpu_seconds(agent.pid)
    stop(agent)
    if agent.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise fail(f"{case.name} run {run}: the agent exited with {agent.returncode}: {tail}")
    result = judge(case, sims, work / "state" / "agent.db", args.warmup)
    result.wall, result.agent_cpu = wall, agent_cpu
    result.sims_cpu = max(0.0, children_cpu() - cpu0 - agent_cpu)  # all reaped by now
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def judge(case: Case, sims: list[Sim], db: Path, warmup: float) -> RunResult:
    """Latencies by role (warm-up left out) and, per controller, the loss figures."""
    stored = stored_events(db)
    namespaced = case.ports > 1  # the agent stores `s000` of controller c as `c/s000`
    tallies: dict[str, Tally] = {}
    acked: list[tuple[str, float, float]] = []  # (role, ts, acked_at)
    first_ack: dict[str, float] = {}
    summaries = {}
    for sim in sims:
        sent: dict[Key, str] = {}  # key -> controller
        seen: set[Key] = set()
        for record in read_truth(sim.truth):
            if record["op"] == "summary":
                summaries[sim.spec.prefix] = record
            if record["op"] not in ("sent", "acked"):
                continue
            controller, stream = record["controller"], record["stream"]
            if namespaced and not stream.startswith(f"{controller}/"):
                stream = f"{controller}/{stream}"
            key = (stream, record["boot_epoch"], record["seq"])
            tally = tallies.setdefault(controller, Tally())
            if record["op"] == "sent":
                sent[key] = controller
                tally.sent += 1
            elif key not in seen:  # its first ACK is the event's latency
                seen.add(key)
                tally.acked += 1
                tally.lost += record["payload"] not in stored.get(key, ())
                acked.append((sim.spec.role, record["ts"], record["acked_at"]))
                first_ack.setdefault(controller, record["acked_at"])
        for key in sent.keys() - seen:
            tallies[sent[key]].unacked += 1
    for controller, tally in tallies.items():
        tally.stored = sum(1 for stream, _, _ in stored
                           if not namespaced or stream.startswith(f"{controller}/"))  # fmt: skip
    ready = max(first_ack.values(), default=0.0) + warmup
    latencies: dict[str, list[float]] = {spec.role: [] for spec in case.sims}
    for role, ts, acked_at in acked:
        if ts >= ready:
            latencies[role].append(acked_at - ts)
    left_out = len(acked) - sum(len(v) for v in latencies.values())
    return RunResult(latencies, tallies, left_out, 0.0, 0.0, 0.0, summaries)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def print_run(case: Case, run: int, result: RunResult) -> None:
    groups = "; ".join(
        f"{role} n={len(lat):,} " + "/".join(ms(v) for v in figures(lat).values())
        for role, lat in result.latencies.items()
    )
    lost = sum(t.lost for t in result.tallies.values())
    unacked = sum(t.unacked for t in result.tallies.values())
    print(
        f"  run {run} {case.name:<8} p50/p99/max ms: {groups}; lost {lost}, unacked {unacked}; "
        f"{result.wall:.1f} s, CPU agent {result.agent_cpu:.1f} s, sims {result.sims_cpu:.1f} s",
        flush=True,
    )


def median_of(results: list[RunResult], value: Callable[[RunResult], float]) -> float:
    return statistics.median(value(r) for r in results)


def report(args: argparse.Namespace, results: dict[str, list[RunResult]]) -> int:
    """Medians over the runs; the ratios to the baseline; the loss verdict (exit status)."""
    print(f"\nmedians over {args.runs} run(s); ACK latency in ms, warm-up left out")
    head = ("case", "group", "ports", "p50", "p99", "max", "measured", "sent", "acked",
            "stored", "lost", "unacked")  # fmt: skip
    row = "  {:<32} {:<9} {:>5} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>7} {:>5} {:>7}"
    print(row.format(*head))
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for case in CASES:
        runs = results[case.name]
        for role in dict.fromkeys(spec.role for spec in case.sims):
            members = [f"{s.prefix}{k}" for s in case.sims if s.role == role
                       for k in range(s.controllers)]  # fmt: skip
            per_run = [figures(r.latencies[role]) for r in runs]
            med = {f: statistics.median(fig[f] for fig in per_run) for f in FIGURES}
            medians[(case.name, role)] = med
            count = statistics.median(len(r.latencies[role]) for r in runs)
            totals = [sum(getattr(r.tallies[m], attr) for r in runs for m in members)
                      for attr in ("sent", "acked", "stored", "lost", "unacked")]  # fmt: skip
            print(row.format(case.title, role, len(members), *(ms(med[f]) for f in FIGURES),
                             f"{count:,.0f}", *(f"{t:,}" for t in totals)))  # fmt: skip
    print("  (sent ... unacked: summed over the runs; lost = ACKed, not stored)")
    base = medians[("baseline", "healthy")]
    print(
        f"\nhealthy ports' ACK latency / one controller's (target <= {TARGET:.1f}x, not asserted)"
    )
    for case in CASES[1:]:
        med = medians[(case.name, "healthy")]
        within = all(med[f] / base[f] <= TARGET for f in ("p50", "p99"))
        cells = ", ".join(f"{f} {med[f] / base[f]:.2f}x" for f in FIGURES)
        verdict = "within" if within else "NOT within"
        print(f"  {case.title:<32} {cells} -> p50 and p99 {verdict} {TARGET:.1f}x")
        pairs = zip(results["baseline"], results[case.name], strict=True)
        per_run = [{f: figures(r.latencies["healthy"])[f] / figures(b.latencies["healthy"])[f]
                    for f in ("p50", "p99")} for b, r in pairs]  # fmt: skip
        print(
            "    run by run (each next to the baseline run before it): "
            + ", ".join(f"{x['p50']:.2f}x/{x['p99']:.2f}x" for x in per_run)
            + " (p50/p99)"
        )
    faulty, clean = medians[("faulty", "healthy")], medians[("clean", "healthy")]
    print(
        "  faulty / clean, the faulty ports' cost to the healthy ones: "
        + ", ".join(f"{f} {faulty[f] / clean[f]:.2f}x" for f in FIGURES)
    )
    print("\nper run: simulators' retransmits; faults injected")
    for case in CASES:
        parts = []
        for r in results[case.name]:
            s = r.summaries
            text = " ".join(f"{p} {s.get(p, {}).get('retransmits', 0)}" for p in s)
            if case.name == "faulty":
                text += (f", {s['plug']['unplugs']} unplugs, "
                         f"{s['noisy']['faults']['garbage_bytes']:,} garbage bytes")  # fmt: skip
            parts.append(f"[{text}]")
        print(f"  {case.name:<8} " + " ".join(parts))
    print(f"\nCPU seconds, median of the runs (agent + simulators / wall, {os.cpu_count()} CPUs):")
    for case in CASES:
        runs = results[case.name]
        agent = median_of(runs, lambda r: r.agent_cpu)
        sims = median_of(runs, lambda r: r.sims_cpu)
        wall = median_of(runs, lambda r: r.wall)
        print(f"  {case.name:<8} {agent:.1f} + {sims:.1f} / {wall:.1f} s; warm-up events "
              f"left out {median_of(runs, lambda r: r.left_out):,.0f}")  # fmt: skip
    print(f"  load average now {load()}")
    lost = sum(r.missing for runs in results.values() for r in runs)
    if lost:
        print(f"\nLOSS: {lost} event(s) ACKed and not stored, or never ACKed (see above)")
        return 1
    print("\nzero loss: every event of every controller ACKed and stored, in every run")
    return 0


def on_signal(signum: int, _frame: FrameType | None) -> None:
    # Unwind through the ExitStack: every process stopped, every directory removed.
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each case (medians)")
    parser.add_argument("--rate", type=float, default=400.0, help="events/s per controller")
    parser.add_argument("--events", type=int, default=4000, help="events per controller")
    parser.add_argument("--streams", type=int, default=4, help="streams per controller")
    parser.add_argument(
        "--warmup", type=float, default=0.5,
        help="seconds after every port's first ACK before latencies count",
    )  # fmt: skip
    parser.add_argument(
        "--tmp", default=None,
        help="parent of the temporary directory (agent state, links, truth); default: system's",
    )  # fmt: skip
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (path printed)"
    )
    args = parser.parse_args()
    if not 1 <= args.runs <= 50 or not 100 <= args.events <= 10**6 or args.rate <= 0:
        raise fail("--runs within [1, 50], --events within [100, 10^6], --rate > 0")
    for path in (AGENT, SIM):
        if not os.access(path, os.X_OK):
            raise fail(f"{path} not found: run with the project's venv python")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    print(f"bench_controllers: {args.rate:g} ev/s x {args.streams} streams, {args.events:,} "
          f"events per controller, {args.runs} run(s) of {len(CASES)} cases; load {load()}",
          flush=True)  # fmt: skip
    results: dict[str, list[RunResult]] = {c.name: [] for c in CASES}
    with contextlib.ExitStack() as cleanup:
        tmp = Path(tempfile.mkdtemp(prefix="bench-controllers-", dir=args.tmp))
        if args.keep:
            print(f"  keeping {tmp}")
        else:
            cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        for run in range(1, args.runs + 1):
            for case in CASES:
                with contextlib.ExitStack() as procs:
                    result = run_case(case, run, args, tmp, procs)
                results[case.name].append(result)
                print_run(case, run, result)
        return report(args, results)


if __name__ == "__main__":
    sys.exit(main())
