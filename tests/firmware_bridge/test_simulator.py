"""The bridge end to end over real pseudo-terminals: `ironfleet-sim` against the agent side."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import click
import psutil

from firmware_bridge.protocol import MAX_ENCODED_FRAME_BYTES
from firmware_bridge.simulator import cli

from simharness import AgentSide, Sim
from support import SIM, open_fds, wait_for

StartSim = Callable[..., Sim]
MakeSide = Callable[..., AgentSide]


def check_delivery(sim: Sim, side: AgentSide) -> tuple[int, int]:
    """Every ACKed event stored, byte-equal; nothing stored that was never sent."""
    sent = sim.keys("sent")
    acked = sim.keys("acked")
    stored = {k: v.hex() for k, v in side.stored.items()}
    missing = [k for k in acked if k not in stored]
    assert not missing, f"{len(missing)} ACKed events not stored, e.g. {missing[:3]}"
    false_accepts = [k for k, v in stored.items() if sent.get(k) != v]
    assert not false_accepts, f"stored events that were never sent as such: {false_accepts[:3]}"
    assert side.duplicates == 0
    return len(acked), len(stored)


def test_bit_errors_1e4_over_50k_frames(start_sim: StartSim, agent_side: MakeSide) -> None:
    sim = start_sim("--events", "50000", "--rate", "25000", "--streams", "8", "--ber", "1e-4")
    side = agent_side(sim.devices["ecu0"])
    assert sim.wait(timeout=150) == 0
    summary = sim.summary()
    side.stop()
    acked, stored = check_delivery(sim, side)
    assert summary["sent"] == 50_000
    assert acked == 50_000  # with retransmission, everything arrives
    assert stored == 50_000
    corruptions = summary["faults"]["corruption_events"]
    assert corruptions > 500
    frames_lost = summary["frames_sent"] - side.link.decoder.accepted
    ratio = frames_lost / corruptions
    print(f"corruption events {corruptions}, frames lost {frames_lost}, ratio {ratio:.3f}")
    assert 0.95 <= ratio <= 1.15  # about one frame per corruption event
    rejects = side.link.decoder.rejects
    assert rejects["msgpack"] == rejects["schema"] == 0  # CRC caught everything first


def test_garbage_drops_inserts_truncation(start_sim: StartSim, agent_side: MakeSide) -> None:
    sim = start_sim(
        "--events", "8000", "--rate", "4000", "--garbage-every", "0.2",
        "--drop-rate", "2e-4", "--insert-rate", "2e-4", "--truncate-rate", "0.01",
    )  # fmt: skip
    side = agent_side(sim.devices["ecu0"])
    assert sim.wait(timeout=60) == 0
    side.stop()
    faults = sim.summary()["faults"]
    assert min(faults["garbage_bytes"], faults["bytes_dropped"], faults["frames_truncated"]) > 0
    assert check_delivery(sim, side) == (8000, 8000)


def test_unplug_replug_under_new_names(
    start_sim: StartSim, agent_side: MakeSide, tmp_path: Path
) -> None:
    sim = start_sim(
        "--events", "4000", "--rate", "800", "--unplug-every", "0.8", "--unplug-for", "0.3",
        "--replug-rename", "--link-name", "ttyIF{index}-{gen}",
    )  # fmt: skip
    fds_before = open_fds()
    side = agent_side(str(tmp_path / "dev" / "ttyIF0-*"))
    assert sim.wait(timeout=60) == 0
    side.stop()
    summary = sim.summary()
    assert summary["unplugs"] >= 3
    assert side.port.reconnects >= 3
    assert check_delivery(sim, side) == (4000, 4000)
    assert open_fds() <= fds_before  # every lost port was closed


def test_controller_reboot_is_not_mistaken_for_duplicates(
    start_sim: StartSim, agent_side: MakeSide
) -> None:
    sim = start_sim("--events", "3000", "--rate", "1000", "--streams", "2")
    side = agent_side(sim.devices["ecu0"])
    wait_for(lambda: len(side.stored) >= 1000, 30, "1000 events before the reboot")
    sim.signal(signal.SIGUSR1)
    assert sim.wait(timeout=60) == 0
    side.stop()
    check_delivery(sim, side)
    after = {k for k in sim.keys("sent") if k[1] == 2}
    assert ("ecu0/s000", 2, 1) in after  # sequences restarted
    assert after <= set(side.stored)  # every new-epoch event stored, none taken for a dup
    assert side.link.counters["controller_reboots"] == 1


def test_truncation_then_silence_brings_the_link_down(
    start_sim: StartSim, agent_side: MakeSide
) -> None:
    sim = start_sim("--rate", "500", "--silence-after", "300", "--truncate-rate", "0.05")
    side = agent_side(sim.devices["ecu0"], heartbeat=0.1)
    wait_for(lambda: side.link.counters["link_downs"] >= 1, 30, "the link to go down")
    assert side.link.state == "down"
    assert side.link.decoder.buffered <= MAX_ENCODED_FRAME_BYTES
    sim.signal(signal.SIGTERM)
    assert sim.wait(timeout=10) == 0
    side.stop()
    check_delivery(sim, side)


def test_flood_of_10_mb_random_bytes_is_bounded(start_sim: StartSim, agent_side: MakeSide) -> None:
    sim = start_sim("--flood-bytes", "10000000", "--events", "2000", "--rate", "1000")
    rss_before = psutil.Process().memory_info().rss
    side = agent_side(sim.devices["ecu0"])
    assert sim.wait(timeout=120) == 0
    side.stop()
    assert sim.summary()["faults"]["garbage_bytes"] == 10_000_000
    assert side.max_buffered <= MAX_ENCODED_FRAME_BYTES
    assert side.link.decoder.rejected > 10_000
    growth = psutil.Process().memory_info().rss - rss_before
    assert growth < 32 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB"
    assert check_delivery(sim, side) == (2000, 2000)


def test_help_documents_every_option() -> None:
    out = subprocess.run([SIM, "--help"], capture_output=True, text=True, check=True).stdout
    for param in cli.params:
        assert isinstance(param, click.Option)
        for option in param.opts:
            assert option in out, option
        assert param.help, f"{param.opts} has no help text"
