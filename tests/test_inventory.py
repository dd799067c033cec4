"""The inventory scan: bulk reads, key ids only where needed, a bounded call budget."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from botocore.stub import Stubber

from rotator.aws import AwsIam
from rotator.errors import PermissionDenied
from rotator.inventory import fetch_credential_report, parse_credential_report, scan
from rotator.model import AccessKey, Decision, IamGroup, IamUser, KeyStatus, NewKey
from rotator.policy import Match, Rules, resolve
from rotator.ports import KeyLastUsed
from rotator.sandbox import QUARANTINE_V2, LocalAws, SeedKey
from rotator.testing import FakeIam

RULES = Rules(
    max_age=timedelta(days=90),
    warn_age=timedelta(days=80),
    quarantine_policies=frozenset({QUARANTINE_V2}),
)


def iam_for(aws: LocalAws) -> AwsIam:
    return AwsIam(region="us-east-1", endpoint_url=aws.endpoint_url)


def test_report_parser_reads_both_keys_and_skips_root() -> None:
    """The credential report's CSV gives each user's keys with status, age and last use."""
    content = (
        b"user,arn,access_key_1_active,access_key_1_last_rotated,access_key_1_last_used_date,"
        b"access_key_2_active,access_key_2_last_rotated,access_key_2_last_used_date\n"
        b"<root_account>,arn:root,false,N/A,N/A,false,N/A,N/A\n"
        b"alice,arn:a,true,2026-01-01T00:00:00+00:00,N/A,false,2025-01-01T00:00:00+00:00,"
        b"2025-06-01T10:00:00+00:00\n"
        b"bob,arn:b,false,N/A,N/A,false,N/A,N/A\n"
    )
    parsed = parse_credential_report(content)
    assert set(parsed) == {"alice", "bob"}
    assert parsed["bob"] == []
    first, second = parsed["alice"]
    assert first.status is KeyStatus.ACTIVE
    assert first.last_used_at is None
    assert second.status is KeyStatus.INACTIVE
    assert second.last_used_at == datetime(2025, 6, 1, 10, tzinfo=UTC)


class SlowReport:
    """A fake IAM whose credential report takes a few polls to be ready."""

    def __init__(self, polls: int) -> None:
        self.states = iter(["STARTED"] + ["INPROGRESS"] * (polls - 1) + ["COMPLETE"] * 10)

    def generate_credential_report(self) -> str:
        return next(self.states)

    def get_credential_report(self) -> bytes | None:
        return b"user,arn\n"


def test_report_is_polled_with_growing_bounded_sleeps() -> None:
    """Report generation is polled with exponential backoff, never a fixed long sleep."""
    slept: list[float] = []
    content = fetch_credential_report(SlowReport(6), sleep=slept.append)  # type: ignore[arg-type]
    assert content == b"user,arn\n"
    assert slept == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0]


def test_report_polling_gives_up_after_its_timeout() -> None:
    """A report that never completes ends the wait after the timeout with a transient error."""
    slept: list[float] = []
    never = SlowReport(10_000)
    with pytest.raises(Exception, match="not ready"):
        fetch_credential_report(never, timeout=10, sleep=slept.append)  # type: ignore[arg-type]
    assert sum(slept) < 20


class NoReportIam:
    """A fake IAM that refuses the credential report, as an account without that
    permission does; everything else answers from a small fixed account."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        now = datetime.now(UTC)
        self.user = IamUser("111122223333", "carol", "arn:aws:iam::111122223333:user/carol")
        self.keys = [AccessKey("AKIACAROL00000000001", KeyStatus.ACTIVE, now - timedelta(days=100))]

    def account_id(self) -> str:
        return "111122223333"

    def iter_users_with_details(self) -> Iterator[IamUser]:
        yield self.user

    def generate_credential_report(self) -> str:
        raise PermissionDenied("iam:GenerateCredentialReport")

    def list_access_keys(self, user_name: str) -> list[AccessKey]:
        self.calls.append(f"ListAccessKeys:{user_name}")
        return self.keys

    def key_last_used(self, access_key_id: str) -> KeyLastUsed:
        self.calls.append(f"GetAccessKeyLastUsed:{access_key_id}")
        return KeyLastUsed("carol", datetime(2026, 11, 1, tzinfo=UTC))

    def create_access_key(self, user_name: str) -> NewKey:  # pragma: no cover - never called
        raise AssertionError("a scan must not create keys")


def test_scan_falls_back_to_per_user_calls_and_says_so() -> None:
    """Without the credential report the scan reads keys per user and notes the fallback."""
    fake = NoReportIam()
    inventory = scan(fake, RULES, datetime.now(UTC))  # type: ignore[arg-type]
    assert inventory.source == "per_user"
    assert any("credential report unavailable" in n for n in inventory.notes)
    [decision] = inventory.decisions
    assert decision.decision is Decision.ROTATE
    assert decision.key.access_key_id == "AKIACAROL00000000001"
    assert decision.key.last_used_at == datetime(2026, 11, 1, tzinfo=UTC)
    assert fake.calls == ["ListAccessKeys:carol", "GetAccessKeyLastUsed:AKIACAROL00000000001"]


def test_scan_reads_ids_only_for_users_needing_action(aws: LocalAws) -> None:
    """Key ids are listed for due users only; ok users cost no per-user call."""
    now = datetime.now(UTC)
    aws.add_user("fresh", keys=[SeedKey(timedelta(days=3))], now=now)
    [old] = aws.add_user(
        "old", keys=[SeedKey(timedelta(days=120), last_used_ago=timedelta(days=1))], now=now
    )
    iam = iam_for(aws)
    inventory = scan(iam, RULES, now)
    by_user = {d.user.user_name: d for d in inventory.decisions}
    assert by_user["fresh"].decision is Decision.OK
    assert by_user["fresh"].key.access_key_id is None
    assert by_user["old"].decision is Decision.ROTATE
    assert by_user["old"].key.access_key_id == old.access_key_id
    assert by_user["old"].key.last_used_at is not None
    assert iam.calls["iam:ListAccessKeys"] == 1
    assert inventory.source == "credential_report"


def test_scan_call_budget_does_not_grow_with_users_needing_no_action(aws: LocalAws) -> None:
    """Three hundred users with a dozen due take fewer than 60 IAM calls in one scan."""
    now = datetime.now(UTC)
    for i in range(288):
        aws.add_user(f"ok-{i:03d}", keys=[SeedKey(timedelta(days=i % 70))], now=now)
    for i in range(12):
        aws.add_user(f"due-{i:02d}", keys=[SeedKey(timedelta(days=100 + i))], now=now)
    iam = iam_for(aws)
    inventory = scan(iam, RULES, now)
    due = [d for d in inventory.decisions if d.decision is Decision.ROTATE]
    assert len(due) == 12
    iam_calls = sum(n for op, n in iam.calls.items() if op.startswith("iam:"))
    assert iam_calls < 60, dict(iam.calls)
    assert iam.calls["iam:ListAccessKeys"] == 12


def test_scan_changes_nothing_in_iam(aws: LocalAws) -> None:
    """A scan sends no write call to IAM and leaves every key as it was."""
    aws.add_user("a", keys=[SeedKey(timedelta(days=200)), SeedKey(timedelta(days=120))])
    aws.add_user("q", policies=[QUARANTINE_V2], keys=[SeedKey(timedelta(days=5))])
    before = {u: aws.keys(u) for u in ("a", "q")}
    iam = iam_for(aws)
    scan(iam, RULES, datetime.now(UTC))
    assert {u: aws.keys(u) for u in ("a", "q")} == before
    writes = [op for op in iam.calls if any(w in op for w in ("Create", "Update", "Delete"))]
    assert writes == []


ADMIN = "arn:aws:iam::aws:policy/AdministratorAccess"


def ten_rules() -> Rules:
    """Ten rules over every kind of condition, with the policy's own thresholds, so that
    they decide exactly as the policy would and only the rule names differ."""
    same = {"max_age": RULES.max_age, "warn_age": RULES.warn_age}
    matches = [
        Match(attached_policy="AdministratorAccess"),
        Match(attached_policy=ADMIN, group="admins"),
        Match(group="deployers"),
        Match(tags=(("type", "human"),)),
        Match(path="/ci/"),
        Match(user="svc-*"),
        Match(account="999999999999"),
        Match(tags=(("team", "data"),), path="/teams/"),
        Match(user="nobody-*", group="nobody"),
        Match(),
    ]
    return replace(
        RULES,
        rules=tuple(resolve(RULES.default, f"r{i}", m, **same) for i, m in enumerate(matches)),
    )


def test_a_scan_with_ten_rules_makes_the_same_iam_calls_as_with_none(aws: LocalAws) -> None:
    """Rules about groups, attached policies, tags, paths and names are judged from the
    bulk listing: ten of them cost not one IAM call more than none (calls counted by
    AwsIam), and they do decide (every user falls under a rule, admins through a group)."""
    now = datetime.now(UTC)
    for name, kw in {
        "alice": {"tags": {"type": "human"}},
        "root": {},
        "deploy": {"path": "/ci/"},
        "svc-a": {},
        "data-1": {"path": "/teams/", "tags": {"team": "data"}},
    }.items():
        aws.add_user(name, keys=[SeedKey(timedelta(days=120))], now=now, **kw)  # type: ignore[arg-type]
    aws.add_user("fresh", keys=[SeedKey(timedelta(days=3))], now=now)
    aws.add_group("admins", policies=[ADMIN], users=["root"])
    aws.add_group("deployers", users=["deploy", "svc-a"])

    def calls(rules: Rules) -> tuple[dict[str, int], dict[str, str]]:
        iam = iam_for(aws)
        inventory = scan(iam, rules, now)
        return dict(iam.calls), {d.user.user_name: d.rule for d in inventory.decisions}

    calls(RULES)  # the credential report made once: both scans below reuse it
    without, default = calls(RULES)
    with_rules, named = calls(ten_rules())
    assert with_rules == without
    assert set(default.values()) == {"default"}
    assert named == {
        "alice": "r3",
        "root": "r0",
        "deploy": "r2",
        "svc-a": "r2",
        "data-1": "r7",
        "fresh": "r9",
    }


def test_fake_iam_scan_with_ten_rules_makes_the_same_calls_as_with_none() -> None:
    """The same holds on FakeIam, whose calls the engine tests count."""
    now = datetime.now(UTC)
    fake = FakeIam(clock=lambda: now)
    fake.add_user("root", keys=[SeedKey(timedelta(days=120))])
    fake.add_user("alice", tags={"type": "human"}, keys=[SeedKey(timedelta(days=3))])
    fake.add_group("admins", policies=[ADMIN], users=["root"])
    scan(fake, RULES, now, sleep=lambda _: None)  # the credential report made once
    fake.calls.clear()
    scan(fake, RULES, now, sleep=lambda _: None)
    without = dict(fake.calls)
    fake.calls.clear()
    inventory = scan(fake, ten_rules(), now, sleep=lambda _: None)
    assert dict(fake.calls) == without
    assert {d.user.user_name: d.rule for d in inventory.decisions} == {
        "alice": "r3",
        "root": "r0",
    }


def test_a_group_listed_on_a_later_page_than_its_member_still_applies() -> None:
    """GetAccountAuthorizationDetails may put a group on a later page than a user in it:
    the adapter reads every page before it gives users out, so the group's policy
    reaches the user (moto does not paginate, hence botocore's Stubber)."""
    iam = AwsIam(region="us-east-1", endpoint_url="http://127.0.0.1:9", account_id="123456789012")
    stub = Stubber(iam._iam)
    created = datetime(2026, 1, 1, tzinfo=UTC)
    user = {
        "UserName": "root-admin",
        "UserId": "AIDAROOTADMINXXXXXXX",
        "Arn": "arn:aws:iam::123456789012:user/root-admin",
        "Path": "/",
        "CreateDate": created,
        "GroupList": ["platform", "gone"],
        "AttachedManagedPolicies": [],
    }
    group = {
        "GroupName": "platform",
        "GroupId": "AGPAPLATFORMXXXXXXXX",
        "Arn": "arn:aws:iam::123456789012:group/platform",
        "Path": "/",
        "CreateDate": created,
        "AttachedManagedPolicies": [{"PolicyName": "AdministratorAccess", "PolicyArn": ADMIN}],
    }
    wanted = {"Filter": ["User", "Group"], "MaxItems": 1000}
    stub.add_response(
        "get_account_authorization_details",
        {"UserDetailList": [user], "IsTruncated": True, "Marker": "m1"},
        wanted,
    )
    stub.add_response(
        "get_account_authorization_details",
        {"GroupDetailList": [group], "IsTruncated": False},
        {**wanted, "Marker": "m1"},
    )
    with stub:
        [listed] = list(iam.iter_users_with_details())
    stub.assert_no_pending_responses()
    assert listed.groups == (IamGroup("gone"), IamGroup("platform", frozenset({ADMIN})))
    rules = ten_rules()
    assert rules.rule_for(listed)[0].name == "r0"
