"""A token bucket: at most `rate` calls per second on average, bursts up to `burst`.

IAM publishes no call rate and throttles without warning; a rotator that spends its
budget on a scan gets throttled exactly when an incident needs it. Each account gets
its own bucket, shared by every thread that calls IAM there.

Containment jumps the queue: a call made inside `rotator.urgency.urgent()` (setting a leaked key
Inactive, finding its owner) takes its token at once, and the calls queued behind it
(a scan, replacements) pay it back by waiting a little longer. Leaks are rare, so the
average rate holds; in a burst of leaks every key is off before any replacement call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rotator.urgency import is_urgent


class TokenBucket:
    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be greater than 0")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()
        self.waited = 0.0

    def acquire(self) -> float:
        """Take one token, sleeping until it is there (not at all inside `urgent()`);
        returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            # Reserve the token now (the balance may go negative): callers queue up in
            # order instead of racing for the next token. An urgent call takes its token
            # on credit and goes at once; later callers wait for it.
            self._tokens -= 1.0
            late = self._tokens < 0 and not is_urgent()
            wait = -self._tokens / self.rate if late else 0.0
            self.waited += wait
        if wait > 0:
            self._sleep(wait)
        return wait
