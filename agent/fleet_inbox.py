"""What the agent accepts from the fleet: acks and commands, checked before anything acts.

The broker -> agent trust boundary (docs/fleet-protocol.md section 5). Every message on
`ack` or `cmd` goes through `FleetInbox`, which returns the message to act on or None;
refused ones are counted by reason in `rejected` (published as `uplink.rejected`) and
logged once per kind and reason per LOG_INTERVAL (LogThrottle), never once per message.

Checks run cheapest first, so a flood costs little: size cap and total decoding
(agent.fleet), signature present, ack for a batch actually in flight with the digest of
the bytes we published, command counter newer than the last accepted one, a token bucket
before any signature verification of a command, then Ed25519 (agent.fleet_auth), then a
token bucket per command kind (a ping costs a publish; a replay a state rebuild).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from agent.fleet import Ack, Command, FleetMessageError
from agent.fleet_auth import FleetAuth
from agent.resilience.ratelimit import LogThrottle, TokenBucket

log = logging.getLogger(__name__)

# Why a message was refused: a fixed set, so the counters cannot grow with peer input.
REASONS: Final = (
    "undecodable",  # not a well-formed ack / command (agent.fleet decoders)
    "unsigned",  # no signature while a fleet key is configured
    "bad_signature",  # a signature that is not the fleet's over these exact fields
    "digest_mismatch",  # an ack whose digest is not that of the batch we published
    "stale_counter",  # a command whose id is not above the last accepted one (replay)
    "rate_limited",  # over a per-kind token bucket
    "retained",  # retained on ack/cmd: the collector never retains, so never genuine
    "bug",  # a handler raised: caught by FleetSync's last-resort guard
)
LOG_INTERVAL: Final = 60.0  # seconds: one line per kind and reason, then a count
# Verifying a signature costs ~50-100 us (bench/bench_fleet_auth.py): a flood of commands
# with fresh counters and bogus signatures must not buy more than this many a second.
# Genuine commands are rare (an operator's replay, a health ping).
COMMAND_VERIFY_RATE: Final = 20.0
COMMAND_VERIFY_BURST: Final = 40.0
# A ping is answered with a retained status publish: bounded, so a ping flood can neither
# fill paho's queue nor crowd the batches' PUBACKs out (the issue's reconnect storm).
PING_RATE: Final = 1.0
PING_BURST: Final = 5.0

DigestOf = Callable[[int], bytes | None]


class FleetInbox:
    """Decode, authenticate and rate-limit acks and commands; count what is refused."""

    def __init__(self, auth: FleetAuth, digest_of: DigestOf) -> None:
        self.auth = auth
        self.digest_of = digest_of  # batch id -> digest of the payload sent; None: unknown
        self.rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.accepted = {"ack": 0, "cmd": 0}
        self.last_command_id = 0  # in memory: see docs/fleet-protocol.md 4.3
        self._verify = TokenBucket(COMMAND_VERIFY_RATE, COMMAND_VERIFY_BURST)
        self._pings = TokenBucket(PING_RATE, PING_BURST)
        self._throttle = LogThrottle(LOG_INTERVAL, max_keys=2 * len(REASONS) + 4)

    @property
    def refused(self) -> int:
        return sum(self.rejected.values())

    def ack(self, payload: bytes, now: float) -> Ack | None:
        """The ack to apply, or None. An ack for a batch not in flight is returned
        unverified: applying it changes nothing (Resync counts it stale)."""
        try:
            ack = Ack.decode(payload)
        except FleetMessageError as exc:
            self._reject("ack", "undecodable", now, str(exc))
            return None
        reason = self._ack_refusal(ack)
        if reason is not None:
            self._reject("ack", reason, now, f"batch={ack.batch_id}")
            return None
        self.accepted["ack"] += 1
        return ack

    def command(self, payload: bytes, now: float) -> Command | None:
        """The command to act on, or None."""
        try:
            cmd = Command.decode(payload)
        except FleetMessageError as exc:
            self._reject("cmd", "undecodable", now, str(exc))
            return None
        reason = self._command_refusal(cmd, now)
        if reason is not None:
            self._reject("cmd", reason, now, f"op={cmd.op} id={cmd.cmd_id}")
            return None
        self.accepted["cmd"] += 1
        if cmd.op == "replay":
            verdict = self._throttle.check("replay_requested", now)
            if verdict.log:
                log.info("replay_requested id=%d more_in_last_interval=%d", cmd.cmd_id,
                         verdict.suppressed)  # fmt: skip
        return cmd

    def retained(self, kind: str, now: float) -> None:
        """A retained message arrived on `kind` (ack or cmd): dropped unread."""
        self._reject(kind, "retained", now, "retained flag set")

    def bug(self, kind: str, now: float, exc: BaseException) -> None:
        """A handler raised on a message of `kind`: counted, traceback logged (throttled)."""
        self.rejected["bug"] += 1
        verdict = self._throttle.check(f"{kind}:bug", now)
        if verdict.log:
            log.error("fleet_handler_bug topic=%s error=%r more_in_last_interval=%d", kind,
                      f"{type(exc).__name__}: {exc}", verdict.suppressed,
                      exc_info=(type(exc), exc, exc.__traceback__))  # fmt: skip

    def _reject(self, kind: str, reason: str, now: float, detail: str) -> None:
        self.rejected[reason] += 1
        verdict = self._throttle.check(f"{kind}:{reason}", now)
        if verdict.log:
            log.warning("fleet_message_rejected topic=%s reason=%s detail=%r "
                        "more_in_last_interval=%d", kind, reason, detail[:160],
                        verdict.suppressed)  # fmt: skip

    def _ack_refusal(self, ack: Ack) -> str | None:
        if self.auth.signed and not ack.signature:
            return "unsigned"
        expected = self.digest_of(ack.batch_id)
        if expected is None:
            return None  # not in flight: stale or foreign, and it moves nothing
        if (self.auth.signed or ack.digest) and ack.digest != expected:
            return "digest_mismatch"
        if not self.auth.ack_ok(ack):
            return "bad_signature"
        return None

    def _command_refusal(self, cmd: Command, now: float) -> str | None:
        if self.auth.signed:
            if not cmd.signature:
                return "unsigned"
            if cmd.cmd_id <= self.last_command_id:
                return "stale_counter"
            if not self._verify.allow(now):
                return "rate_limited"
            if not self.auth.command_ok(cmd):
                return "bad_signature"
            self.last_command_id = cmd.cmd_id
        if cmd.op == "ping" and not self._pings.allow(now):
            return "rate_limited"
        return None
