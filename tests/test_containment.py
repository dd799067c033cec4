"""Containment first, from every source, whatever else is going on: a leaked key stops
being Active in the same pass or command, whatever state the user's rotation is in and
whether or not Vault answers, and the user still ends with one working key that Vault
serves. Each case was a way the rotator left a leaked key Active (issue 11).

End to end: the CLI (`python -m rotator ...`) against the moto server and the OpenBao dev
server, with the fault-injecting proxy in front of Vault where Vault must be down, and
the AWS Health sample events of tests/fixtures/health. A poison SQS message ahead of a
real leak is covered by tests/test_fuzz.py."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from rotator.model import KeyStatus
from rotator.sandbox import ACCOUNT_ID, QUARANTINE_V2, LocalAws, SeedKey
from tests.conftest import VaultTarget
from tests.faultproxy import FaultProxy, vault_error
from tests.rig import identity_of, rotator, vault_secret, write_config

D = timedelta(days=1)
FIXTURES = Path(__file__).parent / "fixtures" / "health"
# A key id of the right shape that no user in moto holds.
NOBODYS_KEY = "AKIANOBODYHASTHIS001"
OTHER_ACCOUNT = "111122223333"  # the management account of the organization-view sample


# --- helpers ---------------------------------------------------------------------------


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`rotator --config CONFIG ARGS`, JSON logs on stderr."""
    return rotator("--config", str(config), "--log-format", "json", *args)


def rotations_of(config: Path, user: str) -> list[dict[str, Any]]:
    """Every rotation of `user`, newest first, with its events (`status --user --json`)."""
    shown = cli(config, "status", "--user", user, "--json")
    assert shown.returncode in (0, 4), shown.stderr
    return list(json.loads(shown.stdout)["rotations"])


def status_of(config: Path, user: str) -> dict[str, Any]:
    """The user's latest rotation, with its events."""
    rotations = rotations_of(config, user)
    assert rotations, f"no rotation recorded for {user}"
    return rotations[0]


def active_keys(aws: LocalAws, user: str) -> set[str]:
    return {k for k, status in aws.keys(user).items() if status is KeyStatus.ACTIVE}


def trail_text(rotation: dict[str, Any]) -> str:
    return " | ".join(e["reason"] for e in rotation["events"])


def explained(rotations: list[dict[str, Any]], key_id: str) -> bool:
    """Whether an event of `rotations` names `key_id` as leaked or contained."""
    return any(
        key_id in e["reason"] and ("leak" in e["reason"] or "contain" in e["reason"])
        for r in rotations
        for e in r["events"]
    )


def operator_iam(aws: LocalAws) -> Any:
    """What a person (or AWS itself) uses: boto3 straight against moto."""
    return boto3.client("iam", endpoint_url=aws.endpoint_url, region_name="us-east-1")


def quarantine(aws: LocalAws, *users: str) -> None:
    """Attach AWS's key quarantine policy, as AWS does when it finds a key exposed."""
    iam = operator_iam(aws)
    for user in users:
        iam.attach_user_policy(UserName=user, PolicyArn=QUARANTINE_V2)


def assert_off(aws: LocalAws, user: str, *key_ids: str) -> None:
    """Each key is Inactive, or already deleted: it no longer authenticates."""
    keys = aws.keys(user)
    for key_id in key_ids:
        assert keys.get(key_id, KeyStatus.INACTIVE) is KeyStatus.INACTIVE, (key_id, keys)


def served_key(aws: LocalAws, vault: VaultTarget, user: str) -> str:
    """The key Vault serves for `user`: Active in IAM, and the pair a consumer reads
    authenticates as the user. Returns its id."""
    held = vault_secret(vault, f"aws/{ACCOUNT_ID}/{user}")
    assert held is not None, f"Vault serves nothing for {user}"
    key_id = str(held["data"]["aws_access_key_id"])
    assert aws.keys(user).get(key_id) is KeyStatus.ACTIVE, (key_id, aws.keys(user))
    assert identity_of(aws, held) == f"arn:aws:iam::{ACCOUNT_ID}:user/{user}"
    return key_id


def health_event(name: str, *key_ids: str) -> dict[str, Any]:
    """The sample event `name` from tests/fixtures/health, naming `key_ids` as its
    affected entities (and the first as eventMetadata.publicKey when it has one)."""
    event: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    detail = event["detail"]
    detail["affectedEntities"] = [{"entityValue": k} for k in key_ids]
    if event.get("resources"):
        event["resources"] = list(key_ids)
    if "eventMetadata" in detail:
        detail["eventMetadata"]["publicKey"] = key_ids[0]
    return event


def write_event(tmp_path: Path, event: dict[str, Any], name: str = "event.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(event))
    return path


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def wait_for(moment: str | None, margin: float = 0.5) -> None:
    """Sleep until `moment` (an ISO time from `status --json`) has passed."""
    if moment is None:
        return
    time.sleep(max(0.0, (at(moment) - datetime.now(UTC)).total_seconds()) + margin)


# --- 1. a quarantine on a user whose rotation is already open --------------------------


@dataclass(frozen=True)
class MidRotation:
    """Two users quarantined while their rotations were open, and the pass after."""

    config: Path
    blocked: tuple[str, str]  # both keys of the user whose rotation was BLOCKED
    old: str  # the old key of the user whose rotation was in OVERLAP
    active_before: dict[str, set[str]]  # user -> keys Active just before the pass
    after: subprocess.CompletedProcess[str]  # that pass


def quarantine_mid_rotation(aws: LocalAws, vault: VaultTarget, tmp_path: Path) -> MidRotation:
    """`blocked` (two active keys, both due) is BLOCKED and `overlapping` in a 1h OVERLAP
    when AWS attaches the quarantine policy to both; then one `run --once`."""
    b1, b2 = aws.add_user("blocked", keys=[SeedKey(120 * D), SeedKey(100 * D)])
    [old] = aws.add_user("overlapping", keys=[SeedKey(120 * D)])
    config = write_config(aws, vault, tmp_path, policy={"overlap": "1h"})
    first = cli(config, "run", "--once")
    assert first.returncode == 1, first.stderr  # the BLOCKED rotation is new
    assert status_of(config, "blocked")["state"] == "BLOCKED"
    waiting = status_of(config, "overlapping")
    assert waiting["state"] == "OVERLAP", waiting
    new_id = str(waiting["new_key_id"])
    assert aws.keys("overlapping") == {
        old.access_key_id: KeyStatus.ACTIVE,
        new_id: KeyStatus.ACTIVE,
    }
    active = {u: active_keys(aws, u) for u in ("blocked", "overlapping")}
    quarantine(aws, "blocked", "overlapping")
    after = cli(config, "run", "--once")
    return MidRotation(
        config, (b1.access_key_id, b2.access_key_id), old.access_key_id, active, after
    )


def test_quarantine_contains_keys_of_users_with_blocked_and_overlap_rotations(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A quarantine attached while one user's rotation is BLOCKED (two active keys) and
    another's in OVERLAP: the next `run --once` sets both keys of the first and the old key
    of the second Inactive, and `status` shows each rotation escalated for the leak."""
    seen = quarantine_mid_rotation(aws, vault, tmp_path)
    assert_off(aws, "blocked", *seen.blocked)
    assert_off(aws, "overlapping", seen.old)
    assert seen.after.returncode in (0, 1), seen.after.stderr
    for user, key_id in (("blocked", seen.blocked[0]), ("overlapping", seen.old)):
        shown = status_of(seen.config, user)
        assert shown["leaked"] is True, shown
        assert explained([shown], key_id), trail_text(shown)
        assert "quarantine policy" in trail_text(shown), trail_text(shown)


def test_status_names_every_key_a_quarantine_contained(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """After a quarantine on users with open rotations, every key the pass took out of
    service is named in `status --user` as leaked or contained, not only the rotation's
    own old key."""
    seen = quarantine_mid_rotation(aws, vault, tmp_path)
    silent: dict[str, str] = {}
    for user, before in seen.active_before.items():
        rotations = rotations_of(seen.config, user)
        taken_out = before - active_keys(aws, user)
        assert taken_out, f"the quarantine took no key of {user} out of service"
        for key_id in sorted(taken_out):
            if not explained(rotations, key_id):
                silent[key_id] = f"{user}: {' / '.join(trail_text(r) for r in rotations)}"
    assert silent == {}, silent


def test_quarantine_during_the_overlap_leaves_the_user_a_working_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Quarantines attached during OVERLAP and BLOCKED: after the pass (and one more) the
    key Vault serves each user is Active, authenticates as the user, and is none of the
    keys that had to be contained."""
    seen = quarantine_mid_rotation(aws, vault, tmp_path)
    again = cli(seen.config, "run", "--once")
    assert_off(aws, "overlapping", seen.old)
    assert served_key(aws, vault, "blocked") not in seen.blocked
    assert served_key(aws, vault, "overlapping") != seen.old
    assert again.returncode in (0, 4), again.stderr


# --- 2. containment does not need Vault -------------------------------------------------


def test_leak_event_contains_with_vault_down_and_a_later_pass_replaces_the_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """With Vault answering 503 to everything, `leak-event` sets the key Inactive and exits
    3; once Vault is back a later pass replaces it with one working key Vault serves."""
    [leaked] = aws.add_user("alice", keys=[SeedKey(40 * D)])
    proxy = fault_proxy(vault.addr)
    proxy.add(lambda request: True, vault_error(503, ["Vault is sealed"]))
    config = write_config(aws, vault, tmp_path, vault={"url": proxy.url})
    event = health_event("aws-health-tools-risk-credentials-exposed.json", leaked.access_key_id)
    done = cli(config, "leak-event", str(write_event(tmp_path, event)))
    assert done.returncode == 3, done.stderr
    assert aws.keys("alice") == {leaked.access_key_id: KeyStatus.INACTIVE}
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/alice") is None

    proxy.clear()
    wait_for(status_of(config, "alice")["next_action_at"])
    later = cli(config, "run", "--once")
    assert later.returncode == 0, later.stderr
    assert status_of(config, "alice")["state"] == "DONE"
    new_id = served_key(aws, vault, "alice")
    assert aws.keys("alice") == {new_id: KeyStatus.ACTIVE}


def test_run_contains_a_quarantined_user_with_vault_down_and_replaces_later(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """With Vault answering 503 to everything, `run --once` still sets a quarantined user's
    key Inactive and exits 3; once Vault is back a later pass replaces it with one working
    key Vault serves."""
    [leaked] = aws.add_user("mallory", policies=[QUARANTINE_V2], keys=[SeedKey(3 * D)])
    proxy = fault_proxy(vault.addr)
    proxy.add(lambda request: True, vault_error(503, ["Vault is sealed"]))
    config = write_config(aws, vault, tmp_path, vault={"url": proxy.url})
    down = cli(config, "run", "--once")
    assert down.returncode == 3, down.stderr
    assert aws.keys("mallory") == {leaked.access_key_id: KeyStatus.INACTIVE}

    # The replacement must be on record: the key is Inactive now, so no later scan
    # would find anything due for this user.
    opened = status_of(config, "mallory")
    assert opened["leaked"] is True, opened
    proxy.clear()
    wait_for(opened["next_action_at"])
    later = cli(config, "run", "--once")
    assert later.returncode == 0, later.stderr
    new_id = served_key(aws, vault, "mallory")
    assert aws.keys("mallory") == {new_id: KeyStatus.ACTIVE}
    assert status_of(config, "mallory")["state"] == "DONE"


# --- 3. each key of an event on its own; replays change nothing ------------------------


def test_unknown_and_deleted_keys_in_an_event_do_not_stop_the_real_one(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """An event naming a key nobody has, a deleted key and a real active key: the real key is
    contained and replaced, the others get a "nothing to contain" note, exit 0. Replaying
    the same event changes nothing, opens no second rotation and notes it was handled."""
    [real] = aws.add_user("bob", keys=[SeedKey(40 * D)])
    [gone] = aws.add_user("carol", keys=[SeedKey(40 * D)])
    operator_iam(aws).delete_access_key(UserName="carol", AccessKeyId=gone.access_key_id)
    config = write_config(aws, vault, tmp_path)
    event = health_event(
        "aws-health-tools-risk-credentials-exposed.json",
        NOBODYS_KEY,
        gone.access_key_id,
        real.access_key_id,
    )
    path = write_event(tmp_path, event)
    done = cli(config, "leak-event", str(path), "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    notes = doc["notes"]
    for key_id in (NOBODYS_KEY, gone.access_key_id):
        [note] = [n for n in notes if key_id in n]
        assert "nothing to contain" in note, notes
    assert not any(real.access_key_id in n for n in notes), notes
    [rotation] = doc["rotations"]
    assert rotation["user_name"] == "bob"
    assert rotation["state"] == "DONE", rotation
    assert_off(aws, "bob", real.access_key_id)
    new_id = served_key(aws, vault, "bob")
    keys_after = aws.keys("bob")
    assert keys_after == {new_id: KeyStatus.ACTIVE}
    assert rotations_of(config, "carol") == []
    stored = vault_secret(vault, f"aws/{ACCOUNT_ID}/bob")

    again = cli(config, "leak-event", str(path), "--json")
    assert again.returncode == 0, again.stderr
    replay = json.loads(again.stdout)
    assert replay["rotations"] == [], replay
    [note] = [n for n in replay["notes"] if real.access_key_id in n]
    assert "handled already" in note, replay["notes"]
    assert aws.keys("bob") == keys_after
    assert len(rotations_of(config, "bob")) == 1
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/bob") == stored


# --- 4. organization view ----------------------------------------------------------------


def test_organization_view_event_is_contained_in_the_affected_account(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """The organization-view sample (top-level `account` the management account,
    `detail.affectedAccount` moto's) is contained and replaced, not rejected as "not
    configured"."""
    [leaked] = aws.add_user("ci-deployer", keys=[SeedKey(40 * D)])
    event = health_event("organization-view.json", leaked.access_key_id)
    assert event["account"] == OTHER_ACCOUNT
    event["detail"]["affectedAccount"] = ACCOUNT_ID
    config = write_config(aws, vault, tmp_path)
    done = cli(config, "leak-event", str(write_event(tmp_path, event)), "--json")
    assert "not configured" not in done.stderr
    assert done.returncode == 0, done.stderr
    [rotation] = json.loads(done.stdout)["rotations"]
    assert rotation["account_id"] == ACCOUNT_ID
    assert rotation["state"] == "DONE", rotation
    assert_off(aws, "ci-deployer", leaked.access_key_id)
    new_id = served_key(aws, vault, "ci-deployer")
    assert aws.keys("ci-deployer") == {new_id: KeyStatus.ACTIVE}


# --- 5. every leaked key of a quarantined user in one pass --------------------------------


def test_a_quarantined_user_with_two_active_keys_has_both_contained_in_one_pass(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    """A quarantined user with two Active keys: one `run --once` sends UpdateAccessKey
    Inactive for both (not one per pass), and the user ends with one working key."""
    k1, k2 = aws.add_user("dave", policies=[QUARANTINE_V2], keys=[SeedKey(30 * D), SeedKey(5 * D)])
    proxy = fault_proxy(aws.endpoint_url)
    config = write_config(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    done = cli(config, "run", "--once")
    assert done.returncode == 0, done.stderr
    deactivated = {
        r.request.form.get("AccessKeyId")
        for r in proxy.log
        if r.request.action == "UpdateAccessKey" and r.request.form.get("Status") == "Inactive"
    }
    assert {k1.access_key_id, k2.access_key_id} <= deactivated, deactivated
    assert_off(aws, "dave", k1.access_key_id, k2.access_key_id)
    served_key(aws, vault, "dave")


# --- 6. the new key leaks during the overlap ----------------------------------------------


@pytest.mark.parametrize("source", ["rotate --leaked", "leak-event"])
def test_a_new_key_leaked_during_the_overlap_is_replaced_and_nothing_is_untracked(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, source: str
) -> None:
    """The new key leaks during OVERLAP: it is contained and deleted, another is made and
    stored; the old key stays Active (the overlap goes on) beside exactly one new Active
    key that Vault serves, and every key is the rotation's old or new key."""
    [old] = aws.add_user("erin", keys=[SeedKey(120 * D)])
    config = write_config(aws, vault, tmp_path, policy={"overlap": "1h"})
    first = cli(config, "run", "--once")
    assert first.returncode == 0, first.stderr
    waiting = status_of(config, "erin")
    assert waiting["state"] == "OVERLAP", waiting
    leaked_id = waiting["new_key_id"]

    if source == "rotate --leaked":
        done = cli(config, "rotate", "erin", "--key", leaked_id, "--leaked", "--reason", "INC-6")
    else:
        event = health_event("aws-health-tools-risk-credentials-exposed.json", leaked_id)
        done = cli(config, "leak-event", str(write_event(tmp_path, event)))
    assert done.returncode == 0, done.stderr

    assert leaked_id not in aws.keys("erin")
    new_id = served_key(aws, vault, "erin")
    assert new_id not in (leaked_id, old.access_key_id)
    assert aws.keys("erin") == {old.access_key_id: KeyStatus.ACTIVE, new_id: KeyStatus.ACTIVE}
    [rotation] = rotations_of(config, "erin")
    assert rotation["id"] == waiting["id"]
    assert rotation["state"] == "OVERLAP", rotation
    assert {rotation["old_key_id"], rotation["new_key_id"]} == set(aws.keys("erin"))
    assert explained([rotation], leaked_id), trail_text(rotation)


# --- 7. keys made after the quarantine are not leaked ---------------------------------------


def test_keys_created_after_the_quarantine_was_first_seen_are_not_judged_leaked(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """The policy stays attached until an operator detaches it. The leak's replacement,
    a forced rotation's key and a key a person adds later are all created after the
    rotator first saw the policy: later passes leave them Active (no false containment),
    and `plan` counts no leaked key, marks only the contained one as suspect and says the
    user is still quarantined."""
    aws.add_user("oz", policies=[QUARANTINE_V2], keys=[SeedKey(40 * D)])
    config = write_config(aws, vault, tmp_path)
    first = cli(config, "run", "--once")
    assert first.returncode == 0, first.stderr
    replacement = served_key(aws, vault, "oz")
    assert aws.keys("oz") == {replacement: KeyStatus.ACTIVE}

    forced = cli(config, "rotate", "oz", "--reason", "INC-7 follow-up")
    assert forced.returncode == 0, forced.stderr
    rotated = served_key(aws, vault, "oz")
    assert rotated != replacement
    status = status_of(config, "oz")
    wait_for(status["next_action_at"])
    settled = cli(config, "run", "--once")
    assert settled.returncode == 0, settled.stderr
    person = operator_iam(aws).create_access_key(UserName="oz")["AccessKey"]["AccessKeyId"]

    again = cli(config, "run", "--once")
    assert again.returncode == 0, again.stderr
    assert active_keys(aws, "oz") >= {rotated, person}, aws.keys("oz")
    assert status_of(config, "oz")["leaked"] is False
    plan = cli(config, "plan", "--json")
    assert plan.returncode == 0, plan.stderr
    doc = json.loads(plan.stdout)
    assert doc["summary"]["leaked"] == 0, doc
    # (The credential report names no key ids: keys that need nothing show none.)
    mine = [i for i in doc["items"] if i["user_name"] == "oz"]
    active = [i for i in mine if i["status"] == "Active"]
    assert len(active) == len(active_keys(aws, "oz")) >= 2, mine
    for item in active:
        assert not item["suspect"], item
        assert "created after the quarantine policy was first seen" in item["reason"], item
    assert all(i["status"] == "Inactive" for i in mine if i["suspect"]), mine
    assert any("oz is still quarantined" in n for n in doc["notes"]), doc.get("notes")


# --- a leak reported where no Vault token is configured yet ---------------------------------


def test_a_leak_is_contained_and_its_replacement_waits_blocked_without_a_vault_token(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An incident responder on a machine with no Vault token: `rotate --leaked` sets the
    key Inactive, records the replacement and stops BLOCKED saying the token is missing
    (exit 1, not an "invalid configuration" that hides the containment); once a token
    is there, `run --once` finishes the replacement."""
    [leaked] = aws.add_user("nadia", keys=[SeedKey(20 * D)])
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    config = write_config(aws, vault, tmp_path, vault={"auth": {"method": "token"}})
    done = cli(config, "rotate", "nadia", "--key", leaked.access_key_id, "--leaked")
    assert done.returncode == 1, done.stderr
    assert aws.keys("nadia") == {leaked.access_key_id: KeyStatus.INACTIVE}
    blocked = status_of(config, "nadia")
    assert (blocked["state"], blocked["leaked"]) == ("BLOCKED", True), blocked
    assert "VAULT_TOKEN" in blocked["last_error"], blocked
    assert "replacement continues once this is fixed" in blocked["last_error"]

    monkeypatch.setenv("VAULT_TOKEN", vault.token)
    later = cli(config, "run", "--once")
    assert later.returncode == 0, trail_text(status_of(config, "nadia"))
    new_id = served_key(aws, vault, "nadia")
    assert aws.keys("nadia") == {new_id: KeyStatus.ACTIVE}
    assert status_of(config, "nadia")["state"] == "DONE"
