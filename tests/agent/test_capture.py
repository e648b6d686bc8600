"""Wire capture and replay (firmware_bridge/capture.py, replay.py; [serial] capture): a
field trace becomes a reproducible test. The capture format is read totally; a capture
taken under serial faults replays into a fresh agent and yields the same stored events."""

from __future__ import annotations

import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from firmware_bridge.capture import (
    FROM_CONTROLLER,
    HEADER,
    TO_CONTROLLER,
    CaptureError,
    CaptureWriter,
    capture_files,
    read_records,
)

from simharness import AgentProcess, Sim, TruthReader, assert_zero_loss, stored_events
from support import wait_for

StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]


def test_records_round_trip_and_rotate_within_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "ttyIF0.ifcap"
    writer = CaptureWriter(path, max_bytes=2**16)  # rotates at 32 KiB
    sent = [(float(i), i % 2, bytes([i % 251]) * 1000) for i in range(100)]
    for at, direction, data in sent:
        writer.record(at, direction, data)
    writer.close()
    files = capture_files(path)
    assert [p.name for p in files] == ["ttyIF0.ifcap.1", "ttyIF0.ifcap"]
    assert sum(p.stat().st_size for p in files) <= 2**16
    got = [(r.at, r.direction, r.data) for p in files for r in read_records(p)]
    assert got == sent[-len(got) :]  # the newest, in order; the oldest rotated away
    assert len(got) * 1013 >= 2**15  # at least the last half of the cap is kept


def test_a_record_cut_by_a_kill_ends_the_capture_and_garbage_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.ifcap"
    writer = CaptureWriter(path, max_bytes=2**20)
    writer.record(1.0, FROM_CONTROLLER, b"abc")
    writer.record(2.0, TO_CONTROLLER, b"defg")
    writer.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-2])  # the last record half written
    assert [r.data for r in read_records(path)] == [b"abc"]
    path.write_bytes(whole + struct.pack(">dBI", 3.0, 7, 1) + b"x")
    with pytest.raises(CaptureError, match="bad record at byte"):
        list(read_records(path))
    path.write_bytes(b"not a capture")
    with pytest.raises(CaptureError, match="not an IronFleet capture"):
        list(read_records(path))
    assert HEADER.startswith(b"IFCAP")


def test_a_capture_under_serial_faults_replays_to_the_same_store(
    start_sim: StartSim, start_agent: StartAgent
) -> None:
    faults = ("--ber", "1e-5", "--garbage-every", "0.5", "--truncate-rate", "0.01")
    sim = start_sim("--events", "3000", "--rate", "1500", "--streams", "6", *faults)
    first = start_agent(sim.devices["ecu0"], serial={"capture": True}).start()
    assert sim.wait(timeout=90) == 0
    assert first.terminate() == 0
    assert_zero_loss(TruthReader(sim.truth_path), first.db, complete=True)
    log = first.log.read_text()
    assert "capture_on path=" in log
    assert "capture_off" in log
    captures = sorted((first.workdir / "state" / "capture").glob("*.ifcap*"))
    assert captures, "no capture written"
    files = capture_files(next(p for p in captures if p.suffix == ".ifcap"))
    assert any(r.direction == TO_CONTROLLER for r in read_records(files[-1]))  # both ways

    player = start_sim(*[a for f in files for a in ("--replay", str(f))], "--replay-fast")
    second = start_agent(player.devices["replay"]).start()
    assert player.wait(timeout=90) == 0
    assert second.terminate() == 0
    original = stored_events(first.db)
    assert len(original) == 3000
    assert stored_events(second.db) == original


def test_sighup_turns_the_capture_on_and_off(start_sim: StartSim, start_agent: StartAgent) -> None:
    sim = start_sim("--rate", "200")
    agent = start_agent(sim.devices["ecu0"]).start()
    wait_for(agent.started, 20, "start")
    assert agent.proc is not None
    text = agent.config.read_text()
    agent.config.write_text(text.replace("[serial]", "[serial]\ncapture = true"))
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: b"capture_on path=" in agent.log.read_bytes(), 10, "capture on")
    path = next((agent.workdir / "state" / "capture").glob("*.ifcap"))
    wait_for(lambda: path.stat().st_size > len(HEADER), 10, "captured bytes flushed")
    agent.config.write_text(text)
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: b"capture_off" in agent.log.read_bytes(), 10, "capture off")
    assert b"reload_needs_restart" not in agent.log.read_bytes()
    size = path.stat().st_size
    assert any(r.direction == FROM_CONTROLLER for r in read_records(path))
    assert agent.terminate() == 0
    assert path.stat().st_size == size  # nothing written after it was turned off
