"""`run --once`, `status`, `rotate` and `rollback` as an operator types them."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from rotator.model import KeyStatus
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from tests.conftest import VaultTarget
from tests.rig import rotator, vault_secret, write_config

D = timedelta(days=1)


def config(tmp_path: Path, aws: LocalAws, vault: VaultTarget, **policy: str) -> str:
    return str(write_config(aws, vault, tmp_path, policy=policy))


def test_a_dozen_due_users_rotate_in_one_pass_and_the_next_pass_changes_nothing(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """One `run --once` leaves each of twelve due users with one active key that Vault
    holds with matching metadata; `status --json` shows them DONE; a second pass opens
    nothing and exits 0."""
    old = {
        f"user{i:02d}": aws.add_user(f"user{i:02d}", keys=[SeedKey((91 + i) * D)])[0]
        for i in range(12)
    }
    cfg = config(tmp_path, aws, vault, overlap="0s", delete_after="0s")
    first = rotator("--config", cfg, "run", "--once", "--json")
    assert first.returncode == 0, first.stderr
    for name, key in old.items():
        keys = aws.keys(name)
        [(new_id, status)] = keys.items()
        assert status is KeyStatus.ACTIVE
        assert new_id != key.access_key_id
        secret = vault_secret(vault, f"aws/{ACCOUNT_ID}/{name}")
        assert secret is not None
        assert secret["data"]["aws_access_key_id"] == secret["metadata"]["access_key_id"] == new_id
    status = json.loads(rotator("--config", cfg, "status", "--json").stdout)
    assert sorted(r["state"] for r in status["rotations"]) == ["DONE"] * 12
    before = {name: aws.keys(name) for name in old}
    second = rotator("--config", cfg, "run", "--once", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["opened"] == []
    assert {name: aws.keys(name) for name in old} == before


def test_rollback_reactivates_the_old_key_from_the_command_line(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """After a rotation deactivated the old key, `rollback USER` turns it back on and
    `status` shows ROLLED_BACK; a second rollback has nothing to undo (exit 2)."""
    [old] = aws.add_user("alice", keys=[SeedKey(120 * D)])
    cfg = config(tmp_path, aws, vault, overlap="0s", delete_after="7d")
    ran = rotator("--config", cfg, "run", "--once")
    assert ran.returncode == 0, ran.stderr
    assert aws.keys("alice")[old.access_key_id] is KeyStatus.INACTIVE
    back = rotator("--config", cfg, "rollback", "alice")
    assert back.returncode == 0, back.stderr
    assert aws.keys("alice")[old.access_key_id] is KeyStatus.ACTIVE
    assert "ROLLED_BACK" in rotator("--config", cfg, "status", "--user", "alice").stdout
    again = rotator("--config", cfg, "rollback", "alice")
    assert again.returncode == 2
    assert "ROLLED_BACK" in again.stderr


def test_rotate_unknown_user_is_a_usage_error(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Forcing a rotation of a user IAM does not know exits 2 with one line."""
    cfg = config(tmp_path, aws, vault, overlap="0s")
    done = rotator("--config", cfg, "rotate", "nobody")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_blocked_user_makes_run_exit_1_and_stays_untouched(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A due user with two active keys ends BLOCKED: `run --once` exits 1 and both keys
    are left as they were."""
    k1, k2 = aws.add_user("bob", keys=[SeedKey(120 * D), SeedKey(100 * D)])
    cfg = config(tmp_path, aws, vault, overlap="0s")
    done = rotator("--config", cfg, "run", "--once")
    assert done.returncode == 1
    assert "BLOCKED" in done.stdout
    assert aws.keys("bob") == {
        k1.access_key_id: KeyStatus.ACTIVE,
        k2.access_key_id: KeyStatus.ACTIVE,
    }


def test_rotate_during_an_open_rotation_says_which_rotation_is_open_not_two_keys(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A second `rotate` of a user in OVERLAP (two active keys: old and new) is refused
    as "already has open rotation" (exit 2), not as "name the one to replace", and
    changes nothing."""
    aws.add_user("ivy", keys=[SeedKey(120 * D)])
    cfg = config(tmp_path, aws, vault, overlap="1h")
    first = rotator("--config", cfg, "rotate", "ivy")
    assert first.returncode == 0, first.stderr
    before = aws.keys("ivy")
    assert len(before) == 2
    again = rotator("--config", cfg, "rotate", "ivy")
    assert again.returncode == 2
    assert "already has open rotation" in again.stderr
    assert "two active keys" not in again.stderr
    assert aws.keys("ivy") == before


def test_rotate_of_an_exempt_user_is_refused_without_force_and_a_leak_is_contained_anyway(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """`rotate` of a user tagged exempt exits 2 saying why and touches nothing; with
    --force it rotates; `rotate --leaked` of an exempt user contains the key regardless."""
    [key] = aws.add_user("break-glass", tags={"rotator:exempt": "true"}, keys=[SeedKey(10 * D)])
    cfg = config(tmp_path, aws, vault, overlap="0s", delete_after="0s")
    refused = rotator("--config", cfg, "rotate", "break-glass")
    assert refused.returncode == 2
    assert "rotator:exempt" in refused.stderr
    assert "--force" in refused.stderr
    assert aws.keys("break-glass") == {key.access_key_id: KeyStatus.ACTIVE}
    forced = rotator("--config", cfg, "rotate", "break-glass", "--force")
    assert forced.returncode == 0, forced.stderr
    [(new_id, status)] = aws.keys("break-glass").items()
    assert status is KeyStatus.ACTIVE
    assert new_id != key.access_key_id
    [other] = aws.add_user("break-glass-2", tags={"rotator:exempt": "yes"}, keys=[SeedKey(D)])
    leaked = rotator(
        "--config", cfg, "rotate", "break-glass-2", "--key", other.access_key_id, "--leaked"
    )
    assert leaked.returncode == 0, leaked.stderr
    assert other.access_key_id not in aws.keys("break-glass-2")
