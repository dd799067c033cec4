"""Durations as the configuration and the command line write them: an integer and `s`,
`m`, `h` or `d` (`"90d"`, `"24h"`, `"0s"`), and back."""

from __future__ import annotations

import re
from datetime import timedelta

from rotator.quoting import quoted, shown

__all__ = ["DURATION_HINT", "format_duration", "is_duration_text", "parse_duration"]

_DURATION_RE = re.compile(r"([0-9]+)([smhd])")
DURATION_HINT = 'an integer and s, m, h or d, e.g. "90d"'
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def is_duration_text(text: str) -> bool:
    """Whether `text` is written as a duration (it may still be too long to be one)."""
    return _DURATION_RE.fullmatch(text) is not None


def parse_duration(text: str) -> timedelta:
    """Parse `"90d"`, `"24h"`, `"15m"` or `"60s"` into a timedelta.

    Raises ValueError naming the text when it is anything else (no sign, no spaces, no
    fractions, no compound forms such as "1h30m").
    """
    match = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{shown(text)} is not a duration ({DURATION_HINT})")
    number, unit = int(match.group(1)), match.group(2)
    try:
        return timedelta(seconds=number * _UNIT_SECONDS[unit])
    except OverflowError:
        raise ValueError(f"{quoted(text)} is too long a duration") from None


def format_duration(value: timedelta) -> str:
    """The shortest exact duration string for `value`: `"90d"`, `"24h"`, `"0s"`.

    Raises ValueError for a negative value or one that is not a whole number of seconds,
    which no duration string can express.
    """
    if value < timedelta(0) or value % timedelta(seconds=1):
        raise ValueError(f"{value} is not a whole, non-negative number of seconds")
    seconds = int(value.total_seconds())
    for unit, size in _UNIT_SECONDS.items():
        if seconds % size == 0 and (seconds or unit == "s"):
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable: every whole number of seconds has a unit")
