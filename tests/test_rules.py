"""Rules a security team rolls out, end to end against the moto server and the OpenBao
dev server: ordered rules matched from the bulk scan (groups included), a rule's own
overlap kept by its rotation, unused keys deactivated and turned back on, dated
exemptions, and inactive keys deleted on purpose."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator.app import App
from rotator.config import Settings, parse_settings
from rotator.engine import new_rotation
from rotator.errors import BadInput
from rotator.machine import State
from rotator.model import KeyStatus, RotationReason
from rotator.policy import Rules
from rotator.sandbox import ACCOUNT_ID, QUARANTINE_V2, LocalAws, SeedKey
from rotator.testing import CapturingNotifier, FakeIam, FakeSecrets, FakeStateStore
from rotator.wiring import Wiring
from tests.conftest import VaultTarget
from tests.rig import FakeClock, config_data, make_app, rotator, run_pass, vault_secret

D = timedelta(days=1)
ADMIN = "arn:aws:iam::aws:policy/AdministratorAccess"

ADMINS = {
    "name": "admins",
    "match": {"attached_policy": "AdministratorAccess"},
    "max_age": "30d",
    "warn_age": "23d",
}
HUMANS = {
    "name": "humans",
    "match": {"tag": {"type": "human"}},
    "unused_after": "45d",
    "unused_action": "deactivate",
}
CI = {"name": "ci", "match": {"path": "/ci/", "user": "ci-*"}, "max_age": "180d", "overlap": "48h"}


def data_with(
    aws: LocalAws,
    vault: VaultTarget,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """The test servers' configuration (zero overlap and retirement) with `rules`."""
    data = config_data(aws, vault, tmp_path, **sections)
    data["rules"] = rules
    return data


def settings_with(
    aws: LocalAws,
    vault: VaultTarget,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    **sections: dict[str, Any],
) -> Settings:
    return parse_settings(data_with(aws, vault, tmp_path, rules, **sections), {})


def file_with(
    aws: LocalAws,
    vault: VaultTarget,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    **sections: dict[str, Any],
) -> str:
    path = tmp_path / "rotator.yaml"
    path.write_text(yaml.safe_dump(data_with(aws, vault, tmp_path, rules, **sections)))
    return str(path)


def rotations_of(settings: Settings, user: str) -> list[Any]:
    app = App(settings)
    try:
        return app.store.list_recent(user_name=user)
    finally:
        app.close()


def test_an_admin_through_a_group_is_rotated_at_31_days_and_a_normal_user_is_not(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """AdministratorAccess attached to a group its user belongs to puts the user under
    the 30-day admins rule: its 31-day key is replaced (new key in Vault, old one gone);
    a user no rule matches keeps its 31-day key under the 90-day policy."""
    now = datetime.now(UTC)
    [admin_key] = aws.add_user("root-admin", keys=[SeedKey(31 * D, last_used_ago=D)], now=now)
    aws.add_group("platform-admins", policies=[ADMIN], users=["root-admin"])
    [plain_key] = aws.add_user("bob", keys=[SeedKey(31 * D, last_used_ago=D)], now=now)
    settings = settings_with(aws, vault, tmp_path, [ADMINS])
    run_pass(make_app(settings, FakeClock()))
    [(new_id, status)] = aws.keys("root-admin").items()
    assert new_id != admin_key.access_key_id
    assert status is KeyStatus.ACTIVE
    secret = vault_secret(vault, f"aws/{ACCOUNT_ID}/root-admin")
    assert secret is not None
    assert secret["data"]["aws_access_key_id"] == new_id
    assert aws.keys("bob") == {plain_key.access_key_id: KeyStatus.ACTIVE}
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/bob") is None
    [rotation] = rotations_of(settings, "root-admin")
    assert (rotation.state, rotation.note) == (State.DONE, "age 31d > max_age 30d")


def test_a_ci_user_matched_by_path_keeps_its_rules_overlap_in_its_rotation(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A CI user under /ci/ is rotated by the ci rule at 181 days (not the policy's 90),
    and its rotation records the rule's 48h overlap: the old key stays active for 48
    hours after the new one is stored, while the policy's overlap here is 0s."""
    [old] = aws.add_user("ci-deploy", path="/ci/", keys=[SeedKey(181 * D)])
    [young] = aws.add_user("ci-build", path="/ci/", keys=[SeedKey(100 * D)])
    settings = settings_with(aws, vault, tmp_path, [CI])
    clock = FakeClock()
    run_pass(make_app(settings, clock))
    [rotation] = rotations_of(settings, "ci-deploy")
    assert rotation.overlap == timedelta(hours=48)
    assert rotation.state is State.OVERLAP
    assert rotation.stored_at is not None
    assert rotation.next_action_at == rotation.stored_at + timedelta(hours=48)
    assert aws.keys("ci-deploy")[old.access_key_id] is KeyStatus.ACTIVE
    assert len(aws.keys("ci-deploy")) == 2
    assert aws.keys("ci-build") == {young.access_key_id: KeyStatus.ACTIVE}
    assert rotations_of(settings, "ci-build") == []


def test_an_unused_key_is_deactivated_without_a_new_one_and_reactivate_turns_it_on(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Under `unused_action: deactivate`, a human's key unused for 60 days (never used:
    counted from its creation) is set Inactive by `run --once`, and no key is issued;
    `rotator reactivate` turns it back on and the next pass leaves it on, since its idle
    clock restarted; a key used yesterday is untouched."""
    [idle] = aws.add_user("ann", tags={"type": "human"}, keys=[SeedKey(60 * D)])
    [busy] = aws.add_user("ben", tags={"type": "human"}, keys=[SeedKey(60 * D, last_used_ago=D)])
    cfg = file_with(aws, vault, tmp_path, [HUMANS])
    ran = rotator("--config", cfg, "run", "--once", "--json")
    assert ran.returncode == 0, ran.stderr
    doc = json.loads(ran.stdout)
    assert [(k["user_name"], k["access_key_id"], k["rule"]) for k in doc["deactivated_unused"]] == [
        ("ann", idle.access_key_id, "humans")
    ]
    assert doc["opened"] == []
    assert aws.keys("ann") == {idle.access_key_id: KeyStatus.INACTIVE}
    assert aws.keys("ben") == {busy.access_key_id: KeyStatus.ACTIVE}
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/ann") is None

    back = rotator("--config", cfg, "reactivate", "ann", "--key", idle.access_key_id)
    assert back.returncode == 0, back.stderr
    assert "is Active again" in back.stdout
    assert aws.keys("ann") == {idle.access_key_id: KeyStatus.ACTIVE}
    again = rotator("--config", cfg, "run", "--once", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["deactivated_unused"] == []
    assert aws.keys("ann") == {idle.access_key_id: KeyStatus.ACTIVE}
    plan = json.loads(rotator("--config", cfg, "plan", "--json").stdout)
    [ann] = [i for i in plan["items"] if i["user_name"] == "ann"]
    assert (ann["decision"], ann["rule"]) == ("ok", "humans")
    status = json.loads(rotator("--config", cfg, "status", "--json", "--user", "ann").stdout)
    [record] = status["rotations"]
    assert (record["state"], record["old_key_id"]) == ("ROLLED_BACK", idle.access_key_id)
    assert record["note"] == "reactivated by an operator: operator reactivation"


def test_reactivate_refuses_a_key_contained_as_leaked_and_an_unknown_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A key the rotator contained as leaked stays off: `reactivate` exits 2 saying so and
    changes nothing; a key the user does not have exits 2 too; an Active key is left as
    it is (exit 0)."""
    [leaked, sound] = aws.add_user("cat", keys=[SeedKey(10 * D), SeedKey(5 * D)])
    settings = settings_with(aws, vault, tmp_path, [])
    app = App(settings)
    try:
        app.report_leak(ACCOUNT_ID, "cat", leaked.access_key_id, "INC-1")
    finally:
        app.close()
    assert aws.keys("cat")[leaked.access_key_id] is KeyStatus.INACTIVE
    cfg = file_with(aws, vault, tmp_path, [])
    refused = rotator("--config", cfg, "reactivate", "cat", "--key", leaked.access_key_id)
    assert refused.returncode == 2
    assert "was contained as leaked" in refused.stderr
    assert aws.keys("cat")[leaked.access_key_id] is KeyStatus.INACTIVE
    unknown = rotator("--config", cfg, "reactivate", "cat", "--key", "AKIAUNKNOWN000000000")
    assert unknown.returncode == 2
    assert "has no key AKIAUNKNOWN000000000" in unknown.stderr
    active = rotator("--config", cfg, "reactivate", "cat", "--key", sound.access_key_id)
    assert active.returncode == 0, active.stderr
    assert "Active already" in active.stdout


def test_an_expired_exemption_is_handled_normally_and_plan_says_it_lapsed(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A user tagged exempt until a date that has passed is rotated like anyone else
    and `plan --json` says the exemption lapsed; one exempt until a future date is not."""
    past = (datetime.now(UTC) - 2 * D).date().isoformat()
    future = (datetime.now(UTC) + 30 * D).date().isoformat()
    [lapsed] = aws.add_user("dan", tags={"rotator:exempt": past}, keys=[SeedKey(120 * D)])
    [kept] = aws.add_user("eve", tags={"rotator:exempt": future}, keys=[SeedKey(120 * D)])
    cfg = file_with(aws, vault, tmp_path, [])
    plan = rotator("--config", cfg, "plan", "--json")
    assert plan.returncode == 0, plan.stderr
    items = {i["user_name"]: i for i in json.loads(plan.stdout)["items"]}
    assert items["dan"]["decision"] == "rotate"
    assert f"exemption lapsed on {past}" in items["dan"]["reason"]
    assert items["eve"]["decision"] == "exempt"
    assert f"exempt until {future}" in items["eve"]["reason"]
    ran = rotator("--config", cfg, "run", "--once")
    assert ran.returncode == 0, ran.stderr
    assert lapsed.access_key_id not in aws.keys("dan")
    assert aws.keys("eve") == {kept.access_key_id: KeyStatus.ACTIVE}


def test_plan_json_names_the_rule_of_every_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Every item of `plan --json` carries "rule" (and why it matched), "default" with
    no match when no rule holds, exempt and inactive keys included."""
    aws.add_user("root-admin", policies=[ADMIN], keys=[SeedKey(3 * D)])
    aws.add_user("ann", tags={"type": "human"}, keys=[SeedKey(3 * D)])
    aws.add_user("ci-x", path="/ci/", keys=[SeedKey(3 * D, status=KeyStatus.INACTIVE)])
    aws.add_user("frank", tags={"rotator:exempt": "true"}, keys=[SeedKey(3 * D)])
    aws.add_user("gil", keys=[SeedKey(3 * D), SeedKey(2 * D)])
    cfg = file_with(aws, vault, tmp_path, [ADMINS, HUMANS, CI])
    plan = rotator("--config", cfg, "plan", "--json")
    assert plan.returncode == 0, plan.stderr
    items = json.loads(plan.stdout)["items"]
    assert len(items) == 6
    assert {(i["user_name"], i["rule"], i["rule_match"]) for i in items} == {
        ("root-admin", "admins", "AdministratorAccess attached"),
        ("ann", "humans", "tag type=human"),
        ("ci-x", "ci", "path /ci/, user ci-*"),
        ("frank", "default", None),
        ("gil", "default", None),
    }


def test_inactive_delete_after_deletes_an_idle_inactive_key_and_keeps_a_recent_one(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """With policy.inactive_delete_after 30d a pass deletes an inactive key last used 40
    days ago, keeps one used 2 days ago, and touches no active key."""
    [idle, working] = aws.add_user(
        "hal",
        keys=[SeedKey(100 * D, KeyStatus.INACTIVE, last_used_ago=40 * D), SeedKey(10 * D)],
    )
    [recent] = aws.add_user("ida", keys=[SeedKey(100 * D, KeyStatus.INACTIVE, last_used_ago=2 * D)])
    cfg = file_with(aws, vault, tmp_path, [], policy={"inactive_delete_after": "30d"})
    ran = rotator("--config", cfg, "run", "--once", "--json")
    assert ran.returncode == 0, ran.stderr
    deleted = json.loads(ran.stdout)["deleted_inactive"]
    assert [(k["user_name"], k["access_key_id"]) for k in deleted] == [("hal", idle.access_key_id)]
    assert aws.keys("hal") == {working.access_key_id: KeyStatus.ACTIVE}
    assert aws.keys("ida") == {recent.access_key_id: KeyStatus.INACTIVE}


def test_a_quarantined_users_key_judged_unused_is_contained_not_merely_deactivated(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Leaked comes before unused: a never-used key of a quarantined human is contained
    and replaced (a leak rotation), not just switched off as unused."""
    [key] = aws.add_user(
        "joe", tags={"type": "human"}, policies=[QUARANTINE_V2], keys=[SeedKey(60 * D)]
    )
    settings = settings_with(aws, vault, tmp_path, [HUMANS])
    run_pass(make_app(settings, FakeClock()))
    [rotation] = rotations_of(settings, "joe")
    assert rotation.leaked
    assert rotation.old_key_id == key.access_key_id
    assert key.access_key_id not in aws.keys("joe")
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/joe") is not None


# --- the pass's own steps, on the in-memory fakes ----------------------------------------


def fake_app(clock: FakeClock, rules: list[dict[str, Any]], **policy: str) -> tuple[App, FakeIam]:
    """An App on FakeIam, FakeSecrets and FakeStateStore (nothing but `policy` and
    `rules` configured), sharing `clock`."""
    data: dict[str, Any] = {"rules": rules, "policy": {"overlap": "0s", **policy}}
    settings = parse_settings(data, {"VAULT_TOKEN": "test-token-not-real"})
    iam = FakeIam(clock=clock)
    wiring = Wiring(
        settings,
        clock=clock,
        iam=iam,
        secrets=FakeSecrets(),
        store=FakeStateStore(clock),
        notifier=CapturingNotifier(),
    )
    return App(settings, wiring=wiring, sleep=clock.sleep), iam


def test_a_key_used_since_the_credential_report_is_not_deactivated_as_unused() -> None:
    """The credential report can be four hours old: before it switches a key off, the
    pass asks GetAccessKeyLastUsed again, and a key used since then stays on."""
    clock = FakeClock()
    app, iam = fake_app(clock, [HUMANS])
    [key] = iam.add_user("kim", tags={"type": "human"}, keys=[SeedKey(60 * D)])
    iam.generate_credential_report()  # the report: never used
    clock.advance(timedelta(hours=1))
    iam.set_last_used("kim", key.access_key_id, clock.now)
    result = app.scan_and_open()
    assert [d.decision.value for inv in result.inventories for d in inv.decisions] == ["unused"]
    assert result.deactivated == []
    assert iam.keys("kim") == {key.access_key_id: KeyStatus.ACTIVE}
    assert iam.calls["iam:GetAccessKeyLastUsed"] == 1


def test_keys_an_open_rotation_tracks_are_neither_deactivated_nor_deleted() -> None:
    """A key an open rotation holds as its new key is never switched off as unused, and
    an inactive old key it is retiring is never deleted as idle: both are left to the
    rotation. The scan describes both by the rotation (neither unused nor due for
    deletion), and the pass's own steps skip them even when handed decisions made
    without the state store, which would call them unused and due."""
    clock = FakeClock()
    app, iam = fake_app(
        clock,
        [{**HUMANS, "unused_after": "8d"}],
        inactive_delete_after="9d",
    )
    [old, new] = iam.add_user(
        "liz",
        tags={"type": "human"},
        keys=[
            SeedKey(100 * D, KeyStatus.INACTIVE, last_used_ago=20 * D),
            SeedKey(11 * D),
        ],
    )
    retiring = replace(
        new_rotation(
            ACCOUNT_ID, "liz", RotationReason.AGE, clock.now, old_key_id=old.access_key_id
        ),
        state=State.RETIRE,
        new_key_id=new.access_key_id,
        next_action_at=clock.now + 30 * D,
    )
    app.store.create(retiring, "test: a rotation retiring the old key")
    result = app.scan_and_open()
    decided = {d.key.access_key_id: d for inv in result.inventories for d in inv.decisions}
    rid = retiring.id[:8]
    assert decided[new.access_key_id].decision.value == "ok"
    assert decided[new.access_key_id].reason.startswith(f"the new key of rotation {rid} (RETIRE)")
    assert not decided[old.access_key_id].delete_due
    assert f"being rotated: rotation {rid} is in RETIRE" in decided[old.access_key_id].reason
    assert (result.deactivated, result.deleted) == ([], [])
    stateless = app.scan(with_state=False).inventories
    blind = {d.key.access_key_id: d for inv in stateless for d in inv.decisions}
    assert blind[new.access_key_id].decision.value == "unused"
    assert blind[old.access_key_id].delete_due
    rules = Rules.from_settings(app.settings)
    assert app.deactivate_unused(stateless, rules) == []
    assert app.delete_idle_inactive(stateless) == []
    assert app.deactivate_unused(stateless, rules, dry_run=True) == []
    assert app.delete_idle_inactive(stateless, dry_run=True) == []
    assert iam.keys("liz") == {
        old.access_key_id: KeyStatus.INACTIVE,
        new.access_key_id: KeyStatus.ACTIVE,
    }


def test_reactivate_refuses_the_old_key_of_an_open_rotation_and_points_to_rollback() -> None:
    """The old key a rotation is retiring is that rotation's to turn back on: reactivate
    refuses it naming `rollback`, and the key stays off."""
    clock = FakeClock()
    app, iam = fake_app(clock, [])
    [old, new] = iam.add_user("max", keys=[SeedKey(100 * D, KeyStatus.INACTIVE), SeedKey(D)])
    retiring = replace(
        new_rotation(
            ACCOUNT_ID, "max", RotationReason.AGE, clock.now, old_key_id=old.access_key_id
        ),
        state=State.RETIRE,
        new_key_id=new.access_key_id,
    )
    app.store.create(retiring, "test: a rotation retiring the old key")
    with pytest.raises(BadInput, match=f"belongs to open rotation {retiring.id} .*rollback max"):
        app.reactivate("max", old.access_key_id, reason="test")
    assert iam.keys("max")[old.access_key_id] is KeyStatus.INACTIVE


def test_an_idle_inactive_key_turned_back_on_after_the_scan_is_not_deleted(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """The deletion re-reads the key first: one a person reactivated between the scan
    and the delete (to see what broke) stays, Active; an idle one still Inactive goes."""
    [revived] = aws.add_user(
        "kim", keys=[SeedKey(100 * D, KeyStatus.INACTIVE, last_used_ago=40 * D)]
    )
    [idle] = aws.add_user("lou", keys=[SeedKey(100 * D, KeyStatus.INACTIVE, last_used_ago=40 * D)])
    settings = settings_with(aws, vault, tmp_path, [], policy={"inactive_delete_after": "30d"})
    app = make_app(settings, FakeClock())
    try:
        scanned = app.scan()
        aws.backend.update_access_key("kim", revived.access_key_id, "Active")
        deleted = app.delete_idle_inactive(scanned.inventories)
    finally:
        app.close()
    assert [d.user.user_name for d in deleted] == ["lou"]
    assert aws.keys("kim") == {revived.access_key_id: KeyStatus.ACTIVE}
    assert idle.access_key_id not in aws.keys("lou")
