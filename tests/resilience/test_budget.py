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
    st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(0, 300_000)), min_size=1, max_size=300),
)
def test_a_contact_window_carries_its_quota_and_one_small_batch_at_most(
    quota: int, seconds: float, steps: list[tuple[float, int]]
) -> None:
    """As the uplink uses it: a batch is cut to the room left (never below
    QUOTA_MIN_BATCH) and goes only when `ready`; `want` 0 is a step with nothing to send.
    Whatever the sizes and timing, a window opens with the first send after the last one
    ended (not when nothing is sent), carries at most quota + QUOTA_MIN_BATCH, and is
    refused only when spent."""
    budget = ByteBudget(0, per_contact=quota, contact_seconds=seconds)
    now = 0.0
    opened: float | None = None  # the window as the documentation defines it
    in_window = 0
    for dt, want in steps:
        now += dt
        if opened is not None and now - opened >= seconds:
            opened, in_window = None, 0  # ended; the next send opens the next one
        if not budget.ready(now):
            assert opened is not None
            assert in_window >= quota  # refused only when the quota is spent
        elif want:
            size = min(want, max(QUOTA_MIN_BATCH, int(budget.room(now))))
            budget.spend(size, now)
            if opened is None:
                opened = now
            in_window += size
        assert in_window <= quota + QUOTA_MIN_BATCH
        assert budget.contact_spent(now) == in_window
        left = 0.0 if opened is None else opened + seconds - now
        assert budget.window_left(now) == pytest.approx(left)


def test_the_window_does_not_refill_before_its_end_and_the_estimate_counts_windows() -> None:
    budget = ByteBudget(1000, per_contact=10_000, contact_seconds=60, now=0.0)
    assert budget.room(0.0) == 10_000
    assert budget.window_left(30.0) == 0.0  # asked, nothing sent: no window is open
    for t in range(30, 140, 10):
        if budget.ready(float(t)):
            budget.spend(5000, float(t))  # the rate's debt repays in 5 s, inside the steps
    # Window 1 opened at t=30 (the first send) and took two messages; refused until t=90,
    # when window 2 opened with the next send and took two more, until t=150.
    assert budget.spent == 20_000
    assert budget.window_left(130.0) == pytest.approx(20.0)
    assert not budget.ready(149.0)
    assert budget.ready(150.0)
    assert drain_estimate(25_000, 1000, 10_000, 4000) == (25.0, 3)  # 4,000 now + 3 windows
    assert drain_estimate(25_000, 0, 0, 0) == (None, None)
    assert drain_estimate(3000, 0, 10_000, 4000) == (None, 0)  # fits in the room left
    with pytest.raises(ValueError, match="per_contact"):
        ByteBudget(0, per_contact=-1)
