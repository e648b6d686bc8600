"""Event validation: a bad identity is refused at construction."""

from __future__ import annotations

import dataclasses

import pytest

from agent.resilience import Event


def test_defaults_and_keyword_only_fields() -> None:
    event = Event("convoy-1", 2)
    assert (event.boot_epoch, event.kind, event.priority, event.payload) == (
        0,
        "telemetry",
        0,
        b"",
    )
    with pytest.raises(TypeError):
        Event("convoy-1", 2, 1)  # type: ignore[misc]


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Event("s", 1).seq = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("stream", "seq", "epoch"),
    [("", 1, 0), ("s", -1, 0), ("s", 1.0, 0), ("s", True, 0), ("s", 1, -1), (None, 1, 0)],
)
def test_rejects_bad_identity(stream: object, seq: object, epoch: object) -> None:
    with pytest.raises(ValueError, match="Event"):
        Event(stream, seq, boot_epoch=epoch)  # type: ignore[arg-type]
