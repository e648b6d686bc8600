"""Software fault injection for a byte stream (pseudo-terminals carry no line errors).

Each fault is a pure transformation of the bytes about to be written, driven by a seeded
random source, so a failing run is replayed by its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class FaultCounts:
    """What was injected, for the ground truth and test reports."""

    bits_flipped: int = 0
    bytes_dropped: int = 0
    bytes_inserted: int = 0
    frames_truncated: int = 0
    garbage_bytes: int = 0
    corruption_events: int = 0  # writes that were altered in any way


@dataclass(slots=True)
class LineNoise:
    """Bit errors, dropped and inserted bytes, truncated frames; all rates per unit."""

    ber: float = 0.0  # probability that any one bit flips
    drop_rate: float = 0.0  # probability that any one byte is lost
    insert_rate: float = 0.0  # probability that a random byte appears after any one byte
    truncate_rate: float = 0.0  # probability that a frame is cut short (its tail lost)
    rng: random.Random = field(default_factory=random.Random)
    counts: FaultCounts = field(default_factory=FaultCounts)

    @property
    def active(self) -> bool:
        return bool(self.ber or self.drop_rate or self.insert_rate or self.truncate_rate)

    def apply_frame(self, wire: bytes) -> bytes:
        """Return `wire` (one encoded frame, delimiter included) as it arrives."""
        if not self.active:
            return wire
        data = wire
        altered = False
        if self.truncate_rate and self.rng.random() < self.truncate_rate and len(data) > 1:
            data = data[: self.rng.randrange(1, len(data))]
            self.counts.frames_truncated += 1
            altered = True
        if self.ber:
            data, flips = self._flip(data)
            altered |= flips > 0
        if self.drop_rate or self.insert_rate:
            data, changed = self._drop_insert(data)
            altered |= changed
        if altered:
            self.counts.corruption_events += 1
        return data

    def _flip(self, data: bytes) -> tuple[bytes, int]:
        nbits = len(data) * 8
        # Geometric gaps between flipped bits: O(flips), not O(bits).
        pos = int(self.rng.expovariate(self.ber))
        if pos >= nbits:
            return data, 0
        buf = bytearray(data)
        flips = 0
        while pos < nbits:
            buf[pos >> 3] ^= 1 << (pos & 7)
            flips += 1
            pos += 1 + int(self.rng.expovariate(self.ber))
        self.counts.bits_flipped += flips
        return bytes(buf), flips

    def _drop_insert(self, data: bytes) -> tuple[bytes, bool]:
        out = bytearray()
        changed = False
        for byte in data:
            if self.drop_rate and self.rng.random() < self.drop_rate:
                self.counts.bytes_dropped += 1
                changed = True
            else:
                out.append(byte)
            if self.insert_rate and self.rng.random() < self.insert_rate:
                out.append(self.rng.randrange(256))
                self.counts.bytes_inserted += 1
                changed = True
        return bytes(out), changed

    def garbage(self, size: int) -> bytes:
        """A burst of random bytes, as from a floating line or a babbling device."""
        self.counts.garbage_bytes += size
        return self.rng.randbytes(size)
