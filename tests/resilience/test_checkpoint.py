"""Checkpoints: monotonic, delta-based cadence, thread-safe."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.resilience import CheckpointManager


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
