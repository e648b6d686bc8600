"""What persisting fleet acks costs: one durable commit per ack against the cadence.

A store of --events events over --streams interleaved streams (synchronous=FULL, on
/var/tmp); then every event is acknowledged in acks of --ack-rows rows, and what the
fleet acknowledged is persisted with `EventStore.mark_delivered` (cursor and per-stream
checkpoints in one transaction) either after every ack or once per --interval rows (the
`CheckpointCadence` default). Each variant runs twice, alternating, on a fresh store; the
ratio within the run is what counts (the machine is noisy). Measured with the CI beside
it (load 4.7): 0.46-0.59 s per 100,000 events per ack, 0.14-0.15 s at one per 5,000
(0.30x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.resilience import Event
from agent.resilience.checkpoint import CheckpointCadence
from agent.store import EventStore


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


def build(path: Path, events: int, streams: int) -> EventStore:
    store = EventStore(path)
    batch = []
    for i in range(events):
        name = f"ecu0/s{i % streams:04d}"
        batch.append(In(Event(name, i // streams + 1, boot_epoch=1, ts=float(i), priority=2,
                              payload=b"x" * 80)))  # fmt: skip
        if len(batch) == 1000:
            store.append(batch, now=1.0)
            batch = []
    if batch:
        store.append(batch, now=1.0)
    return store


def drain(
    store: EventStore, events: int, streams: int, ack_rows: int, every: int
) -> tuple[float, int]:
    """Acknowledge everything in acks of `ack_rows`; persist once `every` rows waited."""
    cadence = CheckpointCadence(interval=every, max_delay=3600.0)
    positions: dict[str, tuple[int, int]] = {}
    commits, started = 0, time.perf_counter()
    for upto in range(ack_rows, events + 1, ack_rows):
        for r in range(upto - ack_rows, upto):
            positions[f"ecu0/s{r % streams:04d}"] = (1, r // streams + 1)
        cadence.acked(ack_rows, 0.0)
        if cadence.due(0.0) or upto + ack_rows > events:
            store.mark_delivered(upto, positions, now=2.0)
            positions, commits = {}, commits + 1
            cadence.persisted()
    return time.perf_counter() - started, commits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--ack-rows", type=int, default=500)
    parser.add_argument("--interval", type=int, default=CheckpointCadence().interval)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    for every in (args.ack_rows, args.interval) * 2:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            store = build(Path(tmp) / "agent.db", args.events, args.streams)
            wall, commits = drain(store, args.events, args.streams, args.ack_rows, every)
            store.close()
        per = wall * 100_000 / args.events
        label = "every ack" if every == args.ack_rows else f"every {every:,} rows"
        results.setdefault(label, []).append(per)
        print(f"persist {label:>17}: {commits:>4} commits, {per:.3f} s per 100k acked events")
    base, cad = (min(v) for v in results.values())
    print(f"load average {os.getloadavg()[0]:.2f}; cadence / every ack = {cad / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
