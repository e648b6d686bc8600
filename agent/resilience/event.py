"""The telemetry event as the resilience core sees it."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any

_set = object.__setattr__


@dataclass(frozen=True, slots=True)
class Event:
    """One telemetry event: a point in a controller stream.

    `(stream, boot_epoch, seq)` identifies it. `boot_epoch` grows when a controller reboots
    and its sequences restart, so `(boot_epoch, seq)` orders events across reboots.
    `payload` is normally the msgpack-encoded map of signal values as stored; any
    msgpack-serialisable value is accepted so that callers may pass a decoded map.
    """

    stream: str
    seq: int
    _: KW_ONLY
    boot_epoch: int = 0
    ts: float = 0.0
    kind: str = "telemetry"
    priority: int = 0
    payload: Any = b""

    def __post_init__(self) -> None:
        # Checked here because a bad key would silently corrupt replay's ordering later.
        if not isinstance(self.stream, str) or not self.stream:
            raise ValueError(f"Event.stream must be a non-empty str, got {self.stream!r}")
        if type(self.seq) is not int or self.seq < 0:
            raise ValueError(f"Event.seq must be an int >= 0, got {self.seq!r}")
        if type(self.boot_epoch) is not int or self.boot_epoch < 0:
            raise ValueError(f"Event.boot_epoch must be an int >= 0, got {self.boot_epoch!r}")

    @classmethod
    def trusted(  # noqa: PLR0917 - positional on purpose: called per frame on the hot path
        cls,
        stream: str,
        seq: int,
        boot_epoch: int,
        ts: float,
        kind: str,
        priority: int,
        payload: Any,
    ) -> Event:
        """Build without re-checking: for callers whose input a schema already validated.

        The ingest hot path decodes tens of thousands of frames a second; the protocol
        schema has checked every field, and checking again here costs a third of it.
        """
        event = object.__new__(cls)
        _set(event, "stream", stream)
        _set(event, "seq", seq)
        _set(event, "boot_epoch", boot_epoch)
        _set(event, "ts", ts)
        _set(event, "kind", kind)
        _set(event, "priority", priority)
        _set(event, "payload", payload)
        return event

    @property
    def position(self) -> tuple[int, int]:
        """Order of this event within its stream: `(boot_epoch, seq)`."""
        return (self.boot_epoch, self.seq)
