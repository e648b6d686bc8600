"""`ironfleet-sim`: onboard controllers emulated on real pseudo-terminals.

Each controller runs the controller side of the protocol (`ControllerLink`: ring buffer,
window, retransmit until ACKed) on its own pty, produces N streams at a given rate, and
can be made to misbehave as real hardware does: bit errors, garbage bursts, dropped and
inserted bytes, truncated frames, unplug/replug (the device node disappears and comes
back, optionally under a new name), reboots (new boot epoch, sequences restart) and a
flood of random bytes.

It writes its ground truth as JSON lines: every event it sent and every event it saw
ACKed (see `docs/protocol.md`, "Simulator ground truth"), so tests and the demo can prove
that nothing ACKed was lost. Runtime control: SIGUSR1 reboots every controller, SIGUSR2
unplugs them for `--unplug-for` seconds, SIGTERM/SIGINT stop cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any, Final

import click

from firmware_bridge.capture import CaptureError
from firmware_bridge.clickrun import run_click
from firmware_bridge.controller import DEFAULT_RING
from firmware_bridge.faults import LineNoise
from firmware_bridge.protocol import MAX_WINDOW
from firmware_bridge.replay import replay
from firmware_bridge.simdevice import Device, GroundTruth, SimOptions, announce

_flags: dict[str, bool] = {"stop": False, "reboot": False, "unplug": False}


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # Handlers only set flags; the main loop acts on them.
    if signum in (signal.SIGTERM, signal.SIGINT):
        _flags["stop"] = True
    elif signum == signal.SIGUSR1:
        _flags["reboot"] = True
    elif signum == signal.SIGUSR2:
        _flags["unplug"] = True


_HELP = (
    "Emulate onboard controllers on pseudo-terminals, speaking the IronFleet serial "
    "protocol, with fault injection. Prints 'DEVICE <controller> <path>' for each "
    "controller, then runs until --events are all ACKed (and any flood sent), --duration "
    "passes, or SIGTERM. SIGUSR1 reboots the controllers, SIGUSR2 unplugs them."
)
_PATH = click.Path(path_type=Path)
_O = click.Option

# The options under their help headings, in that order: SimOptions has a field for each.
SECTIONS: Final[tuple[tuple[str, tuple[click.Option, ...]], ...]] = (
    ("controllers and traffic", (
        _O(["--controllers"], type=click.IntRange(min=1), default=1,
           help="controllers, one pty each"),
        _O(["--controller-id"], default="ecu", help="id prefix; controller k is <id><k>"),
        _O(["--firmware"], default="sim-1.0", help="firmware version sent in HELLO"),
        _O(["--boot-epoch"], type=int, default=1, help="first boot epoch"),
        _O(["--streams"], type=click.IntRange(min=1), default=4, help="streams per controller"),
        _O(["--rate"], type=click.FloatRange(min=0, min_open=True), default=100.0,
           help="events/s per controller"),
        _O(["--events"], type=int, default=0, help="stop after this many (0: no limit)"),
        _O(["--duration"], type=float, default=0.0, help="stop after seconds (0: never)"),
        _O(["--drain-timeout"], type=float, default=30.0,
           help="seconds to wait for the last ACKs"),
        _O(["--kind"], default="telemetry", help="event kind"),
        _O(["--bare-streams"], is_flag=True,
           help="stream names without the '<controller>/' prefix"),
        _O(["--profile"], type=click.Choice(["counter", "vehicle"]), default="counter",
           help="signals: a counter and a random float (default), or a vehicle's position, "
           "speed, engine and status streams from one simulated drive (realistic to compress)"),
        _O(["--seed"], type=int, default=None, help="random seed (printed if not given)"),
    )),
    ("device", (
        _O(["--link-dir"], type=_PATH, default=None,
           help="create a symlink per controller in this directory (the 'device node' that "
           "disappears on unplug); without it the /dev/pts path is printed"),
        _O(["--link-name"], default="ttyIF{index}",
           help="symlink name; {index} is the controller, {gen} counts replugs"),
        _O(["--replug-rename"], is_flag=True,
           help="come back under a new name after an unplug (use {gen} in --link-name)"),
        _O(["--device"], default=None, help="use this serial device instead of a pty"),
        _O(["--baudrate"], type=int, default=921_600, help="baud rate with --device"),
    )),
    ("link protocol", (
        # At most MAX_WINDOW: a larger window would outrun the agent's receive window.
        _O(["--window"], type=click.IntRange(1, MAX_WINDOW), default=64,
           help="frames in flight unACKed"),
        _O(["--ring"], type=click.IntRange(min=1), default=DEFAULT_RING,
           help="ring buffer, in frames"),
        _O(["--retransmit-timeout"], type=float, default=0.5, help="seconds before a resend"),
        _O(["--heartbeat"], type=float, default=1.0, help="heartbeat interval, seconds"),
    )),
    ("fault injection (controller to agent)", (
        _O(["--ber"], type=float, default=0.0, help="bit error rate, e.g. 1e-4"),
        _O(["--drop-rate"], type=float, default=0.0, help="probability a byte is lost"),
        _O(["--insert-rate"], type=float, default=0.0,
           help="probability of a stray byte after one"),
        _O(["--truncate-rate"], type=float, default=0.0,
           help="probability a frame is cut short"),
        _O(["--garbage-every"], type=float, default=0.0, help="seconds between bursts"),
        _O(["--garbage-bytes"], type=int, default=256, help="bytes per garbage burst"),
        _O(["--flood-bytes"], type=int, default=0, help="random bytes sent at start"),
        _O(["--ack-loss"], type=float, default=0.0,
           help="probability that a read of the agent's frames (ACKs) is thrown away"),
        _O(["--unplug-every"], type=float, default=0.0, help="seconds between unplugs"),
        _O(["--unplug-for"], type=float, default=1.0, help="seconds a device stays out"),
        _O(["--reboot-every"], type=float, default=0.0, help="seconds between reboots"),
        _O(["--silence-after"], type=int, default=0,
           help="after this many events, stop sending anything at all (0: never)"),
        _O(["--control"], type=_PATH, default=None,
           help="a file polled for appended command lines: 'reboot', 'unplug SECONDS', "
           "'noise SECONDS BER', 'garbage BYTES', 'stop'"),
    )),
    ("output", (
        _O(["--truth"], type=_PATH, default=None, help="ground truth file (JSON lines)"),
    )),
    ("replay of a wire capture (instead of simulated controllers)", (
        _O(["--replay"], type=_PATH, multiple=True, metavar="FILE",
           help="a capture ([serial] capture: <state_dir>/capture/*.ifcap) played into one "
           "pty; repeat for a rotated pair, the .ifcap.1 first"),
        _O(["--replay-fast"], is_flag=True,
           help="as fast as the agent reads, not at the recorded pace"),
    )),
)  # fmt: skip


class _SectionedCommand(click.Command):
    """A command whose --help lists its options under SECTIONS' headings."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sectioned = {option.name for _, options in SECTIONS for option in options}
        rest = tuple(p for p in self.get_params(ctx) if p.name not in sectioned)  # --help ...
        for title, params in (("options", rest), *SECTIONS):
            rows = [r for r in (p.get_help_record(ctx) for p in params) if r is not None]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"ironfleet-sim {_version()}")
        ctx.exit()


def _command(**values: Any) -> int:
    options = SimOptions(**values)
    if options.replay:
        return main_replay(options)
    summary = run(options)
    print(json.dumps(summary), flush=True)
    return 0


cli = _SectionedCommand(
    "ironfleet-sim",
    help=_HELP,
    callback=_command,
    params=[
        *(option for _, options in SECTIONS for option in options),
        _O(["--version"], is_flag=True, expose_value=False, is_eager=True,
           callback=_print_version, help="Show the version and exit."),
    ],
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                      "max_content_width": 100},
)  # fmt: skip


class Simulation:
    """All controllers, their faults and schedules; `step(now)` advances everything once."""

    def __init__(self, args: SimOptions, seed: int) -> None:
        self.args = args
        self.seed = seed
        rng = random.Random(seed)
        self.truth = GroundTruth(args.truth)
        self.truth.write({"op": "start", "seed": seed, "argv": sys.argv[1:]})
        self.noise = LineNoise(
            ber=args.ber,
            drop_rate=args.drop_rate,
            insert_rate=args.insert_rate,
            truncate_rate=args.truncate_rate,
            rng=random.Random(rng.randrange(2**32)),
        )
        if args.link_dir is not None:
            args.link_dir.mkdir(parents=True, exist_ok=True)
        self.devices = [
            Device(
                index=k,
                controller_id=f"{args.controller_id}{k}",
                link_dir=args.link_dir,
                streams=args.streams,
                boot_epoch=args.boot_epoch,
                args=args,
                truth=self.truth,
                noise=self.noise,
                rng=random.Random(rng.randrange(2**32)),
            )
            for k in range(args.controllers)
        ]
        self.start = time.monotonic()
        self.produced_at = self.start
        self.next_garbage = self._after(self.start, args.garbage_every)
        self.next_unplug = self._after(self.start, args.unplug_every)
        self.next_reboot = self._after(self.start, args.reboot_every)
        self.drain_deadline: float | None = None
        self.silent = False
        self._control_offset = 0
        self._noise_until: float | None = None
        self._base_ber = args.ber

    @staticmethod
    def _after(now: float, every: float) -> float:
        return now + every if every else float("inf")

    def open_devices(self) -> None:
        for device in self.devices:
            if self.args.device:
                device.master = os.open(self.args.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
                device.path = self.args.device
            else:
                device.plug()
            announce(device)
            device.flood_left = self.args.flood_bytes

    def step(self, now: float) -> None:
        """Apply due faults, produce due events, move bytes."""
        self._faults(now)
        generated = min(d.sent for d in self.devices)
        due = int((now - self.produced_at) * self.args.rate)
        if self.args.events:
            due = min(due, self.args.events - generated)
        if self.args.silence_after and generated >= self.args.silence_after:
            self.silent = True
        if due > 0 and not self.silent:
            self.produced_at += due / self.args.rate
            wall = time.time()
            for device in self.devices:
                device.produce(due, wall)
        elif due <= 0:
            self.produced_at = max(self.produced_at, now - 1.0)  # no burst after a pause
        if not self.silent:
            for device in self.devices:
                device.pump(now)
        self.truth.flush()

    def _control(self, now: float) -> None:
        """Apply commands appended to the --control file since the last step."""
        path = self.args.control
        if path is None or not path.exists() or path.stat().st_size <= self._control_offset:
            return
        with path.open("rb") as fh:
            fh.seek(self._control_offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self._control_offset += end
        for line in data[:end].decode().splitlines():
            words = line.split()
            if not words:
                continue
            self.truth.write({"op": "control", "command": line.strip(), "t": now})
            if words[0] == "reboot":
                _flags["reboot"] = True
            elif words[0] == "unplug":
                for device in self.devices:
                    if device.master >= 0:
                        device.unplug(now, float(words[1]) if len(words) > 1 else 1.0)
            elif words[0] == "noise":
                self._noise_until = now + float(words[1])
                self.noise.ber = float(words[2]) if len(words) > 2 else 1e-3
            elif words[0] == "garbage":
                for device in self.devices:
                    device.send_raw(self.noise.garbage(int(words[1])))
            elif words[0] == "stop":
                _flags["stop"] = True

    def _faults(self, now: float) -> None:
        self._control(now)
        if self._noise_until is not None and now >= self._noise_until:
            self._noise_until = None
            self.noise.ber = self._base_ber
        args = self.args
        if _flags["reboot"] or now >= self.next_reboot:
            _flags["reboot"] = False
            self.next_reboot = self._after(now, args.reboot_every)
            for device in self.devices:
                device.reboot()
        if _flags["unplug"] or now >= self.next_unplug:
            _flags["unplug"] = False
            self.next_unplug = self._after(now, args.unplug_every)
            for device in self.devices:
                if device.master >= 0 and not args.device:
                    device.unplug(now, args.unplug_for)
        for device in self.devices:
            if device.unplugged_until is not None and now >= device.unplugged_until:
                device.replug()
        if now >= self.next_garbage:
            self.next_garbage = self._after(now, args.garbage_every)
            for device in self.devices:
                device.send_raw(self.noise.garbage(args.garbage_bytes))

    def finished(self, now: float) -> bool:
        """True when the run is over: duration reached, or every event ACKed and every flood
        sent (or the drain timed out)."""
        if self.args.duration and now - self.start >= self.args.duration:
            return True
        if not self.args.events or any(d.sent < self.args.events for d in self.devices):
            return False
        # A flood still being fed counts as unfinished: the run promised all its bytes (a
        # slow reader, under load, ACKed every event before the flood was through).
        if all(not d.link.ring and not d.flood_left for d in self.devices):
            return True
        if self.drain_deadline is None:
            self.drain_deadline = now + self.args.drain_timeout
        return now >= self.drain_deadline

    def wait(self) -> None:
        """Block until a pty is readable or a short tick passes (no busy loop)."""
        fds = [d.master for d in self.devices if d.master >= 0]
        tick = 0.002 if self.args.rate * len(self.devices) < 2000 else 0.0005
        if fds:
            select.select(fds, [], [], tick)
        else:
            time.sleep(tick)

    def summary(self) -> dict[str, Any]:
        devices, counts = self.devices, self.noise.counts
        return {
            "op": "summary",
            "seed": self.seed,
            "sent": sum(d.sent for d in devices),
            "acked": sum(d.acked_before + d.link.acked for d in devices),
            "unacked": sum(len(d.link.ring) for d in devices),
            "retransmits": sum(d.retransmits_before + d.link.retransmits for d in devices),
            "frames_sent": sum(d.frames_sent + d.link.frames_sent for d in devices),
            "dropped_at_source": sum(d.dropped_at_source for d in devices),
            "lost_at_reboot": sum(d.lost_at_reboot for d in devices),
            "reboots": sum(d.reboots for d in devices),
            "unplugs": sum(d.unplugs for d in devices),
            "agent_reads_lost": sum(d.acks_lost for d in devices),
            "faults": {
                "bits_flipped": counts.bits_flipped,
                "bytes_dropped": counts.bytes_dropped,
                "bytes_inserted": counts.bytes_inserted,
                "frames_truncated": counts.frames_truncated,
                "garbage_bytes": counts.garbage_bytes,
                "corruption_events": counts.corruption_events,
            },
        }

    def close(self) -> dict[str, Any]:
        """Write the summary, close every pty and remove every symlink."""
        summary = self.summary()
        self.truth.write(summary)
        self.truth.close()
        for device in self.devices:
            for fd in (device.master, device.slave):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if device.link_dir is not None:
                with contextlib.suppress(FileNotFoundError):
                    Path(device.path).unlink()
        return summary


def run(args: SimOptions) -> dict[str, Any]:
    """Run the simulation until done or signalled; return the summary."""
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    sim = Simulation(args, seed)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, _on_signal)
    sim.open_devices()
    try:
        while not _flags["stop"]:
            now = time.monotonic()
            sim.step(now)
            if sim.finished(now):
                break
            sim.wait()
    finally:
        summary = sim.close()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `ironfleet-sim`: the run's exit status, 2 for a usage error
    (printed as click's standalone mode would, but returned, for in-process callers)."""
    return run_click(cli, argv, "ironfleet-sim")


def main_replay(args: SimOptions) -> int:
    """`--replay`: play captures into one pty, print the summary line, exit."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    link = None
    if args.link_dir is not None:
        args.link_dir.mkdir(parents=True, exist_ok=True)
        link = args.link_dir / args.link_name.format(index=0, gen=0)
    try:
        summary = replay(
            args.replay, link=link, paced=not args.replay_fast,
            announce=lambda path: print(f"DEVICE replay {path}", flush=True),
            stopped=lambda: _flags["stop"],
        )  # fmt: skip
    except (OSError, CaptureError) as exc:
        print(f"ironfleet-sim: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0 if "error" not in summary else 1


def _version() -> str:
    # The distribution's version, read directly: firmware_bridge never imports agent/.
    try:
        return version("ironfleet-agent")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
