from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.resilience.ratelimit import LogThrottle, TokenBucket


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=5.0)
    assert [bucket.allow(0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert not bucket.allow(0.4)  # 0.8 tokens: not enough
    assert bucket.allow(0.5)  # 1.0 token
    assert (bucket.allowed, bucket.refused) == (6, 3)


def test_bucket_never_holds_more_than_its_burst_and_ignores_a_clock_stepping_back() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0)
    assert sum(bucket.allow(1e6) for _ in range(10)) == 3  # a long idle refills to 3, no more
    assert sum(bucket.allow(0.0) for _ in range(10)) == 0  # back in time: no refill


@given(st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=300))
def test_bucket_allows_at_most_burst_plus_rate_times_elapsed(times: list[float]) -> None:
    bucket = TokenBucket(rate=3.0, burst=4.0)
    times.sort()
    allowed = sum(bucket.allow(t) for t in times)
    elapsed = times[-1] - times[0] if times else 0.0
    assert allowed <= 4 + 3.0 * elapsed + 1e-9
    assert bucket.allowed + bucket.refused == len(times)


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, 1), (1, 0.5), (float("inf"), 1), (1, float("nan"))]
)
def test_bucket_refuses_bad_knobs(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, burst)


def test_throttle_logs_first_then_reports_what_it_held_back() -> None:
    throttle = LogThrottle(interval=60.0)
    assert throttle.check("hello", 0.0).log
    held = [throttle.check("hello", t).log for t in (1.0, 2.0, 30.0)]
    assert held == [False, False, False]
    verdict = throttle.check("hello", 61.0)
    assert (verdict.log, verdict.suppressed) == (True, 3)
    assert throttle.check("other", 61.5).log  # keys are independent


def test_throttle_keys_are_bounded() -> None:
    throttle = LogThrottle(interval=60.0, max_keys=4)
    logged = sum(throttle.check(f"k{i}", 0.0).log for i in range(10_000))
    assert logged == 4 + 1  # four own keys, then one line for the shared overflow key
    assert len(throttle._last) <= 5
