"""Adversarial review: faults and people acting at the worst moment, against the moto
server and the OpenBao dev server (through tests/faultproxy.py where a case needs it).

Each test states the behaviour the promise requires: never lock a consumer out, never
lose a secret, never delete or deactivate a key the rotator did not create. Tests that
pass pin a guarantee nothing else in the suite checks; the others reproduce a hole."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rotator.app import App
from rotator.engine import SimulatedCrash
from rotator.machine import State
from rotator.model import KeyStatus, Rotation
from rotator.policy import propose
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from rotator.state import SqliteStateStore
from tests.conftest import VaultTarget
from tests.faultproxy import (
    DropAfterApply,
    Exchange,
    FaultProxy,
    Reply,
    Respond,
    Stall,
    aws_action,
    aws_error,
    vault_error,
    vault_path,
)
from tests.rig import FakeClock, make_app, run_pass, settings_for, vault_secret, wait_until

D = timedelta(days=1)
USER = "alice"
PATH = f"aws/{ACCOUNT_ID}/{USER}"


@dataclass(frozen=True)
class ThenRespond:
    """Run `fn()` when the call arrives, then answer `reply` in IAM's place (the call
    never reaches IAM)."""

    fn: Callable[[], object]
    reply: Respond

    def perform(self, exchange: Exchange) -> Reply | None:
        self.fn()
        return self.reply.perform(exchange)


class Recorder:
    """A notifier that keeps what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def notify(self, event: str, rotation: Rotation, text: str) -> None:
        self.events.append((event, text))


def latest(settings: object) -> Rotation:
    store = SqliteStateStore(settings.state.path)  # type: ignore[attr-defined]
    try:
        r = store.latest_for(ACCOUNT_ID, USER)
    finally:
        store.close()
    assert r is not None
    return r


def person_creates_key(aws: LocalAws, status: KeyStatus = KeyStatus.ACTIVE) -> str:
    """A person creates a key for USER now (IAM stamps it with the real time)."""
    return aws.add_key(USER, SeedKey(timedelta(0), status=status)).access_key_id


def created_but_not_served(aws: LocalAws, vault: VaultTarget, original: set[str]) -> set[str]:
    """Keys the rotator created that are neither deleted nor what Vault serves."""
    held = vault_secret(vault, PATH)
    served = held["data"]["aws_access_key_id"] if held else None
    return {k for k in aws.keys(USER) if k not in original and k != served}


# --- attribution: a person's key inside the rotator's CreateAccessKey window ---------------


def test_a_key_created_by_a_person_while_create_access_key_is_throttled_is_left_alone(
    aws: LocalAws, vault: VaultTarget, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    """IAM throttles the rotator's CreateAccessKey (nothing minted) while a person creates
    a key: that key is never deleted."""
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)])
    proxy = fault_proxy(aws.endpoint_url)
    created: list[str] = []
    proxy.add(
        aws_action("CreateAccessKey"),
        ThenRespond(lambda: created.append(person_creates_key(aws)), aws_error("Throttling", 400)),
        times=1,
    )
    settings = settings_for(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    clock = FakeClock()
    run_pass(make_app(settings, clock))
    [mine] = created
    assert mine in aws.keys(USER), "the person's active key was deleted as the rotator's orphan"
    assert aws.keys(USER)[old.access_key_id] is KeyStatus.ACTIVE


def test_a_key_created_by_a_person_after_a_crash_and_after_the_call_window_is_left_alone(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A run dies after journalling its intent; once the window of its CreateAccessKey
    call has closed on IAM's clock (deadline plus tolerance: 7 s with a 1 s call
    timeout), a person adds a key; the recovering run never deletes that key and goes
    BLOCKED naming it."""
    clock = FakeClock()
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path, aws={"call_timeout": "1s"})

    def crash(point: str) -> None:
        if point == "create:intent_recorded":
            raise SimulatedCrash(point)

    app = make_app(settings, clock, fault=crash)
    try:
        app.run_once()
    except SimulatedCrash:
        pass
    finally:
        app.close()
    assert latest(settings).state is State.CREATE
    time.sleep(8)
    mine = person_creates_key(aws)
    run_pass(make_app(settings, clock))
    assert mine in aws.keys(USER), "the person's active key was deleted as the rotator's orphan"
    assert aws.keys(USER)[old.access_key_id] is KeyStatus.ACTIVE
    r = latest(settings)
    assert r.state is State.BLOCKED
    assert mine in (r.last_error or "")


def test_a_create_access_key_applied_after_its_timeout_leaves_no_orphan(
    aws: LocalAws, vault: VaultTarget, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    """CreateAccessKey reaches IAM only after the client timed out (a slow network): the
    key it minted is the rotator's and is deleted (or stored), never left as an unstored
    active key with the rotation BLOCKED on it."""
    clock = FakeClock()
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    proxy = fault_proxy(aws.endpoint_url)
    # Held past the call's 1 s read timeout, and let through within its deadline (2 s:
    # rotator.deadlines), the window in which the rotator counts a key as its own. Later
    # than that, only the engine's 2 s clock tolerance would cover it, less up to 1 s
    # for IAM's clock read from a Date header to the second (3 s failed 1 run in 12).
    proxy.add(aws_action("CreateAccessKey"), Stall(1.5), times=1)
    settings = settings_for(
        aws, vault, tmp_path, aws={"endpoint_url": proxy.url, "call_timeout": "1s"}
    )
    run_pass(make_app(settings, clock))
    wait_until(lambda: len(aws.keys(USER)) == 2, 10, "the late CreateAccessKey to land")
    for _ in range(3):
        clock.advance(timedelta(hours=1))
        run_pass(make_app(settings, clock))
    r = latest(settings)
    assert created_but_not_served(aws, vault, {old.access_key_id}) == set(), (
        f"the rotator's own key is left active with its secret lost ({r.state}: {r.last_error})"
    )


def test_the_rotators_own_key_is_recognised_when_the_host_clock_is_behind_iam(
    aws: LocalAws, vault: VaultTarget, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    """With the host clock 30 s behind IAM's, a key whose CreateAccessKey answer was lost
    is still recognised as the rotator's own: deleted, never left active and unstored."""
    clock = FakeClock(now=datetime.now(UTC) - timedelta(seconds=30))
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    proxy = fault_proxy(aws.endpoint_url)
    proxy.add(aws_action("CreateAccessKey"), DropAfterApply(), times=1)
    settings = settings_for(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    for _ in range(2):
        run_pass(make_app(settings, clock))
        clock.advance(timedelta(minutes=30))
    r = latest(settings)
    assert created_but_not_served(aws, vault, {old.access_key_id}) == set(), (
        f"{r.state}: {r.last_error}"
    )


# --- fencing: the lease judged on two different clocks --------------------------------------


def test_a_wall_clock_step_past_the_lease_stops_the_old_holder(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """The host's wall clock steps forward past A's lease (NTP after a VM resume) while
    A's own clock does not: B takes the rotation over (and, IAM's clock not having moved,
    waits for the window of A's CreateAccessKey to close); A then sends no IAM write."""
    clock = FakeClock()
    aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path)
    finished: list[State] = []

    def step_then_let_b_finish(point: str) -> None:
        if point != "create:intent_recorded" or finished:
            return
        clock.advance(settings.state.lease_ttl + timedelta(seconds=1))  # wall clock only
        b = make_app(settings, clock)
        try:
            [done] = b.advance_all([rid])
        finally:
            b.close()
        finished.append(done.state)

    a = App(
        settings,
        clock=clock,
        sleep=clock.sleep,
        fault=step_then_let_b_finish,
        monotonic=lambda: 0.0,
    )
    [opened] = a.scan_and_open().opened
    rid = opened.id
    a.advance_all([rid])
    assert finished == [State.CREATE]
    sent = a.default_iam().calls["iam:CreateAccessKey"]
    a.close()
    assert sent == 0, "A minted a key after B had taken the rotation over"
    assert len(aws.keys(USER)) == 1


# --- Vault writes that can never succeed -----------------------------------------------------


def test_a_soft_deleted_vault_secret_does_not_stop_rotation(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Vault's latest version at the path was soft-deleted (`kv delete`): the rotation
    still stores its new key and completes, instead of minting and deleting keys."""
    clock = FakeClock()
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    data = {"aws_access_key_id": old.access_key_id, "aws_secret_access_key": old.secret_access_key}
    vault.server.request("POST", f"/v1/{vault.mount}/data/{PATH}", {"data": data})
    vault.server.request("DELETE", f"/v1/{vault.mount}/data/{PATH}")
    settings = settings_for(aws, vault, tmp_path)
    app = make_app(settings, clock)
    try:
        app.run_once()
        created = app.default_iam().calls["iam:CreateAccessKey"]
    finally:
        app.close()
    r = latest(settings)
    assert r.state is State.DONE, f"{r.state}: {r.last_error} ({created} key(s) minted)"


def test_a_vault_that_never_accepts_a_write_ends_the_rotation_failed_and_notified(
    aws: LocalAws, vault: VaultTarget, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    """Vault answers reads but refuses every data write with a 500: after at most
    max_attempts minted (and deleted) keys the rotation ends FAILED and people are told,
    instead of a create-delete cycle every 15 minutes forever."""
    clock = FakeClock()
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    proxy = fault_proxy(vault.addr)
    proxy.add(vault_path("POST", rf"/v1/{vault.mount}/data/"), vault_error(500, ["internal"]))
    settings = settings_for(aws, vault, tmp_path, vault={"url": proxy.url})
    notes = Recorder()
    minted = 0
    for _ in range(12):
        app = App(settings, clock=clock, sleep=clock.sleep, notifier=notes)
        try:
            app.run_once()
            minted += app.default_iam().calls["iam:CreateAccessKey"]
        finally:
            app.close()
        clock.advance(timedelta(minutes=20))
    r = latest(settings)
    assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE}
    assert r.state is State.FAILED, f"{r.state} after {minted} keys minted: {r.last_error}"
    assert minted <= 8
    assert any(event == "failed" for event, _ in notes.events)


def test_a_leak_rotation_outlasts_a_long_vault_outage_and_replaces_the_key_after_it(
    aws: LocalAws, vault: VaultTarget, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    """A leaked key is contained while Vault is down for six hours. The user has no
    working key until the replacement lands, so the leak rotation never gives up (an age
    rotation would end FAILED after max_attempts); it looks again at least every two
    minutes and, once Vault answers, ends DONE with one working key that Vault serves."""
    clock = FakeClock()
    [leaked] = aws.add_user(USER, keys=[SeedKey(30 * D)], now=clock.now)
    proxy = fault_proxy(vault.addr)
    proxy.add(lambda request: True, vault_error(503, ["Vault is sealed"]))
    settings = settings_for(aws, vault, tmp_path, vault={"url": proxy.url})
    app = make_app(settings, clock)
    try:
        opened = app.report_leak(ACCOUNT_ID, USER, leaked.access_key_id, "INC-9")
        assert aws.keys(USER) == {leaked.access_key_id: KeyStatus.INACTIVE}
        for _ in range(40):
            [waiting] = app.advance_all([opened.id])
            assert waiting.state not in (State.FAILED, State.DONE), waiting.last_error
            assert waiting.next_action_at is not None
            assert waiting.next_action_at - clock.now <= timedelta(minutes=2)
            clock.advance(timedelta(minutes=9))
        assert waiting.attempts > 8
        assert [k for k, s in aws.keys(USER).items() if s is KeyStatus.ACTIVE] == []
        proxy.clear()
        [done] = app.advance_all([opened.id])
    finally:
        app.close()
    assert done.state is State.DONE, done.last_error
    held = vault_secret(vault, PATH)
    assert held is not None
    assert aws.keys(USER) == {held["data"]["aws_access_key_id"]: KeyStatus.ACTIVE}


# --- retirement: the old key is the user's last sound key ------------------------------------


def test_a_new_key_deleted_during_retirement_gets_the_old_key_back_at_the_next_pass(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """The old key is retired (inactive, kept 7 days) and a person deletes the new key:
    the next pass turns the old key back on, not only when the 7 days are over."""
    clock = FakeClock()
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path, policy={"delete_after": "7d"})
    run_pass(make_app(settings, clock))
    r = latest(settings)
    assert r.state is State.RETIRE
    assert r.new_key_id is not None
    aws.backend.delete_access_key(r.new_key_id, USER)
    clock.advance(timedelta(hours=1))
    run_pass(make_app(settings, clock))
    r = latest(settings)
    assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE}, (
        f"no active key for the user; rotation {r.state} until {r.next_action_at}"
    )


# --- no exception escapes a step -------------------------------------------------------------


def test_an_error_while_handling_a_vanished_key_is_recorded_on_the_rotation(
    aws: LocalAws, vault: VaultTarget, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    """DeleteAccessKey answers NoSuchEntity and the follow-up ListAccessKeys is throttled:
    the error is recorded on the rotation with a backoff, not lost in a log line."""
    clock = FakeClock()
    aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    proxy = fault_proxy(aws.endpoint_url)

    def throttle_listing() -> None:
        proxy.add(aws_action("ListAccessKeys"), aws_error("Throttling", 400), times=5)

    proxy.add(
        aws_action("DeleteAccessKey"),
        ThenRespond(throttle_listing, aws_error("NoSuchEntity", 404)),
        times=1,
    )
    settings = settings_for(aws, vault, tmp_path, aws={"endpoint_url": proxy.url})
    run_pass(make_app(settings, clock))
    r = latest(settings)
    assert r.state is State.DELETE
    assert r.last_error is not None, "the Throttling error escaped the step: nothing recorded"
    assert r.next_action_at is not None
    assert r.next_action_at > clock.now


# --- guarantees that hold (pinned: nothing else tests them) -----------------------------------


def test_vault_unreadable_at_deactivate_never_deactivates_the_old_key(
    aws: LocalAws, vault: VaultTarget, fault_proxy: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    """PASSES (pin): when Vault cannot be read at the re-check before DEACTIVATE, the old
    key stays active on every pass until the rotation gives up FAILED."""
    clock = FakeClock()
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    proxy = fault_proxy(vault.addr)
    settings = settings_for(
        aws, vault, tmp_path, vault={"url": proxy.url}, policy={"overlap": "1h"}
    )
    run_pass(make_app(settings, clock))
    first = latest(settings)
    assert first.state is State.OVERLAP
    proxy.add(vault_path("GET", rf"/v1/{vault.mount}/data/"), vault_error(503, ["sealed"]))
    clock.advance(timedelta(hours=2))
    for _ in range(10):
        run_pass(make_app(settings, clock))
        assert aws.keys(USER)[old.access_key_id] is KeyStatus.ACTIVE
        clock.advance(timedelta(minutes=20))
    store = SqliteStateStore(settings.state.path)
    try:
        r = store.get(first.id)
    finally:
        store.close()
    assert r is not None
    assert r.state is State.FAILED, (r.state, r.last_error)
    assert aws.keys(USER)[old.access_key_id] is KeyStatus.ACTIVE


def test_make_room_never_deletes_an_inactive_key_added_after_the_rotation_began(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """PASSES (pin): a cap-blocked rotation whose second key a person replaces by a new,
    inactive one stays BLOCKED naming that key, which is left alone."""
    clock = FakeClock()
    old, other = aws.add_user(USER, keys=[SeedKey(120 * D), SeedKey(10 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path)
    run_pass(make_app(settings, clock))
    assert latest(settings).state is State.BLOCKED
    time.sleep(1.1)  # IAM stamps CreateDate in whole seconds
    aws.backend.delete_access_key(other.access_key_id, USER)
    staged = person_creates_key(aws, KeyStatus.INACTIVE)
    clock.advance(timedelta(hours=1))
    run_pass(make_app(settings, clock))
    r = latest(settings)
    assert r.state is State.BLOCKED, (r.state, r.last_error)
    assert staged in (r.last_error or "")
    assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE, staged: KeyStatus.INACTIVE}


# --- a stalled process acts on a stale scan ----------------------------------------------------


def test_a_scan_that_went_stale_while_another_process_rotated_opens_nothing(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Process A scans (the key is due), then stalls; process B rotates the user to DONE
    meanwhile. When A goes on it must not open a second rotation from its stale scan,
    and a rotation opened from it anyway (an older scan, another store) ends CANCELLED at
    MAKE_ROOM without minting a key: the user keeps exactly the one key Vault serves."""
    clock = FakeClock()
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path)
    stalled = make_app(settings, clock)
    try:
        scanned_at = stalled.now()
        proposals = propose(stalled.scan().inventories[0].decisions)
        assert [p.old_key_id for p in proposals] == [old.access_key_id]

        clock.advance(timedelta(seconds=5))
        run_pass(make_app(settings, clock))  # process B
        done = latest(settings)
        assert done.state is State.DONE
        assert done.new_key_id is not None
        served = {done.new_key_id: KeyStatus.ACTIVE}
        assert aws.keys(USER) == served

        clock.advance(timedelta(seconds=5))
        assert stalled.open_rotations(proposals, scanned_at=scanned_at) == []
        [late] = stalled.open_rotations(proposals)  # as if the scan were older still
        [ended] = stalled.advance_all([late.id])
    finally:
        stalled.close()
    assert ended.state is State.CANCELLED, ended.last_error
    assert aws.keys(USER) == served
    held = vault_secret(vault, PATH)
    assert held is not None
    assert held["data"]["aws_access_key_id"] == done.new_key_id


# --- BLOCKED looks again on an interval, and at once when an operator asks ----------------------


def test_a_blocked_rotation_is_rechecked_every_few_minutes_and_at_once_by_run_once(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Two active due keys: BLOCKED. Ticks before the recheck interval cost no IAM call
    (a BLOCKED rotation is not "always due"); after an operator deactivates one key, the
    next tick past the 5-minute recheck resumes it, and `run --once` resumes it at once."""
    clock = FakeClock()
    _, k2 = aws.add_user(USER, keys=[SeedKey(120 * D), SeedKey(100 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path)
    app = make_app(settings, clock)
    try:
        app.run_once()
        assert latest(settings).state is State.BLOCKED
        before = sum(app.default_iam().calls.values())
        for _ in range(4):
            clock.advance(timedelta(minutes=1))
            assert app.tick() == []
        assert sum(app.default_iam().calls.values()) == before
        aws.backend.update_access_key(USER, k2.access_key_id, "Inactive")
        clock.advance(timedelta(minutes=2))
        [resumed] = app.tick()
        assert resumed.state is not State.BLOCKED, resumed.last_error
    finally:
        app.close()


def test_run_once_looks_at_a_blocked_rotation_before_its_recheck(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """An operator frees a slot and runs `run --once` a minute after the block: the pass
    resumes the rotation now instead of waiting for the 5-minute recheck."""
    clock = FakeClock()
    _, k2 = aws.add_user(USER, keys=[SeedKey(120 * D), SeedKey(100 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path)
    run_pass(make_app(settings, clock))
    assert latest(settings).state is State.BLOCKED
    aws.backend.update_access_key(USER, k2.access_key_id, "Inactive")
    clock.advance(timedelta(minutes=1))
    run_pass(make_app(settings, clock))
    assert latest(settings).state is not State.BLOCKED, latest(settings).last_error


def test_a_blocked_rotation_resumes_when_an_operator_deletes_a_key_instead(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """An operator frees the slot by deleting the other key (not deactivating it): the
    BLOCKED rotation goes back through MAKE_ROOM and ends DONE (it once stayed BLOCKED
    on an illegal BLOCKED -> CREATE transition)."""
    clock = FakeClock()
    _, k2 = aws.add_user(USER, keys=[SeedKey(120 * D), SeedKey(100 * D)], now=clock.now)
    settings = settings_for(aws, vault, tmp_path)
    run_pass(make_app(settings, clock))
    assert latest(settings).state is State.BLOCKED
    aws.backend.delete_access_key(k2.access_key_id, USER)
    clock.advance(timedelta(minutes=1))
    run_pass(make_app(settings, clock))
    done = latest(settings)
    assert done.state is State.DONE, done.last_error
    held = vault_secret(vault, PATH)
    assert held is not None
    assert aws.keys(USER) == {held["data"]["aws_access_key_id"]: KeyStatus.ACTIVE}
