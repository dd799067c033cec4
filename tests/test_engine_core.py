"""The engine on the in-memory fakes: whole rotations, a crash, a leak and a blocked user,
with no server and no real time (the contract suites hold the fakes to the adapters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from rotator.engine import Engine, SimulatedCrash, Timing, new_rotation
from rotator.errors import BackendUnavailable
from rotator.machine import State
from rotator.model import KeyStatus, Rotation, RotationReason
from rotator.ports import IamPort
from rotator.sandbox import ACCOUNT_ID, SeedKey
from rotator.testing import CapturingNotifier, FakeClock, FakeIam, FakeSecrets, FakeStateStore

D = timedelta(days=1)
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
TIMING = Timing(
    overlap=timedelta(0),
    overlap_limit=timedelta(0),
    delete_after=timedelta(0),
    verify_timeout=timedelta(seconds=10),
)
S = State
NORMAL_TRAIL = [
    S.PLANNED,
    S.MAKE_ROOM,
    S.CREATE,
    S.STORE,
    S.VERIFY,
    S.OVERLAP,
    S.DEACTIVATE,
    S.RETIRE,
    S.DELETE,
    S.DONE,
]


@dataclass
class Rig:
    """One account's IAM, a Vault, a state store and a clock, all in memory; engines
    built on them stand for successive processes."""

    clock: FakeClock = field(default_factory=lambda: FakeClock(T0))
    secrets: FakeSecrets = field(default_factory=FakeSecrets)
    notifier: CapturingNotifier = field(default_factory=CapturingNotifier)
    iam: FakeIam = field(init=False)
    store: FakeStateStore = field(init=False)

    def __post_init__(self) -> None:
        self.iam = FakeIam(ACCOUNT_ID, clock=self.clock)
        self.store = FakeStateStore(self.clock)

    def iam_of(self, account_id: str) -> IamPort:
        assert account_id == ACCOUNT_ID
        return self.iam

    def engine(self, owner: str = "engine-1", fault: Callable[[str], None] | None = None) -> Engine:
        return Engine(
            iam=self.iam_of,
            secrets=self.secrets,
            store=self.store,
            timing=TIMING,
            owner=owner,
            clock=self.clock,
            notifier=self.notifier,
            sleep=self.clock.sleep,
            fault=fault,
            monotonic=self.clock.monotonic,
        )

    def open(self, user: str, old_key_id: str, *, leaked: bool = False) -> Rotation:
        reason = RotationReason.LEAKED if leaked else RotationReason.AGE
        rotation = new_rotation(
            ACCOUNT_ID, user, reason, self.clock.now, old_key_id=old_key_id, leaked=leaked
        )
        return self.engine().open(rotation, "test")

    def path(self, user: str) -> str:
        return self.secrets.path_for(ACCOUNT_ID, user)

    def trail(self, rotation_id: str) -> list[State]:
        return [e.to_state for e in self.store.events(rotation_id) if e.from_state != e.to_state]

    def assert_vault_serves_the_users_one_active_key(self, user: str, r: Rotation) -> None:
        held = self.secrets.read(self.path(user))
        assert held is not None
        assert held.access_key_id == r.new_key_id
        assert held.metadata["access_key_id"] == r.new_key_id
        assert held.metadata["rotation_id"] == r.id
        assert self.iam.keys(user) == {r.new_key_id: KeyStatus.ACTIVE}
        assert self.iam.caller_arn(held.as_new_key()) == f"arn:aws:iam::{ACCOUNT_ID}:user/{user}"


def is_write(operation: str) -> bool:
    return operation.split(":")[1].startswith(("Create", "Update", "Delete"))


def crash_at(point: str) -> Callable[[str], None]:
    def fault(reached: str) -> None:
        if reached == point:
            raise SimulatedCrash(point)

    return fault


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_a_due_key_is_rotated_to_done_with_vault_serving_the_new_key(rig: Rig) -> None:
    """One advance takes a due key through every step to DONE: the new key is the user's
    only key, Active, stored in Vault with metadata naming it and its rotation, and it
    authenticates as the user; the old key is deleted."""
    [old] = rig.iam.add_user("alice", keys=[SeedKey(120 * D)])
    opened = rig.open("alice", old.access_key_id)

    done = rig.engine().advance(opened.id)

    assert done.state is State.DONE, done.last_error
    assert done.new_key_id is not None
    assert done.new_key_id != old.access_key_id
    rig.assert_vault_serves_the_users_one_active_key("alice", done)
    assert rig.trail(opened.id) == NORMAL_TRAIL
    assert rig.iam.calls["iam:CreateAccessKey"] == 1
    assert rig.notifier.events() == ["done"]


def test_a_crash_after_create_access_key_recovers_without_an_orphan_key(rig: Rig) -> None:
    """A process that dies between CreateAccessKey and recording the key leaves a key
    whose secret is lost; the next process finds it by the journalled intent, deletes it
    (Vault never held it), and rotates with a key of its own."""
    [old] = rig.iam.add_user("bob", keys=[SeedKey(120 * D)])
    opened = rig.open("bob", old.access_key_id)

    with pytest.raises(SimulatedCrash):
        rig.engine("crashed", fault=crash_at("create:created")).advance(opened.id)

    crashed = rig.store.get(opened.id)
    assert crashed is not None
    assert (crashed.state, crashed.intent_key_ids, crashed.new_key_id) == (
        State.CREATE,
        (old.access_key_id,),
        None,
    )
    [orphan] = set(rig.iam.keys("bob")) - {old.access_key_id}
    assert rig.secrets.read(rig.path("bob")) is None
    rig.clock.advance(TIMING.lease_ttl)  # a killed process's lease runs out

    done = rig.engine("restarted").advance(opened.id)

    assert done.state is State.DONE, done.last_error
    assert done.new_key_id != orphan
    rig.assert_vault_serves_the_users_one_active_key("bob", done)
    notes = [e.reason for e in rig.store.events(opened.id)]
    assert any(orphan in n and "orphan" in n for n in notes)
    assert rig.iam.calls["iam:CreateAccessKey"] == 2


def test_a_leak_rotation_contains_the_leaked_key_before_anything_else(rig: Rig) -> None:
    """A leak rotation sets the leaked key Inactive before any other IAM write (no new key
    is minted first), skips the overlap and retirement, and ends with the leaked key
    deleted and its replacement in Vault."""
    [leaked] = rig.iam.add_user("carol", keys=[SeedKey(30 * D)])
    writes: list[str] = []
    rig.iam.before_call = lambda op: writes.append(op) if is_write(op) else None
    opened = rig.open("carol", leaked.access_key_id, leaked=True)

    done = rig.engine().advance(opened.id)

    assert done.state is State.DONE, done.last_error
    assert writes == ["iam:UpdateAccessKey", "iam:CreateAccessKey", "iam:DeleteAccessKey"]
    assert rig.trail(opened.id) == [
        S.PLANNED,
        S.CONTAIN,
        S.MAKE_ROOM,
        S.CREATE,
        S.STORE,
        S.VERIFY,
        S.DELETE,
        S.DONE,
    ]
    rig.assert_vault_serves_the_users_one_active_key("carol", done)
    assert rig.notifier.events() == ["leaked_contained", "done"]


def test_a_leaked_key_is_contained_while_vault_is_down_and_replaced_once_it_is_back(
    rig: Rig,
) -> None:
    """With Vault unreachable the leaked key is still set Inactive at once; no key is
    minted whose secret could not be stored, and the rotation waits instead of failing.
    Once Vault answers again the replacement is made and stored."""
    [leaked] = rig.iam.add_user("dora", keys=[SeedKey(30 * D)])
    opened = rig.open("dora", leaked.access_key_id, leaked=True)

    def vault_down(operation: str) -> None:
        raise BackendUnavailable(f"Vault is unreachable ({operation})")

    rig.secrets.before_call = vault_down
    waiting = rig.engine().advance(opened.id)

    assert rig.iam.keys("dora") == {leaked.access_key_id: KeyStatus.INACTIVE}
    assert waiting.state not in (State.FAILED, State.DONE)
    assert waiting.next_action_at is not None
    assert waiting.next_action_at > rig.clock.now
    assert rig.iam.calls["iam:CreateAccessKey"] == 0

    rig.secrets.before_call = None
    rig.clock.advance(TIMING.leak_retry_cap)
    done = rig.engine().advance(opened.id)

    assert done.state is State.DONE, done.last_error
    rig.assert_vault_serves_the_users_one_active_key("dora", done)


def test_two_active_keys_block_the_rotation_and_stay_untouched(rig: Rig) -> None:
    """A due user with two Active keys goes BLOCKED (cap_blocked) with both keys as they
    were and no key created; once an operator deactivates the idle one, the next look
    frees that slot and the rotation ends DONE."""
    due, idle = rig.iam.add_user(
        "erin", keys=[SeedKey(120 * D), SeedKey(100 * D, last_used_ago=30 * D)]
    )
    both = {due.access_key_id: KeyStatus.ACTIVE, idle.access_key_id: KeyStatus.ACTIVE}
    opened = rig.open("erin", due.access_key_id)

    blocked = rig.engine().advance(opened.id)

    assert blocked.state is State.BLOCKED
    assert "cap_blocked" in (blocked.last_error or "")
    assert rig.iam.keys("erin") == both
    assert [op for op in rig.iam.calls if is_write(op)] == []
    assert rig.notifier.events() == ["blocked"]

    rig.iam.set_key_status("erin", idle.access_key_id, KeyStatus.INACTIVE)
    rig.clock.advance(TIMING.blocked_recheck)
    done = rig.engine().advance(opened.id)

    assert done.state is State.DONE, done.last_error
    rig.assert_vault_serves_the_users_one_active_key("erin", done)


def test_a_key_whose_vault_write_may_still_land_is_kept_then_deleted_and_replaced(
    rig: Rig,
) -> None:
    """When every write to Vault goes unanswered, the new key is kept (a write may still
    land, and Vault would then serve a deleted key) until the write deadline has passed;
    then recovery deletes it and makes another. The old key stays Active throughout."""
    [old] = rig.iam.add_user("finn", keys=[SeedKey(120 * D)])
    opened = rig.open("finn", old.access_key_id)

    def writes_time_out(operation: str) -> None:
        if operation == "vault:write":
            raise BackendUnavailable("Vault connection closed before an answer")

    rig.secrets.before_call = writes_time_out
    pending = rig.engine().advance(opened.id)

    assert pending.state is State.STORE
    assert pending.new_key_id is not None
    first_key = pending.new_key_id
    assert rig.iam.keys("finn") == {
        old.access_key_id: KeyStatus.ACTIVE,
        first_key: KeyStatus.ACTIVE,
    }

    rig.secrets.before_call = None
    rig.clock.advance(TIMING.vault_deadline)
    done = rig.engine().advance(opened.id)

    assert done.state is State.DONE, done.last_error
    assert done.new_key_id != first_key
    rig.assert_vault_serves_the_users_one_active_key("finn", done)
    notes = [e.reason for e in rig.store.events(opened.id)]
    assert any(first_key in n and "never reached Vault" in n for n in notes)


def test_rotation_retries_wait_10s_doubling_to_15min_and_leak_retries_at_most_2min() -> None:
    """The engine's retry schedule (`Timing.backoff`, on `rotator.backoff.retry_pause`):
    from `retry_base` doubling up to `retry_cap`, or up to `leak_retry_cap` for a leak
    rotation, whose user may have no working key meanwhile; VERIFY looks again after
    1, 2, 4, then every 8 seconds."""
    s = timedelta(seconds=1)
    assert [TIMING.backoff(n) for n in range(1, 10)] == [
        s * x for x in (10, 20, 40, 80, 160, 320, 640, 900, 900)
    ]
    assert [TIMING.backoff(n, leaked=True) for n in range(1, 6)] == [
        s * x for x in (10, 20, 40, 80, 120)
    ]
    assert TIMING.backoff(10**6) == TIMING.retry_cap
    assert [TIMING.verify_backoff(n) for n in range(1, 6)] == [s * x for x in (1, 2, 4, 8, 8)]


def test_store_retries_a_failed_vault_write_after_half_a_second_then_one_then_two(
    rig: Rig,
) -> None:
    """STORE tries the Vault write `store_tries` (4) times, sleeping 0.5, 1 and 2 seconds
    between tries (`Timing.store_backoff`), before it leaves the key to recovery."""
    [old] = rig.iam.add_user("gail", keys=[SeedKey(120 * D)])
    opened = rig.open("gail", old.access_key_id)
    writes: list[str] = []

    def writes_fail(operation: str) -> None:
        if operation == "vault:write":
            writes.append(operation)
            raise BackendUnavailable("Vault connection closed before an answer")

    rig.secrets.before_call = writes_fail
    pending = rig.engine().advance(opened.id)

    assert pending.state is State.STORE
    assert len(writes) == TIMING.store_tries == 4
    assert rig.clock.slept == [0.5, 1.0, 2.0]


def test_the_engine_reports_a_lease_it_took_over_and_a_write_it_was_fenced_from(rig: Rig) -> None:
    """Taking a lease its holder neither released nor renewed (a process that died) is
    reported as "taken_over"; a write refused because another process took the lease
    meanwhile (this one stalled past it) is reported as "fenced", and the stalled engine
    stops there, leaving the rotation to the new holder."""
    [old] = rig.iam.add_user("dora", keys=[SeedKey(120 * D)])
    opened = rig.open("dora", old.access_key_id)
    assert rig.store.acquire_lease(opened.id, "died", TIMING.lease_ttl) is not None
    rig.clock.advance(TIMING.lease_ttl)
    reported: list[str] = []

    def stall_then_lose_the_lease(reached: str) -> None:
        if reached == "moved:MAKE_ROOM->CREATE":
            rig.clock.advance(TIMING.lease_ttl)
            assert rig.store.acquire_lease(opened.id, "other", TIMING.lease_ttl) is not None

    engine = Engine(
        iam=rig.iam_of,
        secrets=rig.secrets,
        store=rig.store,
        timing=TIMING,
        owner="stalled",
        clock=rig.clock,
        sleep=rig.clock.sleep,
        fault=stall_then_lose_the_lease,
        on_lease=reported.append,
        monotonic=rig.clock.monotonic,
    )
    stopped = engine.advance(opened.id)
    assert reported == ["taken_over", "fenced"]
    assert stopped.state is State.CREATE
    assert [e.owner for e in rig.store.events(opened.id)][-1] == "stalled"
    assert set(rig.iam.keys("dora")) == {old.access_key_id}
