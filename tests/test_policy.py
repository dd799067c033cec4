"""The pure policy: one decision and reason per key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rotator.model import AccessKey, Decision, IamUser, KeyStatus
from rotator.policy import Rules, decide_user, exemption

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
QV2 = "arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantineV2"
RULES = Rules(
    max_age=timedelta(days=90),
    warn_age=timedelta(days=80),
    include_paths=("/",),
    exclude_users=("ci-*", "break-glass"),
    exempt_tag="rotator:exempt",
    quarantine_policies=frozenset({QV2}),
)


def key(days: float, status: KeyStatus = KeyStatus.ACTIVE, kid: str | None = None) -> AccessKey:
    return AccessKey(kid, status, NOW - timedelta(days=days))


def user(*keys: AccessKey, name: str = "alice", **kw: object) -> IamUser:
    return IamUser("123456789012", name, f"arn:aws:iam::123456789012:user/{name}", keys=keys, **kw)  # type: ignore[arg-type]


CASES = [
    # (id, user, expected decisions in key order, a word the reason must hold)
    ("fresh", user(key(10)), [Decision.OK], "age 10d"),
    ("warn", user(key(85)), [Decision.WARN], "warn_age 80d"),
    ("rotate", user(key(120)), [Decision.ROTATE], "age 120d > max_age 90d"),
    ("exactly-max-age-is-not-due", user(key(90)), [Decision.WARN], "warn_age"),
    ("a-second-past-max-age-is-due", user(key(90 + 1 / 86400)), [Decision.ROTATE], "max_age"),
    ("exactly-warn-age-is-ok", user(key(80)), [Decision.OK], "age 80d"),
    (
        "two-active-both-due-blocked",
        user(key(120), key(100)),
        [Decision.BLOCKED, Decision.BLOCKED],
        "both keys are active",
    ),
    (
        "two-active-one-due-blocks-only-that-one",
        user(key(120), key(5)),
        [Decision.BLOCKED, Decision.OK],
        "no free slot",
    ),
    (
        "inactive-beside-due-active-does-not-block",
        user(key(200, KeyStatus.INACTIVE), key(120)),
        [Decision.OK, Decision.ROTATE],
        "inactive",
    ),
    ("inactive-old-key-alone-is-ok", user(key(300, KeyStatus.INACTIVE)), [Decision.OK], "inactive"),
    (
        "quarantined-active-keys-are-leaked",
        user(key(3), key(50, KeyStatus.INACTIVE), attached_policy_arns=frozenset({QV2})),
        [Decision.LEAKED, Decision.OK],
        "AWSCompromisedKeyQuarantineV2",
    ),
    (
        "exempt-by-tag",
        user(key(300), tags={"rotator:exempt": "true"}),
        [Decision.EXEMPT],
        "tagged rotator:exempt",
    ),
    (
        "exempt-tag-with-empty-value-exempts",
        user(key(300), tags={"rotator:exempt": ""}),
        [Decision.EXEMPT],
        "tagged",
    ),
    (
        "exempt-tag-false-does-not-exempt",
        user(key(300), tags={"rotator:exempt": "False"}),
        [Decision.ROTATE],
        "max_age",
    ),
    (
        "exempt-by-glob",
        user(key(300), name="ci-runner"),
        [Decision.EXEMPT],
        "exclude_users pattern 'ci-*'",
    ),
    (
        "exempt-wins-over-quarantine",
        user(key(3), name="break-glass", attached_policy_arns=frozenset({QV2})),
        [Decision.EXEMPT],
        "exclude_users",
    ),
]


@pytest.mark.parametrize(("case", "subject", "expected", "word"), CASES, ids=[c[0] for c in CASES])
def test_decision_table(case: str, subject: IamUser, expected: list[Decision], word: str) -> None:
    """Each rule and edge of the policy yields its decision with a reason naming why."""
    decisions = decide_user(subject, NOW, RULES)
    assert [d.decision for d in decisions] == expected
    assert any(word in d.reason for d in decisions), [d.reason for d in decisions]


def test_never_used_key_is_judged_by_age_alone() -> None:
    """A key that was never used is due by age exactly like a used one."""
    never = decide_user(user(key(120)), NOW, RULES)[0]
    used = AccessKey(None, KeyStatus.ACTIVE, NOW - timedelta(days=120), NOW - timedelta(days=1))
    assert never.key.last_used_at is None
    assert never.decision is decide_user(user(used), NOW, RULES)[0].decision is Decision.ROTATE


def test_path_outside_include_paths_is_exempt() -> None:
    """A user under a path that no include_paths prefix covers is exempt."""
    rules = Rules(timedelta(days=90), timedelta(days=80), include_paths=("/teams/",))
    inside = user(key(120), path="/teams/data/")
    outside = user(key(120), path="/system/")
    assert exemption(inside, rules) is None
    assert decide_user(outside, NOW, rules)[0].decision is Decision.EXEMPT
    assert "outside include_paths" in decide_user(outside, NOW, rules)[0].reason


def test_replacement_key_of_contained_leak_is_not_leaked_again() -> None:
    """A key the rotator issued after containing a leak is judged by age, not by the
    quarantine policy that is still attached."""
    subject = user(key(2, kid="AKIANEW"), attached_policy_arns=frozenset({QV2}))
    [decision] = decide_user(subject, NOW, RULES, replacements={"AKIANEW"})
    assert decision.decision is Decision.OK
    assert "still attached" in decision.reason


def test_only_keys_created_before_the_quarantine_was_first_seen_are_leaked() -> None:
    """AWS attached the policy because a key that existed then leaked: keys created
    before the rotator first saw it are leaked (inactive ones flagged as suspect), keys
    created after it (a later rotation, a person's new key) are judged by age alone."""
    first_seen = NOW - timedelta(days=10)
    subject = user(
        key(30, kid="AKIAOLD"),
        key(12, kid="AKIAOFF", status=KeyStatus.INACTIVE),
        attached_policy_arns=frozenset({QV2}),
    )
    old, off = decide_user(subject, NOW, RULES, quarantined_since=first_seen)
    assert old.decision is Decision.LEAKED
    assert "created before" in old.reason
    assert off.decision is Decision.OK
    assert "suspect" in off.reason
    later = user(key(2, kid="AKIALATER"), attached_policy_arns=frozenset({QV2}))
    [fresh] = decide_user(later, NOW, RULES, quarantined_since=first_seen)
    assert fresh.decision is Decision.OK
    assert "created after the quarantine policy was first seen" in fresh.reason
    # Seen for the first time now: every key the user holds is suspect.
    [now_seen] = decide_user(later, NOW, RULES)
    assert now_seen.decision is Decision.LEAKED


def test_as_of_later_moves_a_warn_key_to_rotate() -> None:
    """Evaluating ten days later turns an 85-day key into a due one."""
    subject = user(key(85))
    assert decide_user(subject, NOW, RULES)[0].decision is Decision.WARN
    assert decide_user(subject, NOW + timedelta(days=10), RULES)[0].decision is Decision.ROTATE
