"""Many distinct streams: peak RSS of ingest and restart, append rate, eviction.

A controller chooses its stream names, so the number of distinct streams is peer
controlled. DESIGN.md target: agent RSS <= 64 MiB with 1,000,000 distinct streams, both
while they are ingested and after a restart with them on disk; durable append with dedup
at 1,000 streams >= 200k ev/s (the hot path must stay a dict hit for active streams).

Every figure comes from a fresh process (`--child`), so peak RSS (VmHWM) belongs to that
measurement alone. `--store PATH` loads `EventStore` from another copy of agent/store.py
(for example the code before a change) to print before/after figures in one run:

    python bench/bench_streams.py --store /tmp/store_orig.py --label before
    python bench/bench_streams.py --label after

1. ingest: N distinct streams (one event each, 1,000 per append) into a new store.
2. restart: open that store and append 1,000 events (half to known streams, half new).
3. append: 1,000 interleaved streams, 200,000 events, 1,000 per transaction (FULL).
4. eviction: `make_room` step 1 (delete what the fleet acknowledged, keep each stream's
   latest) on 1,000 streams x 200 events and on 100,000 streams x 2 events.
5. the real daemon (`ironfleet-agent run`, uplink off) fed N distinct streams by
   `ironfleet-sim --streams N` over a pty, then restarted with them on disk while the
   controller resends 5,000 of them: the agent's peak RSS in each phase (psutil, sampled
   every 50 ms). Only for this code (the daemon imports agent.store).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from agent.resilience import Event
from firmware_bridge.link import Received
from firmware_bridge.protocol import TimeQuality

THIS = str(Path(__file__).resolve())
AGENT = str(Path(sys.executable).with_name("ironfleet-agent"))
SIM = str(Path(sys.executable).with_name("ironfleet-sim"))
DAEMON_CACHE = 10_000  # [store] max_cached_streams for section 5 (the default)
BATCH = 1000  # events per append (the daemon's group commit is up to 4,096)
PAYLOAD_POOL = 1024
TARGET_RSS_MIB = 64
TARGET_APPEND_EPS = 200_000
STREAMS_PER_CONTROLLER = 1000


def load_store(path: str | None) -> ModuleType:
    """agent.store, or the module at `path` (another copy of it)."""
    if not path:
        import agent.store  # noqa: PLC0415

        return agent.store
    spec = importlib.util.spec_from_file_location("store_under_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["store_under_test"] = module
    spec.loader.exec_module(module)
    return module


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM: peak RSS of this process image)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def arrival(name: str, seq: int, payload: bytes) -> Received:
    controller = name.split("/", 1)[0]
    event = Event.trusted(name, seq, 1, 1_714_000_000.0 + seq, "sample", 1, payload)
    return Received((1, seq), event, TimeQuality.SYNCED, controller)


def distinct(first: int, n: int, pool: list[bytes]) -> Iterator[list[Received]]:
    """Streams first..first+n-1, one event each (seq 1), in appends of BATCH."""
    for start in range(first, first + n, BATCH):
        yield [
            arrival(f"c{k // STREAMS_PER_CONTROLLER}/s{k}", 1, pool[k % len(pool)])
            for k in range(start, min(start + BATCH, first + n))
        ]


def child_ingest(mod: ModuleType, db: str, n: int) -> dict[str, Any]:
    pool = [random.Random(k).randbytes(60) for k in range(PAYLOAD_POOL)]
    base = status_kib("VmRSS")
    store = mod.EventStore(db, mod.StoreSection(max_buffer_bytes=8 * 2**30, min_free_bytes=0))
    t0 = time.perf_counter()
    for chunk in distinct(0, n, pool):
        store.append(chunk)
    seconds = time.perf_counter() - t0
    streams = store.stats()["streams"]
    store.close()
    return {"base_kib": base, "hwm_kib": status_kib("VmHWM"), "seconds": seconds,
            "streams": streams}  # fmt: skip


def child_restart(mod: ModuleType, db: str, n: int) -> dict[str, Any]:
    pool = [random.Random(k).randbytes(60) for k in range(PAYLOAD_POOL)]
    base = status_kib("VmRSS")
    t0 = time.perf_counter()
    store = mod.EventStore(db, mod.StoreSection(max_buffer_bytes=8 * 2**30, min_free_bytes=0))
    opened = time.perf_counter() - t0
    rng = random.Random(5)
    known = [rng.randrange(n) for _ in range(BATCH // 2)]
    batch = [arrival(f"c{k // STREAMS_PER_CONTROLLER}/s{k}", 2, pool[0]) for k in known]
    batch += next(distinct(n, BATCH // 2, pool))
    t0 = time.perf_counter()
    result = store.append(batch)
    again = store.append(batch)  # all duplicates now
    appended = time.perf_counter() - t0
    assert again.stored == 0, again
    assert again.duplicates == len(batch), again
    assert result.stored == len(set(known)) + BATCH // 2, result
    store.close()
    return {"base_kib": base, "hwm_kib": status_kib("VmHWM"), "open_s": opened,
            "append_s": appended}  # fmt: skip


def child_append(mod: ModuleType, db: str, events: int, durable: int = 1) -> dict[str, Any]:
    streams = 1000
    rng = random.Random(3)
    pool = [rng.randbytes(rng.randint(60, 100)) for _ in range(PAYLOAD_POOL)]
    names = [f"ecu{k // 100}/s{k % 100:03d}" for k in range(streams)]
    controllers = [n.split("/")[0] for n in names]  # one object per controller, as the link

    def make(first: int, n: int) -> list[Received]:
        return [
            Received(
                (1, i), Event.trusted(names[i % streams], i // streams + 1, 1, float(i),
                                      "sample", i % 4, pool[i % PAYLOAD_POOL]),
                TimeQuality.SYNCED, controllers[i % streams],
            )
            for i in range(first, first + n)
        ]  # fmt: skip

    # durable=0: synchronous=OFF, so the figure is the Python hot path (dedup planning).
    store = mod.EventStore(db, mod.StoreSection(synchronous="FULL" if durable else "OFF"))
    store.append(make(0, streams))  # first sight of every stream: not steady state
    timed = make(streams, events)
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, events, BATCH):
        store.append(timed[start : start + BATCH])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    again = store.append(timed[:BATCH])
    assert again.duplicates == BATCH, again
    store.close()
    # Events per CPU second too: on a shared machine wall time mostly measures the others.
    return {"eps": events / seconds, "eps_cpu": events / cpu}


def child_evict_build(mod: ModuleType, db: str, streams: int, per_stream: int) -> dict[str, Any]:
    pool = [random.Random(k).randbytes(80) for k in range(PAYLOAD_POOL)]
    big = mod.StoreSection(max_buffer_bytes=8 * 2**30, min_free_bytes=0, synchronous="OFF")
    store = mod.EventStore(db, big)
    total = streams * per_stream
    for start in range(0, total, 5000):
        store.append(
            [
                arrival(f"c{(i % streams) // STREAMS_PER_CONTROLLER}/s{i % streams}",
                        i // streams + 1, pool[i % PAYLOAD_POOL])
                for i in range(start, min(start + 5000, total))
            ]
        )  # fmt: skip
    store.mark_delivered(int(total * 0.9), {})
    used = store.used_bytes()
    store.close()
    return {"used": used}


def child_evict(mod: ModuleType, db: str, used: int) -> dict[str, Any]:
    """Reopen with a cap just under what is used: the ladder's step 1 must run."""
    small = mod.StoreSection(max_buffer_bytes=used, min_free_bytes=0, high_water=0.9, low_water=0.5)
    store = mod.EventStore(db, small)
    base = status_kib("VmHWM")
    rows = store.event_count
    t0 = time.perf_counter()
    store.make_room()
    seconds = time.perf_counter() - t0
    deleted = rows - store.event_count
    hwm = status_kib("VmHWM")
    kept = store.conn.execute("SELECT count(DISTINCT stream_id) FROM events").fetchone()[0]
    store.close()
    return {"seconds": seconds, "deleted": deleted, "kept_streams": kept, "open_hwm_kib": base,
            "hwm_kib": hwm}  # fmt: skip


def run_sim(tmp: Path, streams: int, events: int) -> tuple[subprocess.Popen[str], str]:
    cmd = [SIM, "--streams", str(streams), "--events", str(events), "--rate", "1000000",
           "--window", "256", "--link-dir", str(tmp / "dev"), "--seed", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:1] == ["DEVICE"], line
    return proc, line[2]


def start_agent(tmp: Path, device: str) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    config = tmp / "agent.toml"
    config.write_text(
        f'[agent]\nvehicle_id = "bench"\nstate_dir = "{tmp / "state"}"\n'
        f'[serial]\ndevice = "{device}"\n'
        f"[store]\nmin_free_bytes = 0\nmax_cached_streams = {DAEMON_CACHE}\n"
        "[uplink]\nenabled = false\n",
        encoding="utf-8",
    )
    log = tmp / "agent.log"
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as fh:
        proc = subprocess.Popen([AGENT, "run", "--config", str(config)], stdout=fh, stderr=fh)
    deadline = time.monotonic() + 120
    while b"agent_started" not in log.read_bytes()[offset:]:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"agent did not start: {log.read_text()[-2000:]}")
        time.sleep(0.01)
    return proc, psutil.Process(proc.pid)


def peak_until_done(sim: subprocess.Popen[str], agent: psutil.Process, timeout: float) -> int:
    peak = agent.memory_info().rss
    deadline = time.monotonic() + timeout
    while sim.poll() is None:
        if time.monotonic() > deadline:
            sim.kill()
            raise SystemExit("the simulator did not finish")
        peak = max(peak, agent.memory_info().rss)
        time.sleep(0.05)
    return max(peak, agent.memory_info().rss)


def section_daemon(tmp: Path, streams: int) -> None:
    work = tmp / "daemon"
    work.mkdir()
    sim, device = run_sim(work, streams, streams)
    proc, agent = start_agent(work, device)
    base = agent.memory_info().rss
    t0 = time.perf_counter()
    peak = peak_until_done(sim, agent, timeout=3600)
    seconds = time.perf_counter() - t0
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    print(
        f"  5 daemon over a pty, {streams:,} distinct streams (cache {DAEMON_CACHE:,}): agent"
        f" RSS {base / 2**20:.1f} MiB at start, peak {peak / 2**20:.1f} MiB,"
        f" {streams / seconds:,.0f} streams/s (sim exit {sim.returncode});"
        f" target <= {TARGET_RSS_MIB} MiB"
    )
    sim, device = run_sim(work, streams, 5000)
    proc, agent = start_agent(work, device)
    started = agent.memory_info().rss
    peak = peak_until_done(sim, agent, timeout=600)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    print(
        f"  5 daemon restart with them on disk, 5,000 resent (duplicates): agent RSS"
        f" {started / 2**20:.1f} MiB once started, peak {peak / 2**20:.1f} MiB"
        f" (sim exit {sim.returncode}); target <= {TARGET_RSS_MIB} MiB"
    )


def run_child(store: str | None, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, THIS, "--child", *args]
    if store:
        cmd += ["--store", store]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child {args} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=None, help="load EventStore from this file")
    parser.add_argument("--label", default="this code")
    parser.add_argument("--streams", type=int, default=1_000_000, help="distinct streams")
    parser.add_argument("--append-events", type=int, default=200_000)
    parser.add_argument("--sections", default="1,2,3,4,5")
    parser.add_argument("--daemon-streams", type=int, default=1_000_000)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mod = load_store(args.store)
        kind, db, *rest = args.child
        nums = [int(x) for x in rest]
        children: dict[str, Callable[..., dict[str, Any]]] = {
            "ingest": child_ingest, "restart": child_restart, "append": child_append,
            "evict-build": child_evict_build, "evict": child_evict,
        }  # fmt: skip
        print(json.dumps(children[kind](mod, db, *nums)))
        return
    sections = {s.strip() for s in args.sections.split(",")}
    tmp = Path(tempfile.mkdtemp(prefix="bench-streams-", dir=os.environ.get("TMPDIR", "/tmp")))
    print(f"[{args.label}] store={args.store or 'agent.store'} · load {os.getloadavg()[0]:.2f}")
    try:
        if sections & {"1", "2"}:
            db = str(tmp / "streams.db")
            r = run_child(args.store, "ingest", db, str(args.streams))
            print(
                f"  1 ingest {args.streams:,} distinct streams: peak RSS {mib(r['hwm_kib'])}"
                f" (after imports {mib(r['base_kib'])}), {args.streams / r['seconds']:,.0f}"
                f" streams/s, stats streams={r['streams']:,}; target <= {TARGET_RSS_MIB} MiB"
            )
            r = run_child(args.store, "restart", db, str(args.streams))
            print(
                f"  2 restart with them on disk + {BATCH:,} appends: peak RSS"
                f" {mib(r['hwm_kib'])} (after imports {mib(r['base_kib'])}), open"
                f" {r['open_s']:.2f} s, appends {r['append_s'] * 1000:.0f} ms;"
                f" target <= {TARGET_RSS_MIB} MiB"
            )
        if "3" in sections:
            for durable in (1, 0):
                runs = [
                    run_child(args.store, "append", str(tmp / f"a{k}{durable}.db"),
                              str(args.append_events), str(durable))
                    for k in range(3)
                ]  # fmt: skip
                rates = [r["eps"] for r in runs]
                print(
                    f"  3 append, 1,000 streams, {BATCH:,}/txn,"
                    f" {'FULL' if durable else 'OFF (hot path only)'}: best of 3"
                    f" {max(rates):,.0f} ev/s (all: {', '.join(f'{r:,.0f}' for r in rates)});"
                    f" per CPU second {max(r['eps_cpu'] for r in runs):,.0f}"
                    + (f"; target >= {TARGET_APPEND_EPS:,}" if durable else "")
                )
        if "4" in sections:
            for streams, per in ((1000, 200), (100_000, 2)):
                db = str(tmp / f"e{streams}.db")
                used = run_child(args.store, "evict-build", db, str(streams), str(per))["used"]
                r = run_child(args.store, "evict", db, str(used))
                print(
                    f"  4 eviction step 1, {streams:,} streams x {per}: {r['seconds'] * 1000:,.0f}"
                    f" ms, deleted {r['deleted']:,}, streams kept {r['kept_streams']:,}; peak"
                    f" RSS {mib(r['open_hwm_kib'])} after open, {mib(r['hwm_kib'])} after"
                    " make_room"
                )
        if "5" in sections and not args.store:
            section_daemon(tmp, args.daemon_streams)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
