"""What joins the daemon's threads: the bounded hand-over queue, reports, wake-up, flags.

Each serial thread (one per controller port) hands received events to the writer through
`to_writer` (bounded: a slow disk stops reading, and the controller keeps its events),
tagged with its port; the writer reports each group durable or not through that port's
`reports` and wakes that thread through its `waker`; the uplink thread asks the writer to
persist fleet acknowledgements through `tasks`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from agent.store import EventStore
from firmware_bridge.link import Received, Token


class Handover(NamedTuple):
    """Events one serial thread read, for the writer to commit and report back."""

    port: int  # the index of its [[serial]] entry: where the report goes
    items: list[Received]


@dataclass
class Shared:
    """State both threads read: flags and counters (single writers, GIL-atomic updates)."""

    # A stop, in its three stages (each set once, in this order): asked for (every loop
    # leaves its main loop); the serial loop hands nothing more to the writer; the writer
    # committed and reported everything (the serial loop sends the last ACKs, then closes).
    stopping: threading.Event = field(default_factory=threading.Event)
    reading_done: threading.Event = field(default_factory=threading.Event)
    writer_done: threading.Event = field(default_factory=threading.Event)
    alarm: str = ""
    store_full: bool = False
    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("batches", "events_committed", "commit_failures", "batches_rejected"), 0
        )
    )


class Waker:
    """A self-pipe: the writer wakes the serial thread the moment a batch is durable."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.write_fd, b"x")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read_fd, 4096):
                pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


Task = Callable[[EventStore], None]  # work for the writer thread (the store's only user)


@dataclass(frozen=True)
class Delivered:
    """The fleet holds every row up to `upto`, and every row of priority class c up to
    `frontiers[c]`; the writer persists it (coalesced)."""

    upto: int
    positions: dict[str, tuple[int, int]]
    frontiers: tuple[int, ...] = ()


@dataclass
class Port:
    """One serial thread's side of the channels: its reports and its wake-up."""

    reports: queue.Queue[tuple[bool, list[Token]]] = field(default_factory=queue.Queue)
    waker: Waker = field(default_factory=Waker)


@dataclass
class Channels:
    """What joins the threads: the bounded hand-over queue, reports, wake-up, flags."""

    to_writer: queue.Queue[Handover]
    ports: list[Port]
    shared: Shared
    # Small, rare writes from other threads (uplink checkpoints). Unbounded on purpose:
    # at most one per acknowledged batch, and the uplink thread must never block on it.
    tasks: queue.Queue[Task | Delivered] = field(default_factory=queue.Queue)
