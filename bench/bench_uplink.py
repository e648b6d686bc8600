"""Fleet uplink through a real mosquitto: drain throughput, convergence time, agent memory.

Run as `.venv/bin/python bench/bench_uplink.py` (about 3-4 minutes; `--quick` for a smoke
test, `--sections`, `--events`, `--converge`, ... to scale). Everything runs in one
invocation against mosquitto processes started here on free 127.0.0.1 ports, so every
figure sits next to a baseline measured in the same run (absolute figures drift 20-30 %
between runs on this machine kind; the ratios are what count):

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

No timing assertions; delivery is checked (every event stored once by the collector, its
state equal to the agent's latest per stream, the daemon exits 0).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import msgpack
import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from agent.collector import Collector, CollectorStore
from agent.config import UplinkSection
from agent.fleet_auth import FleetAuth
from agent.resilience import Backoff, CircuitBreaker, Event
from agent.resync import FleetSync, Resync
from agent.store import EventStore, StoreConfig, connect, read_latest
from agent.uplink import FleetSubscriber, MqttTransport

THIS = str(Path(__file__).resolve())
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
RAM_DIR = Path("/dev/shm")  # tmpfs: where the collector's database goes when "in RAM"
BUFFER_BYTES = 4 * 2**30  # the store cap: large enough that eviction never runs here
CLK_TCK = os.sysconf("SC_CLK_TCK")
Positions = dict[str, tuple[int, int]]

# -- workload --------------------------------------------------------------------------------

_FAMILIES: tuple[str, ...] = ("engine", "coolant", "gnss", "battery", "brake", "door", "imu")


@dataclass(frozen=True, slots=True)
class Arrival:
    """What `EventStore.append` takes (the serial link's `Received` has the same shape)."""

    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


def stream_name(k: int) -> str:
    return f"ecu{k % 4}.{_FAMILIES[k % len(_FAMILIES)]}.{k:04d}"


def make_arrivals(first: int, n: int, streams: int, rng: random.Random) -> list[Arrival]:
    """Events `first`..`first + n - 1`, round-robin over `streams`, realistic payloads."""
    out = []
    for i in range(first, first + n):
        k = i % streams
        payload = msgpack.packb(
            {"v": round(rng.uniform(0.0, 500.0), 2), "n": rng.randrange(10_000), "ok": True}
        )
        event = Event(stream_name(k), i // streams + 1, ts=1.7e9 + i / 1000.0, kind="sample",
                      priority=k % 4, payload=payload)  # fmt: skip
        out.append(Arrival(event))
    return out


def build_store(path: Path, n: int, streams: int, seed: int = 1) -> tuple[float, Positions]:
    """A store holding `n` events; returns (seconds, latest position per stream).

    synchronous=OFF: this is a fixture, its durability is not what is measured.
    """
    rng = random.Random(seed)
    store = EventStore(
        path, StoreConfig(synchronous="OFF", min_free_bytes=0, max_buffer_bytes=BUFFER_BYTES)
    )
    t0 = time.perf_counter()
    for first in range(0, n, 20_000):
        store.append(make_arrivals(first, min(20_000, n - first), streams, rng))
    seconds = time.perf_counter() - t0
    assert store.event_count == n
    latest = {e.stream: e.position for e in store.latest()}
    store.close()
    return seconds, latest


def copy_store(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    """A `VmHWM:`-style line of /proc/<pid>/status, in KiB (0 once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def write_bytes(pid: int | str = "self") -> int:
    """Bytes this process caused to be written to storage so far (/proc/<pid>/io)."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def set_nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    """paho `on_socket_open`: disable Nagle's algorithm on this client's socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return int(proc.returncode)


class Broker:
    """mosquitto on a free 127.0.0.1 port, no persistence, its own config and log.

    `nodelay` sets `set_tcp_nodelay true` (mosquitto's default is false: Nagle's algorithm
    on every client socket).
    """

    def __init__(self, workdir: Path, *, nodelay: bool = False) -> None:
        self.workdir = workdir
        self.nodelay = nodelay
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    "persistence false",
                    "max_queued_messages 100000",
                    "log_dest stdout",
                    "log_type error",
                    "log_type warning",
                    f"set_tcp_nodelay {'true' if nodelay else 'false'}",
                ]
            )
            + "\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()}")
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not listen within 10 s")

    @property
    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


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


# -- the agent side, in this process -----------------------------------------------------------


class StampedTransport:
    """`MqttTransport` as FleetSync sees it, noting the first connect attempt and CONNACK."""

    def __init__(self, inner: MqttTransport) -> None:
        self.inner = inner
        self.attempt_at: float | None = None
        self.connected_at: float | None = None

    @property
    def connected(self) -> bool:
        return self.inner.connected

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def connect_error(self) -> str:
        return self.inner.connect_error

    def connect(self) -> bool:
        if self.attempt_at is None:
            self.attempt_at = time.monotonic()
        return self.inner.connect()

    def poll(self, timeout: float) -> list[tuple[str, object]]:
        events = self.inner.poll(timeout)
        if self.connected_at is None and any(kind == "connected" for kind, _ in events):
            self.connected_at = time.monotonic()
        return events

    def publish(self, kind: str, payload: bytes) -> int | None:
        return self.inner.publish(kind, payload)

    def publish_status(self, state: str, **fields: object) -> None:
        self.inner.publish_status(state, **fields)


class AgentLoop:
    """The agent's uplink exactly as the daemon wires it, stepped from this thread.

    Differences from the daemon: the checkpoint is written by `mark_delivered` inline on
    this thread (the daemon hands it to its writer thread), and no serial or writer thread
    competes for the interpreter.
    """

    def __init__(
        self, db: Path, vehicle: str, section: UplinkSection, *, nodelay: bool = False
    ) -> None:
        self.store = EventStore(db, StoreConfig(min_free_bytes=0, max_buffer_bytes=BUFFER_BYTES))
        self.top = int(self.store.conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0)
        self.reader = connect(db, readonly=True)
        self.resync = Resync(self.reader, vehicle, section, self._deliver)
        self.transport = MqttTransport(section, vehicle)
        if nodelay:
            self.transport.client.on_socket_open = set_nodelay
        self.stamped = StampedTransport(self.transport)
        self.breaker = CircuitBreaker(
            section.breaker_failure_threshold, section.breaker_recovery_timeout
        )
        self.sync = FleetSync(
            self.stamped,
            self.resync,
            self.breaker,
            Backoff(section.reconnect_min, section.reconnect_max),
            auth=FleetAuth(vehicle, None),  # the bench's collector does not sign (lab mode)
            ack_mode=section.ack_mode,
        )
        self.checkpoints = 0

    def _deliver(self, upto: int, positions: Positions) -> None:
        if self.store.mark_delivered(upto, positions):
            self.checkpoints += 1

    def latest(self) -> Positions:
        return {e.stream: e.position for _, e, _, _ in read_latest(self.reader)}

    @property
    def drained(self) -> bool:
        return self.store.cursor > self.top

    @property
    def connected_at(self) -> float | None:
        return self.stamped.connected_at

    def step(self) -> None:
        self.sync.run_once(time.monotonic())

    def run_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timed out: cursor={self.store.cursor} top={self.top} "
                    f"counters={self.resync.counters} breaker={self.breaker.state}"
                )
            self.step()

    def close(self) -> None:
        self.transport.close()
        self.reader.close()
        self.store.close()


def section_for(port: int, batch_events: int, **extra: Any) -> UplinkSection:
    return UplinkSection(port=port, batch_max_events=batch_events, reconnect_min=0.1,
                         reconnect_max=1.0, **extra)  # fmt: skip


# -- 1. drain throughput -----------------------------------------------------------------------


@dataclass
class Drain:
    label: str
    batch: int
    events: int
    seconds: float  # first connect attempt -> checkpoint past the last event persisted
    messages: int
    duplicates: int
    cpu_agent: float
    cpu_collector: float
    cpu_broker: float
    checkpoints: int
    written_agent: int = 0  # bytes written to storage while draining
    written_collector: int = 0
    profile: str = ""  # cProfile report, when asked for

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def drain_fleet(
    args: argparse.Namespace,
    broker: Broker,
    *,
    src: Path,
    expect: Positions,
    n: int,
    batch: int,
    work: Path,
    profile: bool = False,
    collector_in_ram: bool = False,
) -> Drain:
    """Drain a copy of `src` to a fresh collector process; check nothing was lost."""
    vehicle = f"tput-{work.name}"
    db = copy_store(src, work / "agent.db")
    nodelay = broker.nodelay
    db_dir = RAM_DIR if collector_in_ram else None
    coll = CollectorProcess(work, broker.port, vehicle, expect, n, profile=profile,
                            nodelay=nodelay, db_dir=db_dir)  # fmt: skip
    try:
        agent = AgentLoop(db, vehicle, section_for(broker.port, batch), nodelay=nodelay)
        prof = cProfile.Profile() if profile else None
        c_agent, c_coll, c_broker = time.process_time(), coll.cpu, broker.cpu
        w_agent = write_bytes()
        t0 = time.monotonic()
        if prof is not None:
            prof.enable()
        agent.run_until(lambda: agent.drained, args.timeout)
        if prof is not None:
            prof.disable()
        seconds = time.monotonic() - t0
        cpu = (time.process_time() - c_agent, coll.cpu - c_coll, broker.cpu - c_broker)
        w_agent = write_bytes() - w_agent
        latest = agent.latest()
        checkpoints = agent.checkpoints
        agent.close()
        result = coll.finish()
    finally:
        coll.kill()
    assert result.events_in_db == n, f"collector holds {result.events_in_db} of {n} events"
    assert result.stored == n, result
    assert result.bad_messages == 0, result
    assert result.state == latest == expect, "collector state differs from the agent's latest"
    report = ""
    if prof is not None:
        report = (
            profile_text(f"agent loop, {batch} per publish (cProfile, by own time)", prof, args)
            + f"--- collector process, {batch} per publish: message handling (cProfile) ---\n"
            + coll.profile_text(args.profile_top)
        )
    label = f"fleet ack, {batch}/publish" + (", NODELAY" if nodelay else "")
    label += ", coll. in RAM" if collector_in_ram else ""
    return Drain(label, batch, n, seconds, result.messages, result.duplicates, *cpu, checkpoints,
                 w_agent, result.written, report)  # fmt: skip


def drain_broker_ack(
    args: argparse.Namespace, broker: Broker, *, src: Path, n: int, batch: int, work: Path
) -> Drain:
    """Diagnostic: the same loop with ack_mode=broker (PUBACK is the ack); no collector."""
    vehicle = f"puback-{work.name}"
    db = copy_store(src, work / "agent.db")
    agent = AgentLoop(db, vehicle, section_for(broker.port, batch, ack_mode="broker"),
                      nodelay=broker.nodelay)  # fmt: skip
    c_agent, c_broker, w_agent = time.process_time(), broker.cpu, write_bytes()
    t0 = time.monotonic()
    agent.run_until(lambda: agent.drained, args.timeout)
    seconds = time.monotonic() - t0
    cpu_agent, cpu_broker = time.process_time() - c_agent, broker.cpu - c_broker
    w_agent = write_bytes() - w_agent
    sent = agent.resync.counters.batches_sent + agent.resync.counters.state_batches_sent
    checkpoints = agent.checkpoints
    agent.close()
    return Drain(f"PUBACK ack, {batch}/publish", batch, n, seconds, sent, 0, cpu_agent, 0.0,
                 cpu_broker, checkpoints, w_agent)  # fmt: skip


def drain_raw(
    args: argparse.Namespace, broker: Broker, *, src: Path, n: int, batch: int, work: Path
) -> Drain:
    """Baseline: a hand-written loop with the agent's durability but none of its logic.

    Reads `batch` rows by rowid (with the stream name), packs them with msgpack, publishes
    at QoS 1 with up to 8 in flight, and on each PUBACK of the oldest message persists the
    cursor in one synchronous=FULL transaction. No collector, no state batch, no per-stream
    checkpoints, no breaker.
    """
    db = copy_store(src, work / "agent.db")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS raw_cursor (k INTEGER PRIMARY KEY, upto INTEGER)")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{work.name}",
                         protocol=MQTTProtocolVersion.MQTTv311)  # fmt: skip
    client.max_inflight_messages_set(32)
    acked: set[int] = set()
    client.on_publish = lambda _c, _u, mid, _r, _p: acked.add(mid)
    topic = f"bench/raw/{work.name}"
    inflight: list[tuple[int, int]] = []  # (mid, upto rowid), oldest first
    sent_upto, cursor, messages = 0, 0, 0
    c_agent, c_broker, w_agent = time.process_time(), broker.cpu, write_bytes()
    t0 = time.monotonic()
    client.connect("127.0.0.1", broker.port, 30)
    while cursor < n:
        if time.monotonic() - t0 > args.timeout:
            raise RuntimeError("raw loop timed out")
        while len(inflight) < 8 and sent_upto < n:
            rows = conn.execute(
                """SELECT e.id, s.name, e.boot_epoch, e.seq, e.ts, e.ts_quality, e.kind,
                          e.priority, e.payload
                   FROM events AS e JOIN streams AS s ON s.id = e.stream_id
                   WHERE e.id > ? ORDER BY e.id LIMIT ?""",
                (sent_upto, batch),
            ).fetchall()
            body = msgpack.packb([list(r[1:]) for r in rows], use_bin_type=True)
            info = client.publish(topic, body, qos=1)
            assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            sent_upto = rows[-1][0]
            inflight.append((info.mid, sent_upto))
            messages += 1
        client.loop(0.05)
        upto = None
        while inflight and inflight[0][0] in acked:
            acked.discard(inflight[0][0])
            upto = inflight.pop(0)[1]
        if upto is not None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO raw_cursor VALUES (1, ?)", (upto,))
            conn.execute("COMMIT")
            cursor = upto
    seconds = time.monotonic() - t0
    cpu_agent, cpu_broker = time.process_time() - c_agent, broker.cpu - c_broker
    w_agent = write_bytes() - w_agent
    client.disconnect()
    client.loop(0.1)
    conn.close()
    return Drain(f"raw loop, {batch}/publish", batch, n, seconds, messages, 0, cpu_agent, 0.0,
                 cpu_broker, messages, w_agent)  # fmt: skip


def profile_text(title: str, prof: cProfile.Profile, args: argparse.Namespace) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile_top)
    return f"--- {title} ---\n{buf.getvalue()}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def print_drains(runs: list[Drain], base: Drain) -> None:
    print(f"{'path':<36} {'events':>7} {'seconds':>7} {'events/s':>8} {'msgs':>5} {'dup':>4} "
          f"{'CPU us/ev agent/coll/mosq':>25} {'disk B/ev agent/coll':>20} "
          f"{'vs 1/pub':>8}")  # fmt: skip
    for r in runs:
        us = [c / r.events * 1e6 for c in (r.cpu_agent, r.cpu_collector, r.cpu_broker)]
        cpu = " / ".join(f"{u:.0f}" if u else "-" for u in us)
        disk = " / ".join(
            f"{w / r.events:,.0f}" if w else "-" for w in (r.written_agent, r.written_collector)
        )
        vs = ratio(r.rate, base.rate)
        print(f"{r.label:<36} {r.events:>7,} {r.seconds:>7.2f} {r.rate:>8,.0f} {r.messages:>5,} "
              f"{r.duplicates:>4} {cpu:>25} {disk:>20} {vs:>8}")  # fmt: skip


def section_throughput(
    args: argparse.Namespace, broker: Broker, fast: Broker | None, tmp: Path
) -> None:
    print("== 1. Drain throughput: store -> mosquitto QoS 1 -> collector commit -> ack -> "
          "persisted checkpoint ==")  # fmt: skip
    print(f"collector: separate process (CollectorStore+Collector+FleetSubscriber, "
          f"synchronous=FULL, database on disk); agent: Resync+FleetSync+MqttTransport stepped "
          f"in this process, checkpoint by EventStore.mark_delivered (FULL) inline; "
          f"max_in_flight={UplinkSection().max_in_flight}, compress on; {args.streams:,} "
          f"interleaved streams; t=0 at the loop's first step, t=end when the checkpoint "
          f"past the last event is persisted")  # fmt: skip
    big, expect_big = load_fill(tmp, args.events, args.streams)
    one_src, expect_one = load_fill(tmp, args.single_events, args.streams)
    batches = [int(b) for b in args.batches.split(",")]
    runs: list[Drain] = []
    for batch in batches:
        runs.append(drain_fleet(args, broker, src=big, expect=expect_big, n=args.events,
                                batch=batch, work=tmp / f"t{batch}",
                                profile=args.profile and batch == 100))  # fmt: skip
    one = drain_fleet(args, broker, src=one_src, expect=expect_one, n=args.single_events,
                      batch=1, work=tmp / "t1")  # fmt: skip
    runs.append(one)
    print("as shipped (mosquitto and paho defaults: Nagle's algorithm on every socket):")
    print_drains(runs, one)
    print("  dup = events the collector already held: the state batch's, sent again in the "
          "backlog (by design); msgs = batches the collector received")  # fmt: skip
    for r in runs:
        if r.profile:
            print(r.profile)
    if args.no_diagnostics:
        print()
        return
    diag: list[Drain] = []
    if fast is not None:
        diag.append(drain_fleet(args, fast, src=one_src, expect=expect_one,
                                n=args.single_events, batch=1, work=tmp / "n1"))  # fmt: skip
        diag.append(drain_fleet(args, fast, src=big, expect=expect_big, n=args.events,
                                batch=100, work=tmp / "n100"))  # fmt: skip
    ram = drain_fleet(args, broker, src=big, expect=expect_big, n=args.events,
                      batch=batches[0], work=tmp / "m", collector_in_ram=True)  # fmt: skip
    puback = drain_broker_ack(args, broker, src=big, n=args.events, batch=100, work=tmp / "p100")
    raw = drain_raw(args, broker, src=big, n=args.events, batch=100, work=tmp / "r100")
    diag += [ram, puback, raw]
    print("diagnostics: NODELAY = mosquitto set_tcp_nodelay true + TCP_NODELAY on the agent's "
          "and the collector's paho sockets; coll. in RAM = the collector's database on "
          "tmpfs; PUBACK = ack_mode=broker, no collector; raw loop = sqlite3 -> msgpack -> "
          "paho QoS 1 -> PUBACK -> durable cursor, no agent code")  # fmt: skip
    print_drains(diag, one)
    first = runs[0]
    fleet100 = next((r for r in runs if r.batch == 100), first)
    print(f"ratios: agent PUBACK / raw loop {ratio(puback.rate, raw.rate)}; fleet ack / PUBACK "
          f"{ratio(fleet100.rate, puback.rate)} (both 100/publish); collector in RAM / on disk "
          f"{ratio(ram.rate, first.rate)} ({first.batch}/publish)")  # fmt: skip
    if fast is not None:
        print(f"        NODELAY / as shipped: 1/publish {ratio(diag[0].rate, one.rate)}, "
              f"100/publish {ratio(diag[1].rate, fleet100.rate)}")  # fmt: skip
    print("DESIGN reference (raw loop measured earlier): 242k events/s at 100/publish, 8.6k one "
          "per publish; targets >= 200k and >= 8k")  # fmt: skip
    print()


# -- 2. link restore -> converged fleet view ---------------------------------------------------


def converge(
    args: argparse.Namespace,
    broker: Broker,
    *,
    src: Path,
    expect: Positions,
    n: int,
    work: Path,
    full_drain: bool,
) -> dict[str, float]:
    vehicle = f"conv-{work.name}"
    db = copy_store(src, work / "agent.db")
    coll = CollectorProcess(work, broker.port, vehicle, expect, n, nodelay=broker.nodelay)
    try:
        agent = AgentLoop(db, vehicle, section_for(broker.port, 500), nodelay=broker.nodelay)
        time.sleep(0.2)  # agent built (store open), collector subscribed, link down
        t0 = time.monotonic()
        agent.run_until(lambda: agent.resync.counters.last_convergence_s >= 0, args.timeout)
        t_state_acked = time.monotonic()
        if full_drain:
            agent.run_until(lambda: agent.drained, args.timeout)
        else:
            agent.run_until(lambda: time.monotonic() - t_state_acked > 0.5, args.timeout)
        t_end = time.monotonic()
        connected_at = agent.connected_at or t0
        attempt_at = agent.stamped.attempt_at or t0
        latest = agent.latest()
        agent.close()
        result = coll.finish()
    finally:
        coll.kill()
    assert result.converged_at is not None, "the collector's state never converged"
    assert result.state == latest == expect
    assert result.state_messages >= 1
    out = {
        "attempt": attempt_at - t0,
        "connect": connected_at - t0,
        "first_rx": (result.first_rx or t0) - t0,
        "converged": result.converged_at - t0,
        "state_acked": t_state_acked - t0,
    }
    if full_drain:
        assert result.events_in_db == n, result
        assert result.complete_at is not None, result
        out["drain"] = t_end - t0
    return out


def load_fill(tmp: Path, n: int, streams: int) -> tuple[Path, Positions]:
    """The pre-filled store of `n` events (built on first use) and its latest positions."""
    src, meta = tmp / f"fill-{n}.db", tmp / f"fill-{n}.json"
    if not src.exists():
        seconds, expect = build_store(src, n, streams)
        meta.write_text(json.dumps(expect))
        print(f"(pre-filled {n:,} events in {seconds:.1f} s)")
    return src, {s: (e, q) for s, (e, q) in json.loads(meta.read_text()).items()}


def section_convergence(
    args: argparse.Namespace, broker: Broker, fast: Broker | None, tmp: Path
) -> None:
    sizes = [int(s) for s in args.converge.split(",")]
    print("== 2. Link restore -> converged fleet view ==")
    print("collector subscribed, agent built with the backlog in its store (open) but not "
          "connected; t=0 at the uplink loop's first step. attempt: first connect() call; "
          "connected: CONNACK processed; state rx: the first batch (the state) reached the "
          "collector's handler; converged: the collector process committed the batch "
          "after which every stream's latest position is in its state table; state acked: the "
          "agent has the collector's ack for it")  # fmt: skip
    results: list[tuple[str, int, dict[str, float]]] = []
    brokers = [("as shipped", broker)]
    if fast is not None and not args.no_diagnostics:
        brokers.append(("NODELAY", fast))
    for name, b in brokers:
        for n in sizes:
            src, expect = load_fill(tmp, n, args.streams)
            full = n == min(sizes) and b is broker
            r = converge(args, b, src=src, expect=expect, n=n, work=tmp / f"c{n}-{b.port}",
                         full_drain=full)  # fmt: skip
            results.append((name, n, r))
    print(f"{'sockets':<11} {'backlog':>10} {'attempt':>9} {'connected':>10} {'state rx':>9} "
          f"{'converged':>10} {'state acked':>12} {'full drain':>11} "
          f"{'drain/converged':>16}")  # fmt: skip
    for name, n, r in results:
        drain = f"{r['drain']:.2f} s" if "drain" in r else "-"
        dr = ratio(r["drain"], r["converged"]) if "drain" in r else "-"
        keys = ("attempt", "connect", "first_rx", "converged", "state_acked")
        ms = [f"{r[k] * 1000:.1f}ms" for k in keys]
        print(f"{name:<11} {n:>10,} {ms[0]:>9} {ms[1]:>10} {ms[2]:>9} {ms[3]:>10} {ms[4]:>12} "
              f"{drain:>11} {dr:>16}")  # fmt: skip
    for name, _ in brokers:
        rows = [(n, r) for nm, n, r in results if nm == name]
        (n0, r0), (n1, r1) = rows[0], rows[-1]
        if n1 != n0:
            grow = ratio(r1["converged"], r0["converged"])
            print(f"{name}: converged at {n1:,} / at {n0:,} = {grow} for a {n1 / n0:.0f}x "
                  f"backlog (target: <= 1 s, flat)")  # fmt: skip
    n0, first = next((n, r) for _, n, r in results if "drain" in r)
    print(f"full drain of the {n0:,} backlog: {first['drain']:.2f} s = "
          f"{n0 / first['drain']:,.0f} events/s (what a fleet view would wait for without the "
          f"state-first resync)")  # fmt: skip
    print()


# -- 3. the real daemon's memory during a 1M drain ---------------------------------------------


# Fresh interpreters importing more and more of what the agent imports (cumulative); the
# last one is the baseline: every agent module imported, nothing done.
IMPORT_LADDER: tuple[tuple[str, str], ...] = (
    ("-c pass (bare interpreter)", "pass"),
    ("+ sqlite3, msgpack", "import sqlite3, msgpack"),
    ("+ paho.mqtt.client (pulls in ssl)", "import sqlite3, msgpack, paho.mqtt.client"),
    ("+ sqlite_utils", "import sqlite3, msgpack, paho.mqtt.client, sqlite_utils"),
    ("+ prometheus_client",
     "import sqlite3, msgpack, paho.mqtt.client, sqlite_utils, prometheus_client"),
    ("importing the agent's modules only (baseline)",
     "import agent.daemon, agent.store, agent.resync, agent.uplink, agent.collector"),
)  # fmt: skip


def python_hwm(code: str) -> int:
    """VmHWM (KiB) of a fresh interpreter after running `code`."""
    probe = (
        f"{code}\nimport os\n"
        "print(next(l.split()[1] for l in open(f'/proc/{os.getpid()}/status') "
        "if l.startswith('VmHWM:')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1])


def agent_command() -> list[str]:
    exe = Path(sys.executable).parent / "ironfleet-agent"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.daemon"]


def read_cursor_ro(db: Path) -> int:
    try:
        conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True, timeout=1)
        try:
            row = conn.execute(
                "SELECT value FROM agent_state WHERE key = 'uplink.cursor'"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def section_rss(args: argparse.Namespace, broker: Broker, tmp: Path) -> None:
    n = max(int(s) for s in args.converge.split(","))
    print(f"== 3. Peak RSS of the ironfleet-agent process draining a {n:,}-event backlog ==")
    src, expect = load_fill(tmp, n, args.streams)
    work = tmp / "daemon"
    state_dir = work / "state"
    db = copy_store(src, state_dir / "agent.db")
    vehicle = "rss-vehicle"
    config = work / "agent.toml"
    config.write_text(
        f"""[agent]
state_dir = "{state_dir}"
vehicle_id = "{vehicle}"
log_level = "INFO"

[serial]
device = "{work / "no-such-tty"}"

[store]
max_buffer_bytes = {BUFFER_BYTES}
min_free_bytes = 0

[uplink]
port = {broker.port}
allow_unsigned = true
reconnect_min = 0.1
reconnect_max = 1.0
"""
    )
    ladder = [(what, python_hwm(code)) for what, code in IMPORT_LADDER]
    imports = ladder[-1][1]
    db_dir = None if args.rss_collector_on_disk else RAM_DIR
    coll = CollectorProcess(work, broker.port, vehicle, expect, n, db_dir=db_dir)
    log = work / "agent.log"
    samples: list[tuple[float, int, int, int]] = []  # (t, cursor, VmRSS, VmHWM)
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen([*agent_command(), "run", "--config", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            t0 = time.monotonic()
            c_coll, c_broker = coll.cpu, broker.cpu
            hwm = 0
            next_cursor = 0.0
            cursor = 0
            while cursor <= n:
                now = time.monotonic()
                if proc.poll() is not None:
                    raise RuntimeError(f"ironfleet-agent exited {proc.returncode}: "
                                       f"{log.read_text()[-3000:]}")  # fmt: skip
                if now - t0 > args.timeout:
                    raise RuntimeError(
                        f"drain timed out at cursor {cursor}: {log.read_text()[-3000:]}"
                    )
                hwm = max(hwm, proc_status_kib(proc.pid, "VmHWM"))
                if now >= next_cursor:
                    next_cursor = now + 0.25
                    cursor = read_cursor_ro(db)
                    samples.append((now - t0, cursor, proc_status_kib(proc.pid, "VmRSS"), hwm))
                time.sleep(0.02)
            drained = time.monotonic() - t0
            hwm = max(hwm, proc_status_kib(proc.pid, "VmHWM"))
            cpu_agent = cpu_seconds(proc.pid)
            written = write_bytes(proc.pid)
            cpu_coll, cpu_broker = coll.cpu - c_coll, broker.cpu - c_broker
        finally:
            code = stop_process(proc, timeout=20)
        result = coll.finish()
    finally:
        coll.kill()
    assert code == 0, f"ironfleet-agent exited {code}"
    assert result.events_in_db == n, result
    assert result.stored == n, result
    assert result.state == expect
    text = log.read_text()
    started = next((line for line in text.splitlines() if "agent_started" in line), "")
    first_delivery = next((t for t, c, _, _ in samples if c > 1), drained)
    print(f"agent: {' '.join(agent_command())} run (serial device absent; uplink only), "
          f"exit {code}; {started.split('logger=')[-1] if started else ''}")  # fmt: skip
    print(f"drained {n:,} events (checkpoint persisted past the last) in {drained:.1f} s from "
          f"exec, first checkpoint at {first_delivery:.1f} s: "
          f"{n / max(drained - first_delivery, 1e-9):,.0f} events/s; "
          f"CPU agent {cpu_agent:.1f} s, collector {cpu_coll:.1f} s, "
          f"broker {cpu_broker:.1f} s")  # fmt: skip
    where = "on disk" if db_dir is None else "on tmpfs (--rss-collector-on-disk to change)"
    print(f"  agent wrote {written / n:,.0f} B/event to disk over its life (checkpoints, "
          f"live state); collector database {where}")  # fmt: skip
    during = [(c, rss, h) for _, c, rss, h in samples if c > 1]
    print("VmRSS over the drain (share of the backlog acknowledged: MiB): " + "  ".join(
        f"{c / n:.0%}: {rss / 1024:.1f}" for c, rss, _ in thin(during, 8)))  # fmt: skip
    hwm_start = during[0][2] if during else hwm
    print(f"{'process':<56} {'VmHWM MiB':>10} {'vs imports-only':>16}")
    rows = [
        (f"ironfleet-agent, start + {n:,} drain (whole life)", hwm),
        ("ironfleet-agent at its first checkpoint (start-up)", hwm_start),
        *[(f"python {what}", kib) for what, kib in ladder],
        ("collector process (for scale)", result.hwm_kib),
    ]
    for what, kib in rows:
        print(f"{what:<56} {kib / 1024:>10.1f} {ratio(kib, imports):>16}")
    print(f"agent peak over imports-only: {(hwm - imports) / 1024:.1f} MiB; growth during the "
          f"drain: {(hwm - hwm_start) / 1024:.1f} MiB; target <= 64 MiB total (DESIGN reference: "
          f"interpreter + sqlite3 ~ 15 MiB)")  # fmt: skip
    print()


def thin(items: list[Any], k: int) -> Iterator[Any]:
    if len(items) <= k:
        yield from items
        return
    step = (len(items) - 1) / (k - 1)
    for i in range(k):
        yield items[round(i * step)]


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
    parser.add_argument("--sections", default="1,2,3")
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
