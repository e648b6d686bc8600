"""bench_uplink.py: the reference collector in its own process, instrumented."""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from benchprocs import stop_process
from uplink_common import (
    THIS,
    Positions,
    cpu_seconds,
    proc_status_kib,
    set_nodelay,
    write_bytes,
)

from fleet.collector import Collector, CollectorStore
from fleet.subscriber import FleetSubscriber

# -- the collector, in its own process ---------------------------------------------------------


def collector_child(argv: Sequence[str]) -> int:
    """`bench_uplink.py _collector ...`: the reference collector, instrumented.

    Wires CollectorStore + Collector + FleetSubscriber as `ironfleet-collector run` does,
    and stamps with CLOCK_MONOTONIC (comparable across processes): the first batch's
    arrival in the handler, the commit after which the state table equals `--expect`
    (converged), and the commit that brought the stored count to `--total`. Writes them
    as JSON to `--out` on SIGTERM.
    """
    p = argparse.ArgumentParser(prog="bench_uplink.py _collector")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--vehicle", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--expect", required=True, help="JSON file: stream -> [boot_epoch, seq]")
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--profile", default="", help="write cProfile stats of message handling")
    p.add_argument("--nodelay", action="store_true", help="TCP_NODELAY on the client socket")
    args = p.parse_args(argv)
    expect = {
        s: (int(e), int(q)) for s, (e, q) in json.loads(Path(args.expect).read_text()).items()
    }
    store = CollectorStore(args.db)
    collector = Collector(store)
    rec: dict[str, Any] = {"first_rx": None, "converged_at": None, "complete_at": None,
                           "messages": 0, "state_messages": 0, "events_received": 0}  # fmt: skip
    profiler = cProfile.Profile() if args.profile else None
    subscribed = threading.Event()

    def converged() -> bool:
        with store.lock:
            rows = store.conn.execute(
                "SELECT stream, boot_epoch, seq FROM state WHERE vehicle = ?", (args.vehicle,)
            ).fetchall()
        return len(rows) == len(expect) and all(expect.get(s) == (e, q) for s, e, q in rows)

    def stored() -> int:
        with store.lock:
            row = store.conn.execute(
                "SELECT events FROM vehicles WHERE vehicle = ?", (args.vehicle,)
            ).fetchone()
        return int(row[0]) if row else 0

    def on_message(topic: str, payload: bytes) -> None:
        if rec["first_rx"] is None and topic.endswith(("/events", "/state")):
            rec["first_rx"] = time.monotonic()
        if profiler is not None:
            profiler.enable()
        collector.handle(topic, payload)
        if profiler is not None:
            profiler.disable()
        kind = topic.rsplit("/", 1)[1]
        if kind not in ("events", "state"):
            return
        now = time.monotonic()
        rec["messages"] += 1
        rec["state_messages"] += kind == "state"
        if rec["converged_at"] is None and converged():
            rec["converged_at"] = now
        if rec["complete_at"] is None and stored() >= args.total:
            rec["complete_at"] = now

    def on_subscribe(*_: Any) -> None:
        subscribed.set()

    sub = FleetSubscriber("127.0.0.1", args.port, on_message, client_id=args.client_id,
                          vehicles=(args.vehicle,))  # fmt: skip
    sub.client.on_subscribe = on_subscribe
    if args.nodelay:
        sub.client.on_socket_open = set_nodelay
    collector.transport = sub
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    sub.start()
    if not subscribed.wait(10):
        return 1
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    written0 = write_bytes()
    Path(args.out + ".ready").write_text("ready\n")
    while not stop.wait(0.05):
        pass
    sub.stop()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    rec["cpu_s"] = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    rec["written"] = write_bytes() - written0
    rec["stored"] = stored()
    with store.lock:
        row = store.conn.execute(
            "SELECT duplicates FROM vehicles WHERE vehicle = ?", (args.vehicle,)
        ).fetchone()
    rec["duplicates"] = int(row[0]) if row else 0
    rec["bad_messages"] = collector.bad_messages
    rec["hwm_kib"] = proc_status_kib(os.getpid(), "VmHWM")
    if profiler is not None:
        profiler.dump_stats(args.profile)
    Path(args.out).write_text(json.dumps(rec))
    return 0


@dataclass
class CollectorResult:
    first_rx: float | None  # the first batch reached the collector's handler
    converged_at: float | None
    complete_at: float | None
    messages: int
    state_messages: int
    stored: int
    duplicates: int
    bad_messages: int
    cpu_s: float
    written: int
    hwm_kib: int
    state: Positions = field(default_factory=dict)
    events_in_db: int = 0


class CollectorProcess:
    """Starts the instrumented collector child and collects its record."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        vehicle: str,
        expect: Positions,
        total: int,
        *,
        profile: bool = False,
        nodelay: bool = False,
        db_dir: Path | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.db = (db_dir or workdir) / f"collector-{vehicle}.db"
        self.out = workdir / "collector.json"
        self.vehicle = vehicle
        self.prof = workdir / "collector.prof" if profile else None
        expect_file = workdir / "expect.json"
        expect_file.write_text(json.dumps(expect))
        cmd = [sys.executable, THIS, "_collector", "--port", str(port), "--db", str(self.db),
               "--vehicle", vehicle, "--client-id", f"bench-collector-{vehicle}",
               "--expect", str(expect_file), "--total", str(total),
               "--out", str(self.out)]  # fmt: skip
        if self.prof is not None:
            cmd += ["--profile", str(self.prof)]
        if nodelay:
            cmd.append("--nodelay")
        self.log = workdir / "collector.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        ready = Path(str(self.out) + ".ready")
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"collector did not subscribe: {self.log.read_text()}")
            time.sleep(0.01)

    @property
    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def finish(self) -> CollectorResult:
        code = stop_process(self.proc)
        if code != 0 or not self.out.exists():
            raise RuntimeError(f"collector exited {code}: {self.log.read_text()}")
        rec = json.loads(self.out.read_text())
        result = CollectorResult(**{k: rec[k] for k in CollectorResult.__dataclass_fields__
                                    if k in rec})  # fmt: skip
        conn = sqlite3.connect(self.db.absolute().as_uri() + "?mode=ro", uri=True)
        try:
            result.state = {
                s: (e, q)
                for s, e, q in conn.execute(
                    "SELECT stream, boot_epoch, seq FROM state WHERE vehicle = ?", (self.vehicle,)
                )
            }
            result.events_in_db = conn.execute(
                "SELECT count(*) FROM events WHERE vehicle = ?", (self.vehicle,)
            ).fetchone()[0]
        finally:
            conn.close()
        return result

    def profile_text(self, top: int) -> str:
        if self.prof is None or not self.prof.exists():
            return ""
        buf = io.StringIO()
        pstats.Stats(str(self.prof), stream=buf).sort_stats("tottime").print_stats(top)
        return buf.getvalue()

    def kill(self) -> None:
        """Make sure the child is gone and its database removed (it may live in RAM)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.db) + suffix).unlink(missing_ok=True)
