"""The pure policy: one decision and reason per key."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from rotator.model import AccessKey, Decision, IamGroup, IamUser, KeyStatus
from rotator.policy import (
    Due,
    Match,
    Rule,
    Rules,
    UnusedAction,
    decide_user,
    due_at,
    exemption,
    lapsed_exemption,
    needs_action,
    propose,
    resolve,
    to_deactivate,
    to_delete,
)

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
    assert exemption(inside, rules, NOW) is None
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


# --- rules: matching ---------------------------------------------------------------------

ADMIN = "arn:aws:iam::aws:policy/AdministratorAccess"
OWN_ADMIN = "arn:aws:iam::123456789012:policy/team/AdministratorAccess"


def rule(name: str, match: Match, **own: object) -> Rule:
    """A rule as the configuration gives it: what it sets over RULES' policy."""
    return resolve(RULES.default, name, match, **own)


def ruled(*items: Rule) -> Rules:
    return replace(RULES, rules=items)


def matched(subject: IamUser, *items: Rule) -> tuple[str, str | None]:
    chosen, why = ruled(*items).rule_for(subject)
    return chosen.name, why


@pytest.mark.parametrize(
    ("condition", "fits", "misses", "why"),
    [
        (
            Match(path="/ci/"),
            user(path="/ci/build/"),
            user(path="/cis/"),
            "path /ci/",
        ),
        (
            Match(user="ci-*"),
            user(name="ci-runner"),
            user(name="CI-runner"),
            "user ci-*",
        ),
        (
            Match(group="deployers"),
            user(groups=(IamGroup("deployers"),)),
            user(groups=(IamGroup("developers"),)),
            "group deployers",
        ),
        (
            Match(account="111122223333"),
            replace(user(), account_id="111122223333"),
            user(),
            "account 111122223333",
        ),
        (
            Match(tags=(("type", "human"),)),
            user(tags={"type": "human", "team": "a"}),
            user(tags={"type": "Human"}),
            "tag type=human",
        ),
        (
            Match(attached_policy="AdministratorAccess"),
            user(attached_policy_arns=frozenset({ADMIN})),
            user(attached_policy_arns=frozenset({"arn:aws:iam::aws:policy/ReadOnlyAccess"})),
            "AdministratorAccess attached",
        ),
    ],
    ids=["path", "user", "group", "account", "tag", "attached_policy"],
)
def test_each_match_condition_selects_the_users_it_names(
    condition: Match, fits: IamUser, misses: IamUser, why: str
) -> None:
    """Each condition alone picks the users it describes (path prefix, case-sensitive
    name glob, group, account, exact tag value, attached policy) and says why."""
    assert matched(fits, rule("r", condition)) == ("r", why)
    assert matched(misses, rule("r", condition)) == ("default", None)


def test_every_condition_of_a_match_must_hold() -> None:
    """A match with several conditions applies only when all of them hold."""
    ci = rule("ci", Match(path="/ci/", user="ci-*", group="deployers"))
    full = user(name="ci-app", path="/ci/", groups=(IamGroup("deployers"),))
    assert matched(full, ci) == ("ci", "path /ci/, user ci-*, group deployers")
    assert matched(replace(full, path="/"), ci)[0] == "default"
    assert matched(replace(full, user_name="app"), ci)[0] == "default"
    assert matched(replace(full, groups=()), ci)[0] == "default"


def test_the_first_matching_rule_wins_and_none_matching_is_the_default() -> None:
    """Rules are tried in order: a user two rules match gets the first; one no rule
    matches gets the policy ("default")."""
    admins = rule("admins", Match(attached_policy="AdministratorAccess"), max_age=D30)
    humans = rule("humans", Match(tags=(("type", "human"),)))
    both = user(key(31), tags={"type": "human"}, attached_policy_arns=frozenset({ADMIN}))
    assert matched(both, admins, humans)[0] == "admins"
    assert matched(both, humans, admins)[0] == "humans"
    assert matched(user(), admins, humans) == ("default", None)
    [by_admins] = decide_user(both, NOW, ruled(admins, humans))
    [by_humans] = decide_user(both, NOW, ruled(humans, admins))
    assert (by_admins.decision, by_admins.rule) == (Decision.ROTATE, "admins")
    assert (by_humans.decision, by_humans.rule) == (Decision.OK, "humans")


def test_an_empty_match_applies_to_every_user() -> None:
    """`match: {}` is a catch-all rule (the way to set unused_after for everyone)."""
    assert matched(user(name="anyone", path="/x/"), rule("all", Match())) == (
        "all",
        "matches every user",
    )


def test_a_policy_attached_through_a_group_matches_and_says_which_group() -> None:
    """A managed policy attached to one of the user's groups counts as attached to the
    user, and the reason names the group."""
    admins = rule("admins", Match(attached_policy="AdministratorAccess"))
    member = user(groups=(IamGroup("ops"), IamGroup("root", frozenset({ADMIN}))))
    assert matched(member, admins) == ("admins", "AdministratorAccess attached through group root")
    outsider = user(groups=(IamGroup("ops", frozenset({"arn:aws:iam::aws:policy/ReadOnly"})),))
    assert matched(outsider, admins)[0] == "default"


def test_a_policy_name_matches_any_policy_of_that_name_an_arn_only_itself() -> None:
    """By name, AWS's AdministratorAccess and a customer policy of the same name (any
    path) both match; by ARN only that very policy does."""
    by_name = rule("n", Match(attached_policy="AdministratorAccess"))
    by_arn = rule("a", Match(attached_policy=ADMIN))
    aws_own = user(attached_policy_arns=frozenset({ADMIN}))
    customer = user(attached_policy_arns=frozenset({OWN_ADMIN}))
    assert matched(aws_own, by_name)[0] == matched(customer, by_name)[0] == "n"
    assert matched(aws_own, by_arn)[0] == "a"
    assert matched(customer, by_arn)[0] == "default"
    near = user(attached_policy_arns=frozenset({"arn:aws:iam::aws:policy/AdministratorAccessX"}))
    assert matched(near, by_name)[0] == "default"


# --- rules: resolution -------------------------------------------------------------------

D30 = timedelta(days=30)


def test_a_rule_takes_what_it_does_not_set_from_policy() -> None:
    """A rule's own values win; every key it leaves unset is the policy's, and a
    rotation's overlap stays the policy's (None) unless the rule sets one."""
    admins = rule("admins", Match(), max_age=D30, warn_age=None)
    assert (admins.max_age, admins.warn_age) == (D30, RULES.warn_age)
    assert admins.overlap is None
    assert admins.unused_after is None
    ci = rule("ci", Match(), overlap=timedelta(hours=48))
    assert (ci.max_age, ci.overlap) == (RULES.max_age, timedelta(hours=48))
    with pytest.raises(ValueError, match="cannot set delete_after"):
        rule("x", Match(), delete_after=D30)


def test_the_rules_own_values_decide_its_users_keys() -> None:
    """Under a rule with max_age 30d and warn_age 23d, a 31-day key is rotated and a
    24-day key warned about; the same 31-day key of a user no rule matches is ok under
    the 90-day policy. Each decision names its rule."""
    admins = rule(
        "admins",
        Match(attached_policy="AdministratorAccess"),
        max_age=D30,
        warn_age=timedelta(days=23),
    )
    [admin] = decide_user(
        user(key(31), attached_policy_arns=frozenset({ADMIN})), NOW, ruled(admins)
    )
    [plain] = decide_user(user(key(31), name="bob"), NOW, ruled(admins))
    assert (admin.decision, admin.rule, admin.reason) == (
        Decision.ROTATE,
        "admins",
        "age 31d > max_age 30d",
    )
    assert (plain.decision, plain.rule, plain.rule_match) == (Decision.OK, "default", None)
    [warned] = decide_user(
        user(key(24), attached_policy_arns=frozenset({ADMIN})), NOW, ruled(admins)
    )
    assert warned.decision is Decision.WARN


def test_proposals_carry_the_overlap_of_the_rule_that_decided() -> None:
    """A rotation proposed under a rule with its own overlap carries it; under the
    policy it carries none (the engine's policy.overlap applies)."""
    ci = rule("ci", Match(path="/ci/"), overlap=timedelta(hours=48))
    rules = ruled(ci)
    decisions = decide_user(user(key(120), name="deployer", path="/ci/"), NOW, rules)
    decisions += decide_user(user(key(120), name="bob"), NOW, rules)
    by_user = {p.user_name: p for p in propose(decisions, rules)}
    assert by_user["deployer"].overlap == timedelta(hours=48)
    assert by_user["bob"].overlap is None


# --- unused keys -------------------------------------------------------------------------

HUMANS = rule(
    "humans",
    Match(tags=(("type", "human"),)),
    unused_after=timedelta(days=45),
    unused_action="deactivate",
)


def human(*keys: AccessKey, **kw: object) -> IamUser:
    return user(*keys, tags={"type": "human"}, **kw)


def used(
    days_old: float,
    used_days_ago: float,
    status: KeyStatus = KeyStatus.ACTIVE,
    kid: str | None = "AKIAUSED",
) -> AccessKey:
    return AccessKey(
        kid, status, NOW - timedelta(days=days_old), NOW - timedelta(days=used_days_ago)
    )


def test_an_active_key_idle_past_unused_after_is_unused_and_to_be_deactivated() -> None:
    """A key last used 46 days ago under a 45-day rule is `unused`, and the reason says
    the next pass deactivates it; one used 44 days ago is judged by age."""
    [idle] = decide_user(human(used(60, 46)), NOW, ruled(HUMANS))
    [busy] = decide_user(human(used(60, 44)), NOW, ruled(HUMANS))
    assert idle.decision is Decision.UNUSED
    assert "last used 46d ago > unused_after 45d" in idle.reason
    assert "the next pass deactivates it" in idle.reason
    assert busy.decision is Decision.OK
    assert [d.key for d in to_deactivate([idle, busy], ruled(HUMANS))] == [idle.key]


def test_a_never_used_key_counts_as_unused_from_its_creation() -> None:
    """A key never used is idle since it was created: 46 days old is unused, 44 is not."""
    [old] = decide_user(human(key(46)), NOW, ruled(HUMANS))
    [young] = decide_user(human(key(44)), NOW, ruled(HUMANS))
    assert old.decision is Decision.UNUSED
    assert "never used, created 46d ago" in old.reason
    assert old.idle_since == old.key.created_at
    assert young.decision is Decision.OK


def test_unused_wins_over_rotate_and_report_only_is_not_deactivated() -> None:
    """An unused key past max_age is `unused`, not rotated (nobody would use the new
    one); under `unused_action: report` it is shown but not to be deactivated; a rule
    without unused_after judges no key unused."""
    reporting = replace(HUMANS, unused_action=UnusedAction.REPORT)
    [d] = decide_user(human(key(120)), NOW, ruled(reporting))
    assert d.decision is Decision.UNUSED
    assert "not rotated" in d.reason
    assert "reported only" in d.reason
    assert to_deactivate([d], ruled(reporting)) == []
    [no_rule] = decide_user(human(key(120)), NOW, RULES)
    assert no_rule.decision is Decision.ROTATE


def test_inactive_keys_are_never_unused() -> None:
    """Unused concerns Active keys only: an idle Inactive key is `ok`."""
    [d] = decide_user(human(used(200, 100, KeyStatus.INACTIVE)), NOW, ruled(HUMANS))
    assert d.decision is Decision.OK


def test_a_key_turned_back_on_counts_as_idle_from_then() -> None:
    """A key an operator reactivated 2 days ago is not unused although it was last
    used 100 days ago; 46 days after the reactivation it is unused again."""
    stale = AccessKey(
        "AKIAOLD", KeyStatus.ACTIVE, NOW - timedelta(days=300), NOW - timedelta(days=100)
    )
    back_on = {"AKIAOLD": NOW - timedelta(days=2)}
    [fresh] = decide_user(human(stale), NOW, ruled(HUMANS), reactivated=back_on)
    assert fresh.decision is Decision.ROTATE  # judged by age again, 300 days old
    assert fresh.idle_since == NOW - timedelta(days=2)
    [again] = decide_user(
        human(stale), NOW + timedelta(days=44), ruled(HUMANS), reactivated=back_on
    )
    assert again.decision is Decision.UNUSED
    assert "turned it back on 46d ago" in again.reason


def test_a_key_deactivated_as_unused_frees_the_slot_of_its_users_due_key() -> None:
    """With two active keys, a due one is `rotate`, not `blocked`, when the other is
    unused and this pass deactivates it; under report-only it still blocks."""
    subject = human(used(120, 1, kid="AKIADUE"), used(200, 100, kid="AKIAIDLE"))
    due, idle = decide_user(subject, NOW, ruled(HUMANS))
    assert (due.decision, idle.decision) == (Decision.ROTATE, Decision.UNUSED)
    reporting = replace(HUMANS, unused_action=UnusedAction.REPORT)
    due, idle = decide_user(subject, NOW, ruled(reporting))
    assert (due.decision, idle.decision) == (Decision.BLOCKED, Decision.UNUSED)


def test_due_at_is_the_earlier_of_rotation_and_deactivation() -> None:
    """The moment the rotator acts on a key follows from the decision and its rule:
    rotation at creation + max_age, or deactivation at idle-since + unused_after when
    that is earlier and the rule deactivates; nothing for an inactive or exempt key."""
    [d] = decide_user(human(used(10, 9)), NOW, ruled(HUMANS))
    assert due_at(d, HUMANS) == Due(NOW - timedelta(days=9) + timedelta(days=45), "deactivate")
    [d] = decide_user(human(used(80, 1)), NOW, ruled(HUMANS))
    assert due_at(d, HUMANS) == Due(NOW - timedelta(days=80) + timedelta(days=90), "rotate")
    [d] = decide_user(user(used(10, 9)), NOW, RULES)
    assert due_at(d, RULES.default) == Due(NOW + timedelta(days=80), "rotate")
    [off] = decide_user(human(used(10, 9, KeyStatus.INACTIVE)), NOW, ruled(HUMANS))
    assert due_at(off, HUMANS) is None


# --- inactive keys deleted on purpose ----------------------------------------------------


def test_an_inactive_key_idle_past_inactive_delete_after_is_due_for_deletion() -> None:
    """With inactive_delete_after 30d, an Inactive key last used 31 days ago is marked
    for deletion (and needs its id listed); one used 29 days ago, an Active one, or any
    key without the setting is not."""
    rules = replace(RULES, inactive_delete_after=D30)
    idle, recent, active = decide_user(
        user(used(100, 31, KeyStatus.INACTIVE), used(100, 29, KeyStatus.INACTIVE)), NOW, rules
    ) + decide_user(user(used(100, 31)), NOW, rules)
    assert (idle.delete_due, recent.delete_due, active.delete_due) == (True, False, False)
    assert idle.decision is Decision.OK
    assert "idle 31d > inactive_delete_after 30d: the next pass deletes it" in idle.reason
    assert needs_action([idle])
    assert not needs_action([recent])
    [off] = decide_user(user(used(100, 31, KeyStatus.INACTIVE)), NOW, RULES)
    assert not off.delete_due
    [never] = decide_user(user(key(31, KeyStatus.INACTIVE, kid="AKIAX")), NOW, rules)
    assert never.delete_due  # never used: idle since its creation
    assert to_delete([never, recent]) == [never]


# --- exemption dates ---------------------------------------------------------------------


def tagged(value: str) -> IamUser:
    return user(key(120), tags={"rotator:exempt": value})


@pytest.mark.parametrize(
    ("value", "expected", "word"),
    [
        ("2026-11-29", Decision.EXEMPT, "exempt until 2026-11-29"),
        ("2026-11-28", Decision.EXEMPT, "exempt until 2026-11-28"),
        ("2026-11-27", Decision.ROTATE, "exemption lapsed on 2026-11-27"),
        ("true", Decision.EXEMPT, "tagged rotator:exempt=true"),
        ("", Decision.EXEMPT, "tagged"),
        ("false", Decision.ROTATE, "max_age"),
        ("2026-13-01", Decision.EXEMPT, "not a date: exempt with no end"),
    ],
    ids=["tomorrow", "today", "yesterday", "true", "empty", "false", "not-a-date"],
)
def test_an_exempt_tag_may_carry_the_date_the_exemption_ends(
    value: str, expected: Decision, word: str
) -> None:
    """A date exempts through that day (UTC) and lapses after it: the user is then
    handled normally and the reason says the exemption lapsed; any other value but
    "false" exempts as before, a malformed date too (saying so)."""
    [d] = decide_user(tagged(value), NOW, RULES)
    assert d.decision is expected
    assert word in d.reason


def test_a_lapsed_exemption_is_named_on_every_key_of_the_user() -> None:
    """After the date, each of the user's keys is decided by the policy and its reason
    carries the lapsed exemption; the exemption helper says the user is not exempt."""
    subject = user(key(120), key(5), tags={"rotator:exempt": "2026-01-31"})
    decisions = decide_user(subject, NOW, RULES)
    assert [d.decision for d in decisions] == [Decision.BLOCKED, Decision.OK]
    assert all(
        d.reason.endswith("exemption lapsed on 2026-01-31 (tagged rotator:exempt=2026-01-31)")
        for d in decisions
    )
    assert exemption(subject, RULES, NOW) is None
    assert lapsed_exemption(subject, RULES, NOW) is not None
    assert lapsed_exemption(subject, RULES, datetime(2026, 1, 31, 23, 59, tzinfo=UTC)) is None
