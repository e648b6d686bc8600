"""Coverage-guided fuzzing of the fleet documents and of the agent's ack/cmd handlers.

    python tests/chaos/fuzz_fleet.py [libFuzzer flags] CORPUS_DIR
    python tests/chaos/fuzz_fleet.py --write-seeds CORPUS_DIR

A broker delivers whatever anyone publishes, so every input is an MQTT payload an attacker
could send. Input layout: byte 0 picks how the rest becomes the payload (MODES): as is;
as the body of a raw fleet envelope `[1, 0, body]`; zlib-compressed in a zlib envelope
`[1, 1, z]` (so the fuzzer reaches the document checks without forging msgpack framing).

The oracle (`check`), which can fail:
- `Ack.decode`, `Command.decode`, `Batch.decode` and `decode_status` return a value or
  raise FleetMessageError, nothing else; a value they return has exact types (no bool for
  an int, finite floats, digests and signatures of their sizes) and survives
  encode -> decode unchanged;
- the same payload fed to a running `FleetSync` (real SQLite store, the real inbox with
  a fleet key the fuzzer does not have) as an ack, a command and a retained message never
  raises, never trips the last-resort guard (`rejected["bug"]` stays 0: the handlers are
  total by themselves), and never moves the delivery cursor: without the fleet's private
  key no input may count as a delivery.
tests/chaos/test_fuzz_fleet.py replays the corpus through `check` and runs this file
under libFuzzer.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import tempfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import atheris
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# Instrumented here so libFuzzer sees the branches of the code under test; pytest imports
# these modules before it loads this file, which leaves them uninstrumented there.
with atheris.instrument_imports(
    include=["agent.fleet", "agent.fleet_auth", "agent.fleet_inbox", "agent.resync"]
):
    from agent.config import UplinkSection
    from agent.fleet import Ack, Batch, Command, FleetMessageError, decode_status
    from agent.fleet_auth import FleetAuth
    from agent.fleetsync import FleetSync
    from agent.resilience import Backoff, CircuitBreaker, Event
    from agent.resync import Resync
    from agent.store import EventStore, connect

MODES = ("raw", "envelope", "zlib")
VEHICLE = "fuzz-vehicle"
STEP = 0.001  # seconds of fake time per input: ack timeouts come after ~15,000 inputs


class OracleViolation(AssertionError):
    """A decoder or handler did something the fleet protocol's contract forbids."""


def payload_of(data: bytes) -> bytes:
    """The MQTT payload an input stands for (layout in the module docstring)."""
    if not data:
        return b""
    mode, rest = MODES[data[0] % len(MODES)], data[1:]
    if mode == "raw":
        return rest
    if mode == "envelope":
        return bytes(msgpack.packb([1, 0, rest], use_bin_type=True))
    return bytes(msgpack.packb([1, 1, zlib.compress(rest)], use_bin_type=True))


# -- the decoders ----------------------------------------------------------------------------


def _exact(value: object, kind: type, what: str) -> None:
    if type(value) is not kind:
        raise OracleViolation(f"{what} is {type(value).__name__}, not {kind.__name__}")


def _check_ack(ack: Ack) -> None:
    for name in ("batch_id", "stored", "duplicates", "issued"):
        _exact(getattr(ack, name), int, f"ack {name}")
    _exact(ack.kind, str, "ack kind")
    if len(ack.digest) not in (0, 32) or len(ack.signature) not in (0, 64):
        raise OracleViolation(f"ack digest/signature of odd size: {ack!r}")


def _check_batch(batch: Batch) -> None:
    _exact(batch.batch_id, int, "batch id")
    _exact(batch.historical, bool, "batch historical")
    for event, tq in batch.events:
        _exact(event.seq, int, "event seq")
        _exact(event.boot_epoch, int, "event boot_epoch")
        _exact(event.ts, float, "event ts")
        _exact(tq, int, "event time quality")
        _exact(event.payload, bytes, "event payload")
        if event.ts != event.ts or event.ts in (float("inf"), float("-inf")):
            raise OracleViolation(f"event ts {event.ts!r} is not finite")


def check_decoders(payload: bytes) -> list[object]:
    """Every decoder on `payload`: FleetMessageError or a well-typed value that round-trips."""
    values: list[object] = []
    for decode in (Ack.decode, Command.decode, Batch.decode, decode_status):
        try:
            value: Any = decode(payload)
        except FleetMessageError:
            continue
        except Exception as exc:
            raise OracleViolation(f"{decode.__qualname__} raised {exc!r}") from exc
        if isinstance(value, Ack):
            _check_ack(value)
            again: object = Ack.decode(value.encode())
        elif isinstance(value, Command):
            _exact(value.cmd_id, int, "command id")
            again = Command.decode(value.encode())
        elif isinstance(value, Batch):
            _check_batch(value)
            again = Batch.decode(value.encode(compress=False))
        else:
            _exact(value.get("state"), str, "status state")
            again = value
        if again != value:
            raise OracleViolation(f"{value!r} re-decodes as {again!r}")
        values.append(value)
    return values


# -- the handlers ----------------------------------------------------------------------------


@dataclass
class LoopTransport:
    """An in-process transport: always connected; what FleetSync publishes is kept count of
    (bounded), what the test pushes into `pending` comes out of the next poll."""

    connected: bool = False
    pending: list[tuple[str, object]] = field(default_factory=list)
    published: int = 0
    statuses: int = 0
    recent: deque[bytes] = field(default_factory=lambda: deque(maxlen=16))
    _mid: int = 0
    address: str = "loop:0"
    connect_error: str = ""

    def connect(self) -> bool:
        self.pending.append(("connected", None))
        self.connected = True
        return True

    def poll(self, timeout: float) -> list[tuple[str, object]]:
        out, self.pending = self.pending, []
        return out

    def publish(self, kind: str, payload: bytes) -> int | None:
        self._mid += 1
        self.published += 1
        self.recent.append(payload)
        self.pending.append(("puback", self._mid))
        return self._mid

    def publish_status(self, state: str, **fields: object) -> None:
        self.statuses += 1

    def drop(self) -> None:
        self.connected = False
        self.pending.append(("disconnected", "dropped"))


class World:
    """A store with events in flight and a FleetSync whose fleet key nobody here holds."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.store = EventStore(workdir / "agent.db")
        self.store.append([_In(Event(f"s{i % 3}", i // 3 + 1, payload=b"\x80")) for i in range(60)])
        self.reader = connect(self.store.path, readonly=True)
        config = UplinkSection(
            fleet_key_file="/unused", batch_max_events=10, batch_max_delay_ms=0.0, max_in_flight=3
        )
        self.resync = Resync(self.reader, VEHICLE, config, self._deliver, run_id=7)
        self.transport = LoopTransport()
        self.now = 1000.0
        self.sync = FleetSync(
            self.transport,
            self.resync,
            CircuitBreaker(1000, 1.0, clock=lambda: self.now),
            Backoff(0.01, 0.02),
            auth=FleetAuth(VEHICLE, Ed25519PrivateKey.generate().public_key()),
        )
        self.delivered: list[int] = []
        for _ in range(3):
            self.step()

    def _deliver(
        self, upto: int, positions: dict[str, tuple[int, int]], frontiers: tuple[int, ...]
    ) -> None:
        if upto > (self.delivered[-1] if self.delivered else 0):  # the cursor moved
            self.delivered.append(upto)

    def transport_payloads(self) -> list[bytes]:
        """The last batches FleetSync published (at most 16)."""
        return list(self.transport.recent)

    def step(self) -> None:
        self.now += STEP
        self.sync.run_once(self.now, timeout=0.0)

    def feed(self, payload: bytes) -> None:
        """The payload as an ack, a command and (flag only) a retained message."""
        self.transport.pending += [("ack", payload), ("cmd", payload), ("retained", "cmd")]
        try:
            self.step()
        except Exception as exc:
            raise OracleViolation(f"FleetSync.run_once raised {exc!r}") from exc
        if self.sync.inbox.rejected["bug"]:
            raise OracleViolation("a handler raised: the last-resort guard caught it")
        if self.delivered:
            raise OracleViolation(f"an unsigned input moved the cursor to {self.delivered}")

    def close(self) -> None:
        self.reader.close()
        self.store.close()


@dataclass(frozen=True)
class _In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


_WORLD: World | None = None


def world() -> World:
    """The process's world (built on first use, in IRONFLEET_FUZZ_WORKDIR or a temp dir)."""
    global _WORLD  # noqa: PLW0603 - one world per fuzzing process, built lazily
    if _WORLD is None:
        base = os.environ.get("IRONFLEET_FUZZ_WORKDIR") or tempfile.mkdtemp(prefix="fuzz-fleet-")
        _WORLD = World(Path(base))
    return _WORLD


def check(data: bytes) -> list[object]:
    """The whole oracle on one input; raises OracleViolation on the first failure."""
    payload = payload_of(data)
    values = check_decoders(payload)
    world().feed(payload)
    return values


# -- seeds -----------------------------------------------------------------------------------


def seeds() -> dict[str, bytes]:
    """Named inputs: valid documents of each kind and the hostile ones of issue 12."""
    key = Ed25519PrivateKey.generate()
    ack = Ack(1 << 32 | 1, "events", 10, 0, bytes(32), 1_700_000_000_000, key.sign(b"x"))
    event = Event("ecu0/engine", 3, boot_epoch=1, ts=1.7e9, kind="telemetry", payload=b"\x80")
    batch = Batch(VEHICLE, 5, "events", True, ((event, 3),))

    def body(doc: object) -> bytes:
        return b"\x01" + bytes(msgpack.packb(doc, use_bin_type=True))

    def raw(envelope: bytes) -> bytes:
        return b"\x00" + envelope

    return {
        "ack-signed": raw(ack.encode()),
        "ack-unsigned": raw(Ack(9, "state", 1, 0).encode()),
        "cmd-ping": raw(Command("ping", 7).encode()),
        "cmd-replay-signed": raw(Command("replay", 8, key.sign(b"y")).encode()),
        "batch": raw(batch.encode(compress=False)),
        "batch-zlib": raw(Batch(VEHICLE, 6, "state", False, ((event, 3),) * 40).encode()),
        "status": body({"state": "online", "backlog": 3}),
        # issue 12, finding 1: an id that is not an integer, a batch that is infinite
        "hostile-ping-id-x": body({"op": "ping", "id": "x"}),
        "hostile-ack-batch-inf": body(
            {"batch": float("inf"), "type": "events", "stored": 1, "duplicates": 0}
        ),
        "hostile-ack-batch-bool": body(
            {"batch": True, "type": "events", "stored": 1, "duplicates": 0}
        ),
        "hostile-ack-batch-nan": body(
            {"batch": float("nan"), "type": "state", "stored": 0, "duplicates": 0}
        ),
        "hostile-ack-huge-int": body(
            {"batch": 2**64 - 1, "type": "events", "stored": 2**63, "duplicates": -(2**63)}
        ),
        "hostile-cmd-nested": body({"op": [[[["ping"]]]], "id": {"a": {"b": 1}}}),
        "edge-batch-ts-huge-int": body(
            {
                "vehicle": VEHICLE,
                "batch": 1,
                "type": "events",
                "historical": False,
                "events": [["s", 0, 1, 2**64 - 1, 3, "k", 0, b""]],
            }
        ),
        "hostile-batch-historical-int": body(
            {"vehicle": VEHICLE, "batch": 1, "type": "state", "historical": 1, "events": []}
        ),
        "hostile-zlib-bomb": raw(
            bytes(msgpack.packb([1, 1, zlib.compress(b"\x00" * (17 * 2**20), 9)]))
        ),
        "hostile-json": b"\x00" + b'{"op": "ping", "id": "x"}',
        "hostile-envelope-wrong-shape": raw(bytes(msgpack.packb([1, 0]))),
        "hostile-envelope-body-not-bin": raw(bytes(msgpack.packb([1, 0, "text"]))),
        "hostile-version-bool": raw(bytes(msgpack.packb([True, 0, b"\x80"]))),
        "hostile-deep-nesting": b"\x01" + b"\x91" * 5000,
        "hostile-map32-bomb": b"\x01" + b"\xdf\xff\xff\xff\xff",
        "hostile-ext": b"\x01" + b"\xd6\xff\x00\x00\x00\x01",
    }


def write_seeds(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (folder / name).write_bytes(data)


def main(argv: list[str]) -> None:
    """libFuzzer entry; any oracle violation is a crash."""
    if len(argv) == 3 and argv[1] == "--write-seeds":
        write_seeds(Path(argv[2]))
        return
    logging.disable(logging.ERROR)  # rejected-message lines, thousands of times a second
    world()

    def one_input(data: bytes) -> None:
        check(data)

    # -merge=1, -fork and -minimize_crash re-run argv[0] through sh: make it the interpreter
    # and this script, as this file is not executable itself.
    atheris.Setup([shlex.join([sys.executable, argv[0]]), *argv[1:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
