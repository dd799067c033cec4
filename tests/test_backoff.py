"""The one backoff formula, `retry_pause`: its schedule and its properties for any base
and cap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rotator.backoff import retry_pause

seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
attempts = st.integers(min_value=1, max_value=5000)


def test_pauses_double_from_the_base_then_stay_at_the_cap() -> None:
    """10 s doubling, capped at 60 s: 10, 20, 40, 60, 60."""
    assert [retry_pause(n, base=10, cap=60) for n in range(1, 6)] == [10, 20, 40, 60, 60]


def test_an_attempt_number_past_a_floats_range_gives_the_cap() -> None:
    """A retry count so large that base * 2 ** (n - 1) overflows a float is the cap,
    not an OverflowError; a zero base stays zero."""
    assert retry_pause(10**6, base=10, cap=900) == 900
    assert retry_pause(10**6, base=0, cap=900) == 0


@pytest.mark.parametrize(
    ("attempt", "base", "cap"), [(0, 1.0, 2.0), (-1, 1.0, 2.0), (1, -1.0, 2.0), (1, 1.0, -2.0)]
)
def test_an_attempt_below_one_or_a_negative_base_or_cap_is_refused(
    attempt: int, base: float, cap: float
) -> None:
    """Attempts count from 1 and pauses are never negative: anything else is a bug in
    the caller, raised as ValueError."""
    with pytest.raises(ValueError, match=r"attempt|negative"):
        retry_pause(attempt, base=base, cap=cap)


@given(base=seconds, cap=seconds)
def test_the_first_pause_is_the_base_or_the_cap_if_that_is_lower(base: float, cap: float) -> None:
    """Retry number 1 waits exactly `base` (or `cap`, if the base exceeds it)."""
    assert retry_pause(1, base=base, cap=cap) == min(base, cap)


@given(attempt=attempts, base=seconds, cap=seconds)
def test_a_pause_is_never_above_the_cap_nor_negative(attempt: int, base: float, cap: float) -> None:
    """Whatever the attempt number, 0 <= pause <= cap."""
    assert 0 <= retry_pause(attempt, base=base, cap=cap) <= cap


@given(attempt=attempts, base=seconds, cap=seconds)
def test_pauses_never_shrink_from_one_attempt_to_the_next(
    attempt: int, base: float, cap: float
) -> None:
    """The schedule is monotone non-decreasing in the attempt number."""
    assert retry_pause(attempt, base=base, cap=cap) <= retry_pause(attempt + 1, base=base, cap=cap)


@given(attempt=st.integers(min_value=1, max_value=40), base=seconds)
def test_below_the_cap_each_pause_is_twice_the_one_before(attempt: int, base: float) -> None:
    """Without a binding cap, pause n + 1 is exactly 2 * pause n (no jitter)."""
    cap = float("inf")
    assert retry_pause(attempt + 1, base=base, cap=cap) == 2 * retry_pause(
        attempt, base=base, cap=cap
    )
