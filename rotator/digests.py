"""Owner warnings, pure: which keys each owner is told about before the rotator rotates
or deactivates them, grouped into one digest per owner per scan. No I/O.

A key is warned at each distance of `notify.warn_before` (`[14d, 7d, 1d]`) before its
due moment (`policy.due_at`), each stage once. A key first seen inside several stages
(3 days before it is due, with 14d and 7d never sent) gets one line, for the nearest
stage that applies (7d), and every farther stage counts as sent with it: the owner is
not told twice in one scan, nor later about a stage that has passed. A stage counts as
sent only for the due moment it was sent for: when a key's deadline moves (it was used
again, the rule changed), its stages start over.

Texts hold user names, key ids, dates and rule names only: never a secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from rotator.commands import suggested
from rotator.durations import format_duration
from rotator.model import (
    AccessKey,
    ConsoleDecision,
    ConsoleMode,
    Decision,
    IamUser,
    KeyDecision,
)
from rotator.policy import Rules, due_at

__all__ = [
    "Digest",
    "Warning",
    "build_digests",
    "console_warning_id",
    "deactivation_notices",
    "fill_key_ids",
    "is_email_address",
    "owner_of",
    "pending_console_warnings",
    "pending_warnings",
    "stage_name",
    "users_missing_key_ids",
]

# Enough to tell an address from a chat handle or a typo; SES judges the rest.
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def is_email_address(text: str) -> bool:
    """Whether `text` looks like an email address (else: a chat handle)."""
    return _EMAIL_RE.fullmatch(text) is not None


def stage_name(distance: timedelta) -> str:
    """How a stage is stored and shown: `"7d"`, `"36h"`."""
    return format_duration(distance)


@dataclass(frozen=True)
class Warning:
    """One line of a digest: a key that will be rotated or deactivated soon, or one this
    pass has just deactivated as unused (`action` "deactivated")."""

    account_id: str
    user_name: str
    key_id: str
    # "rotate" | "deactivate" | "deactivated" (keys); "rotate_console" (a password)
    action: str
    due_at: datetime
    rule: str
    stage: str  # the nearest stage that applies, e.g. "7d"
    # Every stage this line settles: `stage` and the farther ones not sent yet.
    stages: tuple[str, ...]
    # A key deactivated as unused whose slot the rotation of this other key of the
    # user takes in the same pass: it is deleted, and cannot be turned back on.
    slot_for: str | None = None
    # The user has no owner tag: the line goes to `notify.fallback_owner`.
    unowned: bool = False

    def line(self) -> str:
        text = self._text()
        return f"{text} [{self.user_name} has no owner tag]" if self.unowned else text

    def _text(self) -> str:
        when = self.due_at.strftime("%Y-%m-%d %H:%M UTC")
        if self.action == "rotate_console":
            return (
                f"- {self.user_name} ({self.account_id}) console password: will be rotated "
                f"after {when} (rule {self.rule}; {self.stage} notice); the new one will be "
                "in Vault, and a new password is asked for at the next sign-in"
            )
        if self.action == "deactivated" and self.slot_for is not None:
            return (
                f"- {self.user_name} ({self.account_id}) key {self.key_id}: deactivated as "
                f"unused at {when} (rule {self.rule}), and deleted to free its slot for the "
                f"rotation of key {self.slot_for}: it cannot be turned back on"
            )
        if self.action == "deactivated":
            return (
                f"- {self.user_name} ({self.account_id}) key {self.key_id}: deactivated as "
                f"unused at {when} (rule {self.rule}); to turn it back on: "
                + suggested("reactivate", self.user_name, "--key", self.key_id)
            )
        what = "rotated" if self.action == "rotate" else "deactivated as unused"
        return (
            f"- {self.user_name} ({self.account_id}) key {self.key_id}: will be {what} "
            f"after {when} (rule {self.rule}; {self.stage} notice)"
        )


@dataclass(frozen=True)
class Digest:
    """Everything one owner is told by one scan."""

    owner: str
    warnings: tuple[Warning, ...]

    @property
    def subject(self) -> str:
        passwords = sum(1 for w in self.warnings if w.action == "rotate_console")
        keys = len(self.warnings) - passwords
        what = " and ".join(
            f"{n} {noun}{'s' if n != 1 else ''}"
            for n, noun in ((keys, "access key"), (passwords, "console password"))
            if n
        )
        if any(w.action == "deactivated" for w in self.warnings):
            return f"rotator: {what} of yours changed or will change soon"
        return f"rotator: {what} of yours will change soon"

    @property
    def text(self) -> str:
        done = [w.line() for w in self.warnings if w.action == "deactivated"]
        coming = [w.line() for w in self.warnings if w.action != "deactivated"]
        lines = [f"To {self.owner}:"]
        if done:
            lines += ["these IAM access keys were just deactivated as unused:", *done]
        if coming:
            lines += [
                "these IAM access keys (or console passwords) will be rotated or "
                "deactivated by the rotator unless something changes:",
                *coming,
            ]
        return "\n".join(lines)


def owner_of(tags: Mapping[str, str], owner_tag: str, fallback: str | None) -> str | None:
    """The user's owner: its `owner_tag` tag (trimmed), else `fallback`, else None."""
    value = tags.get(owner_tag, "").strip()
    return value or fallback


def console_warning_id(user_name: str) -> str:
    """How a console password is named where a key id would be: in the warning stages
    the state store remembers, and in a digest's `key_ids`."""
    return f"console:{user_name}"


def _pending(
    user: IamUser,
    name: str,
    action: str,
    due: datetime,
    rule: str,
    now: datetime,
    warn_before: Sequence[timedelta],
    sent: Mapping[str, Mapping[str, datetime]],
) -> Warning | None:
    """The warning for `name` (a key id, or a console password's) due at `due`: for the
    nearest stage that applies and was not sent for that due moment, settling the farther
    unsent ones with it. None when it is past due, farther than every stage, or sent."""
    if due <= now:
        return None
    left, already = due - now, sent.get(name, {})
    applies = [s for s in sorted(warn_before) if left <= s]
    unsent = [stage_name(s) for s in applies if already.get(stage_name(s)) != due]
    if not unsent:
        return None
    return Warning(
        account_id=user.account_id,
        user_name=user.user_name,
        key_id=name,
        action=action,
        due_at=due,
        rule=rule,
        stage=unsent[0],
        stages=tuple(unsent),
    )


def pending_console_warnings(
    decisions: Iterable[ConsoleDecision],
    now: datetime,
    warn_before: Sequence[timedelta],
    sent: Mapping[str, Mapping[str, datetime]],
) -> list[Warning]:
    """As `pending_warnings`, for console passwords a rule rotates (`console: rotate`):
    due at `ConsoleDecision.due_at`, named by `console_warning_id` in `sent`."""
    out: list[Warning] = []
    for d in decisions:
        if d.mode is not ConsoleMode.ROTATE or d.decision is Decision.EXEMPT:
            continue
        if d.due_at is None:
            continue
        name = console_warning_id(d.user.user_name)
        w = _pending(d.user, name, "rotate_console", d.due_at, d.rule, now, warn_before, sent)
        if w is not None:
            out.append(w)
    return out


def pending_warnings(
    decisions: Iterable[KeyDecision],
    rules: Rules,
    now: datetime,
    warn_before: Sequence[timedelta],
    sent: Mapping[str, Mapping[str, datetime]],
) -> list[Warning]:
    """The warnings due now: for each key whose due moment is at most a stage's distance
    away and that has a stage not yet sent for that due moment, one `Warning` for the
    nearest such stage. `sent`: key id -> {stage: due moment it was sent for}. A key
    already past due is left to the pass that acts on it."""
    out: list[Warning] = []
    for d in decisions:
        key_id = d.key.access_key_id
        if key_id is None:
            continue
        due = due_at(d, rules.named(d.rule))
        if due is None:
            continue
        w = _pending(d.user, key_id, due.action, due.at, d.rule, now, warn_before, sent)
        if w is not None:
            out.append(w)
    return out


def deactivation_notices(
    deactivated: Iterable[KeyDecision],
    at: datetime,
    slot_takers: Mapping[tuple[str, str], str] | None = None,
    min_idle: timedelta | None = None,
) -> list[Warning]:
    """One line for each key a pass has just set Inactive as unused: its owner is told
    whether or not a warning came before (a key already past the threshold when first
    seen is deactivated by the first pass that sees it). Nothing to remember: a key is
    deactivated once.

    `slot_takers`: (account, user) -> the key a rotation opened by the same pass
    replaces. That rotation needs the slot the unused key held, and deletes it when it
    has been idle longer than `min_idle` (`policy.inactive_min_idle`): its line then
    says so instead of offering to turn it back on."""
    takers = slot_takers or {}
    out: list[Warning] = []
    for d in deactivated:
        if d.key.access_key_id is None:
            continue
        taker = takers.get((d.user.account_id, d.user.user_name))
        idle_long = (
            min_idle is not None and d.idle_since is not None and at - d.idle_since > min_idle
        )
        out.append(
            Warning(
                account_id=d.user.account_id,
                user_name=d.user.user_name,
                key_id=d.key.access_key_id,
                action="deactivated",
                due_at=at,
                rule=d.rule,
                stage="deactivated",
                stages=(),
                slot_for=taker if taker is not None and idle_long else None,
            )
        )
    return out


def build_digests(
    decisions: Iterable[KeyDecision | ConsoleDecision],
    warnings: Iterable[Warning],
    owner_tag: str,
    fallback: str | None,
) -> tuple[list[Digest], list[Warning]]:
    """Group `warnings` by their user's owner (read from the users in `decisions`): one
    digest per owner, owners and lines in a stable order. Returns the digests and the
    warnings that have nobody to go to (no owner tag, no fallback)."""
    tags = {(d.user.account_id, d.user.user_name): d.user.tags for d in decisions}
    by_owner: dict[str, list[Warning]] = {}
    nobody: list[Warning] = []
    for w in warnings:
        own = tags.get((w.account_id, w.user_name), {})
        owner = owner_of(own, owner_tag, fallback)
        if owner is None:
            nobody.append(w)
            continue
        if owner_of(own, owner_tag, None) is None:
            w = replace(w, unowned=True)
        by_owner.setdefault(owner, []).append(w)
    digests = [
        Digest(owner, tuple(sorted(items, key=lambda w: (w.due_at, w.user_name, w.key_id))))
        for owner, items in sorted(by_owner.items())
    ]
    return digests, nobody


def users_missing_key_ids(
    decisions: Iterable[KeyDecision],
    rules: Rules,
    now: datetime,
    warn_before: Sequence[timedelta],
) -> set[tuple[str, str]]:
    """(account, user) of each user with a key inside the farthest warning distance
    that has no key id: the credential report names none, and the scan lists keys only
    for users whose keys need action now."""
    if not warn_before:
        return set()
    farthest = max(warn_before)
    out: set[tuple[str, str]] = set()
    for d in decisions:
        if d.key.access_key_id is not None:
            continue
        due = due_at(d, rules.named(d.rule))
        if due is not None and now < due.at <= now + farthest:
            out.add((d.user.account_id, d.user.user_name))
    return out


def fill_key_ids(
    decisions: Iterable[KeyDecision], listed: Mapping[tuple[str, str], Sequence[AccessKey]]
) -> list[KeyDecision]:
    """`decisions` with the ids of `listed` keys (per (account, user)) filled in, matched
    by creation time to the second (the credential report's precision)."""
    out: list[KeyDecision] = []
    for d in decisions:
        keys = listed.get((d.user.account_id, d.user.user_name), ())
        if d.key.access_key_id is None:
            created = d.key.created_at.replace(microsecond=0)
            for k in keys:
                if k.created_at.replace(microsecond=0) == created and k.access_key_id:
                    d = replace(d, key=replace(d.key, access_key_id=k.access_key_id))
                    break
        out.append(d)
    return out
