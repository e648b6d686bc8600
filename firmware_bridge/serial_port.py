"""The one owner of the controller's serial device: exclusive open, idle reads, reconnects.

This is the only module that imports pyserial. pyserial opens and configures the device
(raw mode, baud rate, exclusive lock); waiting for data and writing are done here with
`select.poll` on its descriptor, because pyserial 3.5 `read(n)` with a timeout waits the
whole timeout unless `n` bytes arrive, and its `write` spins the CPU while the output
buffer is full. Time for scheduling is passed in as `now`, so the reconnect policy is
stepped by tests with a fake clock; only `read` and a stalled `write` block.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import select
import termios
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Final, Protocol

import serial

from firmware_bridge.errors import PortUnavailable

log = logging.getLogger(__name__)

DEFAULT_BAUDRATE: Final = 921_600
# One read drains up to this much; a 4 KiB UART/pty read chunk is ~45 ms of data at 921,600 baud.
DEFAULT_READ_SIZE: Final = 4096
# A healthy device drains a full driver buffer (18 KiB on a Linux pty) in ~0.2 s at
# 921,600 baud; a write still stuck after this long means the peer stopped reading.
DEFAULT_WRITE_TIMEOUT_S: Final = 1.0

_GLOB_CHARS: Final = frozenset("*?[")
_POLL_READABLE: Final = select.POLLIN | select.POLLERR | select.POLLHUP


class RetryDelays(Protocol):
    """The reopen policy the owner injects (the agent's `Backoff`: the bridge keeps no
    policy of its own). USB re-enumeration takes about 0.5-2 s, so first retries should
    come soon, and a cap bounds how long a replugged controller waits unheard."""

    def next_delay(self) -> float:
        """Seconds to wait before the next open attempt (grows with each failure)."""
        ...

    def reset(self) -> None:
        """The port opened: the next failure starts from the shortest delay again."""
        ...


class PortState(StrEnum):
    """Where the port is in its life: closed by the caller, open, or waiting to reopen."""

    CLOSED = "closed"
    OPEN = "open"
    RECONNECTING = "reconnecting"


class SerialPort:
    """Owns one serial device; reconnects by itself with capped backoff.

    `path` is a device path (or a symlink to one) or a glob such as
    `/dev/serial/by-id/usb-*`; a glob is resolved again at every open attempt because a
    replugged device can come back under a new name, and the first existing match in
    sorted order is used. The device is opened with `exclusive=True` (an advisory
    `flock`: it keeps out a second agent or any other pyserial user that asks for
    exclusivity, not a plain `cat`). Not thread-safe: one loop owns each port.
    """

    def __init__(
        self,
        path: str,
        *,
        baudrate: int = DEFAULT_BAUDRATE,
        backoff: RetryDelays,
        on_state: Callable[[PortState, str], None] | None = None,
        read_size: int = DEFAULT_READ_SIZE,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT_S,
    ) -> None:
        if read_size < 1:
            raise ValueError(f"read_size must be >= 1 byte, got {read_size!r}")
        if not write_timeout > 0:
            raise ValueError(f"write_timeout must be > 0 seconds, got {write_timeout!r}")
        self.path = path
        self.baudrate = baudrate
        self.read_size = read_size
        self.write_timeout = float(write_timeout)
        self._backoff = backoff
        self._on_state = on_state
        self._state = PortState.CLOSED
        self._serial: serial.Serial | None = None
        self._device: str | None = None
        self._readable: select.poll | None = None
        self._writable: select.poll | None = None
        self._next_attempt: float | None = None
        self._lost = False
        self._failure_streak = 0
        self._last_error: PortUnavailable | None = None
        self.reconnects = 0
        self.open_failures = 0
        self.losses = 0

    @property
    def state(self) -> PortState:
        """Current state; changes are also reported to `on_state`."""
        return self._state

    @property
    def device(self) -> str | None:
        """The path actually opened (the glob match, or `path` itself), or None when not open."""
        return self._device

    @property
    def next_attempt_at(self) -> float | None:
        """When `poll` will next try to open, or None if nothing is scheduled (yet)."""
        return self._next_attempt

    @property
    def last_error(self) -> PortUnavailable | None:
        """Why the last open attempt failed or the device was lost; None once open again."""
        return self._last_error

    def open(self, now: float) -> bool:
        """Make one open attempt; on failure schedule the next at `now` plus a backoff delay.

        Returns True if the port is open. A missing or busy device is recorded
        (`open_failures`, `last_error`, state RECONNECTING), never raised; a baud rate
        the driver refuses raises ValueError, since retrying cannot fix configuration.
        """
        if self._state is PortState.OPEN:
            return True
        device = self._resolve()
        if device is None:
            return self._open_failed(now, None, f"no device matches {self.path}")
        port = serial.Serial()
        port.port = device
        port.baudrate = self.baudrate
        port.timeout = 0  # waiting is done by poll() in read(); pyserial only drains
        port.exclusive = True
        try:
            # pyserial closes its own descriptors when open() fails part-way, and ignores
            # ENOTTY/EINVAL from the RTS/DTR ioctls, which ptys and some adapters refuse.
            port.open()
        except (OSError, termios.error) as exc:
            # SerialException is an OSError; termios.error is not, and pyserial 3.5 lets
            # it out of tcsetattr/tcflush when the device vanishes during open().
            return self._open_failed(now, device, str(exc))
        self._serial = port
        self._device = device
        self._readable = select.poll()
        self._readable.register(port.fileno(), _POLL_READABLE)
        self._writable = select.poll()
        self._writable.register(port.fileno(), select.POLLOUT)
        self._next_attempt = None
        self._last_error = None
        self._backoff.reset()
        if self._lost:
            self.reconnects += 1
            self._lost = False
        if self._failure_streak:
            log.info(
                "serial_port_recovered device=%s failures=%d reconnects=%d",
                device,
                self._failure_streak,
                self.reconnects,
            )
        else:
            log.info("serial_port_opened device=%s baudrate=%d", device, self.baudrate)
        self._failure_streak = 0
        self._set_state(PortState.OPEN, device)
        return True

    def poll(self, now: float) -> None:
        """Try to reopen if the port was lost or failed to open and the next attempt is due."""
        if self._state is not PortState.RECONNECTING:
            return
        if self._next_attempt is None:
            # A loss is noticed inside read()/write(), which have no `now`: its backoff
            # delay starts at the first poll after it.
            self._next_attempt = now + self._backoff.next_delay()
        if now >= self._next_attempt:
            self.open(now)

    def read(self, timeout: float, wake_fd: int | None = None) -> bytes:
        """Wait up to `timeout` seconds for data and return what arrived (at most read_size).

        Returns as soon as any bytes are available, or as soon as `wake_fd` (another
        thread's wake-up pipe) is readable. Returns b"" on timeout, on wake-up, when not
        open, or when the device vanished (the port is then closed and RECONNECTING).
        """
        port, readable = self._serial, self._readable
        if port is None or readable is None:
            return b""
        if wake_fd is None:
            if not readable.poll(max(timeout, 0.0) * 1000.0):
                return b""
        else:
            poller = select.poll()
            fd = port.fileno()
            poller.register(fd, _POLL_READABLE)
            poller.register(wake_fd, select.POLLIN)
            if not any(ready == fd for ready, _ in poller.poll(max(timeout, 0.0) * 1000.0)):
                return b""
        try:
            # A vanished device polls readable and then reads EOF or EIO; pyserial turns
            # both into SerialException.
            return port.read(self.read_size)
        except OSError as exc:
            self._lose(f"read failed: {exc}")
            return b""

    def write(self, data: bytes) -> bool:
        """Write all of `data`, waiting up to write_timeout for a full buffer to drain.

        Returns False if the port is not open (state unchanged) or if the write failed
        or stalled (the port is then closed and RECONNECTING; part of `data` may have
        gone out).
        """
        port, writable = self._serial, self._writable
        if port is None or writable is None:
            return False
        fd = port.fileno()
        pending = memoryview(data)
        deadline = time.monotonic() + self.write_timeout
        try:
            while pending:
                with contextlib.suppress(BlockingIOError):
                    pending = pending[os.write(fd, pending) :]
                if not pending:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._lose(
                        f"write stalled: {len(pending)} of {len(data)} bytes unsent "
                        f"after {self.write_timeout:g} s"
                    )
                    return False
                writable.poll(remaining * 1000.0)
        except OSError as exc:
            self._lose(f"write failed: {exc}")
            return False
        return True

    def close(self) -> None:
        """Close the device and stop reconnecting; safe to call any number of times."""
        was_open = self._serial is not None
        self._release()
        self._next_attempt = None
        self._lost = False
        self._failure_streak = 0
        if self._state is not PortState.CLOSED:
            log.info("serial_port_closed path=%s was_open=%s", self.path, was_open)
            self._set_state(PortState.CLOSED, "closed by caller")

    def _resolve(self) -> str | None:
        if not _GLOB_CHARS.intersection(self.path):
            return self.path
        for match in sorted(glob.glob(self.path)):
            if os.path.exists(match):  # skips dangling symlinks left by a vanished device
                return match
        return None

    def _open_failed(self, now: float, device: str | None, detail: str) -> bool:
        self.open_failures += 1
        self._failure_streak += 1
        self._last_error = PortUnavailable(detail)
        delay = self._backoff.next_delay()
        self._next_attempt = now + delay
        log.log(
            logging.WARNING if self._failure_streak == 1 else logging.DEBUG,
            "serial_open_failed path=%s device=%s error=%r streak=%d retry_in_s=%.3f",
            self.path,
            device,
            detail,
            self._failure_streak,
            delay,
        )
        self._set_state(PortState.RECONNECTING, detail)
        return False

    def _lose(self, detail: str) -> None:
        device = self._device
        self._release()
        self.losses += 1
        self._lost = True
        # The loss is the first failure of the streak; the retries that follow log at DEBUG.
        self._failure_streak = 1
        self._last_error = PortUnavailable(detail)
        self._next_attempt = None
        log.warning("serial_port_lost device=%s error=%r losses=%d", device, detail, self.losses)
        self._set_state(PortState.RECONNECTING, detail)

    def _release(self) -> None:
        port = self._serial
        self._serial = None
        self._device = None
        self._readable = None
        self._writable = None
        if port is None:
            return
        try:
            port.close()
        except OSError as exc:
            # pyserial closes the device first and skips its four abort pipes if that
            # raises; Linux frees the device descriptor even when close() reports an error.
            log.debug("serial_close_failed path=%s error=%r", self.path, str(exc))
            for fd in (
                port.pipe_abort_read_r,
                port.pipe_abort_read_w,
                port.pipe_abort_write_r,
                port.pipe_abort_write_w,
            ):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _set_state(self, state: PortState, detail: str) -> None:
        if state is self._state:
            return
        self._state = state
        if self._on_state is not None:
            self._on_state(state, detail)
