"""Pure decisions: (user, key, now, rules) -> decision and a human reason. No I/O.

Order of the rules, first match wins per user:
  exempt  — the user is outside `include_paths`, matches `exclude_users`, or carries the
            exempt tag with any value other than "false";
  leaked  — a quarantine policy is attached: every active key created before the
            rotator first saw that policy on the user is leaked, unless the rotator
            issued it to replace a contained leak. A key created after that moment (a
            replacement, a later rotation, a person's new key) is not suspect;
  then per active key by age: rotate (> max_age), warn (> warn_age), ok.
  A due key whose user holds two active keys is `blocked`: no slot can be freed without
  guessing which key a consumer uses; so is one whose user name cannot be a Vault path
  (`rotator.paths`), since its new secret could not be stored. An inactive key never
  blocks: it is the slot MAKE_ROOM will free.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rotator.model import AccessKey, Decision, IamUser, KeyDecision, RotationReason
from rotator.paths import path_problem

_DAY = 86400.0


@dataclass(frozen=True)
class Rules:
    max_age: timedelta
    warn_age: timedelta
    include_paths: tuple[str, ...] = ("/",)
    exclude_users: tuple[str, ...] = ()
    exempt_tag: str = "rotator:exempt"
    quarantine_policies: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Any) -> Rules:
        return cls(
            max_age=settings.policy.max_age,
            warn_age=settings.policy.warn_age,
            include_paths=tuple(settings.selection.include_paths),
            exclude_users=tuple(settings.selection.exclude_users),
            exempt_tag=settings.selection.exempt_tag,
            quarantine_policies=frozenset(settings.leaks.quarantine_policies),
        )


def age_days(key: AccessKey, now: datetime) -> int:
    """Whole days since the key was created (never negative)."""
    return max(0, math.floor((now - key.created_at).total_seconds() / _DAY))


def format_days(delta: timedelta) -> str:
    days = delta.total_seconds() / _DAY
    return f"{days:g}d" if days >= 1 or days == 0 else f"{delta.total_seconds():g}s"


def exemption(user: IamUser, rules: Rules) -> str | None:
    """Why the user is never touched, or None."""
    if not any(user.path.startswith(prefix) for prefix in rules.include_paths):
        return f"path {user.path} is outside include_paths"
    for pattern in rules.exclude_users:
        if fnmatch.fnmatchcase(user.user_name, pattern):
            return f"user matches exclude_users pattern {pattern!r}"
    if rules.exempt_tag in user.tags and user.tags[rules.exempt_tag].strip().lower() != "false":
        return f"tagged {rules.exempt_tag}={user.tags[rules.exempt_tag]}"
    return None


def quarantine(user: IamUser, rules: Rules) -> str | None:
    """The name of an attached quarantine policy, or None."""
    for arn in sorted(user.attached_policy_arns & rules.quarantine_policies):
        return arn.rsplit("/", 1)[-1]
    return None


def decide_user(
    user: IamUser,
    now: datetime,
    rules: Rules,
    replacements: Iterable[str] = (),
    *,
    quarantined_since: datetime | None = None,
) -> list[KeyDecision]:
    """One decision per key of `user`.

    `quarantined_since`: when the rotator first saw the user's quarantine policy (None:
    first seen now). Only keys created before it are suspect: AWS attached the policy
    because one of them leaked, and the policy stays attached until an operator
    detaches it, so a key made afterwards must not be judged leaked again and again.
    `replacements` are key ids the rotator issued to replace a contained leak: never
    suspect, even when the policy was first seen after them (the leak came in as an
    event before the scan saw the policy)."""
    keys: Sequence[AccessKey] = user.keys
    exempt = exemption(user, rules)
    if exempt is not None:
        return [KeyDecision(user, k, Decision.EXEMPT, exempt) for k in keys]

    quarantined = quarantine(user, rules)
    since = quarantined_since or now
    issued = frozenset(replacements)

    def suspect(key: AccessKey) -> bool:
        return bool(quarantined) and key.created_at < since and key.access_key_id not in issued

    seen = f"quarantine policy {quarantined} (first seen {since.isoformat(timespec='seconds')})"
    active = [k for k in keys if k.active]
    out: list[KeyDecision] = []
    for key in keys:
        days = age_days(key, now)
        if not key.active:
            why = f"inactive (age {days}d)"
            if suspect(key):
                why += f"; suspect: created before {seen}"
            out.append(KeyDecision(user, key, Decision.OK, why, suspect=suspect(key)))
            continue
        if suspect(key):
            out.append(
                KeyDecision(user, key, Decision.LEAKED, f"created before {seen}", suspect=True)
            )
            continue
        age = now - key.created_at
        if age > rules.max_age:
            reason = f"age {days}d > max_age {format_days(rules.max_age)}"
            unstorable = path_problem(user.user_name)
            if unstorable is not None:
                out.append(KeyDecision(user, key, Decision.BLOCKED, f"{reason}, but {unstorable}"))
            elif len(active) >= 2:
                out.append(
                    KeyDecision(
                        user,
                        key,
                        Decision.BLOCKED,
                        f"{reason}, but both keys are active: no free slot without guessing "
                        "which key consumers use",
                    )
                )
            else:
                out.append(KeyDecision(user, key, Decision.ROTATE, reason))
        elif age > rules.warn_age:
            reason = f"age {days}d > warn_age {format_days(rules.warn_age)}"
            out.append(KeyDecision(user, key, Decision.WARN, reason))
        else:
            out.append(KeyDecision(user, key, Decision.OK, f"age {days}d"))
    if quarantined:
        out = [
            d
            if d.decision is Decision.LEAKED or suspect(d.key)
            else KeyDecision(
                user,
                d.key,
                d.decision,
                f"{d.reason}; not suspect: "
                + (
                    "replacement for a contained leak"
                    if d.key.access_key_id in issued
                    else "created after the quarantine policy was first seen"
                )
                + f", {quarantined} still attached (detach it after review)",
            )
            for d in out
        ]
    return out


def needs_action(decisions: Iterable[KeyDecision]) -> bool:
    """True when any decision calls for key ids (everything but ok and exempt)."""
    return any(d.decision not in (Decision.OK, Decision.EXEMPT) for d in decisions)


# --- decisions -> proposals: at most one rotation per user ------------------------------


@dataclass(frozen=True)
class Proposal:
    account_id: str
    user_name: str
    reason: RotationReason
    old_key_id: str | None
    leaked: bool
    why: str


def propose(decisions: Iterable[KeyDecision]) -> list[Proposal]:
    """One proposal per user whose keys are leaked, due, or due but blocked.

    A leaked key wins over a due one (containment first); among several keys of the same
    kind the oldest goes first. A blocked user gets a proposal too: its rotation stops in
    BLOCKED, where operators see it and where it resumes once a slot can be freed."""
    by_user: dict[tuple[str, str], list[KeyDecision]] = defaultdict(list)
    for d in decisions:
        by_user[(d.user.account_id, d.user.user_name)].append(d)
    out: list[Proposal] = []
    for (account, user), items in sorted(by_user.items()):
        for kind, reason in (
            (Decision.LEAKED, RotationReason.LEAKED),
            (Decision.ROTATE, RotationReason.AGE),
            (Decision.BLOCKED, RotationReason.AGE),
        ):
            chosen = sorted(
                (d for d in items if d.decision is kind), key=lambda d: d.key.created_at
            )
            if chosen:
                first = chosen[0]
                out.append(
                    Proposal(
                        account,
                        user,
                        reason,
                        first.key.access_key_id,
                        kind is Decision.LEAKED,
                        first.reason,
                    )
                )
                break
    return out
