"""One emulated controller of `ironfleet-sim` on its own pseudo-terminal, and the ground truth.

`Device` runs the controller side of the protocol (`ControllerLink`) on a pty: it produces
its streams, reads ACKs, applies its line faults, and writes every event it sent, saw
ACKed or lost at a reboot to `GroundTruth` (JSON lines; docs/protocol.md, "Simulator
ground truth"). Kept apart from `firmware_bridge.simulator`, which schedules several
devices and their faults and holds the command line, so each file does one job; `SimOptions`
is what that command line parsed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack

from firmware_bridge.controller import ControllerLink
from firmware_bridge.faults import LineNoise
from firmware_bridge.protocol import EventBody, TimeQuality
from firmware_bridge.telemetry import FAMILIES, VehicleModel

_MAX_WRITE_BACKLOG = 64 * 1024  # bytes held for a pty nobody reads: a UART drops them


@dataclass(frozen=True, kw_only=True)
class SimOptions:
    """Every `ironfleet-sim` option, parsed; the names, defaults and ranges are the command
    line's (firmware_bridge/simulator.py)."""

    # controllers and traffic
    controllers: int
    controller_id: str
    firmware: str
    boot_epoch: int
    streams: int
    rate: float
    events: int
    duration: float
    drain_timeout: float
    kind: str
    bare_streams: bool
    profile: str
    seed: int | None
    # device
    link_dir: Path | None
    link_name: str
    replug_rename: bool
    device: str | None
    baudrate: int
    # link protocol
    window: int
    ring: int
    retransmit_timeout: float
    heartbeat: float
    # fault injection (controller to agent)
    ber: float
    drop_rate: float
    insert_rate: float
    truncate_rate: float
    garbage_every: float
    garbage_bytes: int
    flood_bytes: int
    ack_loss: float
    unplug_every: float
    unplug_for: float
    reboot_every: float
    silence_after: int
    control: Path | None
    # output
    truth: Path | None
    # replay of a wire capture
    replay: tuple[Path, ...]
    replay_fast: bool


def announce(device: Device) -> None:
    """Tell whoever started us (tests, the demo) where a controller's pty is."""
    print(f"DEVICE {device.controller_id} {device.path}", flush=True)


class GroundTruth:
    """Append-only JSON-lines record of what the controllers sent and saw ACKed."""

    def __init__(self, path: Path | None) -> None:
        self._fh: IO[str] | None = path.open("a", encoding="utf-8") if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def event_record(kind: str, controller: str, epoch: int, body: EventBody) -> dict[str, Any]:
    """One ground-truth line; `payload` is the hex of the stored msgpack payload bytes."""
    return {
        "op": kind,
        "controller": controller,
        "stream": body.stream,
        "boot_epoch": epoch,
        "seq": body.seq,
        "ts": body.ts,
        "kind": body.kind,
        "priority": body.priority,
        "payload": msgpack.packb(body.signals, use_bin_type=True).hex(),
    }


@dataclass
class Device:
    """One emulated controller on one pseudo-terminal."""

    index: int
    controller_id: str
    link_dir: Path | None
    streams: int
    boot_epoch: int
    args: SimOptions
    truth: GroundTruth
    noise: LineNoise
    rng: random.Random
    master: int = -1
    slave: int = -1
    path: str = ""
    link: ControllerLink = field(init=False)
    seqs: list[int] = field(init=False)
    pending_write: bytearray = field(default_factory=bytearray)
    unplugged_until: float | None = None
    name_index: int = 0
    sent: int = 0
    dropped_at_source: int = 0
    lost_at_reboot: int = 0
    reboots: int = 0
    unplugs: int = 0
    frames_sent: int = 0  # by controller links replaced at a reboot (and below)
    acked_before: int = 0
    retransmits_before: int = 0
    flood_left: int = 0  # random bytes still to send (a babbling line)
    model: VehicleModel | None = None  # --profile vehicle: the drive the signals come from
    model_wall: float = 0.0  # wall time the model was last stepped to
    acks_lost: int = 0  # reads from the agent thrown away (--ack-loss)

    def __post_init__(self) -> None:
        self._new_link()

    # -- lifecycle -----------------------------------------------------------------------

    def plug(self) -> None:
        """Create the pty (raw mode, so the tty layer never echoes or rewrites bytes)."""
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        if self.link_dir is not None:
            name = self.args.link_name.format(index=self.index, gen=self.name_index)
            link = self.link_dir / name
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(self.path)
            self.path = str(link)
        self.pending_write.clear()

    def unplug(self, now: float, seconds: float) -> None:
        """The device node disappears: the agent's reads fail until it comes back."""
        self.unplugs += 1
        if self.link_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(self.path).unlink()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.master = self.slave = -1
        self.unplugged_until = now + seconds
        self.truth.write({"op": "unplug", "controller": self.controller_id, "t": now})

    def replug(self) -> None:
        if self.args.replug_rename:
            self.name_index += 1
        self.plug()
        self.unplugged_until = None
        self.truth.write({"op": "replug", "controller": self.controller_id, "path": self.path})
        announce(self)

    def reboot(self) -> None:
        """Power-cycle the controller: RAM ring buffer lost, new epoch, sequences restart."""
        for body in self.link.unacked():
            self.truth.write(
                event_record("lost_at_reboot", self.controller_id, self.boot_epoch, body)
            )
            self.lost_at_reboot += 1
        self.reboots += 1
        self.frames_sent += self.link.frames_sent
        self.acked_before += self.link.acked
        self.retransmits_before += self.link.retransmits
        self.boot_epoch += 1
        self._new_link()
        self.truth.write(
            {"op": "reboot", "controller": self.controller_id, "boot_epoch": self.boot_epoch}
        )

    def _new_link(self) -> None:
        self.seqs = [0] * self.streams
        self.link = ControllerLink(
            self.controller_id,
            self.args.firmware,
            self.boot_epoch,
            window=self.args.window,
            ring_capacity=self.args.ring,
            retransmit_timeout=self.args.retransmit_timeout,
            heartbeat_interval=self.args.heartbeat,
            on_ack=self._acked,
        )

    def _acked(self, body: EventBody, now: float) -> None:
        record = event_record("acked", self.controller_id, self.link.boot_epoch, body)
        record["acked_at"] = time.time()  # wall clock, as `ts`: the ACK latency is the gap
        self.truth.write(record)

    # -- traffic -------------------------------------------------------------------------

    def produce(self, count: int, wall: float) -> int:
        """Generate up to `count` events round-robin over the streams; return how many."""
        made = 0
        if self.args.profile == "vehicle" and self.model is None:
            self.model = VehicleModel(random.Random(self.rng.random()))
            self.model_wall = wall
        if self.model is not None:
            self.model.step(min(max(wall - self.model_wall, 0.0), 1.0))
            self.model_wall = wall
        # A controller that does not follow the naming convention sends bare names (the
        # agent then stores them under its id when it reads several controllers).
        prefix = "" if self.args.bare_streams else f"{self.controller_id}/"
        for _ in range(count):
            stream = self.sent % self.streams
            seq = self.seqs[stream] + 1
            if self.model is not None:  # position, speed, engine, status, position, ...
                family = FAMILIES[stream % len(FAMILIES)]
                name = f"{prefix}{family}{stream // len(FAMILIES)}"
                signals = self.model.sample(family)
            else:
                name = f"{prefix}s{stream:03d}"
                signals = {"v": self.sent, "x": round(self.rng.uniform(-180.0, 180.0), 6),
                           "ok": True}  # fmt: skip
            body = EventBody(
                stream=name,
                seq=seq,
                ts=wall,
                time_quality=TimeQuality.SYNCED,
                kind=self.args.kind,
                priority=stream % 4,
                signals=signals,
            )
            if not self.link.offer(body):
                self.dropped_at_source += 1  # ring full: the agent is not ACKing
                break
            self.seqs[stream] = seq
            self.sent += 1
            made += 1
            self.truth.write(event_record("sent", self.controller_id, self.boot_epoch, body))
        return made

    def pump(self, now: float) -> None:
        """Move bytes: controller timers, outgoing (with faults), incoming."""
        if self.master < 0:
            self.link.outgoing()  # nobody to talk to: bytes on a dead line are lost
            return
        self.flood()
        self.link.poll(now)
        out = self.link.outgoing()
        if out:
            if self.noise.active:
                out = b"".join(
                    self.noise.apply_frame(chunk + b"\x00") for chunk in out.split(b"\x00")[:-1]
                )
            self.send_raw(out)
        self.flush_writes()
        self.read(now)

    def flood(self) -> None:
        """Feed the flood in slices so a slow reader sees all of it, not just the tail."""
        if self.flood_left and len(self.pending_write) < _MAX_WRITE_BACKLOG // 4:
            size = min(self.flood_left, _MAX_WRITE_BACKLOG // 2)
            self.flood_left -= size
            self.send_raw(self.noise.garbage(size))

    def send_raw(self, data: bytes) -> None:
        self.pending_write += data
        if len(self.pending_write) > _MAX_WRITE_BACKLOG:
            # The agent is not reading; a real UART would have lost these bytes.
            del self.pending_write[: len(self.pending_write) - _MAX_WRITE_BACKLOG]

    def flush_writes(self) -> None:
        while self.pending_write and self.master >= 0:
            try:
                written = os.write(self.master, self.pending_write[:4096])
            except BlockingIOError:
                return
            except OSError:
                self.pending_write.clear()
                return
            del self.pending_write[:written]

    def read(self, now: float) -> None:
        while self.master >= 0:
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                return
            except OSError:
                return  # EIO: no reader on the other side right now
            if not data:
                return
            if self.args.ack_loss and self.rng.random() < self.args.ack_loss:
                self.acks_lost += 1
                continue  # what the agent said never arrived: its ACKs are lost
            self.link.receive(data, now)
