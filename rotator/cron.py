"""Schedules: a 5-field cron expression or an interval, validated; nothing here runs
them (the daemon turns a `Schedule` into an APScheduler trigger).

Every error names the field and the reason (`minute "61" out of range 0-59`), since an
operator reads them in `rotator config check`.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from rotator.durations import is_duration_text, parse_duration
from rotator.quoting import quoted, shown

__all__ = ["SCHEDULE_HINT", "Schedule", "parse_schedule"]

_MONTH_NAMES = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_WEEKDAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_CRON_FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, _MONTH_NAMES),
    ("day-of-week", 0, 7, _WEEKDAY_NAMES),
)
_NUMBER_RE = re.compile(r"[0-9]+")
SCHEDULE_HINT = 'a 5-field cron expression such as "0 * * * *" or an interval such as "15m"'
# Days in each month, February counted as 29 so that "29 2" stays valid.
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True)
class Schedule:
    """A validated schedule: exactly one of `interval` (a positive timedelta) or `cron`
    (a 5-field cron expression, whitespace-normalised)."""

    interval: timedelta | None
    cron: str | None

    def __post_init__(self) -> None:
        if (self.interval is None) == (self.cron is None):
            raise ValueError("a schedule is either an interval or a cron expression")

    def cron_fields(self) -> dict[str, str]:
        """The cron expression as keyword arguments for APScheduler 3's `CronTrigger`.

        Use this rather than `CronTrigger.from_crontab`: APScheduler 3 numbers weekdays
        from Monday = 0 while cron uses Sunday = 0, so the weekdays here are spelt as
        names and every field is an explicit list, never a range that could wrap.
        """
        if self.cron is None:
            raise ValueError("an interval schedule has no cron fields")
        minute, hour, day, month, weekday = _parse_cron(self.cron)
        names = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
        return {
            "minute": _cron_list(minute, 0, 59),
            "hour": _cron_list(hour, 0, 23),
            "day": _cron_list(day, 1, 31),
            "month": _cron_list(month, 1, 12),
            "day_of_week": (
                "*" if len(weekday) == 7 else ",".join(names[d] for d in sorted(weekday))
            ),
        }


def _cron_list(values: frozenset[int], lo: int, hi: int) -> str:
    if values == frozenset(range(lo, hi + 1)):
        return "*"
    return ",".join(str(v) for v in sorted(values))


def parse_schedule(text: str) -> Schedule:
    """Validate a schedule: an interval (`"15m"`) or a 5-field cron expression.

    Cron fields are minute, hour, day-of-month, month, day-of-week; each is a comma list
    of `*`, `N`, `N-M`, `*/S` or `N-M/S`; months may be `jan`-`dec`, weekdays `sun`-`sat`
    or 0-7 (0 and 7 are Sunday). Raises ValueError saying which field is bad and why,
    e.g. `minute "61" out of range 0-59`.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected {SCHEDULE_HINT}, got {shown(text)}")
    fields = text.split()
    if not fields:
        raise ValueError(f"empty; expected {SCHEDULE_HINT}")
    if len(fields) == 1:
        if not is_duration_text(fields[0]):
            raise ValueError(
                f"{quoted(text.strip())} is neither a 5-field cron expression (e.g. "
                '"0 * * * *") nor an interval (e.g. "15m")'
            )
        interval = parse_duration(fields[0])
        if not interval:
            raise ValueError(f"{quoted(fields[0])} is an interval of zero; use at least 1s")
        return Schedule(interval=interval, cron=None)
    cron = " ".join(fields)
    _parse_cron(cron)
    return Schedule(interval=None, cron=cron)


def _parse_cron(cron: str) -> tuple[frozenset[int], ...]:
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(
            f"cron expression {quoted(cron)} has {len(fields)} fields; expected 5: "
            "minute hour day-of-month month day-of-week"
        )
    parsed = tuple(
        _parse_cron_field(text, name, lo, hi, names)
        for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS, strict=True)
    )
    day_text, weekday_text = fields[2], fields[4]
    if not day_text.startswith("*") and not weekday_text.startswith("*"):
        # cron fires when *either* field matches; APScheduler only when *both* do.
        raise ValueError(
            f'day-of-month "{day_text}" and day-of-week "{weekday_text}" are both '
            "restricted; cron would fire on either, the scheduler only on both. "
            "Restrict one of them and set the other to *"
        )
    days, months = parsed[2], parsed[3]
    if not any(day <= _MONTH_DAYS[month - 1] for day in days for month in months):
        raise ValueError(
            f'day-of-month "{day_text}" never occurs in month "{fields[3]}"; '
            "the schedule would never fire"
        )
    weekdays = frozenset(0 if d == 7 else d for d in parsed[4])
    return (*parsed[:4], weekdays)


def _parse_cron_field(
    text: str, name: str, lo: int, hi: int, names: Mapping[str, int]
) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"{name} {quoted(text)} has an empty list item")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if _NUMBER_RE.fullmatch(step_text) is None:
                raise ValueError(f"{name} {quoted(item)}: step {quoted(step_text)} is not a number")
            step = int(step_text)
            if not 1 <= step <= hi - lo + 1:
                raise ValueError(
                    f"{name} {quoted(item)}: step {quoted(step_text)} out of range 1-{hi - lo + 1}"
                )
        if base == "*":
            first, last = lo, hi
        elif "-" in base:
            first_text, _, last_text = base.partition("-")
            first = _cron_value(first_text, item, name, lo, hi, names)
            last = _cron_value(last_text, item, name, lo, hi, names)
            if first > last:
                raise ValueError(f"{name} {quoted(item)}: the range runs backwards")
        else:
            if slash:
                raise ValueError(
                    f'{name} {quoted(item)}: a step needs "*" or a range before it, '
                    f'e.g. "*/{step_text}" or "{base}-{hi}/{step_text}"'
                )
            first = last = _cron_value(base, item, name, lo, hi, names)
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _cron_value(
    token: str, item: str, name: str, lo: int, hi: int, names: Mapping[str, int]
) -> int:
    if _NUMBER_RE.fullmatch(token):
        value = int(token)
        if not lo <= value <= hi:
            raise ValueError(f"{name} {quoted(token)} out of range {lo}-{hi}")
        return value
    if token.lower() in names:
        return names[token.lower()]
    if not token:
        raise ValueError(f"{name} {quoted(item)} is incomplete")
    if names:
        keys = list(names)
        first, last = keys[0], keys[-1]
        raise ValueError(
            f"{name} {quoted(token)} is not a number ({lo}-{hi}) or a name ({first}-{last})"
        )
    raise ValueError(f"{name} {quoted(token)} is not a number ({lo}-{hi})")
