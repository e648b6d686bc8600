"""Backoff: capped, jittered, deterministic with a seeded source."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.resilience import Backoff


@given(st.floats(0.01, 5.0), st.floats(1.0, 100.0), st.integers(0, 2000), st.integers())
def test_delay_within_ceiling_and_cap(base: float, factor: float, attempts: int, seed: int) -> None:
    cap = base * factor
    b = Backoff(base, cap, rng=random.Random(seed))
    for _ in range(min(attempts, 200)):
        ceiling = b.ceiling()
        delay = b.next_delay()
        assert 0.0 <= delay <= ceiling <= cap


def test_ceiling_doubles_then_caps_and_reset_restarts() -> None:
    b = Backoff(0.5, 4.0, rng=random.Random(1))
    ceilings = []
    for _ in range(6):
        ceilings.append(b.ceiling())
        b.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.ceiling() == 0.5


def test_seeded_sources_give_the_same_sequence() -> None:
    a = Backoff(1.0, 60.0, rng=random.Random(42))
    b = Backoff(1.0, 60.0, rng=random.Random(42))
    assert [a.next_delay() for _ in range(10)] == [b.next_delay() for _ in range(10)]


def test_huge_attempt_counts_do_not_overflow() -> None:
    b = Backoff(1.0, 30.0, rng=random.Random(0))
    b.attempt = 10**6
    assert b.ceiling() == 30.0


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0), (float("nan"), 1.0)])
def test_rejects_bad_parameters(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        Backoff(base, cap)
