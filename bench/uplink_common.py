"""Shared by the bench_uplink.py parts: constants, the workload, processes, mosquitto."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from benchprocs import stop_process

from agent.resilience import Event
from agent.store import EventStore, StoreSection

# The entry script: the collector child runs as `python bench_uplink.py _collector ...`.
THIS = str(Path(__file__).resolve().with_name("bench_uplink.py"))
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
        path, StoreSection(synchronous="OFF", min_free_bytes=0, max_buffer_bytes=BUFFER_BYTES)
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


def load_fill(tmp: Path, n: int, streams: int) -> tuple[Path, Positions]:
    """The pre-filled store of `n` events (built on first use) and its latest positions."""
    src, meta = tmp / f"fill-{n}.db", tmp / f"fill-{n}.json"
    if not src.exists():
        seconds, expect = build_store(src, n, streams)
        meta.write_text(json.dumps(expect))
        print(f"(pre-filled {n:,} events in {seconds:.1f} s)")
    return src, {s: (e, q) for s, (e, q) in json.loads(meta.read_text()).items()}


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


# -- reporting -------------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"
