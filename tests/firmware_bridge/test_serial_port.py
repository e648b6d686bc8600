"""SerialPort on real pseudo-terminals: data both ways, idle reads, exclusivity, replug, fds.

A pty stands in for the controller's USB adapter: the test holds the master, the port opens
the slave through a symlink in tmp_path (as udev's /dev/serial/by-id links), unplugging
closes the master and removes the link, replugging makes a new pty. The reconnect clock is
a float stepped by the test; only reads block, always against a deadline.
"""

from __future__ import annotations

import logging
import os
import random
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.resilience.backoff import Backoff
from firmware_bridge.errors import PortUnavailable
from firmware_bridge.serial_port import PortState, SerialPort

pytestmark = pytest.mark.timeout(10)

ALL_BYTES = bytes(range(256))
LOGGER = "firmware_bridge.serial_port"


class _Ceiling(random.Random):
    """A random source whose uniform(a, b) is always b: backoff delays become 1, 2, 4, 8 s."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Bench:
    """Real ptys behind symlinks, plugged and unplugged like a USB controller."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.masters: dict[str, int] = {}
        self.ports: list[SerialPort] = []

    def link(self, name: str) -> Path:
        return self.directory / name

    def plug(self, name: str) -> int:
        master, slave = os.openpty()
        tty_name = os.ttyname(slave)
        # The port must be the slave's only user, as with a real device: a slave fd kept
        # here would hold the pty (and its /dev/pts number) after the port lets go.
        os.close(slave)
        self.link(name).symlink_to(tty_name)
        self.masters[name] = master
        return master

    def unplug(self, name: str) -> None:
        os.close(self.masters.pop(name))
        self.link(name).unlink()

    def port(self, name: str, **kwargs: Any) -> SerialPort:
        kwargs.setdefault("backoff", Backoff(1.0, 8.0, rng=_Ceiling()))
        port = SerialPort(str(self.link(name)), **kwargs)
        self.ports.append(port)
        return port

    def close(self) -> None:
        for port in self.ports:
            port.close()
        for master in self.masters.values():
            os.close(master)
        self.masters.clear()


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(tmp_path)
    try:
        yield b
    finally:
        b.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def read_master(master: int, size: int, within: float = 2.0) -> bytes:
    """Bytes the port sent, until `size` arrived or `within` seconds passed."""
    got = bytearray()
    deadline = time.monotonic() + within
    while len(got) < size and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            got += os.read(master, size - len(got))
    return bytes(got)


def read_port(port: SerialPort, size: int, within: float = 2.0) -> bytes:
    """Bytes the port received, until `size` arrived or `within` seconds passed."""
    got = bytearray()
    deadline = time.monotonic() + within
    while len(got) < size and time.monotonic() < deadline:
        got += port.read(0.05)
    return bytes(got)


def wait_lost(port: SerialPort, within: float = 2.0) -> None:
    """Read until the port notices its device is gone; every such read returns b""."""
    deadline = time.monotonic() + within
    while port.state is PortState.OPEN and time.monotonic() < deadline:
        assert port.read(0.1) == b""
    assert port.state is PortState.RECONNECTING


def step_until_open(port: SerialPort, now: float, within: float = 100.0) -> float:
    """Step the fake clock by 0.25 s through poll() until the port is open; returns now."""
    limit = now + within
    while port.state is not PortState.OPEN and now < limit:
        port.poll(now)
        now += 0.25
    assert port.state is PortState.OPEN
    return now


def assert_data_flows(bench: Bench, name: str, port: SerialPort, payload: bytes) -> None:
    os.write(bench.masters[name], payload)
    assert read_port(port, len(payload)) == payload
    assert port.write(payload[::-1])
    assert read_master(bench.masters[name], len(payload)) == payload[::-1]


def test_binary_data_flows_both_ways_through_a_symlink(bench: Bench) -> None:
    master = bench.plug("ctl")
    port = bench.port("ctl")
    assert port.open(0.0)
    assert port.state is PortState.OPEN
    assert port.device == str(bench.link("ctl"))

    # Every byte value, NUL (the frame delimiter) and 0xff included, several times over.
    payload = ALL_BYTES * 8
    os.write(master, payload)
    assert read_port(port, len(payload)) == payload
    assert port.write(payload)
    assert read_master(master, len(payload)) == payload


def test_read_returns_at_most_read_size(bench: Bench) -> None:
    master = bench.plug("ctl")
    port = bench.port("ctl", read_size=16)
    assert port.open(0.0)
    os.write(master, ALL_BYTES)
    first = port.read(1.0)
    assert 1 <= len(first) <= 16
    assert first + read_port(port, 256 - len(first)) == ALL_BYTES


def test_idle_read_waits_the_timeout_without_spinning(bench: Bench) -> None:
    bench.plug("ctl")
    port = bench.port("ctl")
    assert port.open(0.0)
    wall, cpu = time.monotonic(), time.process_time()
    assert port.read(0.5) == b""
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    assert 0.45 <= wall < 1.5
    assert cpu < 0.1, f"read spent {cpu:.3f} s of CPU in {wall:.3f} s"
    assert port.state is PortState.OPEN


def test_read_returns_as_soon_as_bytes_arrive(bench: Bench) -> None:
    # pyserial's own read(4096, timeout=5) would wait the full 5 s for 3 bytes.
    master = bench.plug("ctl")
    port = bench.port("ctl")
    assert port.open(0.0)
    sender = threading.Timer(0.2, os.write, (master, b"abc"))
    sender.start()
    try:
        started = time.monotonic()
        assert port.read(5.0) == b"abc"
        assert time.monotonic() - started < 2.0
    finally:
        sender.join()


def test_second_port_on_a_held_device_fails_until_released(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    bench.plug("ctl")
    first = bench.port("ctl")
    assert first.open(0.0)
    fds = open_fds()

    second = bench.port("ctl")
    assert not second.open(0.0)
    assert second.state is PortState.RECONNECTING
    assert second.open_failures == 1
    assert isinstance(second.last_error, PortUnavailable)
    assert "lock" in str(second.last_error)
    assert second.next_attempt_at == 1.0
    second.poll(0.99)
    assert second.open_failures == 1  # not due yet: no attempt
    second.poll(1.0)
    assert second.open_failures == 2
    assert second.state is PortState.RECONNECTING
    assert open_fds() == fds  # each refused open closed the descriptor it had made

    first.close()
    second.poll(3.0)  # second delay: 2 s after the failure at 1.0
    assert second.state is PortState.OPEN
    assert second.last_error is None
    assert second.reconnects == 0  # it never had the device, so nothing was re-opened
    assert_data_flows(bench, "ctl", second, b"\x00hello\xff")

    levels = [(r.getMessage().split()[0], r.levelno) for r in caplog.records if r.name == LOGGER]
    second_port = levels[levels.index(("serial_open_failed", logging.WARNING)) :]
    assert second_port[:2] == [
        ("serial_open_failed", logging.WARNING),
        ("serial_open_failed", logging.DEBUG),
    ]
    assert ("serial_port_recovered", logging.INFO) in second_port


def test_unplug_and_replug_under_the_same_name(bench: Bench) -> None:
    bench.plug("ctl")
    port = bench.port("ctl")
    assert port.open(0.0)
    assert_data_flows(bench, "ctl", port, ALL_BYTES)

    bench.unplug("ctl")
    wait_lost(port)
    assert port.device is None
    assert port.losses == 1
    assert isinstance(port.last_error, PortUnavailable)

    bench.plug("ctl")  # back at once, but the backoff still has to run out
    port.poll(10.0)
    assert port.next_attempt_at == 11.0
    assert port.state is PortState.RECONNECTING
    port.poll(10.99)
    assert port.state is PortState.RECONNECTING
    assert port.open_failures == 0  # nothing was attempted before the delay

    port.poll(11.0)
    assert port.state is PortState.OPEN
    assert port.reconnects == 1
    assert_data_flows(bench, "ctl", port, ALL_BYTES)

    bench.unplug("ctl")
    wait_lost(port)
    port.poll(20.0)
    assert port.next_attempt_at == 21.0  # the success reset the backoff to its base


def test_write_to_a_vanished_device_fails_and_reconnects(bench: Bench) -> None:
    bench.plug("ctl")
    port = bench.port("ctl")
    assert port.open(0.0)
    bench.unplug("ctl")
    assert not port.write(b"\x00ping\x00")
    assert port.state is PortState.RECONNECTING
    assert "write failed" in str(port.last_error)

    bench.plug("ctl")
    step_until_open(port, 1.0)
    assert port.reconnects == 1
    assert_data_flows(bench, "ctl", port, b"pong")


def fill_output_buffer(link: Path) -> None:
    """Fill the tty's buffer towards the master through a second, test-owned slave fd."""
    # flock is advisory: the port's exclusive lock does not stop a plain open().
    fd = os.open(link, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        while True:
            os.write(fd, b"z" * 1024)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def test_stalled_write_gives_up_after_write_timeout_without_spinning(bench: Bench) -> None:
    bench.plug("ctl")  # nobody ever reads the master, so the tty's buffer fills up
    port = bench.port("ctl", write_timeout=0.3)
    assert port.open(0.0)
    now = 0.0
    # First the buffer fills part-way through a write; then a write starts on a buffer that
    # is already full, the case in which pyserial 3.5's own write() spins the CPU.
    for payload in (b"x" * 100_000, b"y"):
        wall, cpu = time.monotonic(), time.process_time()
        assert not port.write(payload)
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        assert 0.25 <= wall < 2.0
        assert cpu < 0.15, f"write spent {cpu:.3f} s of CPU in {wall:.3f} s"
        assert port.state is PortState.RECONNECTING
        assert "stalled" in str(port.last_error)
        now = step_until_open(port, now)
        fill_output_buffer(bench.link("ctl"))


def test_write_when_not_open_fails_without_changing_state(bench: Bench) -> None:
    port = bench.port("ctl")
    assert not port.write(b"x")
    assert port.read(0.0) == b""
    assert port.state is PortState.CLOSED


def test_glob_is_resolved_again_at_every_attempt(bench: Bench, tmp_path: Path) -> None:
    (tmp_path / "usb-ctl-0").symlink_to(tmp_path / "gone")  # dangling: skipped
    bench.plug("usb-ctl-A")
    port = bench.port("usb-ctl-*")
    assert port.open(0.0)
    assert port.device == str(bench.link("usb-ctl-A"))

    bench.unplug("usb-ctl-A")
    wait_lost(port)
    bench.plug("usb-ctl-C")
    bench.plug("usb-ctl-B")
    step_until_open(port, 1.0)
    assert port.device == str(bench.link("usb-ctl-B"))  # first in sorted order
    assert port.reconnects == 1
    assert_data_flows(bench, "usb-ctl-B", port, ALL_BYTES)


def test_glob_without_a_match_is_an_open_failure(bench: Bench) -> None:
    port = bench.port("usb-nothing-*")
    assert not port.open(0.0)
    assert port.state is PortState.RECONNECTING
    assert "no device matches" in str(port.last_error)


def test_a_path_that_is_not_a_tty_is_an_open_failure(bench: Bench) -> None:
    bench.link("ctl").symlink_to(os.devnull)
    fds = open_fds()
    port = bench.port("ctl")
    assert not port.open(0.0)
    assert port.state is PortState.RECONNECTING
    assert "configure" in str(port.last_error)
    assert open_fds() == fds


def test_twenty_unplugs_leak_no_file_descriptors(bench: Bench) -> None:
    bench.plug("ctl")
    port = bench.port("ctl")
    assert port.open(0.0)
    baseline = open_fds()  # includes the port's fds and the one master held here
    now = 0.0
    for i in range(20):
        bench.unplug("ctl")
        wait_lost(port)
        now += 10.0
        port.poll(now)  # schedules the first attempt after the loss
        assert port.next_attempt_at is not None
        now = port.next_attempt_at
        port.poll(now)  # due, but the device is still missing
        assert port.state is PortState.RECONNECTING
        assert port.open_failures == i + 1
        bench.plug("ctl")
        now = step_until_open(port, now)
        assert_data_flows(bench, "ctl", port, bytes([i, 0, 255]))
    assert port.reconnects == 20
    assert open_fds() == baseline
    port.close()
    assert open_fds() == baseline - 5  # the device fd and pyserial's four abort pipes


def test_on_state_reports_every_transition_in_order(bench: Bench) -> None:
    events: list[tuple[PortState, str]] = []
    port = bench.port("ctl", on_state=lambda state, detail: events.append((state, detail)))
    assert not port.open(0.0)  # nothing plugged in yet
    bench.plug("ctl")
    port.poll(1.0)
    bench.unplug("ctl")
    wait_lost(port)
    bench.plug("ctl")
    step_until_open(port, 2.0)
    port.close()

    assert [state for state, _ in events] == [
        PortState.RECONNECTING,
        PortState.OPEN,
        PortState.RECONNECTING,
        PortState.OPEN,
        PortState.CLOSED,
    ]
    link = str(bench.link("ctl"))
    assert "No such file" in events[0][1]
    assert events[1][1] == link
    assert events[2][1].startswith("read failed")
    assert events[3][1] == link


def test_close_is_idempotent_and_stops_reconnecting(bench: Bench) -> None:
    events: list[PortState] = []
    bench.plug("ctl")
    fds = open_fds()
    port = bench.port("ctl", on_state=lambda state, _detail: events.append(state))
    assert port.open(0.0)
    port.close()
    port.close()
    assert events == [PortState.OPEN, PortState.CLOSED]
    assert port.state is PortState.CLOSED
    assert port.device is None
    assert open_fds() == fds
    assert port.read(0.0) == b""
    assert not port.write(b"x")
    for now in (1.0, 10.0, 1000.0):
        port.poll(now)
    assert port.state is PortState.CLOSED  # the device is there, but no reconnect

    assert port.open(1000.0)  # an explicit open starts over
    bench.unplug("ctl")
    wait_lost(port)
    port.close()
    bench.plug("ctl")
    for now in (1001.0, 1010.0, 2000.0):
        port.poll(now)
    assert port.state is PortState.CLOSED
    assert port.open_failures == 0
    assert port.next_attempt_at is None
    assert events[-3:] == [PortState.OPEN, PortState.RECONNECTING, PortState.CLOSED]
