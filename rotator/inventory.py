"""The scan: which users and keys exist, how old they are, when they were last used.

Cost model (IAM has no raisable call rate, so calls are what matters at scale):
  - users, paths, tags, groups and attached policies (the users' own and their
    groups'): `GetAccountAuthorizationDetails` pages, whatever the rules ask about;
  - key ages and last use for everyone: the credential report (about three calls);
  - console passwords (age, last sign-in, MFA): the same report's columns, no call more;
  - key ids: `ListAccessKeys` only for users whose keys need action, because the
    credential report names no key ids.
Only when the credential report cannot be had does the scan fall back to per-user calls,
and it says so in `Inventory.notes`.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from rotator.backoff import retry_pause
from rotator.console_policy import decide_console
from rotator.errors import PermissionDenied, Transient
from rotator.model import (
    AccessKey,
    ConsoleAccess,
    ConsoleDecision,
    Decision,
    IamUser,
    KeyDecision,
    KeyStatus,
    Rotation,
)
from rotator.policy import Rules, decide_user, needs_action, quarantine
from rotator.ports import IamPort

_NO_VALUE = {"N/A", "no_information", "not_supported", ""}
# Credential-report polling: seconds between polls, doubling from the first to the cap.
_POLL_PAUSE = 0.2
_POLL_PAUSE_CAP = 5.0


@dataclass(frozen=True)
class Inventory:
    account_id: str
    users: list[IamUser]
    decisions: list[KeyDecision]
    source: str  # "credential_report" or "per_user"
    notes: list[str] = field(default_factory=list)
    # user -> (quarantine policy name, when the rotator first saw it attached)
    quarantined: dict[str, tuple[str, datetime]] = field(default_factory=dict)
    # One decision per console password judged (`rotator.console_policy`); empty when
    # the credential report could not be read (console access is then unknown).
    console: list[ConsoleDecision] = field(default_factory=list)


def parse_report_time(text: str) -> datetime | None:
    text = text.strip()
    if text in _NO_VALUE:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True)
class CredentialReport:
    """What the scan reads from IAM's credential report: each user's keys (without
    ids), and the console access of the users that have a password."""

    keys: dict[str, list[AccessKey]]
    console: dict[str, ConsoleAccess]


def _is_true(text: str | None) -> bool:
    return (text or "").strip().lower() == "true"


def _console_access(row: Mapping[str, str]) -> ConsoleAccess | None:
    """A row's console columns; None when the user has no password (no login profile).
    `password_last_used` is no_information for a password never used (or last used
    before October 2014); N/A and not_supported mean no date either."""
    if not _is_true(row.get("password_enabled")):
        return None
    return ConsoleAccess(
        password_last_changed=parse_report_time(row.get("password_last_changed", "N/A")),
        password_last_used=parse_report_time(row.get("password_last_used", "N/A")),
        mfa_active=_is_true(row.get("mfa_active")),
    )


def read_credential_report(content: bytes) -> CredentialReport:
    """The report's CSV, read once: keys per user name, and console access per user name
    for users with a password. The report has no key ids and never a password."""
    keys: dict[str, list[AccessKey]] = {}
    console: dict[str, ConsoleAccess] = {}
    for row in csv.DictReader(io.StringIO(content.decode("utf-8"))):
        name = row.get("user", "")
        if not name or name == "<root_account>":
            continue
        keys[name] = _report_keys(row)
        access = _console_access(row)
        if access is not None:
            console[name] = access
    return CredentialReport(keys, console)


def parse_credential_report(content: bytes) -> dict[str, list[AccessKey]]:
    """Keys per user name from the report's CSV. The report has no key ids."""
    return read_credential_report(content).keys


def _report_keys(row: Mapping[str, str]) -> list[AccessKey]:
    keys: list[AccessKey] = []
    for n in (1, 2):
        created = parse_report_time(row.get(f"access_key_{n}_last_rotated", "N/A"))
        if created is None:
            continue
        active = row.get(f"access_key_{n}_active", "false").strip().lower() == "true"
        keys.append(
            AccessKey(
                access_key_id=None,
                status=KeyStatus.ACTIVE if active else KeyStatus.INACTIVE,
                created_at=created,
                last_used_at=parse_report_time(row.get(f"access_key_{n}_last_used_date", "")),
            )
        )
    return keys


def fetch_credential_report(
    iam: IamPort,
    *,
    timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """Generate the report and poll its state with bounded exponential backoff
    (`retry_pause`: 0.2 s doubling up to 5 s); `Transient` once the pauses between
    polls add up to `timeout` seconds.

    AWS reuses a report younger than four hours, so this is usually one call to
    generate and one to fetch."""
    waited, polls = 0.0, 0
    while True:
        state = iam.generate_credential_report()
        if state == "COMPLETE":
            content = iam.get_credential_report()
            if content is not None:
                return content
        if waited >= timeout:
            raise Transient(f"credential report not ready after {timeout:g}s (state {state})")
        polls += 1
        pause = retry_pause(polls, base=_POLL_PAUSE, cap=_POLL_PAUSE_CAP)
        sleep(pause)
        waited += pause


def _seconds(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def merge_keys(
    listed: list[AccessKey], reported: list[AccessKey], iam: IamPort
) -> tuple[AccessKey, ...]:
    """Key ids and status from `ListAccessKeys`, last use from the report, matched by
    creation time (the report has second precision). A key the report does not know
    (created after it was generated) costs one `GetAccessKeyLastUsed`."""
    by_created = {_seconds(k.created_at): k for k in reported}
    merged: list[AccessKey] = []
    for key in sorted(listed, key=lambda k: k.created_at):
        match = by_created.get(_seconds(key.created_at))
        if match is not None:
            last_used = match.last_used_at
        else:
            assert key.access_key_id is not None
            last_used = iam.key_last_used(key.access_key_id).last_used_at
        merged.append(replace(key, last_used_at=last_used))
    return tuple(merged)


def keys_per_user(iam: IamPort, user_name: str) -> tuple[AccessKey, ...]:
    """The fallback: every key with its last use, two or three calls per user."""
    return merge_keys(iam.list_access_keys(user_name), [], iam)


def scan(
    iam: IamPort,
    rules: Rules,
    now: datetime,
    *,
    replacements: Iterable[str] = (),
    quarantined_since: Mapping[str, datetime] | None = None,
    reactivations: Callable[[str], Mapping[str, datetime]] | None = None,
    console_rotated_at: Callable[[str], datetime | None] | None = None,
    rotations: Mapping[str, Rotation] | None = None,
    report_timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    pmap: Callable[[Callable[[IamUser], IamUser], list[IamUser]], Iterable[IamUser]] = map,
) -> Inventory:
    """Read the account and decide every key. Changes nothing in AWS.

    `pmap` runs the per-user reads (key ids for users that need action); pass a thread
    pool's `map` so that they overlap instead of queueing one after another.
    `quarantined_since`: user -> when the rotator first saw its quarantine policy (a
    user missing from it is seeing it now: every key it holds is suspect).
    `reactivations`: user name -> {key id: when an operator turned it back on}; asked
    only for a user with a key judged unused, whose idle clock restarts then.
    `console_rotated_at`: user name -> when the rotator last set its console password
    (None: never); asked only for a user with console access, whose password's age
    counts from then when that is later than the report says.
    `rotations`: key id -> the open key rotation tracking it (its old or new key), from
    the state store: such a key is described by its rotation (`decide_user`), not
    called blocked for sharing its user with the rotation's other key."""
    issued = frozenset(replacements)
    account = iam.account_id()
    users = sorted(iam.iter_users_with_details(), key=lambda u: u.user_name)
    first_seen = quarantined_since or {}
    quarantined: dict[str, tuple[str, datetime]] = {}
    for user in users:
        policy = quarantine(user, rules)
        if policy is not None:
            quarantined[user.user_name] = (policy, first_seen.get(user.user_name, now))

    def decide(
        user: IamUser, reactivated: Mapping[str, datetime] | None = None
    ) -> list[KeyDecision]:
        since = quarantined.get(user.user_name, ("", now))[1]
        return decide_user(
            user,
            now,
            rules,
            issued,
            quarantined_since=since,
            reactivated=reactivated,
            rotations=rotations,
        )

    def decide_listed(user: IamUser) -> list[KeyDecision]:
        decided = decide(user)
        if reactivations is not None and any(d.decision is Decision.UNUSED for d in decided):
            decided = decide(user, reactivations(user.user_name))
        return decided

    notes: list[str] = []
    reported: dict[str, list[AccessKey]] | None
    try:
        report = read_credential_report(
            fetch_credential_report(iam, timeout=report_timeout, sleep=sleep)
        )
        reported = report.keys
        source = "credential_report"
        # Console access comes from the same report; a user it does not list (created
        # after it) is left as the listing gave it.
        users = [
            replace(u, console=report.console[u.user_name]) if u.user_name in report.console else u
            for u in users
        ]
    except (PermissionDenied, Transient) as exc:
        reported = None
        source = "per_user"
        notes.append(f"credential report unavailable ({exc}); read keys with per-user calls")
        notes.append(
            "console access unknown without the credential report: no console password is judged"
        )

    def with_listed_keys(user: IamUser) -> IamUser:
        from_report = (reported or {}).get(user.user_name)
        if from_report is None:
            # No report, or a user created after the (up to four hours old) report.
            return replace(user, keys=keys_per_user(iam, user.user_name))
        listed = iam.list_access_keys(user.user_name)
        return replace(user, keys=merge_keys(listed, from_report, iam))

    settled: dict[str, IamUser] = {}
    to_list: list[IamUser] = []
    for user in users:
        from_report = None if reported is None else reported.get(user.user_name)
        if from_report is not None:
            full = replace(user, keys=tuple(from_report))
            # Report keys carry no ids, so a quarantined user always needs action here.
            if not needs_action(decide(full)):
                settled[user.user_name] = full
                continue
        to_list.append(user)
    settled.update((u.user_name, u) for u in pmap(with_listed_keys, to_list))

    done_users = [settled[u.user_name] for u in users]
    decisions = [d for u in done_users for d in decide_listed(u)]
    console: list[ConsoleDecision] = []
    if reported is not None:
        for user in done_users:
            rotated = None
            if user.console is not None and console_rotated_at is not None:
                rotated = console_rotated_at(user.user_name)
            judged = decide_console(user, rules, now, rotated)
            if judged is not None:
                console.append(judged)
    for name, (policy, since) in sorted(quarantined.items()):
        notes.append(
            f"user {name} is still quarantined ({policy}, first seen "
            f"{since.isoformat(timespec='seconds')}): keys created before that are leaked; "
            "detach the policy once the leak has been reviewed"
        )
    return Inventory(account, done_users, decisions, source, notes, quarantined, console)
