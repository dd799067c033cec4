"""Which calls are urgent: containing a leaked key (setting it Inactive, finding its
owner) goes ahead of every other call waiting for the IAM rate limit
(`rotator.ratelimit`). A context variable, so it holds for the thread (or task) that
entered `urgent()` and nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_urgent: ContextVar[bool] = ContextVar("rotator_urgent_calls", default=False)


@contextmanager
def urgent() -> Iterator[None]:
    """Calls made inside this block skip the queue."""
    token = _urgent.set(True)
    try:
        yield
    finally:
        _urgent.reset(token)


def is_urgent() -> bool:
    return _urgent.get()
