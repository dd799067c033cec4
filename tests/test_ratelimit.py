"""The per-account token bucket that keeps IAM calls under a rate."""

from __future__ import annotations

import threading

import pytest

from rotator.ratelimit import TokenBucket
from rotator.urgency import urgent


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_burst_passes_then_calls_are_spaced_at_the_rate() -> None:
    """A full bucket lets `burst` calls through at once; later calls wait 1/rate each."""
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock, sleep=clock.sleep)
    waits = [bucket.acquire() for _ in range(8)]
    assert waits[:5] == [0, 0, 0, 0, 0]
    assert waits[5:] == pytest.approx([0.1, 0.1, 0.1])
    assert clock.now == pytest.approx(0.3)


def test_idle_time_refills_up_to_burst_only() -> None:
    """Tokens refill with time but never beyond the burst size."""
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=2, clock=clock, sleep=clock.sleep)
    bucket.acquire()
    bucket.acquire()
    clock.now += 100
    assert [bucket.acquire() for _ in range(3)] == pytest.approx([0, 0, 0.5])


def test_threads_queue_up_behind_each_other() -> None:
    """Concurrent callers each reserve the next slot: with the clock standing still, 40
    calls at 200/s (burst 1) are told to wait 0, 1/200, 2/200, ... seconds."""
    clock = Clock()
    bucket = TokenBucket(rate=200, burst=1, clock=clock, sleep=lambda seconds: None)
    threads = [
        threading.Thread(target=lambda: [bucket.acquire() for _ in range(10)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bucket.waited == pytest.approx(sum(i / 200 for i in range(40)))


def test_rate_must_be_positive() -> None:
    """A rate of zero is refused at construction."""
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0)


def test_an_urgent_call_skips_the_queue_and_later_calls_pay_for_it() -> None:
    """With the bucket empty, a containment call made inside `urgent()` goes at once,
    and the next ordinary call waits for that token too: the average rate holds."""
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=1, clock=clock, sleep=clock.sleep)
    assert bucket.acquire() == 0  # the burst
    with urgent():
        assert bucket.acquire() == 0  # on credit, no wait
        assert bucket.acquire() == 0
    assert bucket.acquire() == pytest.approx(0.3)  # its own token and the two borrowed
