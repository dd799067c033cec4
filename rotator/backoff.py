"""The one backoff formula: how long to pause before a retry.

Every retry in the project takes its pause from `retry_pause`: the engine's rotation
retries (`Timing.backoff`), its Vault write loop and its VERIFY look-agains, the
credential-report polling, the notification sender, and the daemon's waits. What
differs between them is only the base and the cap, which each caller keeps with its
other settings.

No jitter: each of these loops is one caller retrying one thing (a rotation's retries
are also spread by the tick that picks them up), so there is no herd to spread out;
the SDKs add their own jitter to their own retries. A deterministic pause also lets the
engine's tests assert the exact schedule.
"""

from __future__ import annotations

import math

__all__ = ["retry_pause"]


def retry_pause(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to pause before retry number `attempt` (1, 2, …)::

        retry_pause(attempt) = min(cap, base * 2 ** (attempt - 1))

    so `base`, `2 * base`, `4 * base`, … until `cap`, then `cap` for ever (a doubling
    too large for a float is past any cap).
    Raises `ValueError` for an attempt below 1 or a negative base or cap."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, not {attempt}")
    if base < 0 or cap < 0:
        raise ValueError(f"base and cap must not be negative (base {base}, cap {cap})")
    try:
        return min(cap, math.ldexp(base, attempt - 1))  # base * 2 ** (attempt - 1), exactly
    except OverflowError:
        return cap
