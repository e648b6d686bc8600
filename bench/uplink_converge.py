"""bench_uplink.py section 2: link restore -> converged fleet view."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from uplink_agent import AgentLoop, section_for
from uplink_collector import CollectorProcess
from uplink_common import Broker, Positions, copy_store, load_fill, ratio

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
