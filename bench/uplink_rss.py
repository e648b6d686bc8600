"""bench_uplink.py section 3: peak RSS of the real agent process during a drain."""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchprocs import stop_process
from uplink_collector import CollectorProcess
from uplink_common import (
    BUFFER_BYTES,
    RAM_DIR,
    Broker,
    copy_store,
    cpu_seconds,
    load_fill,
    proc_status_kib,
    ratio,
    write_bytes,
)

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
     "import agent.daemon, agent.store, agent.resync, agent.uplink, fleet.collector"),
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
