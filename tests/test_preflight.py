"""What an operator reads before letting the rotator act, end to end against the moto
server and the OpenBao dev server: `run --once --dry-run` shows what the real pass
deactivates, deletes and opens, no more and no less; `plan` and `report` describe a
user in its normal overlap by its rotation instead of calling it blocked; and `plan`
names a rule whose match holds for nobody."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from rotator.app import App
from rotator.config import parse_settings
from rotator.engine import new_rotation
from rotator.machine import State
from rotator.model import AccessKey, IamUser, KeyStatus, RotationReason
from rotator.policy import Match, Rule, Rules, idle_rules
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from tests.conftest import VaultTarget
from tests.rig import config_data, rotator

D = timedelta(days=1)
HUMANS = {
    "name": "humans",
    "match": {"tag": {"type": "human"}},
    "unused_after": "45d",
    "unused_action": "deactivate",
}


def _config(
    aws: LocalAws,
    vault: VaultTarget,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    **policy: str,
) -> str:
    """The test servers' configuration with `rules` and `policy` over its defaults."""
    data = config_data(aws, vault, tmp_path)
    data["policy"] = {**data["policy"], **policy}
    data["rules"] = rules
    path = tmp_path / "rotator.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _json(*args: str) -> tuple[int, dict[str, Any]]:
    done = rotator(*args)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def _keys(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((k["user_name"], k["access_key_id"]) for k in items)


def _rotations(cfg: str) -> dict[str, dict[str, Any]]:
    """The newest rotation of each user, from `status --json`."""
    _, doc = _json("--config", cfg, "status", "--json")
    newest: dict[str, dict[str, Any]] = {}
    for r in doc["rotations"]:
        newest.setdefault(r["user_name"], r)
    return newest


def test_dry_run_lists_what_the_pass_deactivates_and_deletes_and_counts_only_what_it_opens(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """With a human's never-used key due for deactivation, an inactive key idle past
    inactive_delete_after, two users already in OVERLAP, one user whose rotation FAILED
    an hour ago and one user newly due, the dry run changes nothing and says: 1 rotation
    would be opened (not 4), the open and failed users would get none and why, the
    unused key would be deactivated and the idle key deleted (re-checked at run time).
    The real pass then does exactly that."""
    now = datetime.now(UTC)
    cfg = _config(aws, vault, tmp_path, [HUMANS], overlap="1d", inactive_delete_after="60d")
    aws.add_user("bob", keys=[SeedKey(120 * D, last_used_ago=D)], now=now)
    aws.add_user("carol", keys=[SeedKey(150 * D, last_used_ago=D)], now=now)
    first = rotator("--config", cfg, "run", "--once")
    assert first.returncode == 0, first.stderr
    overlapping = _rotations(cfg)
    assert {u: r["state"] for u, r in overlapping.items()} == {"bob": "OVERLAP", "carol": "OVERLAP"}

    [unused] = aws.add_user("ann", tags={"type": "human"}, keys=[SeedKey(60 * D)], now=now)
    [idle, _] = aws.add_user(
        "hal",
        keys=[SeedKey(100 * D, KeyStatus.INACTIVE, last_used_ago=70 * D), SeedKey(10 * D)],
        now=now,
    )
    aws.add_user("dave", keys=[SeedKey(120 * D, last_used_ago=D)], now=now)
    [eve_key] = aws.add_user("eve", keys=[SeedKey(100 * D, last_used_ago=D)], now=now)
    app = App(parse_settings(yaml.safe_load(Path(cfg).read_text()), {}))
    try:
        failed = app.store.create(
            replace(
                new_rotation(
                    ACCOUNT_ID, "eve", RotationReason.AGE, now, old_key_id=eve_key.access_key_id
                ),
                state=State.FAILED,
                last_error="test: Vault refused the write",
            ),
            "test: a rotation that failed an hour ago",
        )
    finally:
        app.close()
    users = ("ann", "bob", "carol", "dave", "eve", "hal")
    before = {u: aws.keys(u) for u in users}

    code, dry = _json("--config", cfg, "run", "--once", "--dry-run", "--json")
    assert code == 4  # eve's FAILED rotation stands, reported earlier
    assert [p["user_name"] for p in dry["would_open"]] == ["dave"]
    why_not = {p["user_name"]: p["why_not"] for p in dry["would_not_open"]}
    assert why_not == {
        "bob": f"rotation {overlapping['bob']['id'][:8]} is open (OVERLAP)",
        "carol": f"rotation {overlapping['carol']['id'][:8]} is open (OVERLAP)",
        "eve": why_not["eve"],
    }
    assert why_not["eve"].startswith(f"rotation {failed.id[:8]} FAILED at ")
    assert "retry_failed_after" in why_not["eve"]
    assert _keys(dry["would_deactivate_unused"]) == [("ann", unused.access_key_id)]
    assert dry["would_deactivate_unused"][0]["rule"] == "humans"
    assert _keys(dry["would_delete_inactive"]) == [("hal", idle.access_key_id)]
    assert "deactivated_unused" not in dry
    assert "deleted_inactive" not in dry
    assert any("GetAccessKeyLastUsed" in n for n in dry["notes"])
    assert {u: aws.keys(u) for u in users} == before, "a dry run must not change IAM"

    text = rotator("--config", cfg, "run", "--once", "--dry-run")
    assert "dry run: 1 rotation(s) would be opened" in text.stdout
    assert "dry run: 3 due user(s) would get no new rotation" in text.stdout
    assert f"would deactivate unused key {unused.access_key_id} of ann" in text.stdout
    assert f"would delete inactive key {idle.access_key_id} of hal" in text.stdout
    assert "note: dry run: the real pass looks again" in text.stdout
    assert {u: aws.keys(u) for u in users} == before, "a dry run must not change IAM"

    code, real = _json("--config", cfg, "run", "--once", "--json")
    assert code == 4, real
    assert len(real["opened"]) == 1
    assert _rotations(cfg)["dave"]["id"] == real["opened"][0]
    assert _keys(real["deactivated_unused"]) == _keys(dry["would_deactivate_unused"])
    assert _keys(real["deleted_inactive"]) == _keys(dry["would_delete_inactive"])
    assert aws.keys("ann") == {unused.access_key_id: KeyStatus.INACTIVE}
    assert idle.access_key_id not in aws.keys("hal")
    assert _rotations(cfg)["eve"]["id"] == failed.id  # held back, as the dry run said


def test_plan_and_report_describe_a_user_in_overlap_by_its_rotation_not_as_blocked(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """The day after a rotation, its user holds the old key and the new one, both
    Active by design: `plan` and `report` call the old key `rotate` ("being rotated:
    rotation ... is in OVERLAP until ..., new key ...") and the new one `ok` ("the new
    key of rotation ..."), and count no blocked key for it. A user whose rotation really
    is BLOCKED (two keys of its own) is still blocked, saying why."""
    now = datetime.now(UTC)
    cfg = _config(aws, vault, tmp_path, [], overlap="1d")
    [old] = aws.add_user("bob", keys=[SeedKey(120 * D, last_used_ago=D)], now=now)
    stuck = aws.add_user("two", keys=[SeedKey(120 * D), SeedKey(100 * D)], now=now)
    ran = rotator("--config", cfg, "run", "--once")
    assert ran.returncode == 1, ran.stderr  # "two" blocked: needs attention
    rotations = _rotations(cfg)
    bob, two = rotations["bob"], rotations["two"]
    assert (bob["state"], two["state"]) == ("OVERLAP", "BLOCKED")
    assert bob["old_key_id"] == old.access_key_id
    new = bob["new_key_id"]
    assert set(aws.keys("bob")) == {old.access_key_id, new}

    code, plan = _json("--config", cfg, "plan", "--json")
    assert code == 0
    items = {(i["user_name"], i["access_key_id"]): i for i in plan["items"]}
    being = items[("bob", old.access_key_id)]
    assert being["decision"] == "rotate"
    assert being["reason"].startswith(
        f"being rotated: rotation {bob['id'][:8]} is in OVERLAP until "
        f"{bob['next_action_at']}, new key {new}"
    )
    fresh = items[("bob", new)]
    assert fresh["decision"] == "ok"
    assert fresh["reason"].startswith(f"the new key of rotation {bob['id'][:8]} (OVERLAP)")
    blocked = {k for k, i in items.items() if i["decision"] == "blocked"}
    assert blocked == {("two", k.access_key_id) for k in stuck}
    assert items[("two", two["old_key_id"])]["reason"].startswith(
        f"being rotated: rotation {two['id'][:8]} is BLOCKED: "
    )
    assert plan["summary"]["blocked"] == 2
    assert plan["summary"]["rotate"] == 1

    text = rotator("--config", cfg, "plan")
    assert "BLOCKED (2)" in text.stdout
    assert f"being rotated: rotation {bob['id'][:8]} is in OVERLAP" in text.stdout

    code, report = _json("--config", cfg, "report", "--format", "json")
    assert code == 0
    decided = {(k["user_name"], k["access_key_id"]): k for k in report["keys"]}
    assert decided[("bob", old.access_key_id)]["decision"] == "rotate"
    assert decided[("bob", old.access_key_id)]["reason"] == being["reason"]
    assert decided[("bob", new)]["decision"] == "ok"
    assert {k for k, r in decided.items() if r["decision"] == "blocked"} == blocked


def test_plan_names_a_rule_that_matched_no_user_and_one_every_user_of_which_an_earlier_took(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """The README's `ci` rule with an account id that is not the scanned one matches
    nobody, so its CI user falls to `default`: `plan` (text and JSON notes) says "rule
    ci matched no user (match: ...)" and which accounts were scanned. A rule whose only
    user an earlier rule takes is named too; a rule that decides is not."""
    aws.add_user("ci-deploy", path="/ci/", keys=[SeedKey(100 * D)])
    aws.add_user("ann", tags={"type": "human"}, keys=[SeedKey(10 * D)])
    ci = {
        "name": "ci",
        "match": {"path": "/ci/", "user": "ci-*", "account": "111122223333"},
        "max_age": "180d",
    }
    again = {"name": "humans-a", "match": {"tag": {"type": "human"}, "user": "a*"}}
    cfg = _config(aws, vault, tmp_path, [ci, HUMANS, again])

    code, plan = _json("--config", cfg, "plan", "--json")
    assert code == 0
    rules = {i["user_name"]: i["rule"] for i in plan["items"]}
    assert rules == {"ci-deploy": "default", "ann": "humans"}
    assert plan["notes"] == [
        'rule ci matched no user (match: {path: "/ci/", user: "ci-*", account: '
        f'"111122223333"}}); account 111122223333 is not among the accounts scanned '
        f"({ACCOUNT_ID})",
        'rule humans-a decides for no user: the 1 user(s) its match ({tag: {"type": '
        '"human"}, user: "a*"}) holds for are taken first by rule(s) humans',
    ]
    text = rotator("--config", cfg, "plan")
    assert text.returncode == 0, text.stderr
    assert "note: rule ci matched no user (match: " in text.stdout
    assert "note: rule humans-a decides for no user" in text.stdout
    assert "rule humans matched" not in text.stdout


def test_a_rule_that_decides_only_for_users_without_keys_is_not_called_idle() -> None:
    """`idle_rules` judges users, not keys: a rule whose only user has no key yet (so no
    decision names it) matched someone and gets no note; an unknown account is named."""
    now = datetime.now(UTC)
    rules = Rules(
        max_age=90 * D,
        warn_age=80 * D,
        rules=(
            Rule("new-ci", 180 * D, 80 * D, match=Match(user="ci-*")),
            Rule("other", 30 * D, 20 * D, match=Match(account="999999999999")),
        ),
    )
    keyless = IamUser(ACCOUNT_ID, "ci-new", f"arn:aws:iam::{ACCOUNT_ID}:user/ci-new")
    keyed = IamUser(
        ACCOUNT_ID,
        "bob",
        f"arn:aws:iam::{ACCOUNT_ID}:user/bob",
        keys=(AccessKey("AKIAEXAMPLEBOB000001", KeyStatus.ACTIVE, now - D),),
    )
    assert idle_rules(rules, [keyless, keyed], decided={"default"}) == [
        'rule other matched no user (match: {account: "999999999999"}); account '
        f"999999999999 is not among the accounts scanned ({ACCOUNT_ID})"
    ]
    assert idle_rules(rules, [keyless, keyed], decided={"new-ci", "other"}) == []
