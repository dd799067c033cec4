"""The pure console-password policy (`rotator.console_policy`) and the credential report's
console columns: one decision and reason per user with a login profile, no IAM call."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from rotator.console_policy import CONSOLE_DECISIONS, console_to_rotate, decide_console
from rotator.errors import PermissionDenied
from rotator.inventory import read_credential_report, scan
from rotator.model import (
    KEY_DECISIONS,
    AccessKey,
    ConsoleAccess,
    ConsoleDecision,
    ConsoleMode,
    Decision,
    IamUser,
    KeyStatus,
    NewKey,
)
from rotator.policy import RULE_KEYS, Match, Rules, resolve
from rotator.ports import KeyLastUsed

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
D = timedelta(days=1)
ACCOUNT = "123456789012"
RULES = Rules(
    max_age=90 * D,
    warn_age=80 * D,
    exclude_users=("break-glass-*",),
    exempt_tag="rotator:exempt",
)


def access(
    age: timedelta | None = 10 * D,
    *,
    signed_in_ago: timedelta | None = D,
    mfa: bool = True,
) -> ConsoleAccess:
    return ConsoleAccess(
        password_last_changed=None if age is None else NOW - age,
        password_last_used=None if signed_in_ago is None else NOW - signed_in_ago,
        mfa_active=mfa,
    )


def user(
    console: ConsoleAccess | None, name: str = "alice", path: str = "/", **tags: str
) -> IamUser:
    return IamUser(
        ACCOUNT,
        name,
        f"arn:aws:iam::{ACCOUNT}:user{path}{name}",
        path=path,
        tags=tags,
        console=console,
    )


def decide(
    console: ConsoleAccess | None,
    rules: Rules = RULES,
    rotated_at: datetime | None = None,
    **user_kw: str,
) -> ConsoleDecision | None:
    return decide_console(user(console, **user_kw), rules, NOW, rotated_at)


def judged(console: ConsoleAccess, rules: Rules = RULES, **kw: str) -> ConsoleDecision:
    found = decide(console, rules, **kw)
    assert found is not None
    return found


STALE_AFTER_60D = replace(RULES, console_unused_after=60 * D)


# --- each decision ------------------------------------------------------------------------


def test_a_young_password_with_mfa_is_ok_with_its_age_and_due_date() -> None:
    """10 days old with MFA: ok, the age in the reason, due 90 days after it was set."""
    d = judged(access(10 * D))
    assert d.decision is Decision.OK
    assert d.reason == "password 10 days old; MFA active"
    assert d.password_age == 10 * D
    assert d.due_at == NOW - 10 * D + 90 * D
    assert (d.rule, d.rule_match, d.mode) == ("default", None, ConsoleMode.REPORT)


def test_from_password_warn_age_on_a_password_is_warn() -> None:
    """80 days (exactly password_warn_age) and 85 days old: warn, naming the threshold."""
    for days in (80, 85):
        d = judged(access(days * D))
        assert d.decision is Decision.WARN, days
        assert d.reason == f"password {days} days old >= password_warn_age 80d (rule default)"
    assert judged(access(80 * D - timedelta(seconds=1))).decision is Decision.OK


def test_from_password_max_age_on_a_password_is_rotate_reported_only_under_report() -> None:
    """90 days (exactly password_max_age) and 101 days old under `console: report`:
    rotate, and the reason says it is reported only."""
    for days in (90, 101):
        d = judged(access(days * D))
        assert d.decision is Decision.ROTATE, days
        assert d.mode is ConsoleMode.REPORT
        assert d.reason == (
            f"password {days} days old >= password_max_age 90d (rule default): "
            "reported only (console: report)"
        )
    assert judged(access(90 * D - timedelta(seconds=1))).decision is Decision.WARN


def test_under_console_rotate_the_reason_says_the_next_pass_rotates_it() -> None:
    """A rule with `console: rotate` and password_max_age 30d: a 40-day-old password is
    rotate, in mode rotate, naming the rule and its threshold."""
    admins = resolve(
        RULES.default,
        "admins",
        Match(user="adm-*"),
        console="rotate",
        password_max_age=30 * D,
        password_warn_age=20 * D,
    )
    rules = replace(RULES, rules=(admins,))
    d = judged(access(40 * D), rules, name="adm-root")
    assert d.decision is Decision.ROTATE
    assert d.mode is ConsoleMode.ROTATE
    assert (d.rule, d.rule_match) == ("admins", "user adm-*")
    assert d.reason == (
        "password 40 days old >= password_max_age 30d (rule admins): "
        "the next pass rotates it into Vault"
    )
    assert d.due_at == NOW - 40 * D + 30 * D


def test_console_access_without_mfa_is_no_mfa() -> None:
    """A young password without an MFA device: no_mfa, with its age and rule."""
    d = judged(access(10 * D, mfa=False))
    assert d.decision is Decision.NO_MFA
    assert d.reason == "console password without MFA (password 10 days old, rule default)"


def test_no_sign_in_for_console_unused_after_is_stale_console() -> None:
    """Last sign-in 65 days ago with console_unused_after 60d: stale_console, saying
    when; 59 days is not stale; without console_unused_after nothing is."""
    d = judged(access(70 * D, signed_in_ago=65 * D), STALE_AFTER_60D)
    assert d.decision is Decision.STALE_CONSOLE
    assert d.reason.startswith("no console sign-in for 65 days (last ")
    assert d.reason.endswith(">= console_unused_after 60d (rule default)")
    assert judged(access(70 * D, signed_in_ago=59 * D), STALE_AFTER_60D).decision is Decision.OK
    assert judged(access(70 * D, signed_in_ago=65 * D)).decision is Decision.OK


def test_never_signed_in_counts_from_when_the_password_was_set() -> None:
    """Never signed in, password set 61 days ago: stale_console after 60d; set 50 days
    ago: not yet."""
    d = judged(access(61 * D, signed_in_ago=None), STALE_AFTER_60D)
    assert d.decision is Decision.STALE_CONSOLE
    assert d.reason == (
        "never signed in to the console, password set 61 days ago >= console_unused_after "
        "60d (rule default)"
    )
    fresh = judged(access(50 * D, signed_in_ago=None), STALE_AFTER_60D)
    assert fresh.decision is Decision.OK


# --- the order of the decisions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("console", "rules", "expected"),
    [
        pytest.param(
            access(120 * D, signed_in_ago=100 * D, mfa=False),
            STALE_AFTER_60D,
            Decision.ROTATE,
            id="rotate-before-no_mfa-and-stale",
        ),
        pytest.param(
            access(85 * D, signed_in_ago=70 * D, mfa=False),
            STALE_AFTER_60D,
            Decision.NO_MFA,
            id="no_mfa-before-stale-and-warn",
        ),
        pytest.param(
            access(85 * D, signed_in_ago=70 * D),
            STALE_AFTER_60D,
            Decision.STALE_CONSOLE,
            id="stale-before-warn",
        ),
    ],
)
def test_the_first_decision_that_holds_wins(
    console: ConsoleAccess, rules: Rules, expected: Decision
) -> None:
    """rotate, then no_mfa, then stale_console, then warn: a password that is several
    of them gets the first."""
    assert judged(console, rules).decision is expected


def test_the_exempt_tag_wins_over_every_other_decision() -> None:
    """An exempt user's old password without MFA, unused for months, is exempt."""
    d = judged(
        access(300 * D, signed_in_ago=200 * D, mfa=False),
        STALE_AFTER_60D,
        **{"rotator:exempt": "true"},
    )
    assert d.decision is Decision.EXEMPT
    assert d.reason == "tagged rotator:exempt=true"


def test_a_dated_exemption_holds_until_its_day_then_lapses() -> None:
    """Tagged with tomorrow's date: exempt until then; with yesterday's: judged like any
    other, and the reason says the exemption lapsed."""
    tomorrow = (NOW + D).date().isoformat()
    yesterday = (NOW - D).date().isoformat()
    held = judged(access(120 * D), **{"rotator:exempt": tomorrow})
    assert held.decision is Decision.EXEMPT
    assert f"exempt until {tomorrow}" in held.reason
    lapsed = judged(access(120 * D), **{"rotator:exempt": yesterday})
    assert lapsed.decision is Decision.ROTATE
    assert lapsed.reason.endswith(
        f"exemption lapsed on {yesterday} (tagged rotator:exempt={yesterday})"
    )


# --- the password's age -------------------------------------------------------------------


def test_a_rotation_by_the_rotator_newer_than_the_report_restarts_the_age() -> None:
    """The report (up to four hours old) still says 120 days, but the rotator set the
    password 2 hours ago: ok, 0 days old, due 90 days after the rotation."""
    rotated = NOW - timedelta(hours=2)
    d = decide(access(120 * D), rotated_at=rotated)
    assert d is not None
    assert d.decision is Decision.OK
    assert d.password_age == timedelta(hours=2)
    assert d.due_at == rotated + 90 * D


def test_a_rotation_older_than_the_report_date_changes_nothing() -> None:
    """A password changed by someone after the rotator's last rotation counts from the
    report's date."""
    d = decide(access(85 * D), rotated_at=NOW - 200 * D)
    assert d is not None
    assert d.decision is Decision.WARN
    assert d.password_age == 85 * D


def test_a_password_of_unknown_age_is_never_due() -> None:
    """No date in the report: never rotate or warn, even under the strictest rule; no
    due date; without MFA it is still no_mfa."""
    d = judged(access(None))
    assert d.decision is Decision.OK
    assert (d.password_age, d.due_at) == (None, None)
    assert "password age unknown" in d.reason
    no_mfa = judged(access(None, mfa=False))
    assert no_mfa.decision is Decision.NO_MFA
    assert "password age unknown" in no_mfa.reason


# --- no decision --------------------------------------------------------------------------


def test_a_user_without_a_login_profile_gets_no_console_decision() -> None:
    """No console access (or no report to tell): nothing to judge."""
    assert decide(None) is None


def test_console_off_in_the_policy_or_in_the_users_rule_means_no_decision() -> None:
    """`console: off` under policy leaves every password alone; in a rule, only the
    rule's users, the others still judged by the policy."""
    off = replace(RULES, console=ConsoleMode.OFF)
    assert decide(access(300 * D, mfa=False), off) is None
    robots = resolve(RULES.default, "robots", Match(path="/ci/"), console="off")
    rules = replace(RULES, rules=(robots,))
    assert decide(access(300 * D, mfa=False), rules, name="ci-bot", path="/ci/") is None
    other = decide(access(300 * D, mfa=False), rules, name="bob")
    assert other is not None
    assert other.decision is Decision.ROTATE


def test_users_the_selection_leaves_out_get_no_console_decision() -> None:
    """A user outside include_paths or matching exclude_users is absent, not exempt."""
    only_teams = replace(RULES, include_paths=("/teams/",))
    assert decide(access(300 * D), only_teams) is None
    assert decide(access(300 * D), only_teams, path="/teams/") is not None
    assert decide(access(300 * D), name="break-glass-1") is None


def test_a_rule_sets_console_keys_and_inherits_the_others_from_policy() -> None:
    """A rule that sets only console_unused_after keeps the policy's password ages and
    mode; RULE_KEYS lists every console key a rule may set."""
    assert {"console", "password_max_age", "password_warn_age", "console_unused_after"} <= (
        RULE_KEYS
    )
    humans = resolve(
        RULES.default, "humans", Match(tags=(("type", "human"),)), console_unused_after=45 * D
    )
    assert (humans.password_max_age, humans.password_warn_age) == (90 * D, 80 * D)
    assert humans.console is ConsoleMode.REPORT
    rules = replace(RULES, rules=(humans,))
    d = judged(access(20 * D, signed_in_ago=50 * D), rules, type="human")
    assert d.decision is Decision.STALE_CONSOLE
    assert d.rule == "humans"


# --- what a pass acts on ------------------------------------------------------------------


def test_console_to_rotate_lists_due_passwords_under_console_rotate_only() -> None:
    """Of a due password under rotate, one under report, and a young one under rotate,
    only the first is for the pass to rotate."""
    base = judged(access(120 * D))
    due_rotate = replace(base, mode=ConsoleMode.ROTATE)
    due_report = base
    young = replace(judged(access(10 * D)), mode=ConsoleMode.ROTATE)
    no_mfa = replace(judged(access(10 * D, mfa=False)), mode=ConsoleMode.ROTATE)
    assert console_to_rotate([due_report, young, due_rotate, no_mfa]) == [due_rotate]


def test_console_decisions_are_apart_from_key_decisions() -> None:
    """no_mfa and stale_console are console decisions only; every console decision is a
    Decision."""
    assert Decision.NO_MFA not in KEY_DECISIONS
    assert Decision.STALE_CONSOLE not in KEY_DECISIONS
    assert set(CONSOLE_DECISIONS) == {
        Decision.ROTATE,
        Decision.NO_MFA,
        Decision.STALE_CONSOLE,
        Decision.WARN,
        Decision.OK,
        Decision.EXEMPT,
    }


# --- the credential report's console columns ------------------------------------------------

HEADER = (
    "user,arn,user_creation_time,password_enabled,password_last_used,password_last_changed,"
    "password_next_rotation,mfa_active,access_key_1_active,access_key_1_last_rotated,"
    "access_key_1_last_used_date,access_key_2_active,access_key_2_last_rotated,"
    "access_key_2_last_used_date\n"
)
REPORT = (
    HEADER
    + "<root_account>,arn:root,2020-01-01T00:00:00+00:00,not_supported,2026-11-01T00:00:00+00:00,"
    "not_supported,not_supported,true,false,N/A,N/A,false,N/A,N/A\n"
    "alice,arn:a,2025-01-01T00:00:00+00:00,true,2026-11-27T08:00:00+00:00,"
    "2026-08-20T09:00:00+00:00,N/A,true,true,2026-10-01T00:00:00+00:00,N/A,false,N/A,N/A\n"
    "bob,arn:b,2025-01-01T00:00:00+00:00,true,no_information,2026-09-01T00:00:00+00:00,N/A,"
    "false,false,N/A,N/A,false,N/A,N/A\n"
    "carol,arn:c,2025-01-01T00:00:00+00:00,false,N/A,N/A,N/A,false,true,"
    "2026-11-01T00:00:00+00:00,N/A,false,N/A,N/A\n"
    "dave,arn:d,2025-01-01T00:00:00+00:00,true,no_information,N/A,N/A,false,false,N/A,N/A,"
    "false,N/A,N/A\n"
).encode()


def test_the_report_gives_console_access_only_to_users_with_a_password() -> None:
    """password_enabled true: the dates and MFA; no_information and N/A read as no date;
    a user without a password (carol) and the root account have none; keys as before."""
    report = read_credential_report(REPORT)
    assert set(report.keys) == {"alice", "bob", "carol", "dave"}
    assert report.console == {
        "alice": ConsoleAccess(
            datetime(2026, 8, 20, 9, tzinfo=UTC), datetime(2026, 11, 27, 8, tzinfo=UTC), True
        ),
        "bob": ConsoleAccess(datetime(2026, 9, 1, tzinfo=UTC), None, False),
        "dave": ConsoleAccess(None, None, False),
    }
    assert [k.status for k in report.keys["carol"]] == [KeyStatus.ACTIVE]


class ReportIam:
    """A fake IAM answering from a fixed credential report (or refusing it), counting
    every per-user call."""

    def __init__(self, report: bytes | None) -> None:
        self.report = report
        self.calls: list[str] = []

    def account_id(self) -> str:
        return ACCOUNT

    def iter_users_with_details(self) -> Iterator[IamUser]:
        for name in ("alice", "bob", "carol", "dave"):
            yield IamUser(ACCOUNT, name, f"arn:aws:iam::{ACCOUNT}:user/{name}")

    def generate_credential_report(self) -> str:
        if self.report is None:
            raise PermissionDenied("iam:GenerateCredentialReport")
        return "COMPLETE"

    def get_credential_report(self) -> bytes | None:
        return self.report

    def list_access_keys(self, user_name: str) -> list[AccessKey]:
        self.calls.append(f"ListAccessKeys:{user_name}")
        return []

    def key_last_used(self, access_key_id: str) -> KeyLastUsed:  # pragma: no cover
        raise AssertionError("no key needs its last use here")

    def create_access_key(self, user_name: str) -> NewKey:  # pragma: no cover
        raise AssertionError("a scan must not create keys")


def test_scan_judges_console_passwords_from_the_report_without_a_per_user_call() -> None:
    """alice (100 days, MFA) is rotate, bob (88 days, no MFA) no_mfa, dave (no date, no
    MFA) no_mfa; carol has no password, no item; no per-user IAM call is made."""
    iam = ReportIam(REPORT)
    inventory = scan(iam, RULES, NOW)  # type: ignore[arg-type]
    decided = {c.user.user_name: c.decision for c in inventory.console}
    assert decided == {"alice": Decision.ROTATE, "bob": Decision.NO_MFA, "dave": Decision.NO_MFA}
    assert iam.calls == []
    by_name = {u.user_name: u for u in inventory.users}
    assert by_name["carol"].console is None
    assert by_name["alice"].console is not None


def test_scan_counts_a_password_from_the_rotators_own_rotation() -> None:
    """`console_rotated_at` says alice's password was rotated an hour ago: ok, though the
    report still dates it 100 days back. It is asked about users with console access
    only (carol has none)."""
    asked: list[str] = []

    def rotated_at(name: str) -> datetime | None:
        asked.append(name)
        return NOW - timedelta(hours=1) if name == "alice" else None

    inventory = scan(
        ReportIam(REPORT),  # type: ignore[arg-type]
        RULES,
        NOW,
        console_rotated_at=rotated_at,
    )
    alice = next(c for c in inventory.console if c.user.user_name == "alice")
    assert alice.decision is Decision.OK
    assert alice.password_age == timedelta(hours=1)
    assert sorted(asked) == ["alice", "bob", "dave"]


def test_without_the_report_console_access_is_unknown_and_noted() -> None:
    """A refused credential report: no console item (rather than "nobody has console
    access" stated as a fact), and a note that says so."""
    inventory = scan(ReportIam(None), RULES, NOW)  # type: ignore[arg-type]
    assert inventory.console == []
    assert all(u.console is None for u in inventory.users)
    assert any("console access unknown" in n for n in inventory.notes)
