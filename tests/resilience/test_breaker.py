"""Circuit breaker: each rule with a fake clock, properties, and thread safety."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.resilience import BreakerState, CircuitBreaker


class FakeClock:
    """A monotonic clock the test steps by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(threshold: int = 3, timeout: float = 30.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(threshold, timeout, clock=clock), clock


def test_starts_closed_and_allows() -> None:
    cb, _ = make()
    assert cb.state == "closed"
    assert cb.allow()
    assert cb.snapshot() == ("closed", 0, 0)


def test_opens_after_threshold_failures() -> None:
    cb, _ = make(threshold=3)
    cb.record_failure()
    cb.record_failure()
    assert cb.state == "closed"
    cb.record_failure()
    assert cb.state == "open"
    assert not cb.allow()


def test_success_while_closed_decrements_failures() -> None:
    cb, _ = make(threshold=5)
    for _ in range(3):
        cb.record_failure()
    cb.record_success()
    cb.record_success()
    assert cb.snapshot().failures == 1
    cb.record_success()
    cb.record_success()
    assert cb.snapshot().failures == 0


def test_open_becomes_half_open_after_recovery_timeout() -> None:
    cb, clock = make(threshold=1, timeout=30.0)
    cb.record_failure()
    clock.advance(29.999)
    assert cb.state == "open"
    assert not cb.allow()
    assert cb.retry_in() == pytest.approx(0.001)
    clock.advance(0.001)
    assert cb.state == "half_open"
    assert cb.allow()


def test_three_half_open_successes_close_whatever_the_threshold() -> None:
    cb, clock = make(threshold=10, timeout=5.0)
    for _ in range(10):
        cb.record_failure()
    clock.advance(5.0)
    cb.record_success()
    cb.record_success()
    assert cb.state == "half_open"
    assert cb.snapshot().successes == 2
    cb.record_success()
    assert cb.snapshot() == ("closed", 0, 0)


def test_custom_half_open_successes() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(1, 1.0, half_open_successes=1, clock=clock)
    cb.record_failure()
    clock.advance(1.0)
    cb.record_success()
    assert cb.state == "closed"


def test_half_open_failure_reopens_with_fresh_timestamp() -> None:
    cb, clock = make(threshold=2, timeout=10.0)
    cb.record_failure()
    cb.record_failure()
    clock.advance(10.0)
    assert cb.state == "half_open"
    cb.record_success()
    clock.advance(4.0)
    cb.record_failure()
    assert cb.state == "open"
    clock.advance(9.9)  # 13.9 s after first opening, 9.9 s after re-opening
    assert not cb.allow()
    clock.advance(0.1)
    assert cb.allow()
    assert cb.snapshot().successes == 0


def test_late_results_while_open_change_nothing() -> None:
    cb, clock = make(threshold=1, timeout=10.0)
    cb.record_failure()
    clock.advance(5.0)
    cb.record_failure()  # must not push the re-try further out
    cb.record_success()  # must not count as a probe success
    clock.advance(5.0)
    assert cb.snapshot() == ("half_open", 1, 0)


def test_wall_clock_is_never_read() -> None:
    # With a frozen injected clock the breaker stays open forever, however long we wait.
    cb, _ = make(threshold=1, timeout=0.01)
    cb.record_failure()
    for _ in range(1000):
        assert not cb.allow()


def test_state_is_a_str_enum() -> None:
    assert BreakerState.HALF_OPEN == "half_open"
    assert isinstance(BreakerState.OPEN, str)


@pytest.mark.parametrize(
    ("threshold", "timeout", "probes"),
    [(0, 1.0, 3), (1.5, 1.0, 3), (1, -1.0, 3), (1, float("nan"), 3), (1, 1.0, 0)],
)
def test_rejects_bad_parameters(threshold: object, timeout: float, probes: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        CircuitBreaker(threshold, timeout, half_open_successes=probes)  # type: ignore[arg-type]


ops = st.lists(
    st.one_of(
        st.just(("fail", 0.0)),
        st.just(("ok", 0.0)),
        st.tuples(st.just("wait"), st.floats(0.0, 20.0)),
    ),
    max_size=80,
)


@given(st.integers(1, 5), st.floats(0.5, 15.0), ops)
def test_never_allows_while_open_before_timeout(
    threshold: int, timeout: float, steps: list[tuple[str, float]]
) -> None:
    clock = FakeClock()
    cb = CircuitBreaker(threshold, timeout, clock=clock)
    opened_at: float | None = None
    for op, dt in steps:
        before = cb.state
        if op == "fail":
            cb.record_failure()
        elif op == "ok":
            cb.record_success()
        else:
            clock.advance(dt)
        after = cb.state
        if after == "open" and before != "open":
            opened_at = clock.now
        if opened_at is not None and clock.now - opened_at < timeout:
            assert after == "open"
            assert not cb.allow()
        if after != "open":
            opened_at = None
        snap = cb.snapshot()
        assert 0 <= snap.failures <= threshold
        assert 0 <= snap.successes < 3


def test_concurrent_record_failure_and_snapshot() -> None:
    clock = FakeClock()
    threshold = 10_000
    cb = CircuitBreaker(threshold, 60.0, clock=clock)
    problems: list[str] = []
    start = threading.Barrier(5)

    def fail() -> None:
        start.wait()
        for _ in range(2500):
            cb.record_failure()

    def watch() -> None:
        start.wait()
        last = 0
        for _ in range(5000):
            snap = cb.snapshot()
            if snap.state == "closed" and snap.failures < last:
                problems.append(f"failures went back from {last} to {snap.failures}")
            if snap.state == "open" and snap.failures != threshold:
                problems.append(f"open with {snap.failures} failures")
            last = snap.failures

    threads = [threading.Thread(target=fail) for _ in range(4)]
    threads.append(threading.Thread(target=watch))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not problems
    # Exactly 10,000 failures were recorded: no increment was lost to a race.
    assert cb.snapshot() == ("open", threshold, 0)
