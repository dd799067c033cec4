"""Console passwords in `plan`, `report`, the metrics and a `report`-mode pass, as a user
runs them: subprocesses against the moto server (login profiles seeded with
`LocalAws.add_login_profile`), IAM calls counted by a proxy in front of it."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator.aws import AwsIam
from rotator.compliance import build_report, to_csv, to_html
from rotator.config import parse_settings
from rotator.inventory import Inventory, scan
from rotator.metrics import Metrics
from rotator.model import KEY_DECISIONS, ConsoleAccess, IamUser
from rotator.policy import Rules
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from tests.conftest import VaultTarget
from tests.faultproxy import FaultProxy
from tests.rig import rotator, vault_secret, write_config

D = timedelta(days=1)


def password(user: str) -> str:
    """A distinct password per user, to look for in every output."""
    return f"Pw-{user}-Zq9!x7Lm"


# user -> (add_login_profile keywords, the decision plan must give; None: no item)
CONSOLE_USERS: dict[str, tuple[dict[str, Any], str | None]] = {
    "fresh": ({"age": 10 * D, "last_sign_in_ago": D, "mfa": True}, "ok"),
    "aging": ({"age": 85 * D, "last_sign_in_ago": 2 * D, "mfa": True}, "warn"),
    "old": ({"age": 120 * D, "last_sign_in_ago": D, "mfa": True}, "rotate"),
    "no-mfa": ({"age": 10 * D, "last_sign_in_ago": D, "mfa": False}, "no_mfa"),
    "idle": ({"age": 70 * D, "last_sign_in_ago": 65 * D, "mfa": True}, "stale_console"),
    "never": ({"age": 61 * D, "mfa": True}, "stale_console"),
    "adm-root": ({"age": 40 * D, "last_sign_in_ago": D, "mfa": True}, "rotate"),
    "ci-bot": ({"age": 200 * D, "mfa": False}, None),  # its rule says console: off
    "tagged": ({"age": 200 * D, "mfa": False}, "exempt"),
    "svc-legacy-1": ({"age": 200 * D, "mfa": False}, None),  # excluded by selection
}
WITHOUT_MFA = {u for u, (kw, _) in CONSOLE_USERS.items() if not kw["mfa"]}
RULES_YAML = [
    {
        "name": "admins",
        "match": {"user": "adm-*"},
        "console": "rotate",
        "password_max_age": "30d",
        "password_warn_age": "20d",
    },
    {"name": "robots", "match": {"path": "/ci/"}, "console": "off"},
]


@pytest.fixture
def org(aws: LocalAws) -> datetime:
    """The users above with their login profiles, and one user with a key and no login
    profile (`keys-only`). Returns the moment the ages count from."""
    now = datetime.now(UTC)
    for name, (profile, _) in CONSOLE_USERS.items():
        aws.add_user(
            name,
            path="/ci/" if name == "ci-bot" else "/",
            tags={"rotator:exempt": "true"} if name == "tagged" else None,
            now=now,
        )
        aws.add_login_profile(name, password(name), now=now, **profile)
    aws.add_user("keys-only", keys=[SeedKey(10 * D, last_used_ago=D)], now=now)
    return now


def plan_config(tmp_path: Path, endpoint_url: str, **policy: str) -> Path:
    path = tmp_path / "rotator.yaml"
    data = {
        "aws": {"endpoint_url": endpoint_url, "region": "us-east-1"},
        "state": {"path": str(tmp_path / "state.db")},
        "selection": {"exclude_users": ["svc-legacy-*"]},
        "policy": {"console_unused_after": "60d", **policy},
        "rules": RULES_YAML,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def profiles(aws: LocalAws) -> dict[str, tuple[str, bool] | None]:
    return {u: aws.login_profile(u) for u in [*CONSOLE_USERS, "keys-only"]}


def assert_no_password(*texts: str) -> None:
    for name in CONSOLE_USERS:
        for text in texts:
            assert password(name) not in text, f"the password of {name} was printed"


# --- plan --------------------------------------------------------------------------------


def test_plan_json_lists_every_console_password_with_its_decision(
    aws: LocalAws, org: datetime, tmp_path: Path
) -> None:
    """Each user with a login profile is one `"kind": "console"` item after the key
    items, with the decision its age, MFA and sign-ins call for; console off, excluded
    users and a user without a login profile have none; plan changes no login profile
    and prints no password."""
    before = profiles(aws)
    done = rotator("--config", str(plan_config(tmp_path, aws.endpoint_url)), "plan", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    kinds = [i["kind"] for i in doc["items"]]
    assert kinds == sorted(kinds, key=lambda k: k != "key"), "key items come first"
    assert [i["user_name"] for i in doc["items"] if i["kind"] == "key"] == ["keys-only"]
    console = {i["user"]: i for i in doc["items"] if i["kind"] == "console"}
    expected = {u: d for u, (_, d) in CONSOLE_USERS.items() if d is not None}
    assert {u: i["decision"] for u, i in console.items()} == expected
    assert doc["console_summary"] == {
        "rotate": 2,
        "no_mfa": 1,
        "stale_console": 2,
        "warn": 1,
        "ok": 1,
        "exempt": 1,
    }
    assert list(doc["summary"]) == [d.value for d in KEY_DECISIONS]

    old = console["old"]
    assert old["password_age_days"] == 120
    assert old["mode"] == "report"
    assert old["mfa_active"] is True
    assert old["reason"].endswith("reported only (console: report)")
    assert (old["account"], old["account_id"]) == (ACCOUNT_ID, ACCOUNT_ID)
    changed = datetime.fromisoformat(old["password_last_changed"].replace("Z", "+00:00"))
    assert abs(changed - (org - 120 * D)) < timedelta(seconds=2)
    due = datetime.fromisoformat(old["due_at"].replace("Z", "+00:00"))
    assert due == changed + 90 * D
    admin = console["adm-root"]
    assert (admin["rule"], admin["rule_match"], admin["mode"]) == ("admins", "user adm-*", "rotate")
    assert admin["reason"].endswith("the next pass rotates it into Vault")
    assert console["fresh"]["rule"] == "default"
    assert console["fresh"]["rule_match"] is None
    assert console["never"]["last_sign_in"] is None
    assert console["fresh"]["last_sign_in"] is not None
    assert console["no-mfa"]["mfa_active"] is False
    assert set(old) == {
        "kind",
        "user",
        "account",
        "user_name",
        "account_id",
        "rule",
        "rule_match",
        "decision",
        "reason",
        "password_age_days",
        "password_last_changed",
        "last_sign_in",
        "mfa_active",
        "mode",
        "due_at",
    }
    assert_no_password(done.stdout, done.stderr)
    assert profiles(aws) == before, "plan must not change a login profile"


def test_plan_table_shows_a_console_section_after_the_keys(
    aws: LocalAws, org: datetime, tmp_path: Path
) -> None:
    """The table lists console passwords in their own section, after the keys' summary,
    grouped by decision with age, MFA and mode, and a console summary line."""
    done = rotator("--config", str(plan_config(tmp_path, aws.endpoint_url)), "plan")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.index("Summary:") < text.index("CONSOLE PASSWORDS (8)")
    section = text[text.index("CONSOLE PASSWORDS") :]
    assert "console NO_MFA (1)" in section
    no_mfa_line = next(
        line for line in section.splitlines() if line.startswith(ACCOUNT_ID + "  no-mfa")
    )
    assert "  10d  " in no_mfa_line
    assert "  NO  " in no_mfa_line
    assert "console ROTATE (2)" in section
    assert "admins (user adm-*)" in section
    assert "Console summary: 2 rotate, 1 no_mfa, 2 stale_console, 1 warn, 1 ok, 1 exempt" in text
    assert "ci-bot" not in text
    assert_no_password(text, done.stderr)


def test_console_off_in_policy_shows_no_console_item(
    aws: LocalAws, org: datetime, tmp_path: Path
) -> None:
    """`policy.console: off` (unquoted in YAML) with no rule turning it on: plan lists
    keys only, as before the feature."""
    path = tmp_path / "rotator.yaml"
    path.write_text(
        f"aws: {{endpoint_url: '{aws.endpoint_url}'}}\n"
        f"state: {{path: '{tmp_path / 'state.db'}'}}\n"
        "policy:\n  console: off\n"
    )
    done = rotator("--config", str(path), "plan", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert {i["kind"] for i in doc["items"]} == {"key"}
    assert sum(doc["console_summary"].values()) == 0


def test_console_items_cost_no_iam_call(aws: LocalAws, tmp_path: Path) -> None:
    """`plan --json` makes exactly the same IAM calls, action by action, for twelve
    users without a login profile as for the same twelve with one each (ages, MFA and
    sign-ins varied, some due under `console: rotate`): everything comes from the
    credential report and the bulk listing already read."""
    now = datetime.now(UTC)
    names = [f"user-{n:02d}" for n in range(12)]
    for name in names:
        aws.add_user(name, keys=[SeedKey(5 * D, last_used_ago=D)], now=now)

    with FaultProxy(aws.endpoint_url) as proxy:
        config = plan_config(tmp_path, proxy.url, console="rotate")

        def iam_calls() -> tuple[Counter[str], dict[str, Any]]:
            start = len(proxy.log)
            done = rotator("--config", str(config), "plan", "--json")
            assert done.returncode == 0, done.stderr
            calls = Counter(str(r.request.action) for r in proxy.log[start:])
            return calls, json.loads(done.stdout)

        iam_calls()  # the credential report is generated once: both plans below reuse it
        without, first = iam_calls()
        for n, name in enumerate(names):
            aws.add_login_profile(
                name,
                password(name),
                age=(10 + 15 * n) * D,
                last_sign_in_ago=None if n % 3 == 0 else n * D,
                mfa=n % 2 == 0,
                now=now,
            )
        with_console, second = iam_calls()
    assert not [i for i in first["items"] if i["kind"] == "console"]
    judged = [i for i in second["items"] if i["kind"] == "console"]
    assert len(judged) == 12
    assert {i["decision"] for i in judged} >= {"rotate", "no_mfa", "ok"}
    assert with_console == without, (with_console, without)
    assert without["GetCredentialReport"] == 1
    assert without["ListAccessKeys"] == 0


# --- report (compliance) ------------------------------------------------------------------


def test_report_lists_console_users_and_counts_those_without_mfa(
    aws: LocalAws, org: datetime, tmp_path: Path
) -> None:
    """`rotator report` adds a console row for every user with a login profile (also
    those the rotator does not judge, without a decision) and counts CIS 1.10: four
    console users without MFA, whatever their rule; the key totals stay as they were."""
    config = plan_config(tmp_path, aws.endpoint_url)
    done = rotator("--config", str(config), "report", "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["console_totals"] == {
        "console_users": len(CONSOLE_USERS),
        "cis_1_10_console_without_mfa": len(WITHOUT_MFA),
    }
    assert doc["accounts"][0]["console_totals"] == doc["console_totals"]
    assert doc["totals"] == {
        "keys": 1,
        "active_keys": 1,
        "cis_1_14_over_90_days": 0,
        "cis_1_12_unused_over_45_days": 0,
    }
    rows = {r["user_name"]: r for r in doc["console"]}
    assert set(rows) == set(CONSOLE_USERS)
    assert {u for u, r in rows.items() if r["cis_1_10_console_without_mfa"]} == WITHOUT_MFA
    assert rows["ci-bot"]["decision"] is None
    assert rows["ci-bot"]["rule"] is None
    assert rows["old"]["decision"] == "rotate"
    assert rows["old"]["password_age_days"] == 120
    assert rows["never"]["last_sign_in"] is None
    assert [k["kind"] for k in doc["keys"]] == ["key"]

    as_csv = rotator("--config", str(config), "report", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    csv_rows = list(csv.DictReader(io.StringIO(as_csv.stdout, newline="")))
    assert Counter(r["kind"] for r in csv_rows) == {"key": 1, "console": len(CONSOLE_USERS)}
    no_mfa = next(r for r in csv_rows if r["user_name"] == "no-mfa")
    assert (no_mfa["mfa_active"], no_mfa["cis_1_10_console_without_mfa"]) == ("false", "true")
    assert no_mfa["access_key_id"] == ""

    as_html = rotator("--config", str(config), "report", "--format", "html")
    assert as_html.returncode == 0, as_html.stderr
    assert '<h2 id="console">Console passwords</h2>' in as_html.stdout
    assert "console users without MFA (CIS 1.10)" in as_html.stdout
    assert_no_password(done.stdout, as_csv.stdout, as_html.stdout)


def test_console_rows_escape_iam_strings_in_html_and_defuse_formulas_in_csv() -> None:
    """An owner tag holding a script, or a spreadsheet formula, in a console row: the
    page shows it as text and holds no script; the CSV cell starts with an apostrophe."""
    hostile = "<script>alert(1)</script>"
    formula = '=HYPERLINK("http://evil.example","x")'
    now = datetime(2026, 11, 28, tzinfo=UTC)
    users = [
        IamUser(
            ACCOUNT_ID,
            name,
            f"arn:aws:iam::{ACCOUNT_ID}:user/{name}",
            tags={"owner": owner},
            console=ConsoleAccess(now - 100 * D, None, False),
        )
        for name, owner in (("a", hostile), ("b", formula))
    ]
    built = build_report([Inventory(ACCOUNT_ID, users, [], "credential_report")], now)
    page = to_html(built)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    rows = list(csv.DictReader(io.StringIO(to_csv(built), newline="")))
    assert [(r["kind"], r["owner"]) for r in rows] == [
        ("console", hostile),
        ("console", "'" + formula),
    ]
    assert [r["password_age_days"] for r in rows] == ["100", "100"]
    assert built.console_totals.no_mfa == 2


# --- metrics ------------------------------------------------------------------------------


def test_a_scan_sets_console_users_by_decision_and_key_gauges_only_for_key_decisions(
    aws: LocalAws, org: datetime, tmp_path: Path
) -> None:
    """`rotator_console_users{account,decision}` counts the scan's console decisions
    (zeros included); `rotator_keys` has no console decision; an account scanned
    without the credential report has no console series (unknown, not zero)."""
    settings = parse_settings(
        yaml.safe_load(plan_config(tmp_path, aws.endpoint_url).read_text()), {}, need_vault=False
    )
    inventory = scan(
        AwsIam(region="us-east-1", endpoint_url=aws.endpoint_url),
        Rules.from_settings(settings),
        datetime.now(UTC),
    )
    metrics = Metrics()
    metrics.observe_scan([inventory], datetime.now(UTC))

    def console_users(decision: str) -> float | None:
        labels = {"account": ACCOUNT_ID, "decision": decision}
        return metrics.registry.get_sample_value("rotator_console_users", labels)

    assert {d: console_users(d) for d in ("rotate", "no_mfa", "stale_console", "warn", "ok")} == {
        "rotate": 2.0,
        "no_mfa": 1.0,
        "stale_console": 2.0,
        "warn": 1.0,
        "ok": 1.0,
    }
    assert console_users("exempt") == 1.0
    keys = metrics.registry.get_sample_value
    assert keys("rotator_keys", {"account": ACCOUNT_ID, "decision": "ok"}) == 1.0
    assert keys("rotator_keys", {"account": ACCOUNT_ID, "decision": "no_mfa"}) is None
    assert keys("rotator_keys", {"account": ACCOUNT_ID, "decision": "stale_console"}) is None

    metrics.observe_scan([replace(inventory, source="per_user", console=[])], datetime.now(UTC))
    assert console_users("ok") is None
    assert console_users("no_mfa") is None


# --- a pass in report mode ----------------------------------------------------------------


def test_a_pass_in_report_mode_changes_no_console_password(
    aws: LocalAws, vault: VaultTarget, org: datetime, tmp_path: Path
) -> None:
    """`run --once` with every rule in `console: report` (the default), overdue and
    MFA-less passwords included: every login profile keeps its password and its
    reset flag, and nothing is written under a console path in Vault."""
    before = profiles(aws)
    config = write_config(
        aws,
        vault,
        tmp_path,
        selection={"exclude_users": ["svc-legacy-*"]},
        policy={"console_unused_after": "60d"},
    )
    done = rotator("--config", str(config), "run", "--once")
    assert done.returncode == 0, done.stderr
    assert profiles(aws) == before
    assert all(p is not None and p[1] is False for u, p in before.items() if u != "keys-only")
    for name in CONSOLE_USERS:
        assert vault_secret(vault, f"aws/{ACCOUNT_ID}/{name}/console") is None, name
    assert_no_password(done.stdout, done.stderr)
