"""Console password rotations on the in-memory fakes (FakeIam enforces the account's
password policy, which moto does not): IAM refusing a password after the policy changed,
Vault refusing the rotator, a user deleted mid-rotation, owners warned before a console
password is rotated, and a user who may not have two console rotations at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from rotator.app import App
from rotator.config import parse_settings
from rotator.errors import RotationExists, RotatorError
from rotator.machine import RotationKind, State
from rotator.model import ForcedRotation, PasswordPolicy, Rotation
from rotator.passwords import problems
from rotator.sandbox import ACCOUNT_ID
from rotator.testing import (
    CapturingNotifier,
    FakeClock,
    FakeIam,
    FakeSecrets,
    FakeStateStore,
)
from rotator.wiring import Wiring

D = timedelta(days=1)
USER = "bob"
OLD = "Old-Password-1234!"  # a test's own password
PATH = f"aws/{ACCOUNT_ID}/{USER}/console"


@dataclass
class Owners:
    """An owner notifier that keeps every digest it is handed."""

    sent: list[tuple[str, str, str, tuple[str, ...]]] = field(default_factory=list)

    def warn_owner(self, owner: str, subject: str, text: str, key_ids: Sequence[str]) -> bool:
        self.sent.append((owner, subject, text, tuple(key_ids)))
        return True


@dataclass
class Rig:
    app: App
    iam: FakeIam
    secrets: FakeSecrets
    store: FakeStateStore
    clock: FakeClock
    owners: Owners


def rig(**sections: Any) -> Rig:
    clock = FakeClock()
    data: dict[str, Any] = {"policy": {"overlap": "0s"}, **sections}
    settings = parse_settings(data, {"VAULT_TOKEN": "test-token-not-real"})
    iam, secrets, store, owners = (
        FakeIam(clock=clock),
        FakeSecrets(),
        FakeStateStore(clock),
        Owners(),
    )
    wiring = Wiring(
        settings,
        clock=clock,
        iam=iam,
        secrets=secrets,
        store=store,
        notifier=CapturingNotifier(),
        owner_notifier=owners,
    )
    return Rig(App(settings, wiring=wiring, sleep=clock.sleep), iam, secrets, store, clock, owners)


def force(r: Rig, *, create: bool = False) -> Rotation:
    return r.app.force(ForcedRotation(USER, kind=RotationKind.CONSOLE, create=create))


def test_a_password_refused_after_the_policy_changed_is_replaced_by_one_that_fits() -> None:
    """The policy grows stricter between STORE and SET_PASSWORD: IAM refuses the stored
    password, the rotation goes back to STORE, makes one under the new policy, and ends
    DONE with Vault's latest password being IAM's; the refused one stays in history."""
    r = rig()
    r.iam.add_user(USER)
    r.iam.add_login_profile(USER, OLD, age=100 * D)
    strict = PasswordPolicy(minimum_length=100, require_symbols=True)

    def tighten(operation: str) -> None:
        if operation == "iam:UpdateLoginProfile" and r.iam.account_password_policy is None:
            r.iam.account_password_policy = strict

    r.iam.before_call = tighten
    done = force(r)
    assert done.state is State.DONE, (done.state, done.last_error)
    held = r.secrets.read_password(PATH)
    assert held is not None
    assert held.version == 2
    assert r.iam.login_password(USER) == (held.password, True)
    assert problems(held.password, strict) == []
    moves = [(e.from_state, e.to_state) for e in r.store.events(done.id)]
    assert (State.SET_PASSWORD, State.STORE) in moves


def test_three_refused_passwords_block_with_iam_unchanged_and_a_later_look_finishes() -> None:
    """A policy no password of this rotator can meet (IAM refuses every one): after
    three, the rotation is BLOCKED saying to check the policy, IAM unchanged. Once the
    policy is fixed, the next look makes a new password and finishes."""
    r = rig()
    r.iam.add_user(USER)
    r.iam.add_login_profile(USER, OLD, age=100 * D)
    refuse = PasswordPolicy(minimum_length=129)  # longer than IAM takes

    def refusing(operation: str) -> None:
        if operation == "iam:UpdateLoginProfile":
            r.iam.account_password_policy = refuse

    r.iam.before_call = refusing
    blocked = force(r)
    assert blocked.state is State.BLOCKED, (blocked.state, blocked.last_error)
    assert "GetAccountPasswordPolicy" in (blocked.last_error or "")
    assert r.iam.login_password(USER) == (OLD, False)
    r.iam.before_call = None
    r.iam.account_password_policy = None
    r.clock.advance(timedelta(hours=1))
    [done] = r.app.advance_all([blocked.id], recheck_blocked=True)
    assert done.state is State.DONE, (done.state, done.last_error)
    held = r.secrets.read_password(PATH)
    assert held is not None
    assert r.iam.login_password(USER) == (held.password, True)


def test_a_refused_vault_write_never_touches_iam_and_a_refused_iam_blocks_without_giving_up() -> (
    None
):
    """Vault refusing the rotator before anything is written ends the rotation FAILED
    with IAM unchanged; IAM refusing UpdateLoginProfile (permissions) once the password
    is in Vault leaves it BLOCKED, never FAILED: Vault holds a password IAM does not
    have, and the rotation sets it once IAM lets it."""
    r = rig()
    r.iam.add_user(USER)
    r.iam.add_login_profile(USER, OLD, age=100 * D)

    def deny_update(operation: str) -> None:
        if operation == "iam:UpdateLoginProfile":
            raise RotatorError("iam:UpdateLoginProfile: refused: AccessDenied")

    r.iam.before_call = deny_update
    blocked = force(r)
    assert blocked.state is State.BLOCKED, (blocked.state, blocked.last_error)
    assert "IAM" in (blocked.last_error or "")
    assert r.iam.login_password(USER) == (OLD, False)
    r.iam.before_call = None
    r.clock.advance(timedelta(hours=1))
    [done] = r.app.advance_all([blocked.id], recheck_blocked=True)
    assert done.state is State.DONE
    held = r.secrets.read_password(PATH)
    assert held is not None
    assert held.version == 1
    assert r.iam.login_password(USER) == (held.password, True)


def test_a_user_deleted_mid_rotation_cancels_it() -> None:
    """The user is deleted after its new password reached Vault: the rotation ends
    CANCELLED (nothing to set), not FAILED or retried forever."""
    r = rig()
    r.iam.add_user(USER)
    r.iam.add_login_profile(USER, OLD, age=100 * D)

    deleted: list[str] = []

    def delete_user(operation: str) -> None:
        if operation == "iam:UpdateLoginProfile" and not deleted:
            deleted.append(USER)
            r.iam.delete_user(USER)

    r.iam.before_call = delete_user
    ended = force(r)
    assert ended.state is State.CANCELLED, (ended.state, ended.last_error)


def test_one_open_console_rotation_per_user_and_a_key_rotation_beside_it() -> None:
    """A second forced console rotation while one is open is refused (RotationExists);
    the user's key can still be rotated meanwhile."""
    r = rig()
    r.iam.add_user(USER)
    r.iam.add_login_profile(USER, OLD, age=100 * D)
    request = ForcedRotation(USER, kind=RotationKind.CONSOLE)
    first = r.app.open_forced(request)
    with pytest.raises(RotationExists):
        r.app.open_forced(request)
    key = r.app.open_forced(ForcedRotation(USER))
    assert {first.kind, key.kind} == {RotationKind.CONSOLE, RotationKind.KEY}


def test_owners_are_warned_of_a_coming_console_rotation_once_per_stage() -> None:
    """Under `console: rotate`, a password 85 days old (due at 90) is in its owner's
    digest at the 7d stage, named as a console password; the next pass sends nothing
    more; and no password is in any digest."""
    r = rig(
        policy={"overlap": "0s", "console": "rotate"},
        notify={"owner_tag": "owner", "warn_before": ["14d", "7d", "1d"]},
    )
    r.iam.add_user(USER, tags={"owner": "@bob-team"})
    r.iam.add_login_profile(USER, OLD, age=85 * D)
    r.app.run_once()
    [(owner, _, text, ids)] = r.owners.sent
    assert owner == "@bob-team"
    assert ids == (f"console:{USER}",)
    assert "console password: will be rotated" in text
    assert "7d notice" in text
    assert OLD not in text
    r.app.run_once()
    assert len(r.owners.sent) == 1
    assert r.iam.login_password(USER) == (OLD, False)
