"""`rotator plan` and `rotator config check` as a user runs them: a subprocess against
the moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rotator.model import KeyStatus
from rotator.sandbox import QUARANTINE_V2, LocalAws, SeedKey, free_port
from tests.rig import rotator

D = timedelta(days=1)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "rotator.yaml"
    path.write_text(
        f"state:\n  path: {tmp_path / 'state.db'}\nselection:\n  exclude_users: ['svc-legacy-*']\n"
    )
    return path


@pytest.fixture
def org(aws: LocalAws) -> dict[str, list[str]]:
    """The organisation of the plan scenario: one user per decision."""
    now = datetime.now(UTC)
    seed = {
        "fresh": [SeedKey(10 * D, last_used_ago=D)],
        "aging": [SeedKey(85 * D)],
        "overdue": [SeedKey(120 * D, last_used_ago=3 * D)],
        "two-active": [SeedKey(120 * D), SeedKey(100 * D)],
        "inactive-beside": [SeedKey(200 * D, status=KeyStatus.INACTIVE), SeedKey(120 * D)],
    }
    ids = {
        name: [k.access_key_id for k in aws.add_user(name, keys=keys, now=now)]
        for name, keys in seed.items()
    }
    ids["tagged"] = [
        k.access_key_id
        for k in aws.add_user(
            "tagged", tags={"rotator:exempt": "true"}, keys=[SeedKey(300 * D)], now=now
        )
    ]
    ids["svc-legacy-1"] = [
        k.access_key_id for k in aws.add_user("svc-legacy-1", keys=[SeedKey(300 * D)], now=now)
    ]
    ids["quarantined"] = [
        k.access_key_id
        for k in aws.add_user(
            "quarantined", policies=[QUARANTINE_V2], keys=[SeedKey(5 * D)], now=now
        )
    ]
    ids["pathed"] = [
        k.access_key_id
        for k in aws.add_user("pathed", path="/teams/data/", keys=[SeedKey(120 * D)], now=now)
    ]
    return ids


def test_plan_json_gives_every_decision_with_reasons(
    aws: LocalAws, org: dict[str, list[str]], config: Path
) -> None:
    """The scenario yields ok, warn, rotate, blocked, exempt, exempt, leaked, rotate,
    rotate, with key ids where action is needed, correct ages and last use."""
    before = {u: aws.keys(u) for u in org}
    done = rotator("--config", str(config), "plan", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    items = {
        (i["user_name"], i["access_key_id"] or f"{i['user_name']}-?{i['age_days']}"): i
        for i in doc["items"]
    }
    by_user: dict[str, list[dict[str, object]]] = {}
    for item in doc["items"]:
        by_user.setdefault(str(item["user_name"]), []).append(item)
    decisions = {u: sorted(str(i["decision"]) for i in rows) for u, rows in by_user.items()}
    assert decisions == {
        "fresh": ["ok"],
        "aging": ["warn"],
        "overdue": ["rotate"],
        "two-active": ["blocked", "blocked"],
        "tagged": ["exempt"],
        "svc-legacy-1": ["exempt"],
        "quarantined": ["leaked"],
        "inactive-beside": ["ok", "rotate"],
        "pathed": ["rotate"],
    }
    for item in doc["items"]:
        assert item["reason"]
        if item["decision"] not in ("ok", "exempt"):
            assert item["access_key_id"] in org[str(item["user_name"])]
    overdue = by_user["overdue"][0]
    assert overdue["age_days"] == 120
    assert overdue["last_used_at"] is not None
    assert by_user["aging"][0]["last_used_at"] is None
    assert doc["summary"] == {
        "ok": 2,
        "warn": 1,
        "rotate": 3,
        "leaked": 1,
        "blocked": 2,
        "exempt": 2,
        "unused": 0,
    }
    # No rules configured: the policy decides every key.
    assert {(i["rule"], i["rule_match"]) for i in doc["items"]} == {("default", None)}
    assert items  # every item is keyed
    assert {u: aws.keys(u) for u in org} == before, "plan must not change IAM"


def test_plan_as_of_ten_days_turns_warn_into_rotate(
    aws: LocalAws, org: dict[str, list[str]], config: Path
) -> None:
    """`--as-of +10d` judges the 85-day key as 95 days old: rotate."""
    done = rotator("--config", str(config), "plan", "--json", "--as-of", "+10d")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    aging = next(i for i in doc["items"] if i["user_name"] == "aging")
    assert aging["decision"] == "rotate"
    assert aging["age_days"] == 95
    assert aging["access_key_id"] == org["aging"][0]


def test_plan_table_groups_by_decision_with_counts(
    aws: LocalAws, org: dict[str, list[str]], config: Path
) -> None:
    """The table for people has one heading per decision with its count, and a summary."""
    done = rotator("--config", str(config), "plan")
    assert done.returncode == 0, done.stderr
    for heading in ("LEAKED (1)", "BLOCKED (2)", "ROTATE (3)", "WARN (1)", "OK (2)", "EXEMPT (2)"):
        assert heading in done.stdout
    assert "UNUSED (" not in done.stdout  # no empty group
    assert (
        "Summary: 1 leaked, 2 blocked, 3 rotate, 0 unused, 1 warn, 2 ok, 2 exempt (11 keys)"
        in done.stdout
    )


RULES_YAML = """
rules:
  - name: admins
    match: {attached_policy: AdministratorAccess}
    max_age: 30d
    warn_age: 23d
  - name: humans
    match: {tag: {type: human}}
    unused_after: 45d
    unused_action: deactivate
"""


def test_plan_table_shows_the_rule_of_every_key_and_why_it_matched(
    aws: LocalAws, tmp_path: Path
) -> None:
    """With rules, each row names its rule and why it matched (or "default"), and unused
    keys get a group of their own; plan changes nothing."""
    config = tmp_path / "rotator.yaml"
    config.write_text(f"state:\n  path: {tmp_path / 'state.db'}\n{RULES_YAML}")
    now = datetime.now(UTC)
    aws.add_user("root-admin", keys=[SeedKey(31 * D, last_used_ago=D)], now=now)
    aws.add_group("root", policies=["arn:aws:iam::aws:policy/AdministratorAccess"])
    aws.add_user_to_group("root", "root-admin")
    aws.add_user("ann", tags={"type": "human"}, keys=[SeedKey(60 * D)], now=now)
    aws.add_user("bob", keys=[SeedKey(31 * D, last_used_ago=D)], now=now)
    before = {u: aws.keys(u) for u in ("root-admin", "ann", "bob")}
    done = rotator("--config", str(config), "plan")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[1]: line for line in done.stdout.splitlines() if "123456789012" in line}
    assert "admins (AdministratorAccess attached through group root)" in rows["root-admin"]
    assert "humans (tag type=human)" in rows["ann"]
    assert " default " in rows["bob"]
    assert "UNUSED (1)" in done.stdout
    assert "ROTATE (1)" in done.stdout
    assert {u: aws.keys(u) for u in before} == before, "plan must not change IAM"


def test_config_check_names_a_bad_rule_by_its_path_and_exits_2(tmp_path: Path) -> None:
    """A rule problem is reported like any other: its dotted path, exit 2."""
    path = tmp_path / "rotator.yaml"
    path.write_text(
        "rules:\n  - name: admins\n    match: {attached_policy: AdministratorAccess}\n"
        "    max_age: 30d\n    delete_after: 1d\n"
    )
    done = rotator(
        "--config", str(path), "config", "check", env={"VAULT_TOKEN": "test-token-not-real"}
    )
    assert done.returncode == 2
    assert "rules[0].delete_after: a rule cannot set this" in done.stderr
    assert 'rules[0]: rule "admins" has warn_age 80d (from policy.warn_age)' in done.stderr


def test_plan_exits_3_with_one_line_when_aws_is_unreachable(config: Path) -> None:
    """An AWS endpoint nobody answers gives exit 3, one line, no traceback."""
    done = rotator(
        "--config",
        str(config),
        "plan",
        env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"},
    )
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert "cannot reach AWS" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_plan_rejects_a_bad_as_of(config: Path) -> None:
    """A malformed --as-of is a usage error (exit 2) that shows the accepted forms."""
    done = rotator("--config", str(config), "plan", "--as-of", "tomorrow")
    assert done.returncode == 2
    assert "+N<s|m|h|d>" in done.stderr


def test_config_check_names_three_mistakes_and_exits_2(tmp_path: Path) -> None:
    """Three different mistakes in one file are all reported by path, exit 2."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "policy:\n  max_age: 9x\n"
        "schedule:\n  scan: '61 * * * *'\n"
        "vault:\n  auth:\n    method: approle\n"
    )
    done = rotator("--config", str(path), "config", "check")
    assert done.returncode == 2
    assert 'policy.max_age: "9x" is not a duration' in done.stderr
    assert "schedule.scan" in done.stderr
    assert "role_id" in done.stderr


def test_config_check_accepts_the_example_file() -> None:
    """The documented example configuration is valid."""
    example = Path(__file__).parents[1] / "config" / "rotator.example.yaml"
    done = rotator(
        "--config", str(example), "config", "check", env={"VAULT_TOKEN": "test-token-not-real"}
    )
    assert done.returncode == 0, done.stderr
    assert "configuration ok" in done.stdout


def test_plan_needs_no_config_file_and_no_vault(aws: LocalAws, tmp_path: Path) -> None:
    """With only AWS settings in the environment (no file, no Vault token) `plan` runs:
    an audit never talks to Vault."""
    aws.add_user("solo", keys=[SeedKey(100 * D)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "ROTATOR_"))}
    done = subprocess.run(
        [sys.executable, "-m", "rotator", "plan", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    [item] = json.loads(done.stdout)["items"]
    assert item["decision"] == "rotate"


def test_config_check_still_demands_a_vault_token(tmp_path: Path) -> None:
    """`config check` reports the token method without a token, since rotations need it."""
    path = tmp_path / "rotator.yaml"
    path.write_text("policy:\n  max_age: 90d\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
    done = subprocess.run(
        [sys.executable, "-m", "rotator", "--config", str(path), "config", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    assert 'vault.auth: method "token" needs a token' in done.stderr
