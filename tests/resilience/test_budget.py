"""The uplink's byte budget (agent/resilience/budget.py): never more than the rate allows
plus one burst and one message, never stalled by a message bigger than the burst."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.resilience.budget import ByteBudget


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
