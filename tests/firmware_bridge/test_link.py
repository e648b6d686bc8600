"""Agent link state machine, stepped with a fake clock against the real controller side."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import select
import time
import tracemalloc
from pathlib import Path

import pytest

from agent.resilience import Backoff
from firmware_bridge.controller import ControllerLink
from firmware_bridge.faults import LineNoise
from firmware_bridge.frames import FrameDecoder, encode
from firmware_bridge.link import (
    RX_WINDOW,
    SESSION_LOG_INTERVAL,
    AgentLink,
    LinkState,
    Received,
)
from firmware_bridge.protocol import (
    MAX_WINDOW,
    Ack,
    EventBody,
    Frame,
    Heartbeat,
    Hello,
    Nack,
    TimeQuality,
)
from firmware_bridge.serial_port import PortState, SerialPort

from simharness import AgentProcess
from support import wait_for

EPOCH = 4


def body(seq: int, stream: str = "ecu0/s000") -> EventBody:
    return EventBody(stream, seq, 100.0 + seq, TimeQuality.SYNCED, "telemetry", 1, {"v": seq})


def wire_event(link_seq: int, seq: int | None = None, epoch: int = EPOCH) -> bytes:
    return encode(Frame(epoch, link_seq, body(seq if seq is not None else link_seq)))


def hello(base: int = 1, epoch: int = EPOCH) -> bytes:
    return encode(Frame(epoch, base, Hello("ecu0", "fw-1")))


def sent_frames(agent: AgentLink) -> list[Frame]:
    return FrameDecoder().feed(agent.outgoing())


def acks(agent: AgentLink) -> list[Ack]:
    return [f.body for f in sent_frames(agent) if isinstance(f.body, Ack)]


def up_agent() -> AgentLink:
    agent = AgentLink(session=77)
    agent.start(0.0)
    agent.receive(hello(), 0.0)
    agent.outgoing()
    return agent


def test_start_sends_hello_and_hello_brings_link_up() -> None:
    agent = AgentLink(session=77)
    agent.start(0.0)
    frames = sent_frames(agent)
    assert [type(f.body) for f in frames] == [Hello]
    assert frames[0].session == 77
    assert agent.state is LinkState.DOWN
    agent.receive(hello(base=1), 0.1)
    assert agent.state is LinkState.UP
    assert agent.boot_epoch == EPOCH
    assert agent.controller_id == "ecu0"
    assert acks(agent) == [Ack(EPOCH, 0)]


def test_ack_only_after_durable() -> None:
    agent = up_agent()
    got = agent.receive(wire_event(1) + wire_event(2), 1.0)
    assert [r.event.seq for r in got] == [1, 2]
    assert got[0].event.boot_epoch == EPOCH
    assert got[0].token == (EPOCH, 1)
    assert acks(agent) == []  # received is not durable: nothing acknowledged yet
    agent.durable([got[0].token], 1.0)
    assert acks(agent) == [Ack(EPOCH, 1)]
    agent.durable([got[1].token], 1.0)
    assert acks(agent) == [Ack(EPOCH, 2)]


def test_selective_ack_above_a_gap_and_nack_of_the_gap() -> None:
    agent = up_agent()
    got = agent.receive(wire_event(1) + wire_event(3) + wire_event(4), 1.0)
    nacks = [f.body for f in sent_frames(agent) if isinstance(f.body, Nack)]
    assert nacks == [Nack(EPOCH, ((2, 2),))]
    agent.durable([r.token for r in got], 1.0)
    assert acks(agent) == [Ack(EPOCH, 1, ((3, 4),))]
    assert agent.missing() == [2]
    filled = agent.receive(wire_event(2), 1.1)
    agent.durable([r.token for r in filled], 1.1)
    assert acks(agent) == [Ack(EPOCH, 4)]
    assert agent.counters["gaps"] == 1


def test_retransmit_of_durable_frame_is_reacked_not_returned() -> None:
    agent = up_agent()
    got = agent.receive(wire_event(1), 1.0)
    agent.durable([got[0].token], 1.0)
    agent.outgoing()
    assert agent.receive(wire_event(1), 2.0) == []
    assert acks(agent) == [Ack(EPOCH, 1)]
    assert agent.counters["retransmits_reacked"] == 1


def test_retransmit_of_pending_frame_is_ignored() -> None:
    agent = up_agent()
    agent.receive(wire_event(1), 1.0)
    assert agent.receive(wire_event(1), 1.2) == []
    assert acks(agent) == []
    assert agent.counters["retransmits_pending"] == 1


def test_corrupt_frame_nacks_the_next_expected() -> None:
    agent = up_agent()
    got = agent.receive(wire_event(1), 1.0)
    agent.durable([got[0].token], 1.0)
    agent.outgoing()
    damaged = bytearray(wire_event(2))
    damaged[5] ^= 0x10
    assert agent.receive(bytes(damaged), 1.1) == []
    nacks = [f.body for f in sent_frames(agent) if isinstance(f.body, Nack)]
    assert nacks == [Nack(EPOCH, ((2, 2),))]
    assert agent.decoder.rejected == 1


def test_heartbeat_reveals_lost_tail() -> None:
    agent = up_agent()
    agent.receive(wire_event(1), 1.0)
    agent.outgoing()
    agent.receive(encode(Frame(EPOCH, 4, Heartbeat())), 1.5)  # controller sent up to 3
    nacks = [f.body for f in sent_frames(agent) if isinstance(f.body, Nack)]
    assert nacks == [Nack(EPOCH, ((2, 3),))]


def test_foreign_session_is_dropped_and_hello_requested() -> None:
    agent = up_agent()
    assert agent.receive(wire_event(1, epoch=EPOCH + 9), 1.0) == []
    assert agent.counters["foreign_session"] == 1
    assert any(isinstance(f.body, Hello) for f in sent_frames(agent))


def test_events_before_any_hello_are_not_accepted() -> None:
    agent = AgentLink(session=1)
    assert agent.receive(wire_event(1), 0.0) == []
    assert agent.counters["foreign_session"] == 1


def test_controller_reboot_restarts_sequences_without_false_duplicates() -> None:
    agent = up_agent()
    first = agent.receive(wire_event(1, seq=1) + wire_event(2, seq=2), 1.0)
    agent.durable([r.token for r in first], 1.0)
    agent.receive(hello(base=1, epoch=EPOCH + 1), 2.0)
    again = agent.receive(wire_event(1, seq=1, epoch=EPOCH + 1), 2.1)
    assert [(r.event.boot_epoch, r.event.seq) for r in again] == [(EPOCH + 1, 1)]
    assert agent.counters["controller_reboots"] == 1
    # A late durability report of the old session must not ACK the new one's link_seq 1.
    agent.outgoing()
    agent.durable([(EPOCH, 1)], 2.2)
    assert all(a.cumulative == 0 for a in acks(agent))


def test_same_session_hello_after_agent_hello_keeps_state() -> None:
    agent = up_agent()
    got = agent.receive(wire_event(1) + wire_event(2), 1.0)
    agent.durable([r.token for r in got], 1.0)
    agent.outgoing()
    agent.receive(hello(base=2), 1.5)  # controller never got our ACK of 2
    assert acks(agent) == [Ack(EPOCH, 2)]
    assert agent.receive(wire_event(2), 1.6) == []  # re-ACKed, not stored twice


def test_same_session_hello_past_a_selective_ack_settles_it() -> None:
    """A HELLO whose base passes a selectively ACKed frame: the next ACK is still valid
    (the selective entry used to stay, and every later ACK was refused by the encoder)."""
    agent = up_agent()
    got = agent.receive(wire_event(1) + wire_event(3), 1.0)
    agent.durable([r.token for r in got if r.token[1] == 3], 1.1)
    agent.outgoing()
    agent.receive(hello(base=5), 1.2)  # the controller settled 1..4 (e.g. lost its ring)
    assert acks(agent) == [Ack(EPOCH, 4)]
    assert agent.receive(wire_event(5), 1.3) != []
    agent.durable([(EPOCH, 5)], 1.4)
    assert acks(agent) == [Ack(EPOCH, 5)]


def test_link_down_after_missed_heartbeats_and_back_up() -> None:
    agent = AgentLink(session=1, heartbeat_interval=1.0, missed_heartbeats=3)
    agent.receive(hello(), 0.0)
    agent.poll(2.9)
    assert agent.state is LinkState.UP
    agent.poll(3.0)
    assert agent.state is LinkState.DOWN
    assert agent.counters["link_downs"] == 1
    agent.outgoing()
    agent.poll(4.0)
    assert any(isinstance(f.body, Hello) for f in sent_frames(agent))  # asks while down
    agent.receive(encode(Frame(EPOCH, 1, Heartbeat())), 4.5)
    assert agent.state is LinkState.UP


def test_heartbeats_sent_when_idle() -> None:
    agent = up_agent()
    agent.poll(0.5)  # (repeats the handshake ACK: any frame counts as our heartbeat)
    assert not any(isinstance(f.body, Heartbeat) for f in sent_frames(agent))
    agent.poll(1.49)
    assert not any(isinstance(f.body, Heartbeat) for f in sent_frames(agent))
    agent.poll(1.5)
    assert any(isinstance(f.body, Heartbeat) for f in sent_frames(agent))


def test_ack_repeated_once_when_nothing_follows() -> None:
    agent = up_agent()
    got = agent.receive(wire_event(1), 1.0)
    agent.durable([got[0].token], 1.0)
    assert acks(agent) == [Ack(EPOCH, 1)]
    agent.poll(1.0 + agent.ack_repeat / 2)
    assert acks(agent) == []
    agent.poll(1.0 + agent.ack_repeat)
    assert acks(agent) == [Ack(EPOCH, 1)]
    agent.poll(1.0 + 3 * agent.ack_repeat)
    assert acks(agent) == []  # once only


def test_frames_beyond_the_window_are_dropped() -> None:
    agent = up_agent()
    assert agent.receive(wire_event(RX_WINDOW + 1), 1.0) == []
    assert agent.counters["outside_window"] == 1
    assert len(agent.receive(wire_event(RX_WINDOW), 1.0)) == 1


# -- the whole link over a lossy channel, deterministic -----------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_lossy_channel_delivers_everything_and_acks_only_durable(seed: int) -> None:
    rng = random.Random(seed)
    noise_up = LineNoise(ber=1e-3, drop_rate=1e-4, insert_rate=1e-4, rng=random.Random(seed))
    noise_down = LineNoise(ber=1e-3, rng=random.Random(seed + 100))
    durable: dict[tuple[str, int, int], bytes] = {}
    violations: list[str] = []

    def on_ack(b: EventBody, _now: float) -> None:
        if (b.stream, EPOCH, b.seq) not in durable:
            violations.append(f"ACK before durable: {b.stream} {b.seq}")

    ctl = ControllerLink("ecu0", "fw", EPOCH, window=32, on_ack=on_ack)
    agent = AgentLink(session=9)
    agent.start(0.0)
    total, offered, now = 3000, 0, 0.0
    pending: list[Received] = []
    for _ in range(200_000):
        if ctl.acked == total:
            break
        now += 0.001
        while offered < total and ctl.offer(body(offered + 1, f"s{offered % 3}")):
            offered += 1
        ctl.poll(now)
        wire = ctl.outgoing()
        chunks = wire.split(b"\x00")[:-1]
        damaged = b"".join(noise_up.apply_frame(c + b"\x00") for c in chunks)
        pending += agent.receive(damaged, now)
        if rng.random() < 0.5:  # commit in irregular groups, like the store's group commit
            for r in pending:
                key = (r.event.stream, r.event.boot_epoch, r.event.seq)
                assert key not in durable, f"duplicate handed up: {key}"
                durable[key] = r.event.payload
            agent.durable([r.token for r in pending], now)
            pending = []
        agent.poll(now)
        back = agent.outgoing().split(b"\x00")[:-1]
        ctl.receive(b"".join(noise_down.apply_frame(c + b"\x00") for c in back), now)
    assert not violations
    assert ctl.acked == total
    assert len(durable) == total
    assert noise_up.counts.corruption_events > 50  # the faults really happened
    assert agent.decoder.accepted > 0


def test_stale_ack_from_before_a_reboot_frees_nothing() -> None:
    acked: list[int] = []
    ctl = ControllerLink("ecu0", "fw", EPOCH + 1, on_ack=lambda b, _t: acked.append(b.seq))
    for seq in range(1, 6):
        ctl.offer(body(seq))
    ctl.receive(encode(Frame(77, 1, Ack(EPOCH, 10))), 0.0)  # in flight across the reboot
    assert acked == []
    assert len(ctl.ring) == 5
    assert ctl.stale_acks == 1
    ctl.receive(encode(Frame(77, 1, Ack(EPOCH + 1, 2))), 0.1)
    assert acked == [1, 2]


def test_controller_window_is_capped() -> None:
    ControllerLink("ecu0", "fw", 1, window=MAX_WINDOW)
    with pytest.raises(ValueError, match="window"):
        ControllerLink("ecu0", "fw", 1, window=MAX_WINDOW + 1)


# -- HELLO floods (issue 12, finding 6) ----------------------------------------------------

FLOOD = 20_000
LINK_LOGGER = "firmware_bridge.link"


def session_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LINK_LOGGER and "controller_session_changed" in r.getMessage()
    ]


def changes_reported(lines: list[str]) -> int:
    return sum(int(re.search(r"changes=(\d+)", line).group(1)) for line in lines)  # type: ignore[union-attr]


def test_hello_flood_costs_bounded_log_lines_and_memory(caplog: pytest.LogCaptureFixture) -> None:
    """20k controller reboots in 100 s (fake clock): one line per minute, every change
    counted, the link's memory flat, and it still ACKs after the flood."""
    caplog.set_level(logging.DEBUG, LINK_LOGGER)
    agent = up_agent()
    now = 0.0

    def flood(epochs: range) -> None:
        nonlocal now
        for epoch in epochs:
            now += 0.005
            agent.receive(hello(epoch=epoch), now)
            agent.poll(now)
            agent.outgoing()

    flood(range(EPOCH + 1, EPOCH + 1 + FLOOD - 2000))
    # Only what the link's own code holds (log records kept by caplog are not the link's).
    mine = [tracemalloc.Filter(True, "*/firmware_bridge/*")]
    tracemalloc.start()  # (slow: only over the last 2,000 sessions)
    try:
        before = tracemalloc.take_snapshot().filter_traces(mine)
        flood(range(EPOCH + 1 + FLOOD - 2000, EPOCH + 1 + FLOOD))
        after = tracemalloc.take_snapshot().filter_traces(mine)
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 16 * 1024, f"the link grew by {grown} bytes over 2,000 sessions"
    agent.poll(now + SESSION_LOG_INTERVAL)  # the held count is reported after the interval
    lines = session_lines(caplog)
    assert 1 <= len(lines) <= 2 + now // SESSION_LOG_INTERVAL
    assert changes_reported(lines) == FLOOD == agent.counters["controller_reboots"]
    assert "more in the last 60 s" in lines[-1]
    last = EPOCH + FLOOD
    got = agent.receive(wire_event(1, epoch=last), now + 61)
    agent.durable([r.token for r in got], now + 61)
    assert acks(agent) == [Ack(last, 1)]


def test_session_change_after_a_quiet_interval_logs_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LINK_LOGGER)
    agent = up_agent()
    agent.receive(hello(epoch=EPOCH + 1), 1.0)
    agent.receive(hello(epoch=EPOCH + 2), 1.0 + SESSION_LOG_INTERVAL)
    lines = session_lines(caplog)
    assert len(lines) == 2
    assert "more in the last" not in lines[1]
    assert f"new_epoch={EPOCH + 2}" in lines[1]


def pump(master: int, port: SerialPort, agent: AgentLink, now: float) -> list[Received]:
    """One step of the agent's serial loop; the controller side drains what we sent."""
    got = agent.receive(port.read(0.01), now)
    agent.poll(now)
    out = agent.outgoing()
    if out:
        assert port.write(out)
    while select.select([master], [], [], 0)[0]:
        os.read(master, 65536)
    return got


def test_hello_flood_through_a_pty_then_events_are_acked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real pty: 20k HELLOs with fresh sessions, then events; bounded log lines, and the
    events after the flood are ACKed (the old link logged 20k INFO lines)."""
    caplog.set_level(logging.DEBUG, LINK_LOGGER)
    master, slave = os.openpty()
    device = tmp_path / "ttyFlood"
    device.symlink_to(os.ttyname(slave))
    os.close(slave)
    os.set_blocking(master, False)
    port = SerialPort(str(device), backoff=Backoff(0.25, 10.0))
    agent = AgentLink(session=77)
    try:
        now = 0.0
        assert port.open(now)
        assert port.state is PortState.OPEN
        agent.start(now)
        wire = b"".join(hello(epoch=e) for e in range(1, FLOOD + 1))
        deadline = time.monotonic() + 60
        while (wire or agent.boot_epoch != FLOOD) and time.monotonic() < deadline:
            if wire:
                with contextlib.suppress(BlockingIOError):
                    wire = wire[os.write(master, wire[:4096]) :]
            now += 0.001
            pump(master, port, agent, now)
        assert agent.boot_epoch == FLOOD
        decoder = FrameDecoder()
        os.write(master, b"".join(wire_event(n, epoch=FLOOD) for n in range(1, 11)))
        acked = 0
        while acked < 10 and time.monotonic() < deadline:
            now += 0.001
            got = agent.receive(port.read(0.01), now)
            agent.durable([r.token for r in got], now)
            out = agent.outgoing()
            assert not out or port.write(out)
            while select.select([master], [], [], 0)[0]:
                for frame in decoder.feed(os.read(master, 65536)):
                    if isinstance(frame.body, Ack) and frame.body.epoch == FLOOD:
                        acked = max(acked, frame.body.cumulative)
        assert acked == 10
    finally:
        port.close()
        os.close(master)
    agent.poll(now + SESSION_LOG_INTERVAL)
    lines = session_lines(caplog)
    assert 1 <= len(lines) <= 2 + now // SESSION_LOG_INTERVAL
    assert changes_reported(lines) == agent.counters["controller_reboots"] == FLOOD - 1


def test_hello_flood_against_the_real_daemon_logs_bounded_lines(tmp_path: Path) -> None:
    """`ironfleet-agent run` on a pty fed 20k HELLOs with fresh sessions: its log holds a
    bounded number of session lines and events after the flood are ACKed after commit."""
    master, slave = os.openpty()
    device = tmp_path / "ttyFlood"
    device.symlink_to(os.ttyname(slave))
    os.close(slave)
    os.set_blocking(master, False)
    agent = AgentProcess(tmp_path / "agent", str(device))
    decoder = FrameDecoder()
    acked: dict[int, int] = {}

    def drain() -> None:
        while select.select([master], [], [], 0)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EAGAIN, or EIO while the agent has the port closed
                return
            for frame in decoder.feed(data):
                if isinstance(frame.body, Ack):
                    acked[frame.body.epoch] = max(
                        acked.get(frame.body.epoch, 0), frame.body.cumulative
                    )

    try:
        agent.start()
        wait_for(lambda: b"serial_port_opened" in agent.log.read_bytes(), 30, "the port open")
        wire = b"".join(hello(epoch=e) for e in range(1, FLOOD + 1))
        deadline = time.monotonic() + 90
        while (wire or FLOOD not in acked) and time.monotonic() < deadline:
            if wire:
                with contextlib.suppress(BlockingIOError):
                    wire = wire[os.write(master, wire[:4096]) :]
            drain()
            select.select([master], [], [], 0.001)
        assert FLOOD in acked, "the agent never confirmed the last session"
        os.write(master, b"".join(wire_event(n, epoch=FLOOD) for n in range(1, 11)))
        while acked.get(FLOOD, 0) < 10 and time.monotonic() < deadline:
            drain()
            select.select([master], [], [], 0.01)
        assert acked[FLOOD] == 10
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        os.close(master)
    log = agent.log.read_text()
    lines = [line for line in log.splitlines() if "controller_session_changed" in line]
    assert 1 <= len(lines) <= 3, f"{len(lines)} session lines for {FLOOD} HELLOs"
