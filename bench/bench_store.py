"""Event store and ingest path: durable appends, drains, serial-to-ACK, RSS at 1M events.

Every figure is printed next to a baseline measured in the same run (absolute figures
drift 20-30 % between runs on this machine kind, more when other work shares its two
CPUs; the ratios are what counts), and next to the reference from DESIGN.md
"Performance targets" where there is one.

1. Durable append, synchronous=FULL, 1,000 interleaved streams, 60-100 B payloads:
   `EventStore.append` with group commit (one transaction per batch) against
   (a) the same store, one event per `append` (one transaction per event);
   (b) persist-queue's `SQLiteAckQueue.put` with its defaults (WAL, SQLite's default
       synchronous=FULL, auto_commit: one transaction per put, pickle);
   (c) plain sqlite3 with a UNIQUE(stream, seq) index, same batches (DESIGN's raw
       reference), and the same table without any index (the SQLite floor).
   Bytes written per event for each: /proc/self/io write_bytes (what reached the block
   layer: WAL frames, checkpoints and the final checkpoint) next to the database growth.
   Drain (read the oldest, acknowledge durably): `SQLiteAckQueue` get + ack, and
   `EventStore.backlog` pages + `mark_delivered`, each at the start of the backlog and
   again after most of it was acknowledged; and read-only paging. `--profile` adds a
   cProfile of the group commit and its wall time per SQL statement.
2. End to end through a real pseudo-terminal: this process plays the controller
   (`firmware_bridge.controller.ControllerLink`, the simulator's state machine; its
   `ack_latencies` give first send -> ACK) and the agent is the real `ironfleet-agent run`
   process with default settings (uplink off: no broker here). Saturating producer at
   controller windows 64 and 256; the same with the uplink on and its broker unreachable
   (link lost: when a backlog builds up); paced at 1,536 frames/s (921,600 baud for 60 B
   frames) for latency. Same-run baselines: a minimal single-threaded "raw loop" agent
   (read, split, COBS, CRC-32C, unpackb, executemany + COMMIT with synchronous=FULL,
   cumulative ACK) on the same harness, which also shows the harness's own ceiling; and
   the disk's floor, one-row durable commits at the paced rate.
3. A 1,000,000-event store: in a fresh process, open it, time `latest()`, page through the
   whole backlog with `backlog(after_rowid=..., limit=1000)`; peak RSS of that process
   against a process that only imports sqlite3 and the agent modules; raw sqlite3
   baselines for `latest()`.

This file holds the options, the report header and the `--child` entry points the sections
re-run it with; the sections live beside it: 1 in store_append.py, 2 in store_e2e.py, 3 in
store_rss.py, and what they share (constants, workload, measuring helpers) in
store_common.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from store_append import section_append
from store_e2e import raw_agent, section_e2e
from store_rss import rss_child, section_rss

# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="1,2,3", help="which sections to run")
    parser.add_argument("--streams", type=int, default=1000, help="interleaved streams")
    parser.add_argument("--events", type=int, default=200_000, help="group-commit events")
    parser.add_argument("--batch", type=int, default=1000, help="events per transaction")
    parser.add_argument("--single-events", type=int, default=2000, help="one-per-call events")
    parser.add_argument("--pq-events", type=int, default=6000, help="persist-queue items")
    parser.add_argument("--pq-window", type=int, default=1000, help="drain window, items")
    parser.add_argument("--drain-pages", type=int, default=20, help="drain window, pages")
    parser.add_argument("--e2e-frames", type=int, default=60_000, help="frames per e2e run")
    parser.add_argument(
        "--windows", type=lambda s: [int(w) for w in s.split(",")], default=[64, 256]
    )
    parser.add_argument(
        "--uplink-down-frames", type=int, default=10_000, help="0: skip the uplink-on run"
    )
    parser.add_argument("--paced-rate", type=float, default=1536.0, help="frames/s, paced")
    parser.add_argument("--paced-seconds", type=float, default=6.0)
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--profile", action="store_true", help="cProfile the group commit")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "raw-agent":
            raw_agent(rest[0], rest[1])
        elif kind == "rss":
            rss_child(rest[0], int(rest[1]), int(rest[2]))
        return
    sections = {s.strip() for s in args.sections.split(",")}
    print(
        f"IronFleet store benchmark · Python {sys.version.split()[0]} · SQLite "
        f"{sqlite3.sqlite_version} · {os.cpu_count()} CPUs"
    )
    print()
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-", dir=os.environ.get("TMPDIR", "/tmp")))
    t0 = time.perf_counter()
    try:
        if "1" in sections:
            section_append(args, tmp)
        if "2" in sections:
            section_e2e(args, tmp)
        if "3" in sections:
            section_rss(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"total {time.perf_counter() - t0:.0f} s; 1-min load average {load:.2f} at start,"
        f" {os.getloadavg()[0]:.2f} at end (2 CPUs: above ~1 means other work shared them)"
    )


if __name__ == "__main__":
    main()
