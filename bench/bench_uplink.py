"""Fleet uplink through a real mosquitto: drain throughput, convergence time, agent memory.

Run as `.venv/bin/python bench/bench_uplink.py` (about 6 minutes, section 5 about 2.5;
`--quick` for a smoke test, `--sections`, `--events`, `--converge`, ... to scale).
Everything runs in one invocation against mosquitto processes started here on free
127.0.0.1 ports, so every figure sits next to a baseline measured in the same run
(absolute figures drift 20-30 % between runs on this machine kind; the ratios are what count):

1. Drain throughput: a pre-filled store (1,000 interleaved streams) drained by the agent's
   own loop (`Resync` + `FleetSync` + `MqttTransport`, stepped in this process,
   `ack_mode=fleet`) through mosquitto (QoS 1) to the reference collector (`CollectorStore`
   + `Collector` + `FleetSubscriber`) in a separate process, as on a 2-core box where the
   fleet side would not share the agent's interpreter. An event counts as delivered when
   the collector committed it (synchronous=FULL), its ack came back and the agent persisted
   the checkpoint (`EventStore.mark_delivered`, synchronous=FULL). Batched (500, the
   default, and 100 per publish) next to one event per publish (smaller store). Then
   diagnostics that locate the cost: TCP_NODELAY everywhere, the collector's database on
   tmpfs, `ack_mode=broker` (no collector), and a hand-written raw loop (sqlite3 -> msgpack
   -> paho QoS 1 -> PUBACK -> durable cursor), the kind of loop the DESIGN reference
   figures came from. CPU and bytes written per event are printed for each process.
2. Link restore -> converged fleet view, for a 100,000- and a 1,000,000-event backlog: the
   collector is subscribed, the agent side is built (store open) but not connected; then it
   connects and the collector process stamps (CLOCK_MONOTONIC, shared by both processes)
   the commit after which every stream's latest position is in its state table. The full
   drain of the 100k backlog is the baseline: what the fleet view would wait for without
   the state-first resync.
3. Peak RSS (VmHWM) of the real `ironfleet-agent` process while it drains the 1M backlog to
   the collector (serial device absent, so it only uplinks; the collector's database on
   tmpfs so the drain takes about a minute), next to fresh interpreters that import the
   agent's modules only, and its dependencies step by step.

4. Bytes and CPU per event on the wire for each encoding (uplink_encoding.py): zlib over
   rows (codec 1), zstd with a trained dictionary, and the columnar codec 2, on the
   simulator's vehicle profile.
5. Live events on a scarce link (uplink_scarce.py): a 1,000,000-event backlog of the
   vehicle profile drained with max_bytes_per_second = 8000 (64 kbit/s) while live events
   are appended at 20/s; per codec (zlib, columnar) the live latency (store commit ->
   collector commit) p50 / p99 / max, bytes/s published against the budget, backlog
   delivered meanwhile and the time to drain it all, next to the wait behind the backlog in
   arrival order (before the live lane).

No timing assertions; delivery is checked (every event stored once by the collector, its
state equal to the agent's latest per stream, the daemon exits 0).

This file holds the options, the report header and the `_collector` entry point the
collector child is started with; the rest lives beside it: section 1 in uplink_drain.py,
2 in uplink_converge.py, 3 in uplink_rss.py, 4 in uplink_encoding.py, 5 in
uplink_scarce.py (with its own collector child); the instrumented
collector process in uplink_collector.py, the agent's stepped uplink loop in
uplink_agent.py, and the workload, process helpers and mosquitto management in
uplink_common.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt
from uplink_collector import collector_child
from uplink_common import MOSQUITTO, Broker
from uplink_converge import section_convergence
from uplink_drain import section_throughput
from uplink_encoding import section_encoding
from uplink_rss import section_rss
from uplink_scarce import section_scarce

# -- main --------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_collector":
        raise SystemExit(collector_child(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=100_000, help="store for batched drains")
    parser.add_argument("--single-events", type=int, default=1_000,
                        help="store for the one-event-per-publish drains")  # fmt: skip
    parser.add_argument("--streams", type=int, default=1_000)
    parser.add_argument("--batches", default="500,100", help="batch_max_events values")
    parser.add_argument("--converge", default="100000,1000000",
                        help="backlog sizes (section 2); 3 drains the largest")  # fmt: skip
    parser.add_argument("--sections", default="1,2,3,4,5")
    parser.add_argument("--encoding-events", type=int, default=20_000,
                        help="section 4: events of the vehicle profile per run")  # fmt: skip
    parser.add_argument("--scarce-backlog", type=int, default=1_000_000,
                        help="section 5: backlog events behind the live traffic")  # fmt: skip
    parser.add_argument("--scarce-seconds", type=float, default=60.0,
                        help="section 5: seconds of live traffic per codec")  # fmt: skip
    parser.add_argument("--scarce-live-rate", type=float, default=20.0,
                        help="section 5: live events per second")  # fmt: skip
    parser.add_argument("--no-diagnostics", action="store_true",
                        help="skip the NODELAY, PUBACK-mode and raw-loop runs")  # fmt: skip
    parser.add_argument("--rss-collector-on-disk", action="store_true",
                        help="section 3: collector database on disk (slower)")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="cProfile agent loop and collector at 100/publish")  # fmt: skip
    parser.add_argument("--profile-top", type=int, default=18)
    parser.add_argument("--timeout", type=float, default=300.0, help="per drain, seconds")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.quick:
        args.events, args.single_events, args.converge = 20_000, 300, "10000,50000"
        args.scarce_backlog, args.scarce_seconds = 50_000, 10.0
    sections = {int(s) for s in args.sections.split(",")}
    tmp = Path(tempfile.mkdtemp(prefix="bench-uplink-"))
    broker = Broker(tmp / "broker")
    fast = None if args.no_diagnostics else Broker(tmp / "broker-nodelay", nodelay=True)
    t0 = time.monotonic()
    try:
        broker.start()
        if fast is not None:
            fast.start()
        print(f"mosquitto {MOSQUITTO} on 127.0.0.1:{broker.port} (defaults)"
              + (f" and :{fast.port} (set_tcp_nodelay true)" if fast else "")
              + f"; python {sys.version.split()[0]}, paho-mqtt {paho.mqtt.__version__}, "
              f"{os.cpu_count()} CPUs; work dir {tmp}")  # fmt: skip
        print()
        if 1 in sections:
            section_throughput(args, broker, fast, tmp)
        if 2 in sections:
            section_convergence(args, broker, fast, tmp)
        if 3 in sections:
            section_rss(args, broker, tmp)
        if 4 in sections:
            section_encoding(args)
        if 5 in sections:
            section_scarce(args, broker, tmp)
    finally:
        broker.stop()
        if fast is not None:
            fast.stop()
        if args.keep:
            print(f"work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"total {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
