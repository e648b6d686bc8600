"""Errors of the firmware bridge, classified by what the caller should do about them."""

from __future__ import annotations

from typing import Literal

RejectReason = Literal["cobs", "crc", "too_long", "msgpack", "schema"]
REJECT_REASONS: tuple[RejectReason, ...] = ("cobs", "crc", "too_long", "msgpack", "schema")


class BridgeError(Exception):
    """Root of every error raised by `firmware_bridge`."""


class FrameCorrupt(BridgeError):
    """A frame failed one stage of decoding; `reason` names the stage.

    Every decode failure, whatever library raised it, becomes this one error so the
    caller has one thing to count and NACK. The frame is dropped, never half-used.
    """

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason
        self.detail = detail


class PortUnavailable(BridgeError):
    """The serial device is missing, busy or vanished; retry with backoff."""


class FrameTooLarge(BridgeError):
    """An outgoing frame would exceed MAX_FRAME_BYTES; a programming or config error."""
