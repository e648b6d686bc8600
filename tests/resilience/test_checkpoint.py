"""Checkpoints: monotonic, delta-based cadence, thread-safe."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.resilience import CheckpointManager
from agent.resilience.checkpoint import CheckpointCadence


def test_delta_based_cadence_5000_5500_6000() -> None:
    cm = CheckpointManager(interval=1000)
    assert cm.mark("convoy-1", 5000)
    assert not cm.should_checkpoint("convoy-1", 5500)
    assert cm.should_checkpoint("convoy-1", 6000)


def test_never_moves_backwards_and_counts_ignored() -> None:
    cm = CheckpointManager()
    assert cm.position("s") is None
    assert cm.mark("s", 10)
    assert not cm.mark("s", 9)
    assert not cm.mark("s", 10)
    assert cm.position("s") == 10
    assert cm.ignored == 2
    assert cm.mark("s", 11)
    assert cm.position("s") == 11


def test_streams_are_independent() -> None:
    cm = CheckpointManager(interval=10)
    cm.mark("a", 100)
    assert cm.position("b") is None
    assert cm.should_checkpoint("b", 10)
    assert not cm.should_checkpoint("b", 9)
    assert cm.positions() == {"a": 100}


def test_load_never_lowers() -> None:
    cm = CheckpointManager()
    cm.mark("a", 50)
    cm.load({"a": 40, "b": 7})
    assert cm.positions() == {"a": 50, "b": 7}


@pytest.mark.parametrize("interval", [0, -1, 1.5])
def test_rejects_bad_interval(interval: object) -> None:
    with pytest.raises(ValueError, match="interval"):
        CheckpointManager(interval=interval)  # type: ignore[arg-type]


@given(st.lists(st.integers(0, 1000), max_size=60))
def test_position_is_running_max(marks: list[int]) -> None:
    cm = CheckpointManager()
    accepted = [cm.mark("s", m) for m in marks]
    assert cm.position("s") == (max(marks) if marks else None)
    assert sum(accepted) + cm.ignored == len(marks)


def test_concurrent_mark_and_should_checkpoint() -> None:
    cm = CheckpointManager(interval=100)
    per_thread = 5000
    errors: list[str] = []
    start = threading.Barrier(5)

    accepted = [0] * 4

    def marker(offset: int) -> None:
        start.wait()
        for i in range(per_thread):
            accepted[offset] += cm.mark("s", i * 4 + offset)

    def reader() -> None:
        start.wait()
        last = -1
        for _ in range(per_thread):
            pos = cm.position("s")
            if pos is not None:
                if pos < last:
                    errors.append(f"position went back from {last} to {pos}")
                last = pos
                # should_checkpoint is consistent with a position read under the same lock
                cm.should_checkpoint("s", pos + 100)

    threads = [threading.Thread(target=marker, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert cm.position("s") == (per_thread - 1) * 4 + 3
    assert sum(accepted) + cm.ignored == 4 * per_thread


# -- the cadence at which the agent persists fleet acks ----------------------------------


def test_cadence_persists_after_interval_rows_or_max_delay() -> None:
    cadence = CheckpointCadence(interval=5000, max_delay=1.0)
    assert not cadence.pending
    assert not cadence.due(0.0)
    cadence.acked(500, 10.0)
    assert cadence.pending
    assert not cadence.due(10.5)
    assert cadence.due(11.0)  # the oldest waiting ack is max_delay old
    cadence.persisted()
    assert not cadence.pending
    assert not cadence.due(99.0)
    for i in range(10):  # 10 acks of 500 rows within 0.1 s: due by volume at the 10th
        cadence.acked(500, 20.0 + i / 100)
        assert cadence.due(20.0 + i / 100) is (i == 9)
    cadence.acked(0, 30.0)  # nothing new: no new waiting time either
    cadence.persisted()
    cadence.acked(0, 30.0)
    assert not cadence.pending


@given(st.lists(st.tuples(st.integers(0, 3000), st.floats(0, 2)), max_size=60))
def test_no_ack_waits_longer_than_max_delay_nor_interval_rows(
    acks: list[tuple[int, float]],
) -> None:
    """Stepping the clock through any ack pattern: whenever a persist is not due, what
    waits is under `interval` rows and younger than `max_delay`."""
    cadence = CheckpointCadence(interval=5000, max_delay=1.0)
    now, waiting, oldest = 0.0, 0, None
    for rows, gap in acks:
        now += gap
        cadence.acked(rows, now)
        if rows > 0:
            waiting += rows
            oldest = now if oldest is None else oldest
        if cadence.due(now):
            cadence.persisted()
            waiting, oldest = 0, None
        else:
            assert waiting < 5000
            assert oldest is None or now - oldest < 1.0


@pytest.mark.parametrize(("interval", "max_delay"), [(0, 1.0), (1.5, 1.0), (10, -1.0)])
def test_cadence_rejects_bad_settings(interval: object, max_delay: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        CheckpointCadence(interval=interval, max_delay=max_delay)  # type: ignore[arg-type]
