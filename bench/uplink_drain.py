"""bench_uplink.py section 1: drain throughput."""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from uplink_agent import AgentLoop, section_for
from uplink_collector import CollectorProcess
from uplink_common import RAM_DIR, Broker, Positions, copy_store, load_fill, ratio, write_bytes

from agent.config import UplinkSection

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
    args: argparse.Namespace,
    broker: Broker,
    *,
    src: Path,
    n: int,
    batch: int,
    work: Path,
    codec: str = "zlib",
) -> Drain:
    """Diagnostic: the same loop with ack_mode=broker (PUBACK is the ack); no collector.
    `codec` raw encodes as the raw loop does (msgpack, no compression)."""
    vehicle = f"puback-{work.name}"
    db = copy_store(src, work / "agent.db")
    section = section_for(broker.port, batch, ack_mode="broker", codec=codec)
    agent = AgentLoop(db, vehicle, section, nodelay=broker.nodelay)
    c_agent, c_broker, w_agent = time.process_time(), broker.cpu, write_bytes()
    t0 = time.monotonic()
    agent.run_until(lambda: agent.drained, args.timeout)
    seconds = time.monotonic() - t0
    cpu_agent, cpu_broker = time.process_time() - c_agent, broker.cpu - c_broker
    w_agent = write_bytes() - w_agent
    sent = agent.resync.counters.batches_sent + agent.resync.counters.state_batches_sent
    checkpoints = agent.checkpoints
    agent.close()
    label = f"PUBACK ack, {batch}/publish" + (f", codec {codec}" if codec != "zlib" else "")
    return Drain(label, batch, n, seconds, sent, 0, cpu_agent, 0.0, cpu_broker, checkpoints,
                 w_agent)  # fmt: skip


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
    plain = drain_broker_ack(args, broker, src=big, n=args.events, batch=100,
                             work=tmp / "p100raw", codec="raw")  # fmt: skip
    raw = drain_raw(args, broker, src=big, n=args.events, batch=100, work=tmp / "r100")
    diag += [ram, puback, plain, raw]
    print("diagnostics: NODELAY = mosquitto set_tcp_nodelay true + TCP_NODELAY on the agent's "
          "and the collector's paho sockets; coll. in RAM = the collector's database on "
          "tmpfs; PUBACK = ack_mode=broker, no collector; raw loop = sqlite3 -> msgpack -> "
          "paho QoS 1 -> PUBACK -> durable cursor, no agent code")  # fmt: skip
    print_drains(diag, one)
    first = runs[0]
    fleet100 = next((r for r in runs if r.batch == 100), first)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"ratios: agent PUBACK / raw loop {ratio(puback.rate, raw.rate)} (zlib), "
          f"{ratio(plain.rate, raw.rate)} (codec raw: msgpack only, as the raw loop); "
          f"fleet ack / PUBACK "
          f"{ratio(fleet100.rate, puback.rate)} (both 100/publish); collector in RAM / on disk "
          f"{ratio(ram.rate, first.rate)} ({first.batch}/publish)")  # fmt: skip
    if fast is not None:
        print(f"        NODELAY / as shipped: 1/publish {ratio(diag[0].rate, one.rate)}, "
              f"100/publish {ratio(diag[1].rate, fleet100.rate)}")  # fmt: skip
    print("DESIGN reference (raw loop measured earlier): 242k events/s at 100/publish, 8.6k one "
          "per publish; targets >= 200k and >= 8k")  # fmt: skip
    print()
