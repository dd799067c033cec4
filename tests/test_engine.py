"""Full rotation cycles against the moto server and the OpenBao dev server."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from rotator.app import App
from rotator.aws import AwsIam
from rotator.config import Settings
from rotator.errors import Transient
from rotator.machine import State
from rotator.model import ForcedRotation, KeyStatus, NewKey
from rotator.ports import IamPort
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from rotator.wiring import Wiring
from tests.conftest import VaultTarget
from tests.rig import FakeClock, make_app, settings_for, vault_secret

D = timedelta(days=1)


def test_zero_overlap_cycle_leaves_one_working_key_in_vault(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """With overlap and delete_after 0s one pass rotates a due key to DONE: one active
    key, held in Vault with matching custom metadata, and it authenticates as the user."""
    clock = FakeClock()
    [old] = aws.add_user("alice", keys=[SeedKey(120 * D)], now=clock.now)
    app = make_app(settings_for(aws, vault, tmp_path), clock)
    result = app.run_once()
    [rotation] = result.rotations
    assert rotation.state is State.DONE, rotation.last_error
    keys = aws.keys("alice")
    assert list(keys.values()) == [KeyStatus.ACTIVE]
    assert old.access_key_id not in keys
    secret = vault_secret(vault, f"aws/{ACCOUNT_ID}/alice")
    assert secret is not None
    assert secret["data"]["aws_access_key_id"] == rotation.new_key_id == next(iter(keys))
    assert secret["metadata"]["access_key_id"] == rotation.new_key_id
    assert secret["metadata"]["rotation_id"] == rotation.id
    assert secret["metadata"]["rotated_at"]
    iam = AwsIam(region="us-east-1", endpoint_url=aws.endpoint_url)
    new = NewKey(secret["data"]["aws_access_key_id"], secret["data"]["aws_secret_access_key"])
    assert iam.caller_arn(new) == f"arn:aws:iam::{ACCOUNT_ID}:user/alice"


def test_second_pass_makes_no_iam_change(aws: LocalAws, vault: VaultTarget, tmp_path: Path) -> None:
    """After everything is rotated, another pass sends no write call to IAM."""
    clock = FakeClock()
    for name in ("a", "b", "c"):
        aws.add_user(name, keys=[SeedKey(100 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path)
    first = make_app(settings, clock).run_once()
    assert {r.state for r in first.rotations} == {State.DONE}
    second_app = make_app(settings, clock)
    second = second_app.run_once()
    assert second.opened == []
    writes = [
        op
        for op in second_app.default_iam().calls
        if any(w in op for w in ("Create", "Update", "Delete"))
    ]
    assert writes == []


def test_overlap_keeps_old_key_active_until_it_passes(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """With a 24h overlap the old key stays active while Vault already holds the new
    one; later passes deactivate it after the overlap and delete it after delete_after."""
    clock = FakeClock()
    [old] = aws.add_user("bob", keys=[SeedKey(120 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path, policy={"overlap": "24h", "delete_after": "7d"})
    [r] = make_app(settings, clock).run_once().rotations
    assert r.state is State.OVERLAP
    assert aws.keys("bob")[old.access_key_id] is KeyStatus.ACTIVE
    assert vault_secret(vault, f"aws/{ACCOUNT_ID}/bob")["data"]["aws_access_key_id"] == r.new_key_id  # type: ignore[index]

    clock.advance(timedelta(hours=23))
    [r] = make_app(settings, clock).run_once().rotations
    assert r.state is State.OVERLAP
    assert aws.keys("bob")[old.access_key_id] is KeyStatus.ACTIVE

    clock.advance(timedelta(hours=2))
    [r] = make_app(settings, clock).run_once().rotations
    assert r.state is State.RETIRE
    assert aws.keys("bob")[old.access_key_id] is KeyStatus.INACTIVE

    clock.advance(7 * D)
    [r] = make_app(settings, clock).run_once().rotations
    assert r.state is State.DONE
    assert list(aws.keys("bob")) == [r.new_key_id]


def test_rollback_reactivates_a_retired_old_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Rollback turns a deactivated old key back on and ends the rotation ROLLED_BACK."""
    clock = FakeClock()
    [old] = aws.add_user("carol", keys=[SeedKey(120 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path, policy={"delete_after": "7d"})
    app = make_app(settings, clock)
    [r] = app.run_once().rotations
    assert r.state is State.RETIRE
    assert aws.keys("carol")[old.access_key_id] is KeyStatus.INACTIVE
    rolled = app.engine.rollback(r, "test")
    assert rolled.state is State.ROLLED_BACK
    assert aws.keys("carol")[old.access_key_id] is KeyStatus.ACTIVE


def test_two_active_keys_block_and_stay_untouched(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A due user with two active keys ends BLOCKED with both keys unchanged; once an
    operator deactivates one, the next pass rotates."""
    clock = FakeClock()
    k1, k2 = aws.add_user("dave", keys=[SeedKey(120 * D), SeedKey(100 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path)
    result = make_app(settings, clock).run_once()
    [r] = result.rotations
    assert r.state is State.BLOCKED
    assert "cap_blocked" in (r.last_error or "")
    assert aws.keys("dave") == {
        k1.access_key_id: KeyStatus.ACTIVE,
        k2.access_key_id: KeyStatus.ACTIVE,
    }

    aws.backend.update_access_key("dave", k2.access_key_id, "Inactive")
    [r] = make_app(settings, clock).run_once().rotations
    assert r.state is State.DONE, r.last_error
    assert list(aws.keys("dave")) == [r.new_key_id]


def test_inactive_key_beside_due_key_is_deleted_to_make_room(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """An inactive key frees the slot the replacement needs; the cap is never exceeded."""
    clock = FakeClock()
    _inactive, _active = aws.add_user(
        "erin", keys=[SeedKey(200 * D, status=KeyStatus.INACTIVE), SeedKey(120 * D)], now=clock.now
    )
    [r] = make_app(settings_for(aws, vault, tmp_path), clock).run_once().rotations
    assert r.state is State.DONE
    assert list(aws.keys("erin")) == [r.new_key_id]


def test_forced_rotation_of_user_without_keys_issues_a_first_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """`rotate` on a user with no key creates one, stores it in Vault, and is DONE."""
    clock = FakeClock()
    aws.add_user("frank", now=clock.now)
    app = make_app(settings_for(aws, vault, tmp_path), clock)
    r = app.force(ForcedRotation("frank", reason="onboarding"))
    assert r.state is State.DONE, r.last_error
    assert list(aws.keys("frank")) == [r.new_key_id]
    assert (
        vault_secret(vault, f"aws/{ACCOUNT_ID}/frank")["data"]["aws_access_key_id"] == r.new_key_id
    )  # type: ignore[index]


class SlowToAccept:
    """IAM whose new keys are refused by STS for the first `refusals` calls, as real IAM
    refuses a fresh key for a few seconds (moto accepts at once)."""

    def __init__(self, inner: IamPort, refusals: int) -> None:
        self._inner = inner
        self.refusals = refusals
        self.verify_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def caller_arn(self, key: NewKey) -> str:
        self.verify_calls += 1
        if self.verify_calls <= self.refusals:
            raise Transient(
                "sts:GetCallerIdentity: new key not accepted yet (InvalidClientTokenId)"
            )
        return self._inner.caller_arn(key)


def slow_app(settings: Settings, clock: FakeClock, refusals: int) -> tuple[App, SlowToAccept]:
    """An App whose IAM is the real one wrapped in `SlowToAccept`."""
    aws = settings.aws
    real = AwsIam(region=aws.region, endpoint_url=str(aws.endpoint_url))
    slow = SlowToAccept(real, refusals)
    wiring = Wiring(settings, clock=clock, iam=slow)
    return App(settings, wiring=wiring, sleep=clock.sleep), slow


def test_verify_waits_for_eventual_consistency_without_blocking(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A new key refused for a while is retried from VERIFY with growing pauses between
    passes of the scheduler loop, and the rotation completes; the old key stays active
    until then."""
    clock = FakeClock()
    [old] = aws.add_user("hal", keys=[SeedKey(120 * D)], now=clock.now)
    app, iam = slow_app(settings_for(aws, vault, tmp_path), clock, refusals=3)
    [r] = app.run_once().rotations
    assert r.state is State.DONE, r.last_error
    assert iam.verify_calls == 4
    assert clock.slept == [1, 2, 4]
    assert list(aws.keys("hal")) == [r.new_key_id]
    assert old.access_key_id not in aws.keys("hal")


def test_verify_gives_up_after_verify_timeout_keeping_the_old_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A new key that never works fails the rotation once verify_timeout has passed; the
    old key is still active (a consumer is never locked out)."""
    clock = FakeClock()
    [old] = aws.add_user("ida", keys=[SeedKey(120 * D)], now=clock.now)
    app, _ = slow_app(
        settings_for(aws, vault, tmp_path, policy={"verify_timeout": "20s"}), clock, refusals=10**6
    )
    [r] = app.run_once().rotations
    assert r.state is State.FAILED
    assert "verify_timeout" in (r.last_error or "")
    assert aws.keys("ida")[old.access_key_id] is KeyStatus.ACTIVE
    assert 20 <= sum(clock.slept) < 30


def test_a_rotation_costs_at_most_seven_iam_calls_and_one_sts_call(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """From MAKE_ROOM to DONE, across three passes (overlap and retirement waits), a
    rotation sends at most 7 IAM calls and 1 STS call: one listing per pass (the one
    after the overlap re-checks the new key before the old one is deactivated)."""
    clock = FakeClock()
    aws.add_user("joe", keys=[SeedKey(120 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path, policy={"overlap": "1h", "delete_after": "1d"})
    app = make_app(settings, clock)
    proposals = app.scan_and_open().opened
    iam = app.default_iam()
    before = dict(iam.calls)
    for step in (timedelta(0), timedelta(hours=2), timedelta(days=2)):
        clock.advance(step)
        [r] = app.advance_all([proposals[0].id])
    assert r.state is State.DONE
    spent = {op: n - before.get(op, 0) for op, n in iam.calls.items() if n - before.get(op, 0)}
    assert sum(n for op, n in spent.items() if op.startswith("iam:")) <= 7, spent
    assert spent.get("sts:GetCallerIdentity") == 1, spent


def test_a_process_stalled_past_its_lease_makes_no_side_effect_after_a_takeover(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Process A stalls after journalling its intent, past its lease; B takes the
    rotation over (and waits out the window of A's CreateAccessKey, which IAM's clock
    has not passed). When A resumes, the CreateAccessKey it was about to send is never
    sent: its lease is gone, and it stops without writing."""
    clock = FakeClock()
    [old] = aws.add_user("joe", keys=[SeedKey(120 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path)
    stalled = {"seconds": 0.0}
    taken_over: list[State] = []

    def stall_then_let_b_take_over(point: str) -> None:
        if point != "create:intent_recorded" or taken_over:
            return
        # A stops here (a GC or VM pause) for longer than its lease, on every clock.
        pause = settings.state.lease_ttl + timedelta(seconds=1)
        stalled["seconds"] += pause.total_seconds()
        clock.advance(pause)
        b = make_app(settings, clock)
        [seen] = b.advance_all([rid])
        taken_over.append(seen.state)
        b.close()

    a = App(
        settings,
        clock=clock,
        sleep=clock.sleep,
        fault=stall_then_let_b_take_over,
        monotonic=lambda: stalled["seconds"],
    )
    [opened] = a.scan_and_open().opened
    rid = opened.id
    [after] = a.advance_all([rid])
    assert taken_over == [State.CREATE]
    assert after.state is State.CREATE
    assert a.default_iam().calls["iam:CreateAccessKey"] == 0
    assert aws.keys("joe") == {old.access_key_id: KeyStatus.ACTIVE}
    a.close()
