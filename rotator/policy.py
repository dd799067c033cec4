"""Pure decisions: (user, key, now, rules) -> decision and a human reason. No I/O.

Which rule: `Rules.rules` are tried in order and the first whose `match` holds for the
user wins (every condition it gives must hold); none matching, the `policy` section
decides (the rule "default"). A rule holds every value of `policy` it does not set
itself (`resolve`).

The order of the decisions, per user and then per key:
  exempt  — the user is outside `include_paths`, matches `exclude_users`, or carries the
            exempt tag with any value other than "false". A date as the value
            (`2027-01-31`) exempts until the end of that day (UTC); after it the user is
            handled normally and every reason says "exemption lapsed on 2027-01-31";
  leaked  — a quarantine policy is attached: every active key created before the
            rotator first saw that policy on the user is leaked, unless the rotator
            issued it to replace a contained leak. A key created after that moment (a
            replacement, a later rotation, a person's new key) is not suspect;
  then per active key:
  unused  — the rule sets `unused_after` and the key has been idle longer than that:
            not used since (a key never used counts from its creation, a key an operator
            turned back on from that moment). With `unused_action: deactivate` the next
            pass sets it Inactive; no new key is issued, nobody needs one;
  rotate  — older than `max_age`; `blocked` instead when the user holds two active keys
            (no slot can be freed without guessing which key a consumer uses; a key this
            pass deactivates as unused does not count) or when the user name cannot be a
            Vault path (`rotator.paths`), since its new secret could not be stored;
  warn    — older than `warn_age`;
  ok      — everything else. An inactive key is `ok` and never blocks: it is the slot
            MAKE_ROOM frees. One idle longer than the rule's `inactive_delete_after` is
            marked `delete_due`: the next pass deletes it.

A key an open rotation tracks (its old or new key; `decide_user(rotations=...)`) is
described by that rotation instead, after `exempt` and `leaked`: its active old key is
`rotate` ("being rotated: rotation 1a2b3c4d is in OVERLAP until ..."), or `blocked`
while the rotation itself is BLOCKED; its new key is `ok`; neither is judged unused or
due for deletion (the rotation decides what becomes of them). Mid-rotation a user holds
two active keys by design: that is no reason to call it blocked.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

from rotator.machine import State
from rotator.model import (
    DEFAULT_RULE,
    AccessKey,
    ConsoleMode,
    Decision,
    IamUser,
    KeyDecision,
    Rotation,
    RotationReason,
)
from rotator.paths import path_problem

_DAY = 86400.0
# An exempt tag's value that is a date: exempt until the end of that day (UTC).
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class UnusedAction(StrEnum):
    """What a pass does with a key its rule finds unused."""

    REPORT = "report"
    DEACTIVATE = "deactivate"


# The keys a rule may set: of `policy`, those that judge a key or a console password or
# that a rotation records when it opens; and two of its own. The other keys of `policy`
# apply to every rotation alike (the configuration refuses them in a rule).
RULE_KEYS = frozenset(
    {
        "max_age",
        "warn_age",
        "overlap",
        "inactive_delete_after",
        "unused_after",
        "unused_action",
        "console",
        "password_max_age",
        "password_warn_age",
        "console_unused_after",
    }
)
# The defaults of the console keys, as `policy` has them when built in Python.
PASSWORD_MAX_AGE = timedelta(days=90)
PASSWORD_WARN_AGE = timedelta(days=80)


@dataclass(frozen=True)
class Match:
    """Which users a rule applies to. Every condition given must hold; none given
    matches every user.

    `attached_policy`: a managed policy's name (any policy of that name) or ARN, attached
    to the user directly or to one of its groups; `tags`: each key with exactly that
    value; `path`: an IAM path prefix; `user`: a glob on the user name; `group`: a group
    the user belongs to; `account`: the user's account id."""

    attached_policy: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    path: str | None = None
    user: str | None = None
    group: str | None = None
    account: str | None = None

    def text(self) -> str:
        """The conditions as the configuration file gives them, e.g. `{path: "/ci/",
        account: "111122223333"}` (`{}`: matches every user)."""
        parts: list[str] = []
        if self.attached_policy is not None:
            parts.append(f"attached_policy: {_quote(self.attached_policy)}")
        if self.tags:
            tags = ", ".join(f"{_quote(k)}: {_quote(v)}" for k, v in self.tags)
            parts.append(f"tag: {{{tags}}}")
        for name in ("path", "user", "group", "account"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}: {_quote(value)}")
        return "{" + ", ".join(parts) + "}"

    def explain(self, user: IamUser) -> str | None:
        """Why every condition holds for `user` (e.g. "path /ci/, user ci-*"), or None
        when one does not."""
        why: list[str] = []
        if self.account is not None:
            if user.account_id != self.account:
                return None
            why.append(f"account {self.account}")
        if self.path is not None:
            if not user.path.startswith(self.path):
                return None
            why.append(f"path {self.path}")
        if self.user is not None:
            if not fnmatch.fnmatchcase(user.user_name, self.user):
                return None
            why.append(f"user {self.user}")
        if self.group is not None:
            if self.group not in {g.name for g in user.groups}:
                return None
            why.append(f"group {self.group}")
        for tag, value in self.tags:
            if user.tags.get(tag) != value:
                return None
            why.append(f"tag {tag}={value}")
        if self.attached_policy is not None:
            through = attached_through(user, self.attached_policy)
            if through is None:
                return None
            why.append(through)
        return ", ".join(why) or "matches every user"


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _is_policy(reference: str, arn: str) -> bool:
    """A policy reference is an ARN (that policy) or a name (any policy of that name,
    whatever its path or owner: `arn:aws:iam::aws:policy/job-function/ViewOnlyAccess`
    is named ViewOnlyAccess)."""
    if reference.startswith("arn:"):
        return arn == reference
    return arn.rsplit("/", 1)[-1] == reference


def attached_through(user: IamUser, reference: str) -> str | None:
    """How the policy `reference` (name or ARN) applies to the user: attached to it
    directly, or to one of its groups (named); None when it does not."""
    if any(_is_policy(reference, arn) for arn in user.attached_policy_arns):
        return f"{reference} attached"
    for group in sorted(user.groups, key=lambda g: g.name):
        if any(_is_policy(reference, arn) for arn in group.attached_policy_arns):
            return f"{reference} attached through group {group.name}"
    return None


@dataclass(frozen=True)
class Rule:
    """A rule as it applies to keys: every value set, the `policy` section's where the
    rule sets none (`resolve`). The `policy` section itself is the rule "default".

    `overlap`: what the rule sets itself (None: `policy.overlap`, as the engine has it);
    a rotation opened under the rule records it and keeps it. `unused_after`: None, no
    key is judged unused. `inactive_delete_after`: None, inactive keys are not deleted
    for being idle.

    Console passwords (`rotator.console_policy`): `console` says what is done with them,
    `password_max_age` and `password_warn_age` judge their age, `console_unused_after`
    (None: not judged) the time since the last sign-in."""

    name: str
    max_age: timedelta
    warn_age: timedelta
    match: Match = field(default_factory=Match)
    overlap: timedelta | None = None
    unused_after: timedelta | None = None
    unused_action: UnusedAction = UnusedAction.REPORT
    inactive_delete_after: timedelta | None = None
    console: ConsoleMode = ConsoleMode.REPORT
    password_max_age: timedelta = PASSWORD_MAX_AGE
    password_warn_age: timedelta = PASSWORD_WARN_AGE
    console_unused_after: timedelta | None = None

    @property
    def deactivates_unused(self) -> bool:
        return self.unused_after is not None and self.unused_action is UnusedAction.DEACTIVATE


def resolve(default: Rule, name: str, match: Match, **own: Any) -> Rule:
    """The rule `name` as it applies: the values it sets itself (`own`, None meaning
    unset), the default's for the rest. Raises ValueError for a key no rule may set."""
    unknown = sorted(set(own) - RULE_KEYS)
    if unknown:
        raise ValueError(f"a rule cannot set {', '.join(unknown)}")
    given = {k: v for k, v in own.items() if v is not None}
    if "unused_action" in given:
        given["unused_action"] = UnusedAction(given["unused_action"])
    if "console" in given:
        given["console"] = ConsoleMode(given["console"])
    return replace(default, name=name, match=match, **given)


@dataclass(frozen=True)
class Rules:
    """Everything a decision needs: the `policy` section (the default rule), the
    ordered `rules`, the selection, and the quarantine policies."""

    max_age: timedelta
    warn_age: timedelta
    include_paths: tuple[str, ...] = ("/",)
    exclude_users: tuple[str, ...] = ()
    exempt_tag: str = "rotator:exempt"
    quarantine_policies: frozenset[str] = frozenset()
    inactive_delete_after: timedelta | None = None
    rules: tuple[Rule, ...] = ()
    # The `policy` section's console keys (`Rule`).
    console: ConsoleMode = ConsoleMode.REPORT
    password_max_age: timedelta = PASSWORD_MAX_AGE
    password_warn_age: timedelta = PASSWORD_WARN_AGE
    console_unused_after: timedelta | None = None

    @property
    def default(self) -> Rule:
        """The `policy` section as a rule: it decides for users no rule matches."""
        return Rule(
            DEFAULT_RULE,
            self.max_age,
            self.warn_age,
            inactive_delete_after=self.inactive_delete_after,
            console=self.console,
            password_max_age=self.password_max_age,
            password_warn_age=self.password_warn_age,
            console_unused_after=self.console_unused_after,
        )

    def rule_for(self, user: IamUser) -> tuple[Rule, str | None]:
        """The first rule whose match holds for `user` and why it holds; the default
        and None when none does."""
        for rule in self.rules:
            why = rule.match.explain(user)
            if why is not None:
                return rule, why
        return self.default, None

    def named(self, name: str) -> Rule:
        """The rule a decision names (`KeyDecision.rule`); KeyError for another name."""
        if name == DEFAULT_RULE:
            return self.default
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    @classmethod
    def from_settings(cls, settings: Any) -> Rules:
        base = cls(
            max_age=settings.policy.max_age,
            warn_age=settings.policy.warn_age,
            include_paths=tuple(settings.selection.include_paths),
            exclude_users=tuple(settings.selection.exclude_users),
            exempt_tag=settings.selection.exempt_tag,
            quarantine_policies=frozenset(settings.leaks.quarantine_policies),
            inactive_delete_after=settings.policy.inactive_delete_after,
            console=ConsoleMode(settings.policy.console),
            password_max_age=settings.policy.password_max_age,
            password_warn_age=settings.policy.password_warn_age,
            console_unused_after=settings.policy.console_unused_after,
        )
        default = base.default
        rules = []
        for item in settings.rules:
            m = item.match
            match = Match(
                attached_policy=m.attached_policy,
                tags=tuple(sorted((m.tag or {}).items())),
                path=m.path,
                user=m.user,
                group=m.group,
                account=m.account,
            )
            rules.append(
                resolve(default, item.name, match, **{k: getattr(item, k) for k in RULE_KEYS})
            )
        return replace(base, rules=tuple(rules))


def age_days(key: AccessKey, now: datetime) -> int:
    """Whole days since the key was created (never negative)."""
    return max(0, math.floor((now - key.created_at).total_seconds() / _DAY))


def _days(delta: timedelta) -> int:
    return max(0, math.floor(delta.total_seconds() / _DAY))


def format_days(delta: timedelta) -> str:
    days = delta.total_seconds() / _DAY
    return f"{days:g}d" if days >= 1 or days == 0 else f"{delta.total_seconds():g}s"


def idle_rules(rules: Rules, users: Iterable[IamUser], decided: Iterable[str] = ()) -> list[str]:
    """A note for each rule of `rules.rules` that decides for none of `users` (the
    scanned users): "rule ci matched no user (match: {...})", or, when the users it
    matches are all taken by an earlier rule, which ones. `decided`: the rule names the
    scan's decisions carry, so that a rule that decided a key costs no matching at all.
    Matching is in memory: no IAM call."""
    used = set(decided)
    left = [r for r in rules.rules if r.name not in used]
    if not left:
        return []
    scanned = list(users)
    accounts = sorted({u.account_id for u in scanned})
    first = [rules.rule_for(u)[0].name for u in scanned]
    notes: list[str] = []
    for rule in left:
        matching = [i for i, u in enumerate(scanned) if rule.match.explain(u) is not None]
        if not matching:
            note = f"rule {rule.name} matched no user (match: {rule.match.text()})"
            account = rule.match.account
            if account is not None and account not in accounts:
                note += (
                    f"; account {account} is not among the accounts scanned "
                    f"({', '.join(accounts) or 'none'})"
                )
            notes.append(note)
            continue
        if any(first[i] == rule.name for i in matching):
            continue  # it decides for users without a key: nothing to judge yet
        earlier = ", ".join(sorted({first[i] for i in matching}))
        notes.append(
            f"rule {rule.name} decides for no user: the {len(matching)} user(s) its match "
            f"({rule.match.text()}) holds for are taken first by rule(s) {earlier}"
        )
    return notes


# --- exemption ---------------------------------------------------------------------------


def _tag_exemption(user: IamUser, rules: Rules, now: datetime) -> tuple[str | None, str | None]:
    """(why the exempt tag exempts the user, why its exemption lapsed): at most one set."""
    tag = rules.exempt_tag
    if tag not in user.tags:
        return None, None
    value = user.tags[tag]
    text = value.strip()
    if text.lower() == "false":
        return None, None
    if _DATE.fullmatch(text):
        try:
            until = date.fromisoformat(text)
        except ValueError:
            # Looks like a date and is none: exempt (the tag's meaning without a date),
            # saying so, rather than rotate what someone meant to keep.
            return f"tagged {tag}={value} (not a date: exempt with no end)", None
        if now.astimezone(UTC).date() <= until:
            return f"tagged {tag}={value}: exempt until {until.isoformat()}", None
        return None, f"exemption lapsed on {until.isoformat()} (tagged {tag}={value})"
    return f"tagged {tag}={value}", None


def unselected(user: IamUser, rules: Rules) -> str | None:
    """Why `selection` leaves the user out (its path is outside `include_paths`, its
    name matches an `exclude_users` glob), or None."""
    if not any(user.path.startswith(prefix) for prefix in rules.include_paths):
        return f"path {user.path} is outside include_paths"
    for pattern in rules.exclude_users:
        if fnmatch.fnmatchcase(user.user_name, pattern):
            return f"user matches exclude_users pattern {pattern!r}"
    return None


def tag_exemption(user: IamUser, rules: Rules, now: datetime) -> str | None:
    """Why the user's exempt tag exempts it at `now` (a dated one until its day has
    passed), or None."""
    return _tag_exemption(user, rules, now)[0]


def exemption(user: IamUser, rules: Rules, now: datetime) -> str | None:
    """Why the user is never touched at `now`, or None."""
    return unselected(user, rules) or tag_exemption(user, rules, now)


def lapsed_exemption(user: IamUser, rules: Rules, now: datetime) -> str | None:
    """ "exemption lapsed on <date> (...)" when the user's exempt tag carries a date that
    has passed at `now` (the user is then handled normally), else None."""
    return _tag_exemption(user, rules, now)[1]


def quarantine(user: IamUser, rules: Rules) -> str | None:
    """The name of an attached quarantine policy, or None."""
    for arn in sorted(user.attached_policy_arns & rules.quarantine_policies):
        return arn.rsplit("/", 1)[-1]
    return None


# --- per key -----------------------------------------------------------------------------


def idle_since(key: AccessKey, reactivated_at: datetime | None = None) -> datetime:
    """Since when the key counts as idle: its last use, else its creation, or when an
    operator turned it back on (`rotator reactivate`, `rollback`), whichever is latest."""
    moment = key.last_used_at or key.created_at
    return max(moment, reactivated_at) if reactivated_at is not None else moment


def _unused_reason(key: AccessKey, since: datetime, rule: Rule, now: datetime) -> str:
    assert rule.unused_after is not None
    idle = _days(now - since)
    if key.last_used_at is not None and since == key.last_used_at:
        what = f"last used {idle}d ago"
    elif since == key.created_at:
        what = f"never used, created {idle}d ago"
    else:
        what = f"not used since an operator turned it back on {idle}d ago"
    action = (
        "the next pass deactivates it"
        if rule.unused_action is UnusedAction.DEACTIVATE
        else "reported only (unused_action report)"
    )
    limit = format_days(rule.unused_after)
    return f"unused: {what} > unused_after {limit} (rule {rule.name}): {action}"


def _is_unused(key: AccessKey, since: datetime, rule: Rule, now: datetime) -> bool:
    return key.active and rule.unused_after is not None and now - since > rule.unused_after


def decide_user(
    user: IamUser,
    now: datetime,
    rules: Rules,
    replacements: Iterable[str] = (),
    *,
    quarantined_since: datetime | None = None,
    reactivated: Mapping[str, datetime] | None = None,
    rotations: Mapping[str, Rotation] | None = None,
) -> list[KeyDecision]:
    """One decision per key of `user`.

    `quarantined_since`: when the rotator first saw the user's quarantine policy (None:
    first seen now). Only keys created before it are suspect: AWS attached the policy
    because one of them leaked, and the policy stays attached until an operator
    detaches it, so a key made afterwards must not be judged leaked again and again.
    `replacements` are key ids the rotator issued to replace a contained leak: never
    suspect, even when the policy was first seen after them (the leak came in as an
    event before the scan saw the policy). `reactivated`: key id -> when an operator
    turned it back on; its idle clock starts again then. `rotations`: key id -> the open
    key rotation that tracks it (as its old or new key); such a key is described by its
    rotation (`being_rotated`), not judged by age or use."""
    keys: Sequence[AccessKey] = user.keys
    rule, matched = rules.rule_for(user)
    turned_on = reactivated or {}
    tracked = rotations or {}

    def tracking(key: AccessKey) -> Rotation | None:
        return tracked.get(key.access_key_id) if key.access_key_id else None

    def idle(key: AccessKey) -> datetime:
        return idle_since(key, turned_on.get(key.access_key_id or ""))

    def decision(key: AccessKey, kind: Decision, why: str, **more: Any) -> KeyDecision:
        return KeyDecision(
            user, key, kind, why, rule=rule.name, rule_match=matched, idle_since=idle(key), **more
        )

    exempt = exemption(user, rules, now)
    if exempt is not None:
        return [decision(k, Decision.EXEMPT, exempt) for k in keys]

    quarantined = quarantine(user, rules)
    since = quarantined_since or now
    issued = frozenset(replacements)

    def suspect(key: AccessKey) -> bool:
        return bool(quarantined) and key.created_at < since and key.access_key_id not in issued

    def freed(key: AccessKey) -> bool:
        # Deactivated as unused by this pass: it holds no slot a rotation would need.
        unused = _is_unused(key, idle(key), rule, now)
        return rule.deactivates_unused and unused and not suspect(key)

    seen = f"quarantine policy {quarantined} (first seen {since.isoformat(timespec='seconds')})"
    active = [k for k in keys if k.active and not freed(k)]
    out: list[KeyDecision] = []
    for key in keys:
        days = age_days(key, now)
        age = now - key.created_at
        rotation = tracking(key)
        if not key.active:
            why = f"inactive (age {days}d)"
            if suspect(key):
                why += f"; suspect: created before {seen}"
            if rotation is not None:
                # Its rotation retires (or replaced) it: never deleted as idle by a pass.
                why += f"; {being_rotated(rotation, key)}"
                out.append(decision(key, Decision.OK, why, suspect=suspect(key)))
                continue
            limit = rule.inactive_delete_after
            due = limit is not None and now - idle(key) > limit
            if limit is not None and due:
                why += (
                    f"; idle {_days(now - idle(key))}d > inactive_delete_after "
                    f"{format_days(limit)}: the next pass deletes it"
                )
            out.append(decision(key, Decision.OK, why, suspect=suspect(key), delete_due=due))
            continue
        if suspect(key):
            out.append(decision(key, Decision.LEAKED, f"created before {seen}", suspect=True))
            continue
        if rotation is not None:
            kind = Decision.OK
            if key.access_key_id == rotation.old_key_id:
                blocked = rotation.state is State.BLOCKED
                kind = Decision.BLOCKED if blocked else Decision.ROTATE
            out.append(decision(key, kind, f"{being_rotated(rotation, key)}; age {days}d"))
            continue
        if _is_unused(key, idle(key), rule, now):
            why = _unused_reason(key, idle(key), rule, now)
            if age > rule.max_age:
                why += f"; also older than max_age {format_days(rule.max_age)}: not rotated"
            out.append(decision(key, Decision.UNUSED, why))
        elif age > rule.max_age:
            reason = f"age {days}d > max_age {format_days(rule.max_age)}"
            unstorable = path_problem(user.user_name)
            if unstorable is not None:
                out.append(decision(key, Decision.BLOCKED, f"{reason}, but {unstorable}"))
            elif len(active) >= 2:
                out.append(
                    decision(
                        key,
                        Decision.BLOCKED,
                        f"{reason}, but both keys are active: no free slot without guessing "
                        "which key consumers use",
                    )
                )
            else:
                out.append(decision(key, Decision.ROTATE, reason))
        elif age > rule.warn_age:
            reason = f"age {days}d > warn_age {format_days(rule.warn_age)}"
            out.append(decision(key, Decision.WARN, reason))
        else:
            out.append(decision(key, Decision.OK, f"age {days}d"))
    if quarantined:
        out = [
            d
            if d.decision is Decision.LEAKED or suspect(d.key)
            else replace(
                d,
                reason=f"{d.reason}; not suspect: "
                + (
                    "replacement for a contained leak"
                    if d.key.access_key_id in issued
                    else "created after the quarantine policy was first seen"
                )
                + f", {quarantined} still attached (detach it after review)",
            )
            for d in out
        ]
    lapsed = lapsed_exemption(user, rules, now)
    if lapsed is not None:
        out = [replace(d, reason=f"{d.reason}; {lapsed}") for d in out]
    return out


def _moment(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def being_rotated(rotation: Rotation, key: AccessKey) -> str:
    """How the open `rotation` that tracks `key` describes it: "being rotated: rotation
    1a2b3c4d is in OVERLAP until 2026-05-02T10:00:00Z, new key AKIA..." for its old key,
    "the new key of rotation 1a2b3c4d (OVERLAP)" for its new one. A BLOCKED rotation
    says why it is blocked."""
    rid = rotation.id[:8]
    state = rotation.state.value
    if key.access_key_id == rotation.new_key_id:
        return f"the new key of rotation {rid} ({state})"
    what = f"rotation {rid}" + (" (leaked)" if rotation.leaked else "")
    if rotation.state is State.BLOCKED:
        why = rotation.waiting_on or rotation.last_error or "an operator must act"
        return f"being rotated: {what} is BLOCKED: {why}"
    text = f"being rotated: {what} is in {state}"
    if rotation.next_action_at is not None:
        until = "until" if rotation.state is State.OVERLAP else "next step at"
        text += f" {until} {_moment(rotation.next_action_at)}"
    if rotation.new_key_id:
        text += f", new key {rotation.new_key_id}"
    if rotation.waiting_on:
        text += f" ({rotation.waiting_on})"
    return text


def needs_action(decisions: Iterable[KeyDecision]) -> bool:
    """True when any decision calls for key ids (everything but ok and exempt, and an
    inactive key that is due for deletion)."""
    return any(d.decision not in (Decision.OK, Decision.EXEMPT) or d.delete_due for d in decisions)


# --- what a pass does without a rotation ---------------------------------------------------


def to_deactivate(decisions: Iterable[KeyDecision], rules: Rules) -> list[KeyDecision]:
    """The unused Active keys whose rule says `unused_action: deactivate`."""
    return [
        d
        for d in decisions
        if d.decision is Decision.UNUSED
        and d.key.active
        and d.key.access_key_id is not None
        and rules.named(d.rule).deactivates_unused
    ]


def to_delete(decisions: Iterable[KeyDecision]) -> list[KeyDecision]:
    """The Inactive keys idle longer than their rule's `inactive_delete_after`."""
    return [
        d
        for d in decisions
        if d.delete_due and not d.key.active and d.key.access_key_id is not None
    ]


@dataclass(frozen=True)
class Due:
    """When the rotator acts on a key if nothing changes, and how."""

    at: datetime
    action: str  # "rotate" | "deactivate"


def due_at(decision: KeyDecision, rule: Rule) -> Due | None:
    """The moment after which `decision`'s Active key is rotated (older than
    `max_age`) or, when `rule` deactivates unused keys, deactivated (idle longer than
    `unused_after`, counted from `decision.idle_since`): the earlier one. None for a key
    the rotator does not act on by age or use (inactive, exempt, leaked: that one is
    contained at once). The owners' notices count down to it."""
    key = decision.key
    if not key.active or decision.decision in (Decision.EXEMPT, Decision.LEAKED):
        return None
    due = Due(key.created_at + rule.max_age, "rotate")
    if rule.deactivates_unused:
        assert rule.unused_after is not None
        since = decision.idle_since or idle_since(key)
        off = since + rule.unused_after
        if off <= due.at:
            due = Due(off, "deactivate")
    return due


# --- decisions -> proposals: at most one rotation per user ------------------------------


@dataclass(frozen=True)
class Proposal:
    account_id: str
    user_name: str
    reason: RotationReason
    old_key_id: str | None
    leaked: bool
    why: str
    # The rule's own overlap, which the rotation records (None: policy.overlap).
    overlap: timedelta | None = None


def propose(decisions: Iterable[KeyDecision], rules: Rules | None = None) -> list[Proposal]:
    """One proposal per user whose keys are leaked, due, or due but blocked.

    A leaked key wins over a due one (containment first); among several keys of the same
    kind the oldest goes first. A blocked user gets a proposal too: its rotation stops in
    BLOCKED, where operators see it and where it resumes once a slot can be freed. A
    rotation by age carries the overlap its rule sets (`rules`)."""
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
                leaked = kind is Decision.LEAKED
                overlap = None
                if rules is not None and not leaked:
                    overlap = rules.named(first.rule).overlap
                out.append(
                    Proposal(
                        account,
                        user,
                        reason,
                        first.key.access_key_id,
                        leaked,
                        first.reason,
                        overlap,
                    )
                )
                break
    return out
