"""`ironfleet-sim --replay`: a wire capture's controller side played back into a pty.

The bytes the controller sent (direction 0 of `firmware_bridge.capture`) are written to a
fresh pseudo-terminal in their recorded order, either at the recorded pace (gaps kept,
so timing bugs reproduce) or as fast as the agent takes them. The capture, not this
process, plays the controller: the bytes go out as recorded, garbage and all, so the agent
stores what it stored from the original line.

Two things the original controller did are kept: it never ran more than a window ahead of
the agent's ACKs (the agent drops an EVENT beyond its receive window), so an EVENT frame
waits until the agent has acknowledged its session up to `link_seq - WINDOW` (the agent's
ACKs are decoded for that); and it stopped once its frames were acknowledged, so playback
ends when every EVENT sent is acknowledged. A wait with no progress for `STALL` seconds
gives up on that frame's ACK and goes on (a frame the original agent never acknowledged
either). Playback starts once the agent has opened the port (its first byte arrives),
because a serial open may flush input that was written before it.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from firmware_bridge.capture import FROM_CONTROLLER, read_records
from firmware_bridge.errors import FrameCorrupt
from firmware_bridge.frames import DELIMITER, FrameDecoder, decode_one
from firmware_bridge.protocol import Ack, EventBody

OPEN_TIMEOUT = 60.0  # seconds to wait for the agent to open the port
WINDOW = 256  # EVENT frames ahead of the agent's ACKs (its receive window is 1,024)
STALL = 5.0  # seconds without a new ACK before a wait gives up


class _Agent:
    """The agent's side of the pty: its ACKs decoded, per session (boot epoch)."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.decoder = FrameDecoder()
        self.acked: dict[int, int] = {}
        self.heard = False
        self.progress_at = time.monotonic()

    def poll(self, timeout: float) -> None:
        select.select([self.master], [], [], timeout)
        data = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self.master, 65536):
                data += chunk
        if not data:
            return
        self.heard = True
        for frame in self.decoder.feed(data):
            body = frame.body
            if isinstance(body, Ack) and body.cumulative > self.acked.get(body.epoch, 0):
                self.acked[body.epoch] = body.cumulative
                self.progress_at = time.monotonic()

    def wait_acked(self, session: int, upto: int, stopped: Callable[[], bool]) -> None:
        """Until the agent acknowledged `session` up to `upto`, or STALL without progress."""
        self.progress_at = time.monotonic()
        while self.acked.get(session, 0) < upto and not stopped():
            if time.monotonic() - self.progress_at > STALL:
                return
            self.poll(0.05)


def replay(
    files: Sequence[Path],
    *,
    link: Path | None,
    paced: bool,
    announce: Callable[[str], None],
    stopped: Callable[[], bool],
) -> dict[str, Any]:
    """Play `files` (oldest first) into a new pty; returns counts for the summary line."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    path = os.ttyname(slave)
    if link is not None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(path)
        path = str(link)
    announce(path)
    sent = records = 0
    agent = _Agent(master)
    last: dict[int, int] = {}  # highest EVENT link_seq sent, per session
    try:
        deadline = time.monotonic() + OPEN_TIMEOUT
        while not agent.heard and time.monotonic() < deadline and not stopped():
            agent.poll(0.1)
        if not agent.heard:
            return {"replayed_records": 0, "replayed_bytes": 0, "error": "agent never opened"}
        records, sent = _play(agent, files, last, paced=paced, stopped=stopped)
        for session, upto in last.items():
            agent.wait_acked(session, upto, stopped)
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        if link is not None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
    return {"replayed_records": records, "replayed_bytes": sent}


def _play(
    agent: _Agent,
    files: Sequence[Path],
    last: dict[int, int],
    *,
    paced: bool,
    stopped: Callable[[], bool],
) -> tuple[int, int]:
    """Write the controller's records, frame by frame through `_gate`; (records, bytes)."""
    start = time.monotonic()
    first: float | None = None
    held = bytearray()  # bytes after the last delimiter: a frame not complete yet
    records = sent = 0
    for f in files:
        for rec in read_records(f):
            if rec.direction != FROM_CONTROLLER:
                continue
            if stopped():
                return records, sent
            first = rec.at if first is None else first
            if paced:
                _pause_until(agent, start + (rec.at - first), stopped)
            held += rec.data
            while (end := held.find(DELIMITER)) >= 0:
                frame, held = bytes(held[: end + 1]), held[end + 1 :]
                _gate(agent, frame, last, stopped)
                _write_all(agent, frame, stopped)
                sent += len(frame)
            records += 1
    _write_all(agent, bytes(held), stopped)
    return records, sent + len(held)


def _gate(agent: _Agent, frame: bytes, last: dict[int, int], stopped: Callable[[], bool]) -> None:
    """Hold an EVENT frame until it is within WINDOW of the agent's ACKs for its session."""
    try:
        decoded = decode_one(frame[:-1])
    except FrameCorrupt:
        return  # garbage or a damaged frame: it goes out as recorded, ungated
    if isinstance(decoded.body, EventBody):
        session, seq = decoded.session, decoded.link_seq
        if seq > WINDOW:
            agent.wait_acked(session, seq - WINDOW, stopped)
        last[session] = max(last.get(session, 0), seq)


def _pause_until(agent: _Agent, when: float, stopped: Callable[[], bool]) -> None:
    while (left := when - time.monotonic()) > 0 and not stopped():
        agent.poll(min(left, 0.1))


def _write_all(agent: _Agent, data: bytes, stopped: Callable[[], bool]) -> None:
    view = memoryview(data)
    while view and not stopped():
        try:
            view = view[os.write(agent.master, view) :]
        except BlockingIOError:
            select.select([], [agent.master], [], 0.1)
            agent.poll(0)  # the agent's replies must not fill the other direction
