"""Crash recovery and hostile conditions, against the moto server and the OpenBao dev
server: a crash at every fault point, Vault going away mid-STORE, a CAS race, a user
deleted mid-rotation, IAM throttling and lost responses, two processes on one rotation,
and `run --once` killed with SIGKILL at random moments.

After each, the invariants of DESIGN.md are checked on what IAM, Vault and the state
store really hold, not on what the engine says it did."""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from structlog.testing import capture_logs

from rotator.app import App
from rotator.aws import AwsIam
from rotator.config import Settings, parse_settings
from rotator.engine import SimulatedCrash
from rotator.errors import Transient
from rotator.machine import TERMINAL, TRANSITIONS, State
from rotator.model import ForcedRotation, KeyStatus, NewKey, Rotation
from rotator.ports import IamPort, SecretStore
from rotator.sandbox import ACCOUNT_ID, LocalAws, SeedKey
from rotator.state import SqliteStateStore
from rotator.wiring import Wiring, build_secrets
from tests.conftest import VaultTarget
from tests.faultproxy import FaultProxy, vault_error, vault_path
from tests.rig import FakeClock, config_data, run_pass, settings_for, vault_secret

D = timedelta(days=1)
USER = "alice"
PATH = f"aws/{ACCOUNT_ID}/{USER}"

# The fault points each kind of rotation passes through, in order. A guard test keeps
# these lists equal to what the engine really calls, so that a new fault point cannot
# escape the crash matrix.
NORMAL_POINTS = (
    "moved:PLANNED->MAKE_ROOM",
    "moved:MAKE_ROOM->CREATE",
    "create:intent_recorded",
    "create:created",
    "create:recorded",
    "moved:CREATE->STORE",
    "store:written",
    "moved:STORE->VERIFY",
    "moved:VERIFY->OVERLAP",
    "moved:OVERLAP->DEACTIVATE",
    "deactivate:done",
    "moved:DEACTIVATE->RETIRE",
    "moved:RETIRE->DELETE",
    "delete:done",
    "moved:DELETE->DONE",
)
# A due key beside an inactive one: MAKE_ROOM deletes the inactive key first.
MAKE_ROOM_POINTS = (NORMAL_POINTS[0], "make_room:deleted", *NORMAL_POINTS[1:])
# (The leaked key is already off when the rotation opens: containment comes first and
# needs no rotation. CONTAIN's own deactivation is a fallback that is not reached here.)
LEAKED_POINTS = (
    "moved:PLANNED->CONTAIN",
    "moved:CONTAIN->MAKE_ROOM",
    "moved:MAKE_ROOM->CREATE",
    "create:intent_recorded",
    "create:created",
    "create:recorded",
    "moved:CREATE->STORE",
    "store:written",
    "moved:STORE->VERIFY",
    "moved:VERIFY->DELETE",
    "delete:done",
    "moved:DELETE->DONE",
)
SCENARIOS = {"normal": NORMAL_POINTS, "make_room": MAKE_ROOM_POINTS, "leaked": LEAKED_POINTS}

# One boto3 session for the in-process apps of this module: building botocore clients
# from a fresh session costs about a quarter of a second, most of a crash test's time.
_SESSION = boto3.session.Session()


def build(
    settings: Settings,
    clock: FakeClock | None = None,
    fault: Callable[[str], None] | None = None,
    *,
    iam: IamPort | None = None,
    secrets: SecretStore | None = None,
) -> App:
    """The real App, except that the AWS clients of its own account come from the
    module's shared session (and so skip the client-side IAM call-rate limit, which
    `test_ratelimit` covers; these tests make a few dozen calls each), and that `iam`
    and `secrets`, when given, replace the adapters the settings describe."""
    aws = settings.aws
    shared = AwsIam(
        region=aws.region,
        endpoint_url=str(aws.endpoint_url) if aws.endpoint_url else None,
        session=_SESSION,
    )
    wiring = Wiring(settings, clock=clock, default_iam=shared, iam=iam, secrets=secrets)
    return App(settings, wiring=wiring, sleep=clock.sleep if clock else None, fault=fault)


def fresh_report(aws: LocalAws) -> None:
    """Let moto answer GenerateCredentialReport with COMPLETE at once, as AWS does while
    a report younger than four hours exists (it saves every scan a 0.2 s poll)."""
    aws.backend.credential_report = True


def latest(settings: Settings, user: str = USER) -> Rotation:
    store = SqliteStateStore(settings.state.path)
    try:
        r = store.latest_for(ACCOUNT_ID, user)
    finally:
        store.close()
    assert r is not None
    return r


def events_of(settings: Settings, rotation_id: str) -> list[Any]:
    store = SqliteStateStore(settings.state.path)
    try:
        return store.events(rotation_id)
    finally:
        store.close()


def states_of(events: list[Any]) -> list[State]:
    """The states a rotation entered, in order (notes, whose from and to are equal,
    left out)."""
    return [e.to_state for e in events if e.from_state is None or e.from_state != e.to_state]


def vault_versions(vault: VaultTarget, path: str) -> dict[int, dict[str, Any]]:
    """Every version's data at `path` (raw API, root token)."""
    meta = vault.server.request("GET", f"/v1/{vault.mount}/metadata/{path}")
    out = {}
    for number in meta["data"]["versions"]:
        got = vault.server.request("GET", f"/v1/{vault.mount}/data/{path}?version={number}")
        out[int(number)] = got["data"]["data"]
    return out


def works_as_user(aws: LocalAws, key_id: str, secret: str, user: str = USER) -> bool:
    iam = AwsIam(region="us-east-1", endpoint_url=aws.endpoint_url, session=_SESSION)
    return iam.caller_arn(NewKey(key_id, secret)) == f"arn:aws:iam::{ACCOUNT_ID}:user/{user}"


# --- the watcher: a fault hook that checks invariants at every point -----------------


@dataclass
class Watch:
    """A fault hook that, at every fault point of every app it is given to, checks
    invariants 1 and 2 against the backends, remembers every key the user ever held,
    runs `also`, and raises `SimulatedCrash` at `crash_at` (once)."""

    aws: LocalAws
    vault: VaultTarget
    original: frozenset[str] = frozenset()
    crash_at: str | None = None
    also: Callable[[str], None] | None = None
    app: App | None = None
    points: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    max_keys: int = 0
    violations: list[str] = field(default_factory=list)
    crashed: bool = False

    def __call__(self, point: str) -> None:
        self.points.append(point)
        if self.also is not None:
            self.also(point)
        self.check(point)
        if point == self.crash_at and not self.crashed:
            self.crashed = True
            raise SimulatedCrash(point)

    def check(self, point: str) -> None:
        if USER not in self.aws.backend.users:
            return
        keys = self.aws.keys(USER)
        self.seen |= set(keys)
        self.max_keys = max(self.max_keys, len(keys))
        if len(keys) > 2:
            self.violations.append(f"{point}: {len(keys)} keys")
        assert self.app is not None
        r = self.app.store.latest_for(ACCOUNT_ID, USER)
        if r is None or r.old_key_id not in keys:
            return
        old_active = keys[r.old_key_id] is KeyStatus.ACTIVE
        if r.leaked:
            # Contain first: no new key may exist beside a leaked key that is active.
            if old_active and set(keys) - self.original:
                self.violations.append(f"{point}: a new key beside the active leaked key")
        elif not old_active:
            held = vault_secret(self.vault, PATH)
            stored = held is not None and held["data"]["aws_access_key_id"] == r.new_key_id
            if r.verified_at is None or not stored:
                self.violations.append(f"{point}: old key inactive before its replacement")


def seed(aws: LocalAws, scenario: str, clock: FakeClock) -> tuple[str, frozenset[str]]:
    """Create USER for `scenario`; return the id of the key to replace and all key ids."""
    fresh_report(aws)
    if scenario == "make_room":
        keys = aws.add_user(
            USER,
            keys=[SeedKey(200 * D, status=KeyStatus.INACTIVE), SeedKey(120 * D)],
            now=clock.now,
        )
        return keys[1].access_key_id, frozenset(k.access_key_id for k in keys)
    age = 5 * D if scenario == "leaked" else 120 * D
    [key] = aws.add_user(USER, keys=[SeedKey(age)], now=clock.now)
    return key.access_key_id, frozenset({key.access_key_id})


def start(app: App, scenario: str, old_key_id: str) -> None:
    """The first pass of `scenario`: a scan-driven run, or a forced leaked rotation."""
    try:
        if scenario == "leaked":
            app.force(
                ForcedRotation(
                    USER, key_id=old_key_id, leaked=True, reason="test: key on a paste site"
                )
            )
        else:
            app.run_once()
    finally:
        app.close()


def recover(
    settings: Settings, clock: FakeClock, watch: Watch, *, passes: int = 3
) -> tuple[Rotation, int]:
    """Run fresh apps (new lease owners, same state file) until the user's latest
    rotation is terminal; return it and how many passes that took."""
    for n in range(1, passes + 1):
        app = build(settings, clock, fault=watch)
        watch.app = app
        run_pass(app)
        r = latest(settings)
        if r.state in TERMINAL:
            return r, n
        if r.state is State.CREATE and r.intent_key_ids is not None and r.next_action_at:
            # The window of a crashed CreateAccessKey closes on IAM's clock (moto's, the
            # real one), which the test's clock does not move: wait it out for real.
            # (IAM's Date header has whole seconds: one more second of margin.)
            time.sleep(max(0.0, (r.next_action_at - clock.now).total_seconds()) + 1.0)
        clock.advance(timedelta(minutes=30))
    return r, passes


def assert_trail_complete(events: list[Any], r: Rotation, logs: list[dict[str, Any]]) -> None:
    """Invariant 6: the trail is one unbroken chain of legal moves from PLANNED to the
    final state, and every move was also logged as one `rotation.transition` event."""
    moves = [
        (e.from_state, e.to_state)
        for e in events
        if e.from_state is None or e.from_state != e.to_state
    ]
    assert moves[0] == (None, State.PLANNED)
    for (_, before), (frm, to) in itertools.pairwise(moves):
        assert frm == before, f"gap in the trail: {moves}"
        assert to in TRANSITIONS[frm], f"illegal move {frm} -> {to}"
    assert moves[-1][1] is r.state
    logged = [
        (State(e["from"]), State(e["to"]))
        for e in logs
        if e.get("event") == "rotation.transition" and e.get("rotation_id") == r.id
    ]
    assert logged == moves[1:]


def assert_rotated(aws: LocalAws, vault: VaultTarget, r: Rotation, watch: Watch) -> str:
    """Invariants 1 and 4 once the rotation is over; returns the new key id."""
    assert r.state is State.DONE, (r.state, r.last_error)
    keys = aws.keys(USER)
    # 1: exactly one key in the end, active; never more than two on the way.
    assert list(keys.values()) == [KeyStatus.ACTIVE]
    assert watch.max_keys <= 2
    [new_id] = keys
    assert new_id not in watch.original
    assert r.new_key_id == new_id
    # 4: every key the rotator created is in Vault or deleted: the one left is Vault's.
    held = vault_secret(vault, PATH)
    assert held is not None
    assert held["data"]["aws_access_key_id"] == new_id
    assert (watch.seen - watch.original) & set(keys) == {new_id}
    # What Vault holds is the key's real secret: it authenticates as the user.
    assert works_as_user(aws, new_id, held["data"]["aws_secret_access_key"])
    return new_id


# --- a crash at every fault point ------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fault_point_lists_match_what_the_engine_calls(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, scenario: str
) -> None:
    """An uncrashed rotation of each kind passes through exactly the fault points the
    crash matrix crashes at, in that order, so no point escapes the matrix."""
    clock = FakeClock()
    old_key_id, original = seed(aws, scenario, clock)
    watch = Watch(aws, vault, original=original)
    app = build(settings_for(aws, vault, tmp_path), clock, fault=watch)
    watch.app = app
    start(app, scenario, old_key_id)
    assert tuple(watch.points) == SCENARIOS[scenario]
    assert watch.violations == []


CRASHES = [(s, p) for s, points in sorted(SCENARIOS.items()) for p in points]


@pytest.mark.parametrize(("scenario", "point"), CRASHES, ids=[f"{s}-{p}" for s, p in CRASHES])
def test_crash_at_any_fault_point_recovers_with_invariants_intact(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, scenario: str, point: str
) -> None:
    """A process stopped dead at any fault point leaves a rotation that the next process
    (new lease owner, same state file) completes in one pass (two when the call it
    journalled may still have been in flight): one active key, held by
    Vault; the old key deactivated only after the new one was stored and verified (a
    leaked one contained first); one rotation; every move recorded and logged."""
    clock = FakeClock()
    old_key_id, original = seed(aws, scenario, clock)
    settings = settings_for(aws, vault, tmp_path)
    watch = Watch(aws, vault, original=original, crash_at=point)
    with capture_logs() as logs:
        app = build(settings, clock, fault=watch)
        watch.app = app
        with pytest.raises(SimulatedCrash):
            start(app, scenario, old_key_id)
        assert watch.points[-1] == point
        r, passes = recover(settings, clock, watch)
    # Killed between the journal and the call, the call may still be in flight: recovery
    # waits out its window (on IAM's clock) once; anywhere else it needs no waiting.
    assert passes == (2 if point == "create:intent_recorded" else 1), "recovery waited"
    assert watch.violations == []
    assert r.old_key_id == old_key_id
    assert_rotated(aws, vault, r, watch)
    # 5: recovery carried on with the crashed rotation; nothing else was opened.
    store = SqliteStateStore(settings.state.path)
    try:
        assert store.list_open() == []
        assert [x.id for x in store.list_recent(limit=100, user_name=USER)] == [r.id]
    finally:
        store.close()
    events = events_of(settings, r.id)
    assert_trail_complete(events, r, logs)
    states = states_of(events)
    if scenario == "leaked":
        assert states.index(State.CONTAIN) < states.index(State.CREATE)
        assert State.OVERLAP not in states
    else:
        # 2: DEACTIVATE (and RETIRE) only after the one VERIFY.
        assert states.count(State.VERIFY) == 1
        assert states.index(State.VERIFY) < states.index(State.DEACTIVATE)
        assert states.index(State.DEACTIVATE) < states.index(State.RETIRE)
    # 1: IAM never refused a key for lack of a slot (LimitExceeded was never provoked).
    assert not any("IAM refused" in e.reason for e in events)


def test_crash_during_recovery_itself_is_recovered_too(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A process killed after CreateAccessKey, then its successor killed while deleting
    the orphan (`recover:deleted`): a third process still ends DONE with one key."""
    clock = FakeClock()
    _, original = seed(aws, "normal", clock)
    settings = settings_for(aws, vault, tmp_path)
    watch = Watch(aws, vault, original=original, crash_at="create:created")
    app = build(settings, clock, fault=watch)
    watch.app = app
    with pytest.raises(SimulatedCrash):
        start(app, "normal", "")
    watch.crash_at, watch.crashed = "recover:deleted", False
    app = build(settings, clock, fault=watch)
    watch.app = app
    with pytest.raises(SimulatedCrash):
        run_pass(app)
    r, passes = recover(settings, clock, watch)
    assert passes == 1
    assert watch.violations == []
    assert_rotated(aws, vault, r, watch)
    assert len(watch.seen - original) == 2  # the orphan (now gone) and the key in Vault


# --- Vault unreachable during STORE ------------------------------------------------------


def test_vault_down_during_store_keeps_the_new_key_until_a_read_shows_vault_lacks_it(
    aws: LocalAws, own_vault: Callable[[], VaultTarget], tmp_path: Path
) -> None:
    """When Vault dies between CreateAccessKey and the write, nothing proves the write
    did not land: the new key is kept, the old one stays active, and the rotation waits
    in STORE with the error and an attempt counted. Once Vault answers again, a read
    shows it lacks the key, which is deleted then, and a later pass completes."""
    clock = FakeClock()
    fresh_report(aws)
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    first = own_vault()
    settings = settings_for(aws, first, tmp_path)
    doomed: set[str] = set()

    def kill_vault(point: str) -> None:
        if point == "create:recorded" and not doomed:
            doomed.update(set(aws.keys(USER)) - {old.access_key_id})
            first.server.stop()

    watch = Watch(aws, first, original=frozenset({old.access_key_id}), also=kill_vault)
    app = build(settings, clock, fault=watch)
    watch.app = app
    run_pass(app)
    assert "store:discarded" not in watch.points
    r = latest(settings)
    assert r.state is State.STORE
    assert r.attempts == 1
    assert "could not be read" in (r.last_error or "")
    assert r.next_action_at is not None
    assert r.next_action_at > clock.now
    assert len(doomed) == 1
    assert r.new_key_id == next(iter(doomed))
    assert aws.keys(USER) == {
        old.access_key_id: KeyStatus.ACTIVE,
        r.new_key_id: KeyStatus.ACTIVE,
    }

    # Vault is back (a new server, so new settings); before the retry is due, nothing moves.
    second = own_vault()
    settings = settings_for(aws, second, tmp_path)
    run_pass(build(settings, clock))
    assert latest(settings).state is State.STORE
    assert set(aws.keys(USER)) == {old.access_key_id, *doomed}

    assert r.next_action_at is not None
    clock.now = r.next_action_at
    watch.vault = second
    app = build(settings, clock, fault=watch)
    watch.app = app
    run_pass(app)
    done = latest(settings)
    assert done.id == r.id
    assert_rotated(aws, second, done, watch)
    assert watch.violations == []
    assert not doomed & set(aws.keys(USER)), "the unstored key was deleted once Vault answered"
    assert doomed.isdisjoint(aws.keys(USER))


def test_crash_right_after_the_unstorable_key_was_deleted_recovers(
    aws: LocalAws,
    vault: VaultTarget,
    fault_proxy: Callable[[str], FaultProxy],
    tmp_path: Path,
) -> None:
    """Vault refuses every write (503) but answers reads: a read shows it lacks the new
    key, which is deleted; a process killed right then (`store:discarded`, the rotation
    still in STORE) is recovered: back to MAKE_ROOM, then DONE."""
    clock = FakeClock()
    _, original = seed(aws, "normal", clock)
    proxy = fault_proxy(vault.addr)
    settings = settings_for(aws, vault, tmp_path, vault={"url": proxy.url})
    writes = vault_path("POST", rf"/v1/{vault.mount}/data/")
    proxy.add(writes, vault_error(503, ["Vault is sealed"]))
    watch = Watch(aws, vault, original=original, crash_at="store:discarded")
    app = build(settings, clock, fault=watch)
    watch.app = app
    with pytest.raises(SimulatedCrash):
        run_pass(app)
    assert latest(settings).state is State.STORE
    assert set(aws.keys(USER)) == original
    proxy.clear()
    r, _ = recover(settings, clock, watch)
    assert_rotated(aws, vault, r, watch)
    assert watch.violations == []


# --- a CAS race on the Vault path -------------------------------------------------------


class RacedSecrets:
    """The real Vault store, except that just before the engine's first write another
    writer (`race`) puts its own version at the path: the engine's check-and-set
    version, taken from its read a moment before, is then stale."""

    def __init__(self, inner: SecretStore, race: Callable[[str], None]) -> None:
        self._inner = inner
        self._race: Callable[[str], None] | None = race

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write(self, path: str, key: NewKey, metadata: Any, cas: int) -> int:
        if self._race is not None:
            race, self._race = self._race, None
            race(path)
        return self._inner.write(path, key, metadata, cas)


def raced_secrets(settings: Settings, race: Callable[[str], None]) -> RacedSecrets:
    return RacedSecrets(build_secrets(settings), race)


def test_cas_conflict_rereads_and_writes_over_the_other_version(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Someone writes the path between the engine's read and its CAS write: the write
    is refused, the engine retries with the current version and completes; Vault's
    latest version is the new key and the other write stays in the history."""
    clock = FakeClock()
    fresh_report(aws)
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)
    previous = {"aws_access_key_id": old.access_key_id, "aws_secret_access_key": "x" * 40}
    vault.server.request("POST", f"/v1/{vault.mount}/data/{PATH}", {"data": previous})
    other = {"aws_access_key_id": "AKIAOTHERWRITER00000", "aws_secret_access_key": "y" * 40}

    def race(path: str) -> None:
        vault.server.request("POST", f"/v1/{vault.mount}/data/{path}", {"data": other})

    watch = Watch(aws, vault, original=frozenset({old.access_key_id}))
    with capture_logs() as logs:
        settings = settings_for(aws, vault, tmp_path)
        app = build(settings, clock, fault=watch, secrets=raced_secrets(settings, race))
        watch.app = app
        run_pass(app)
    r = latest(settings_for(aws, vault, tmp_path))
    new_id = assert_rotated(aws, vault, r, watch)
    refused = [e for e in logs if e["event"] == "vault.write_failed"]
    assert len(refused) == 1
    assert "someone else wrote it" in refused[0]["error"]
    versions = vault_versions(vault, PATH)
    assert sorted(versions) == [1, 2, 3]
    assert versions[1] == previous
    assert versions[2] == other
    assert versions[3]["aws_access_key_id"] == new_id
    assert r.vault_version == 3


def test_unreadable_secret_at_the_path_fails_without_leaving_the_new_key(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """When another writer leaves something that is not a key pair at the path, the
    rotation fails (an operator must look), but the new key, whose secret cannot be
    stored, is deleted and the old key stays active (invariant 4)."""
    clock = FakeClock()
    fresh_report(aws)
    [old] = aws.add_user(USER, keys=[SeedKey(120 * D)], now=clock.now)

    def race(path: str) -> None:
        body = {"data": {"note": "hand-written by an operator"}}
        vault.server.request("POST", f"/v1/{vault.mount}/data/{path}", body)

    settings = settings_for(aws, vault, tmp_path)
    app = build(settings, clock, secrets=raced_secrets(settings, race))
    run_pass(app)
    r = latest(settings)
    assert r.state is State.FAILED
    assert "lacks" in (r.last_error or "")
    assert aws.keys(USER) == {old.access_key_id: KeyStatus.ACTIVE}


def test_recovery_with_an_unreadable_secret_at_the_path_deletes_the_orphan(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """A process killed after CreateAccessKey, and meanwhile the path got something that
    is not a key pair: recovery still deletes the orphan (it is not in Vault), and the
    rotation fails for an operator with only the old key left, active."""
    clock = FakeClock()
    old_key_id, original = seed(aws, "normal", clock)
    settings = settings_for(aws, vault, tmp_path)
    watch = Watch(aws, vault, original=original, crash_at="create:created")
    app = build(settings, clock, fault=watch)
    watch.app = app
    with pytest.raises(SimulatedCrash):
        start(app, "normal", old_key_id)
    body = {"data": {"note": "hand-written by an operator"}}
    vault.server.request("POST", f"/v1/{vault.mount}/data/{PATH}", body)
    r, _ = recover(settings, clock, watch)
    assert r.state is State.FAILED
    assert "lacks" in (r.last_error or "")
    assert aws.keys(USER) == {old_key_id: KeyStatus.ACTIVE}
    assert watch.violations == []


# --- the user deleted mid-rotation ---------------------------------------------------------


def delete_user(aws: LocalAws, name: str) -> None:
    """What an admin does in the console: delete the keys, detach policies, delete."""
    backend = aws.backend
    user = backend.users[name]
    for key in list(user.access_keys):
        backend.delete_access_key(key.access_key_id, name)
    for arn in list(user.managed_policies):
        backend.detach_user_policy(arn, name)
    backend.delete_user(name)


@pytest.mark.parametrize(
    "point",
    [
        "moved:PLANNED->MAKE_ROOM",
        "create:intent_recorded",
        "create:created",
        "store:written",
        "moved:VERIFY->OVERLAP",
        "deactivate:done",
        "moved:RETIRE->DELETE",
    ],
)
def test_user_deleted_mid_rotation_cancels_it(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, point: str
) -> None:
    """A user deleted from IAM at any point of a rotation ends it CANCELLED, with no
    exception escaping the pass."""
    clock = FakeClock()
    seed(aws, "normal", clock)

    def vanish(at: str) -> None:
        if at == point:
            delete_user(aws, USER)

    settings = settings_for(aws, vault, tmp_path)
    with capture_logs() as logs:
        app = build(settings, clock, fault=vanish)
        try:
            result = app.run_once()
        finally:
            app.close()
    [r] = result.rotations
    assert r.state is State.CANCELLED, (r.state, r.last_error)
    assert latest(settings).state is State.CANCELLED
    assert "no longer exists" in states_reason(settings, r.id)
    assert result.failures == {}
    assert not [e for e in logs if e["event"] == "rotation.advance_failed"]


def states_reason(settings: Settings, rotation_id: str) -> str:
    return events_of(settings, rotation_id)[-1].reason


# --- IAM throttling, and a CreateAccessKey whose answer is lost ---------------------------


class FlakyIam:
    """The real AwsIam, except that the first `times` calls of `operation` raise
    `Transient` like a `Throttling` answer. With `lost_answer` the call is made first
    and only its answer is lost (a read timeout): IAM did act."""

    def __init__(self, inner: IamPort, operation: str, times: int, lost_answer: bool) -> None:
        self._inner = inner
        self._operation = operation
        self._times = times
        self._lost_answer = lost_answer
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._inner, name)
        if name != self._operation:
            return real

        def flaky(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls > self._times:
                return real(*args, **kwargs)
            if self._lost_answer:
                real(*args, **kwargs)
                raise Transient(f"iam:{name}: read timeout")
            # What the AWS adapter makes of IAM's Throttling answer (HTTP 400): a
            # refusal, answered, certainly not applied.
            throttled = Transient(f"iam:{name}: Throttling: Rate exceeded")
            throttled.answered = throttled.not_applied = True
            raise throttled

        return flaky


def flaky_iam(aws: LocalAws, operation: str, times: int, *, lost_answer: bool) -> FlakyIam:
    inner = AwsIam(region="us-east-1", endpoint_url=aws.endpoint_url, session=_SESSION)
    return FlakyIam(inner, operation, times, lost_answer)


@pytest.mark.parametrize(
    ("operation", "state"),
    [
        ("create_access_key", State.CREATE),
        ("set_key_status", State.DEACTIVATE),
        ("delete_access_key", State.DELETE),
    ],
)
def test_throttling_waits_with_backoff_then_completes(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path, operation: str, state: State
) -> None:
    """IAM throttling one step twice: each time the rotation stays in that step with
    the attempt and the error recorded and a later next_action_at, leaves IAM alone
    until then, and completes on the pass after the backoff."""
    clock = FakeClock()
    _, original = seed(aws, "normal", clock)
    settings = settings_for(aws, vault, tmp_path)
    # One FlakyIam for every app of the test (the IAM of every account each app knows),
    # so that the count of failed calls carries over between passes.
    flaky = flaky_iam(aws, operation, 2, lost_answer=False)
    delays = []
    for attempt in (1, 2):
        run_pass(build(settings, clock, iam=flaky))
        r = latest(settings)
        assert r.state is state
        assert r.attempts == attempt
        assert "Throttling" in (r.last_error or "")
        assert r.next_action_at is not None
        assert r.next_action_at > clock.now
        delays.append(r.next_action_at - clock.now)
        # Not due yet: a pass changes nothing and does not call the throttled operation.
        calls = flaky.calls
        run_pass(build(settings, clock, iam=flaky))
        assert latest(settings) == r
        assert flaky.calls == calls
        clock.now = r.next_action_at
    assert delays[1] > delays[0]  # the backoff grows
    run_pass(build(settings, clock, iam=flaky))
    r = latest(settings)
    assert r.state is State.DONE, r.last_error
    assert r.attempts == 0
    assert r.last_error is None
    assert flaky.calls == 3
    assert len(aws.keys(USER)) == 1
    assert set(aws.keys(USER)).isdisjoint(original)


def test_create_access_key_answer_lost_leaves_no_orphan(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """CreateAccessKey mints a key but its answer is lost (a timeout, so the secret is
    never seen): the same step finds the key by its recorded intent and the call's
    window, deletes it and backs off; the next pass rotates with a fresh key: the only
    one left, in Vault."""
    clock = FakeClock()
    _, original = seed(aws, "normal", clock)
    settings = settings_for(aws, vault, tmp_path)
    flaky = flaky_iam(aws, "create_access_key", 1, lost_answer=True)
    watch = Watch(aws, vault, original=original)
    app = build(settings, clock, fault=watch, iam=flaky)
    watch.app = app
    run_pass(app)
    r = latest(settings)
    assert r.state is State.MAKE_ROOM
    assert r.intent_key_ids is None
    assert r.attempts == 1
    assert set(aws.keys(USER)) == original, "the orphan is gone at once"
    [orphan] = [e.reason.split()[3] for e in events_of(settings, r.id) if "orphan" in e.reason]
    assert orphan.startswith("AKIA")
    assert r.next_action_at is not None
    clock.now = r.next_action_at
    app = build(settings, clock, fault=watch, iam=flaky)
    watch.app = app
    run_pass(app)
    r = latest(settings)
    new_id = assert_rotated(aws, vault, r, watch)
    assert new_id != orphan
    assert orphan not in aws.keys(USER)
    assert watch.violations == []


# --- two processes advancing the same rotations ------------------------------------------

ADVANCE_SCRIPT = """
import json, sys, time
from pathlib import Path
from rotator import log
from rotator.app import App
from rotator.config import parse_settings

config, ready, go, *ids = sys.argv[1:]
log.configure("json", "INFO", stream=sys.stderr)
app = App(parse_settings(json.loads(Path(config).read_text()), {}))
app.engine
app.default_iam().account_id()
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.002)
states = {rid: app.engine.advance(rid).state.value for rid in ids}
app.close()
print(json.dumps(states))
"""


def settings_data(aws: LocalAws, vault: VaultTarget, tmp_path: Path) -> dict[str, Any]:
    """The configuration of tests/rig.py, as plain data for a subprocess."""
    return config_data(aws, vault, tmp_path)


def test_two_processes_advancing_the_same_rotations_create_one_key_each(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """Two OS processes released at the same instant advance the same three rotations
    (in opposite orders): every rotation ends DONE having created exactly one key,
    Vault holds one version per user, and neither process hit a stale save or IAM's
    key limit."""
    fresh_report(aws)
    users = ["u1", "u2", "u3"]
    for name in users:
        aws.add_user(name, keys=[SeedKey(120 * D)])
    data = settings_data(aws, vault, tmp_path)
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(data))
    settings = parse_settings(data, {})
    app = build(settings)
    try:
        ids = [r.id for r in app.scan_and_open().opened]
    finally:
        app.close()
    assert len(ids) == 3
    script = tmp_path / "advance.py"
    script.write_text(ADVANCE_SCRIPT)
    go = tmp_path / "go"
    procs = []
    for n, order in enumerate((ids, ids[::-1])):
        ready = tmp_path / f"ready{n}"
        procs.append(
            (
                ready,
                subprocess.Popen(
                    [sys.executable, str(script), str(config), str(ready), str(go), *order],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=os.environ.copy(),
                ),
            )
        )
    deadline = time.monotonic() + 30
    while not all(ready.exists() for ready, _ in procs):
        assert time.monotonic() < deadline, "the processes did not get ready"
        assert all(p.poll() is None for _, p in procs), [p.communicate() for _, p in procs]
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=60) for _, p in procs]
    for (_, p), (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert set(json.loads(out)) == set(ids)
        for bad in ("Traceback", "StaleRotation", "rotation.stale", "LimitExceeded"):
            assert bad not in err, err
        assert "advance_failed" not in err
    store = SqliteStateStore(settings.state.path)
    try:
        for rid in ids:
            r = store.get(rid)
            assert r is not None
            assert r.state is State.DONE, (r.state, r.last_error)
            keys = aws.keys(r.user_name)
            assert list(keys) == [r.new_key_id]
            created = [e for e in store.events(rid) if e.to_state is State.STORE]
            assert len(created) == 1
            versions = vault_versions(vault, f"aws/{ACCOUNT_ID}/{r.user_name}")
            assert [v["aws_access_key_id"] for v in versions.values()] == [r.new_key_id]
    finally:
        store.close()


# --- SIGKILL at random moments ---------------------------------------------------------------


def trail_length(db: Path) -> int:
    """How many events the state file holds (0 before the schema exists)."""
    try:
        conn = sqlite3.connect(db, timeout=5)
    except sqlite3.Error:
        return 0
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def run_and_kill(command: list[str], out: Path, db: Path, moment: Callable[[], bool]) -> bool:
    """Start `command`, SIGKILL it as soon as `moment()` says so; True when it was still
    running when killed (False: it had finished by itself)."""
    with open(out, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and not moment():
                time.sleep(0.002)
            running = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
    return running


@pytest.mark.slow
def test_run_once_killed_at_random_moments_still_rotates_everyone(
    aws: LocalAws, vault: VaultTarget, tmp_path: Path
) -> None:
    """`rotator run --once` killed with SIGKILL six times at random moments, then run
    to completion: every user rotated to one new active key that Vault holds, no
    rotation FAILED, never more than two keys, no old key deactivated before VERIFY."""
    seed_value = int(os.environ.get("ROTATOR_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed_value)
    why = f"ROTATOR_KILL_SEED={seed_value}"
    fresh_report(aws)
    users = [f"svc-{n}" for n in range(8)]
    original = {
        name: aws.add_user(name, keys=[SeedKey(120 * D)])[0].access_key_id for name in users
    }
    config = tmp_path / "rotator.yaml"
    config.write_text(json.dumps(settings_data(aws, vault, tmp_path)))  # JSON is YAML
    db = tmp_path / "state.db"
    command = [sys.executable, "-m", "rotator", "--config", str(config)]
    command += ["--log-format", "json", "--log-level", "DEBUG", "run", "--once"]
    interrupted = 0
    for n in range(6):
        if n % 2 == 0:
            # A random wall-clock moment: often start-up, the scan or opening rotations;
            # on a machine fast enough to finish the work before it, a moment in the
            # work instead (8 rotations write about 80 events; at most 40 pass).
            deadline = time.monotonic() + rng.uniform(0.2, 2.0)
            limit = trail_length(db) + rng.randint(1, 40)
            moment = functools.partial(
                lambda d, t: time.monotonic() >= d or trail_length(db) >= t, deadline, limit
            )
        else:
            # A random moment of the work itself, whatever the machine's speed: once the
            # trail has grown by 1 to 20 events.
            target = trail_length(db) + rng.randint(1, 20)
            moment = functools.partial(lambda t: trail_length(db) >= t, target)
        if run_and_kill(command, tmp_path / f"run{n}.log", db, moment):
            store = SqliteStateStore(db)
            interrupted += any(r.state not in TERMINAL for r in store.list_recent(limit=100))
            store.close()
        for name in users:
            assert len(aws.keys(name)) <= 2, why
    assert interrupted >= 1, f"no kill landed while rotations were open ({why})"
    for _ in range(4):
        final = subprocess.run(command, capture_output=True, text=True, timeout=60)
        store = SqliteStateStore(db)
        settled = store.list_open() == []
        store.close()
        if settled:
            break
        # A run killed between its journal and CreateAccessKey leaves a call that may
        # still be in flight: the next run waits out its window (6 s here, IAM's clock).
        time.sleep(7)
    assert final.returncode == 0, (why, final.stdout, final.stderr)

    store = SqliteStateStore(db)
    try:
        assert store.list_open() == [], why
        rotations = store.list_recent(limit=1000)
        assert not [r for r in rotations if r.state is State.FAILED], why
        for name in users:
            keys = aws.keys(name)
            assert list(keys.values()) == [KeyStatus.ACTIVE], (why, name)
            [new_id] = keys
            assert new_id != original[name], why
            held = vault_secret(vault, f"aws/{ACCOUNT_ID}/{name}")
            assert held is not None, why
            assert held["data"]["aws_access_key_id"] == new_id, why
            [r] = [r for r in rotations if r.user_name == name]
            assert r.state is State.DONE, why
            assert r.new_key_id == new_id, why
            states = states_of(store.events(r.id))
            assert states.index(State.VERIFY) < states.index(State.DEACTIVATE), (why, states)
    finally:
        store.close()
