"""Run the real agent with one deliberate bug patched in: the chaos suite's controls.

    python broken.py VARIANT AGENT_PATH run --config FILE

A chaos harness that cannot fail proves nothing, so each harness also runs the agent
with a known bug and must report the loss. The bug is patched into the real daemon in
this process (no test hook lives in the product): the rest of the agent, the store,
the serial link and the uplink are the shipped code.

Variants:
- `ack_before_commit`: the writer reports a batch durable, then commits it.
- `ack_after_failed_commit`: a failed commit is reported durable anyway.
- `accept_corrupt`: the frame decoder skips the CRC check.
- `checkpoint_on_publish`: the uplink counts a batch delivered as soon as it is
  published, without waiting for the collector's acknowledgement.
- `wall_clock_timers`: the agent's timers (breaker, backoff, heartbeats) read the wall
  clock instead of the monotonic one.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from cobs import cobs

from agent import daemon, resync, writer
from agent.store import CommitFailed, StoreFull
from firmware_bridge import frames


def ack_before_commit() -> None:
    def commit(self: writer.Writer, groups: list[Any]) -> None:
        self._report(groups, True)
        time.sleep(0.002)  # let the serial thread send the ACK before the commit
        with contextlib.suppress(CommitFailed, StoreFull):
            self._append([r for g in groups for r in g.items])

    writer.Writer._commit = commit  # type: ignore[method-assign]


def ack_after_failed_commit() -> None:
    original = writer.Writer._append

    def append(self: writer.Writer, arrivals: Sequence[Any]) -> None:
        try:
            original(self, arrivals)
        except (CommitFailed, StoreFull):
            self.shared.counters["commit_failures"] += 1  # and then claim success

    writer.Writer._append = append  # type: ignore[method-assign]


def accept_corrupt() -> None:
    def unseal(chunk: bytes) -> bytes:
        try:
            raw: bytes = cobs.decode(chunk)
        except cobs.DecodeError as exc:
            raise frames.FrameCorrupt("cobs", str(exc)) from None
        if len(raw) <= frames.CRC_BYTES:
            raise frames.FrameCorrupt("crc", "short")
        return raw[: -frames.CRC_BYTES]

    frames.unseal = unseal


def checkpoint_on_publish() -> None:
    original = resync.Resync.run_once

    def run_once(self: resync.Resync, now: float) -> list[resync.Outgoing]:
        out = original(self, now)
        for batch in out:
            if batch.kind == "events":
                self.on_ack(batch.batch_id, now)  # as if the fleet held it already
        return out

    resync.Resync.run_once = run_once  # type: ignore[method-assign]


def wall_clock_timers() -> None:
    time.monotonic = time.time


VARIANTS: dict[str, Callable[[], None]] = {
    f.__name__: f
    for f in (
        ack_before_commit,
        ack_after_failed_commit,
        accept_corrupt,
        checkpoint_on_publish,
        wall_clock_timers,
    )
}


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in VARIANTS:
        print(f"usage: broken.py {{{','.join(VARIANTS)}}} AGENT_PATH ARGS...", file=sys.stderr)
        return 2
    VARIANTS[argv[1]]()
    print(f"broken_variant name={argv[1]} (a deliberate bug: this run must fail)", flush=True)
    return daemon.main(argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
