"""The uplink's byte budget (agent/resilience/budget.py): never more than the rate allows
plus one burst and one message, never stalled by a message bigger than the burst."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.resilience.budget import QUOTA_MIN_BATCH, ByteBudget, drain_estimate


@given(
    st.integers(100, 100_000),
    st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(1, 300_000)), min_size=1, max_size=200),
)
def test_what_goes_out_stays_within_the_rate(rate: int, steps: list[tuple[float, int]]) -> None:
    budget = ByteBudget(rate)
    now, sent, biggest = 0.0, 0, 0
    for dt, size in steps:
        now += dt
        if budget.ready(now):
            budget.spend(size)
            sent += size
            biggest = max(biggest, size)
        assert sent <= rate * now + budget.burst + biggest
    assert budget.spent == sent


@given(st.integers(100, 10_000), st.integers(10_000, 10**7))
def test_a_message_bigger_than_the_burst_goes_and_the_link_recovers(rate: int, size: int) -> None:
    budget = ByteBudget(rate)
    assert budget.ready(0.0)
    budget.spend(size)
    assert not budget.ready(0.0)
    assert budget.ready((size - rate) / rate + 1e-3)  # once the debt is repaid


def test_unlimited_and_a_clock_that_steps_back() -> None:
    free = ByteBudget(0)
    free.spend(10**9)
    assert free.ready(0.0)
    assert free.seconds_for(10**6) == 0.0
    budget = ByteBudget(1000, now=100.0)
    budget.spend(5000)
    assert not budget.ready(50.0)  # backwards: refills nothing
    assert budget.ready(104.001)
    assert budget.seconds_for(8000) == 8.0
    with pytest.raises(ValueError, match="rate"):
        ByteBudget(float("nan"))


@given(
    st.integers(4096, 200_000),
    st.floats(1.0, 100.0),
    st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(1, 300_000)), min_size=1, max_size=300),
)
def test_a_contact_window_carries_its_quota_and_one_small_batch_at_most(
    quota: int, seconds: float, steps: list[tuple[float, int]]
) -> None:
    """As the uplink uses it: a batch is cut to the room left (never below
    QUOTA_MIN_BATCH), and goes only when `ready`. Whatever the sizes and timing, a
    window's bytes stay within quota + QUOTA_MIN_BATCH, and a new window opens only
    `contact_seconds` after the last one opened."""
    budget = ByteBudget(0, per_contact=quota, contact_seconds=seconds)
    now = 0.0
    window: list[float] = []  # when the current window opened, by our own count
    in_window = 0
    for dt, want in steps:
        now += dt
        if not window or now - window[-1] >= seconds:
            window.append(now)
            in_window = 0
        if budget.ready(now):
            size = min(want, max(QUOTA_MIN_BATCH, int(budget.room(now))))
            budget.spend(size)
            in_window += size
        else:
            assert in_window >= quota  # refused only when the quota is spent
        assert in_window <= quota + QUOTA_MIN_BATCH
        assert budget.contact_spent == in_window
        assert budget.window_left(now) == pytest.approx(max(0.0, window[-1] + seconds - now))


def test_the_window_does_not_refill_before_its_end_and_the_estimate_counts_windows() -> None:
    budget = ByteBudget(1000, per_contact=10_000, contact_seconds=60, now=0.0)
    budget.spend(0)
    assert budget.room(0.0) == 10_000
    for t in range(11):
        assert budget.ready(float(t * 10)) or budget.contact_spent >= 10_000
        if budget.ready(float(t * 10)):
            budget.spend(5000)  # the rate's debt repays in 5 s, well inside the steps
    # Two 5,000-byte messages in the window at t=0..50, then refused until t=60.
    assert budget.spent == 10_000 + 2 * 5000  # window 2 opened at t=60 and took two more
    assert not budget.ready(110.0)
    assert budget.ready(120.0)
    assert drain_estimate(25_000, 1000, 10_000, 4000) == (25.0, 3)  # 4,000 now + 3 windows
    assert drain_estimate(25_000, 0, 0, 0) == (None, None)
    assert drain_estimate(3000, 0, 10_000, 4000) == (None, 0)  # fits in the room left
    with pytest.raises(ValueError, match="per_contact"):
        ByteBudget(0, per_contact=-1)
