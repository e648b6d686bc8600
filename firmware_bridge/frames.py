"""Sans-I/O frame codec: COBS framing, `0x00` delimiters and a CRC-32C trailer.

`encode(frame)` returns the bytes to write; `FrameDecoder.feed(data)` takes whatever bytes
arrived (any chunking) and returns the complete, validated frames, counting every reject
by the stage that caught it. Bytes are framed first and decoded second: a corrupt frame
costs that frame only, because COBS resynchronises at the next delimiter.
"""

from __future__ import annotations

from typing import Final

import crc32c
from cobs import cobs

from firmware_bridge.errors import REJECT_REASONS, FrameCorrupt, FrameTooLarge, RejectReason
from firmware_bridge.protocol import (
    CRC_BYTES,
    MAX_ENCODED_FRAME_BYTES,
    MAX_ENVELOPE_BYTES,
    MAX_FRAME_BYTES,
    Frame,
    pack_envelope,
    parse_envelope,
)

DELIMITER: Final = b"\x00"


def crc(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as sent little-endian after the envelope."""
    value: int = crc32c.crc32c(data)
    return value


def seal(envelope: bytes) -> bytes:
    """Append the CRC and COBS-encode: the wire bytes of one frame, delimiter included."""
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise FrameTooLarge(f"envelope of {len(envelope)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    encoded: bytes = cobs.encode(envelope + crc(envelope).to_bytes(CRC_BYTES, "little"))
    return encoded + DELIMITER


def encode(frame: Frame) -> bytes:
    """Wire bytes of `frame`; raises `FrameTooLarge` past MAX_FRAME_BYTES."""
    return seal(pack_envelope(frame))


def unseal(chunk: bytes) -> bytes:
    """Undo `seal` for one delimiter-free chunk: COBS-decode, check length and CRC."""
    if len(chunk) > MAX_ENCODED_FRAME_BYTES:
        raise FrameCorrupt("too_long", f"{len(chunk)} encoded bytes")
    try:
        raw: bytes = cobs.decode(chunk)
    except cobs.DecodeError as exc:
        raise FrameCorrupt("cobs", str(exc)) from None
    if len(raw) > MAX_FRAME_BYTES:
        raise FrameCorrupt("too_long", f"{len(raw)} decoded bytes")
    if len(raw) <= CRC_BYTES:
        raise FrameCorrupt("crc", f"frame of {len(raw)} bytes has no room for a CRC")
    envelope, trailer = raw[:-CRC_BYTES], raw[-CRC_BYTES:]
    if crc(envelope) != int.from_bytes(trailer, "little"):
        raise FrameCorrupt("crc", "checksum mismatch")
    return envelope


def decode_one(chunk: bytes) -> Frame:
    """Decode one delimiter-free chunk into a validated frame, or raise `FrameCorrupt`."""
    return parse_envelope(unseal(chunk))


class FrameDecoder:
    """Incremental decoder: feed bytes in any chunking, get whole validated frames.

    The receive buffer never holds more than MAX_ENCODED_FRAME_BYTES: bytes past that are
    discarded until the next delimiter, and the oversize frame counts once as `too_long`.
    Empty frames (delimiters in a row) are idle fill, not errors.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overflow = False
        self.accepted = 0
        self.rejects: dict[RejectReason, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.last_reject: FrameCorrupt | None = None
        self.bytes_discarded = 0

    @property
    def rejected(self) -> int:
        """Total frames rejected, all reasons."""
        return sum(self.rejects.values())

    @property
    def buffered(self) -> int:
        """Bytes held waiting for a delimiter (bounded by MAX_ENCODED_FRAME_BYTES)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Consume `data`; return the frames it completed, in order."""
        parts = bytes(data).split(DELIMITER)
        frames: list[Frame] = []
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if self._overflow:
                self.bytes_discarded += len(part)
                if not last:
                    self._overflow = False
                    self._reject(FrameCorrupt("too_long", "no delimiter within the frame cap"))
                continue
            if last:
                self._hold(part)
                break
            if self._buf:
                self._buf += part
                chunk = bytes(self._buf)
                self._buf.clear()
            else:
                chunk = part
            if not chunk:
                continue
            try:
                frames.append(decode_one(chunk))
            except FrameCorrupt as exc:
                self._reject(exc)
            else:
                self.accepted += 1
        return frames

    def reset(self) -> None:
        """Drop a partial frame, e.g. after the port was reopened."""
        self.bytes_discarded += len(self._buf)
        self._buf.clear()
        self._overflow = False

    def _hold(self, part: bytes) -> None:
        if len(self._buf) + len(part) > MAX_ENCODED_FRAME_BYTES:
            self.bytes_discarded += len(self._buf) + len(part)
            self._buf.clear()
            self._overflow = True
        else:
            self._buf += part

    def _reject(self, exc: FrameCorrupt) -> None:
        self.rejects[exc.reason] += 1
        self.last_reject = exc
