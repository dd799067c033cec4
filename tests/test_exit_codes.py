"""Exit codes every command follows (rotator/outcome.py, README "Exit codes"): the pure
derivation from rotations and their event trails, and the codes end to end through the
command line against the moto server and the OpenBao dev server."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from rotator import cli as cli_module
from rotator.errors import (
    BackendUnavailable,
    BadInput,
    ConfigError,
    IllegalTransition,
    NotFound,
    PermissionDenied,
    RotationExists,
    RotatorError,
    Transient,
)
from rotator.machine import OPEN, State
from rotator.model import Event, KeyStatus, Rotation, RotationReason
from rotator.outcome import (
    MEANING,
    UNSTORED,
    ExitCode,
    exit_code,
    for_error,
    unresolved,
    waiting_on_backend,
)
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey, free_port
from tests.conftest import VaultTarget
from tests.faultproxy import FaultProxy, vault_error, vault_path
from tests.rig import rotator, vault_secret, write_config

D = timedelta(days=1)
T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
README = Path(__file__).parents[1] / "README.md"


# --- the derivation, on values ---------------------------------------------------------


def rot(
    state: State,
    *,
    user: str = "bob",
    created: datetime = T0 - D,
    updated: datetime = T0,
    last_error: str | None = None,
    next_action_at: datetime | None = None,
    rid: str | None = None,
) -> Rotation:
    return Rotation(
        id=rid or f"{user}-{state.value}-{created.isoformat()}",
        account_id=ACCOUNT_ID,
        user_name=user,
        reason=RotationReason.AGE,
        state=state,
        created_at=created,
        updated_at=updated,
        last_error=last_error,
        next_action_at=next_action_at,
    )


def moved(r: Rotation, frm: State, to: State, at: datetime) -> Event:
    return Event(r.id, at, frm, to, "test")


def test_a_move_into_blocked_during_the_command_needs_attention() -> None:
    """A handled rotation whose trail moves into BLOCKED at or after the start exits 1."""
    r = rot(State.BLOCKED)
    trail = [Event(r.id, T0 - D, None, State.PLANNED, "opened")]
    trail.append(moved(r, State.MAKE_ROOM, State.BLOCKED, T0))
    code = exit_code(started=T0, now=T0, handled=[r], trails={r.id: trail}, standing=[r])
    assert code is ExitCode.ATTENTION


def test_a_move_into_failed_during_the_command_needs_attention() -> None:
    """A handled rotation that moved into FAILED after the start exits 1."""
    r = rot(State.FAILED)
    trail = [moved(r, State.VERIFY, State.FAILED, T0 + timedelta(seconds=3))]
    code = exit_code(started=T0, now=T0 + D, handled=[r], trails={r.id: trail})
    assert code is ExitCode.ATTENTION


def test_a_rotation_blocked_before_the_command_is_unresolved_not_new() -> None:
    """BLOCKED before the start (a note since is no move) and still BLOCKED: 4, not 1."""
    r = rot(State.BLOCKED)
    trail = [
        moved(r, State.MAKE_ROOM, State.BLOCKED, T0 - timedelta(microseconds=1)),
        Event(r.id, T0 + timedelta(seconds=1), State.BLOCKED, State.BLOCKED, "still blocked"),
    ]
    code = exit_code(started=T0, now=T0, handled=[r], trails={r.id: trail}, standing=[r])
    assert code is ExitCode.UNRESOLVED


def test_rotate_answers_for_its_rotations_state_whenever_it_was_reached() -> None:
    """With own_state_counts (rotate, leak-event) an earlier BLOCKED rotation exits 1."""
    r = rot(State.BLOCKED)
    trail = [moved(r, State.MAKE_ROOM, State.BLOCKED, T0 - D)]
    owned = exit_code(started=T0, now=T0, handled=[r], trails={r.id: trail}, own_state_counts=True)
    assert owned is ExitCode.ATTENTION
    assert exit_code(started=T0, now=T0, handled=[r], trails={r.id: trail}) is ExitCode.OK


def test_an_account_that_could_not_be_scanned_needs_attention() -> None:
    """A failed account exits 1 even when every rotation went well."""
    done = rot(State.DONE)
    code = exit_code(started=T0, now=T0, handled=[done], failed_accounts={"444455556666": "x"})
    assert code is ExitCode.ATTENTION


@pytest.mark.parametrize("state", sorted(UNSTORED))
def test_a_rotation_left_waiting_before_its_key_was_stored_is_a_backend_failure(
    state: State,
) -> None:
    """Waiting to retry after an error, set during the command, before STORE ended: 3."""
    r = rot(
        state,
        updated=T0 + timedelta(seconds=2),
        last_error="Vault unavailable",
        next_action_at=T0 + timedelta(seconds=40),
    )
    assert waiting_on_backend(r, T0, T0 + timedelta(seconds=5))
    assert exit_code(started=T0, now=T0 + timedelta(seconds=5), handled=[r]) is ExitCode.BACKEND


@pytest.mark.parametrize(
    ("why", "changes"),
    [
        ("new key stored already (VERIFY)", {"state": State.VERIFY}),
        ("no error", {"last_error": None}),
        ("retry due already", {"next_action_at": T0}),
        ("no retry planned", {"next_action_at": None}),
        ("set to wait by an earlier command", {"updated": T0 - timedelta(seconds=1)}),
    ],
)
def test_what_is_not_a_rotation_waiting_on_a_backend(why: str, changes: dict[str, Any]) -> None:
    """Each fact the code-3 rule needs, taken away on its own, makes it exit 0."""
    facts: dict[str, Any] = {
        "state": State.STORE,
        "updated": T0 + timedelta(seconds=1),
        "last_error": "Vault unavailable",
        "next_action_at": T0 + timedelta(minutes=1),
    }
    facts.update(changes)
    r = rot(
        facts["state"],
        updated=facts["updated"],
        last_error=facts["last_error"],
        next_action_at=facts["next_action_at"],
    )
    now = T0 + timedelta(seconds=5)
    assert not waiting_on_backend(r, T0, now), why
    assert exit_code(started=T0, now=now, handled=[r]) is ExitCode.OK, why


def test_attention_wins_over_backend_and_backend_over_unresolved() -> None:
    """When several codes apply, 1 wins over 3 and 3 over 4."""
    blocked = rot(State.BLOCKED, user="bob")
    wait = rot(
        State.MAKE_ROOM,
        user="carol",
        last_error="Vault unavailable",
        next_action_at=T0 + D,
        updated=T0,
    )
    failed = rot(State.FAILED, user="dave", updated=T0 - D)
    trails = {blocked.id: [moved(blocked, State.MAKE_ROOM, State.BLOCKED, T0)]}
    every = [blocked, wait, failed]
    assert exit_code(started=T0, now=T0, handled=every, trails=trails, standing=every) == 1
    rest = [wait, failed]
    assert exit_code(started=T0, now=T0, handled=rest, standing=rest) == 3
    assert exit_code(started=T0, now=T0, handled=[failed], standing=[failed]) == 4


def test_unresolved_is_an_open_blocked_rotation_or_a_users_latest_failed_one() -> None:
    """Unresolved: any BLOCKED rotation and a user's latest when FAILED, no older one."""
    old_failed = rot(State.FAILED, user="alice", created=T0 - 3 * D)
    newer_done = rot(State.DONE, user="alice", created=T0 - 2 * D)
    done_then = rot(State.DONE, user="carol", created=T0 - 3 * D)
    latest_failed = rot(State.FAILED, user="carol", created=T0 - D)
    blocked = rot(State.BLOCKED, user="bob")
    found = unresolved([old_failed, newer_done, done_then, latest_failed, blocked])
    assert {r.id for r in found} == {latest_failed.id, blocked.id}
    assert unresolved([old_failed, newer_done]) == []
    assert exit_code(started=T0, now=T0, standing=[newer_done, old_failed]) is ExitCode.OK


def test_status_facts_never_give_1_or_3() -> None:
    """What `status` passes (only what stands) gives 4 or 0, never 1 or 3."""
    for state in OPEN - {State.BLOCKED}:
        waiting = rot(state, last_error="x", next_action_at=T0 + D, updated=T0)
        assert exit_code(started=T0, now=T0, standing=[waiting]) is ExitCode.OK, state
    assert exit_code(started=T0, now=T0, standing=[rot(State.BLOCKED)]) == 4
    assert exit_code(started=T0, now=T0, standing=[rot(State.FAILED)]) == 4


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError(["policy.max_age: bad"]), 2),
        (BadInput("malformed"), 2),
        (NotFound("no such user"), 2),
        (RotationExists("open rotation r1 exists"), 2),
        (PermissionDenied("iam:ListAccessKeys"), 3),
        (Transient("throttled"), 3),
        (BackendUnavailable("cannot reach Vault"), 3),
        (IllegalTransition("illegal transition DONE -> CREATE"), 1),
        (RotatorError("anything else"), 1),
    ],
)
def test_errors_that_stop_a_command_map_to_their_code(error: RotatorError, code: int) -> None:
    """Usage problems exit 2, backends that fail or refuse exit 3, anything else 1."""
    assert for_error(error) == code


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_readme_help_and_cli_docstring_give_every_code_the_same_meaning() -> None:
    """README table, `rotator --help` and cli.py word each code as outcome.MEANING does."""
    readme = README.read_text(encoding="utf-8")
    section = readme.split("### Exit codes", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(\d)` \| ([^|]+) \|", section, flags=re.MULTILINE)
    assert {int(c): m.strip() for c, m in rows} == {int(c): m for c, m in MEANING.items()}
    assert "Exit codes:" not in readme  # the old one-line paragraph is gone
    helped = rotator("--help")
    assert helped.returncode == 0
    for text in (_flat(helped.stdout), _flat(cli_module.__doc__ or "")):
        for code, meaning in MEANING.items():
            assert f"{int(code)} {meaning}" in text, (code, text)


# --- end to end through the command line ----------------------------------------------


def unreachable_config(tmp_path: Path) -> Path:
    """AWS and Vault on loopback ports nobody listens on: a command that reached for
    either would exit 3, not 2."""
    path = tmp_path / "rotator.yaml"
    data = {
        "aws": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "region": "us-east-1"},
        "vault": {"url": f"http://127.0.0.1:{free_port()}", "auth": {"token": "not-used"}},
        "state": {"path": str(tmp_path / "state.db")},
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["", "bad name!", "a" * 65, "älice", "alice\n"])
@pytest.mark.parametrize("command", ["rotate", "rollback"])
def test_a_user_name_iam_cannot_have_exits_2_before_anything_is_touched(
    tmp_path: Path, command: str, name: str
) -> None:
    """An invalid IAM user name exits 2 with one line; no backend, no state store touched."""
    config = unreachable_config(tmp_path)
    done = rotator("--config", str(config), command, name, env={"AWS_MAX_ATTEMPTS": "1"})
    assert done.returncode == 2, done.stderr
    assert "is not an IAM user name" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state.db").exists()


def test_status_with_an_invalid_user_name_exits_2(tmp_path: Path) -> None:
    """`status --user ''` is a usage error, not an empty listing."""
    done = rotator("--config", str(unreachable_config(tmp_path)), "status", "--user", "")
    assert done.returncode == 2
    assert "--user" in done.stderr


def _states(config: Path) -> dict[str, str]:
    doc = json.loads(rotator("--config", str(config), "status", "--json").stdout)
    return {r["user_name"]: r["state"] for r in doc["rotations"]}


def test_a_pass_that_blocks_a_user_exits_1_the_next_4_and_after_the_fix_0(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """The blocking pass exits 1, later passes and status 4, and 0 once a slot is freed."""
    k1, k2 = aws.add_user("bob", keys=[SeedKey(120 * D), SeedKey(100 * D)])
    aws.add_user("alice", keys=[SeedKey(5 * D)])
    config = write_config(aws, vault, tmp_path)

    first = rotator("--config", str(config), "run", "--once")
    assert first.returncode == 1, first.stderr
    assert "needs attention: rotation" in first.stderr
    assert "of bob" in first.stderr
    assert _states(config) == {"bob": "BLOCKED"}

    second = rotator("--config", str(config), "run", "--once")
    assert second.returncode == 4, second.stderr
    assert "still unresolved: bob (BLOCKED)" in second.stderr
    dry = rotator("--config", str(config), "run", "--once", "--dry-run")
    assert dry.returncode == 4, dry.stderr
    status = rotator("--config", str(config), "status")
    assert status.returncode == 4, status.stderr
    assert "BLOCKED" in status.stdout
    assert aws.keys("bob") == {
        k1.access_key_id: KeyStatus.ACTIVE,
        k2.access_key_id: KeyStatus.ACTIVE,
    }

    # The operator frees a slot: the younger key is the one no consumer uses.
    iam = boto3.client("iam", endpoint_url=aws.endpoint_url, region_name="us-east-1")
    iam.update_access_key(UserName="bob", AccessKeyId=k2.access_key_id, Status="Inactive")
    third = rotator("--config", str(config), "run", "--once")
    assert third.returncode == 0, third.stderr
    assert _states(config) == {"bob": "DONE"}
    [(new_id, status_of_new)] = aws.keys("bob").items()
    assert status_of_new is KeyStatus.ACTIVE
    assert new_id not in (k1.access_key_id, k2.access_key_id)
    after = rotator("--config", str(config), "status")
    assert after.returncode == 0, after.stderr


def test_rotate_exits_3_and_opens_nothing_when_vault_is_unreachable_from_the_start(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """With Vault unreachable, `rotate` exits 3 with one line and opens no rotation."""
    [key] = aws.add_user("alice", keys=[SeedKey(10 * D)])
    config = write_config(aws, vault, tmp_path, vault={"url": f"http://127.0.0.1:{free_port()}"})
    done = rotator("--config", str(config), "rotate", "alice")
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert aws.keys("alice") == {key.access_key_id: KeyStatus.ACTIVE}
    status = rotator("--config", str(config), "status")
    assert status.returncode == 0
    assert "no rotations" in status.stdout


def test_rotate_exits_3_when_vault_fails_mid_rotation_and_says_the_rotation_waits(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, fault_proxy: Any
) -> None:
    """Vault sealed after its checks: exit 3 (was 0), a line says the rotation waits."""
    [key] = aws.add_user("alice", keys=[SeedKey(10 * D)])
    # Health, token and mount checks pass; every KV call answers as a sealed Vault does.
    proxy: FaultProxy = fault_proxy(vault.addr)
    proxy.add(vault_path("GET", rf"/v1/{vault.mount}/"), vault_error(503, ["Vault is sealed"]))
    proxy.add(vault_path("POST", rf"/v1/{vault.mount}/"), vault_error(503, ["Vault is sealed"]))
    proxy.add(vault_path("PUT", rf"/v1/{vault.mount}/"), vault_error(503, ["Vault is sealed"]))
    config = write_config(aws, vault, tmp_path, vault={"url": proxy.url})
    done = rotator("--config", str(config), "rotate", "alice", "--json")
    assert done.returncode == 3, done.stderr
    shown = json.loads(done.stdout)
    assert shown["state"] in {s.value for s in UNSTORED}
    assert shown["last_error"]
    assert "waits in" in done.stderr
    assert "rotator run --once" in done.stderr
    assert f"Last error: {shown['last_error']}" in done.stderr
    # The new key was deleted (its secret could not be stored); the old one still works.
    assert aws.keys("alice") == {key.access_key_id: KeyStatus.ACTIVE}
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/alice") is None


def test_rotate_leaked_with_vault_unreachable_contains_the_key_and_exits_3(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A leak is contained without Vault; the replacement waits for Vault: exit 3."""
    [key] = aws.add_user("alice", keys=[SeedKey(10 * D)])
    down = write_config(aws, vault, tmp_path, vault={"url": f"http://127.0.0.1:{free_port()}"})
    done = rotator("--config", str(down), "rotate", "alice", "--key", key.access_key_id, "--leaked")
    assert done.returncode == 3, done.stderr
    assert "waits in" in done.stderr
    assert "rotator run --once" in done.stderr
    assert aws.keys("alice") == {key.access_key_id: KeyStatus.INACTIVE}

    # While it waits, the user's rotation is open: another `rotate` is a usage error.
    up = write_config(aws, vault, tmp_path)
    doc = json.loads(rotator("--config", str(up), "status", "--json").stdout)
    [waiting_rotation] = doc["rotations"]
    assert waiting_rotation["state"] in {s.value for s in UNSTORED}
    again = rotator("--config", str(up), "rotate", "alice")
    assert again.returncode == 2, again.stderr
