"""Pure decisions about console passwords: (user, rules, now) -> decision and a human
reason. No I/O, and never a password: the credential report tells only dates and
whether an MFA device is active.

Which users: those with a login profile (`IamUser.console`), that `selection` selects
(`include_paths`, `exclude_users`), whose rule (`Rules.rule_for`, as for keys) does not
say `console: off`. The others get no decision at all.

The password's age counts from the later of the report's `password_last_changed` and
when the rotator itself last set it (`rotated_at`): the credential report may be four
hours old, and a password rotated since must not look due again.

The order of the decisions, the first that holds:
  exempt         — the exempt tag, as for keys (a dated one until the end of its day;
                   after it, every reason says the exemption lapsed);
  rotate         — the password is at least `password_max_age` old: under
                   `console: rotate` the next pass rotates it into Vault, under
                   `console: report` it is reported only (`console_to_rotate`);
  no_mfa         — console access without an active MFA device (CIS AWS Foundations
                   1.10);
  stale_console  — `console_unused_after` is set and nobody signed in for that long
                   (never signed in: counted from when the password was set);
  warn           — at least `password_warn_age` old;
  ok             — everything else.
A password whose age is unknown (the report gives no date) is never due.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime, timedelta

from rotator.model import ConsoleAccess, ConsoleDecision, ConsoleMode, Decision, IamUser
from rotator.policy import (
    Rule,
    Rules,
    format_days,
    lapsed_exemption,
    tag_exemption,
    unselected,
)

__all__ = [
    "CONSOLE_DECISIONS",
    "console_to_rotate",
    "decide_console",
    "password_since",
]

# The decisions a console password can get, most urgent first.
CONSOLE_DECISIONS: tuple[Decision, ...] = (
    Decision.ROTATE,
    Decision.NO_MFA,
    Decision.STALE_CONSOLE,
    Decision.WARN,
    Decision.OK,
    Decision.EXEMPT,
)

_DAY = 86400.0


def _days(delta: timedelta) -> int:
    return max(0, math.floor(delta.total_seconds() / _DAY))


def password_since(access: ConsoleAccess, rotated_at: datetime | None = None) -> datetime | None:
    """Since when the password counts as set: the later of the report's date and when the
    rotator last set it; None when neither is known."""
    dates = [d for d in (access.password_last_changed, rotated_at) if d is not None]
    return max(dates) if dates else None


def _rotate_reason(age_days: int, rule: Rule) -> str:
    action = (
        "the next pass rotates it into Vault"
        if rule.console is ConsoleMode.ROTATE
        else "reported only (console: report)"
    )
    return (
        f"password {age_days} days old >= password_max_age "
        f"{format_days(rule.password_max_age)} (rule {rule.name}): {action}"
    )


def _stale_reason(access: ConsoleAccess, since: datetime, now: datetime, rule: Rule) -> str:
    assert rule.console_unused_after is not None
    limit = format_days(rule.console_unused_after)
    idle = _days(now - since)
    if access.password_last_used is not None:
        what = f"no console sign-in for {idle} days (last {since.date().isoformat()})"
    else:
        what = f"never signed in to the console, password set {idle} days ago"
    return f"{what} >= console_unused_after {limit} (rule {rule.name})"


def decide_console(
    user: IamUser, rules: Rules, now: datetime, rotated_at: datetime | None = None
) -> ConsoleDecision | None:
    """The decision for the user's console password at `now`, or None when there is
    nothing to judge: no login profile (or no credential report to tell), a user
    `selection` leaves out, or a rule that says `console: off`. `rotated_at`: when the
    rotator last set this user's password (None: never, or not known)."""
    access = user.console
    if access is None:
        return None
    rule, matched = rules.rule_for(user)
    if rule.console is ConsoleMode.OFF or unselected(user, rules) is not None:
        return None
    since = password_since(access, rotated_at)
    age = None if since is None else max(now - since, timedelta(0))
    due = None if since is None else since + rule.password_max_age

    def decision(kind: Decision, why: str) -> ConsoleDecision:
        lapsed = lapsed_exemption(user, rules, now)
        if lapsed is not None:
            why = f"{why}; {lapsed}"
        return ConsoleDecision(
            user,
            access,
            kind,
            why,
            rule.console,
            rule=rule.name,
            rule_match=matched,
            password_age=age,
            due_at=due,
        )

    exempt = tag_exemption(user, rules, now)
    if exempt is not None:
        return decision(Decision.EXEMPT, exempt)
    old = "password age unknown" if age is None else f"password {_days(age)} days old"
    if age is not None and age >= rule.password_max_age:
        return decision(Decision.ROTATE, _rotate_reason(_days(age), rule))
    if not access.mfa_active:
        return decision(Decision.NO_MFA, f"console password without MFA ({old}, rule {rule.name})")
    idle_since = access.password_last_used or since
    if (
        rule.console_unused_after is not None
        and idle_since is not None
        and now - idle_since >= rule.console_unused_after
    ):
        return decision(Decision.STALE_CONSOLE, _stale_reason(access, idle_since, now, rule))
    if age is not None and age >= rule.password_warn_age:
        return decision(
            Decision.WARN,
            f"{old} >= password_warn_age {format_days(rule.password_warn_age)} (rule {rule.name})",
        )
    if age is None:
        return decision(Decision.OK, f"{old}: the credential report gives no date; MFA active")
    return decision(Decision.OK, f"{old}; MFA active")


def console_to_rotate(decisions: Iterable[ConsoleDecision]) -> list[ConsoleDecision]:
    """The console passwords a pass must rotate: due (`rotate`) under a rule that says
    `console: rotate`."""
    return [d for d in decisions if d.decision is Decision.ROTATE and d.mode is ConsoleMode.ROTATE]
