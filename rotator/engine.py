"""The engine: advances one rotation one step at a time, under a lease.

Every step reads the real state in IAM and Vault first and does nothing when its effect
is already there, so rerunning a step after a crash is harmless. The secret of a new key
goes from `CreateAccessKey` straight to Vault: until Vault holds it, only the call that
created it keeps it, and the log scrubber knows it meanwhile (`log.register_secret`) so
that no log line can show it. It never reaches the state store, an event or an error.
If the process dies before Vault holds it, recovery finds the key Vault does not hold
and deletes it (its secret is lost for good; an unused key must not linger).

Invariants this module keeps (DESIGN.md):
  1. never a third key: CREATE runs only with a free slot, re-read just before;
  2. a non-leaked old key is deactivated (and deleted) only after a fresh look shows its
     replacement exists, is Active, and is what Vault serves;
  4. after recovery every key the rotator created is in Vault or deleted, and a key is
     deleted only after a successful read shows that Vault does not hold it;
  5. one rotation per user in flight (the state store's index, plus a fenced lease per
     rotation: a process that lost its lease makes no further side effect or write);
  6. every transition is recorded with a reason and logged as one event.

Fencing: the lease is taken for `lease_ttl` on a clock that keeps counting while the
process is stopped (CLOCK_BOOTTIME), measured from before the request that took it. No
IAM or Vault side effect starts unless at least one call deadline (`rotator.deadlines`)
is left; otherwise the lease is renewed first, and a renewal that finds another holder
ends the work (`LeaseLost`). Every state-store write carries the lease and is refused
once it is no longer current.

Attribution: a key is this rotation's own only when it is absent from the intent list
*and* was created inside the window of the rotation's own CreateAccessKey call. Any
other key that appears is never deleted or deactivated: the rotation goes BLOCKED and
names it.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from rotator import log
from rotator.backoff import retry_pause
from rotator.commands import suggested
from rotator.deadlines import call_deadline, iam_create_deadline, vault_call_deadline
from rotator.durations import format_duration
from rotator.errors import (
    BadInput,
    CapConflict,
    CasConflict,
    LeaseLost,
    NotFound,
    PasswordRefused,
    RotatorError,
    StaleRotation,
    Transient,
)
from rotator.machine import TERMINAL, RotationKind, State, check_transition
from rotator.model import (
    AccessKey,
    KeyStatus,
    Lease,
    NewKey,
    Rotation,
    RotationReason,
    StoredPassword,
    StoredSecret,
)
from rotator.passwords import new_password
from rotator.ports import Clock, IamPort, Notifier, SecretStore, StateStore, key_ids

_log = log.get_logger("rotator.engine")


class SimulatedCrash(BaseException):
    """Raised by a test's fault hook to stop the engine dead at a named point. It
    derives from BaseException so that no `except Exception` in the engine catches it."""


@dataclass(frozen=True)
class Timing:
    overlap: timedelta
    overlap_limit: timedelta
    delete_after: timedelta
    verify_timeout: timedelta
    lease_ttl: timedelta = timedelta(minutes=5)
    # Retries of transient failures: the delay doubles from `retry_base` up to
    # `retry_cap` (`backoff`); after `max_attempts` a rotation that holds nothing
    # dangling fails (a leak rotation never does: its old key is off, the user needs
    # the replacement).
    retry_base: timedelta = timedelta(seconds=10)
    retry_cap: timedelta = timedelta(minutes=15)
    max_attempts: int = 8
    # A leak rotation's user may have no working key until the replacement lands: it
    # looks again at least this often.
    leak_retry_cap: timedelta = timedelta(minutes=2)
    # Vault writes in STORE, while the new key's secret is held in memory: tries, and
    # the pause between them in seconds, doubling from `store_pause` up to
    # `store_pause_cap` (0.5, 1, 2 with these values).
    store_tries: int = 4
    store_pause: float = 0.5
    store_pause_cap: float = 2.0
    # A new key IAM does not accept yet (VERIFY): the next look doubles from this up to
    # the cap, until `verify_timeout` has passed since the key was stored.
    verify_retry_base: timedelta = timedelta(seconds=1)
    verify_retry_cap: timedelta = timedelta(seconds=8)
    # While consumers still use the old key, how often OVERLAP looks again.
    recheck: timedelta = timedelta(minutes=15)
    # The longest one backend call may take (rotator.deadlines): a side effect starts
    # only while the lease has at least this much left.
    call_deadline: timedelta = timedelta(seconds=80)
    # The longest CreateAccessKey may take (sent once): after a crash during it, a key
    # created later than this past the intent cannot be the rotation's.
    create_deadline: timedelta = timedelta(seconds=20)
    # The attribution window is kept on IAM's own clock (read from its Date headers),
    # in whole seconds, as CreateDate is: this covers the rounding of both.
    clock_tolerance: timedelta = timedelta(seconds=2)
    # While the deactivated old key is kept (RETIRE), how often the new key is looked at
    # again: if a person deleted it, the old key is turned back on.
    retire_recheck: timedelta = timedelta(minutes=15)
    # How often a BLOCKED rotation looks again whether an operator freed a slot (`run
    # --once`, an operator's own command, looks at once).
    blocked_recheck: timedelta = timedelta(minutes=5)
    # MAKE_ROOM deletes an inactive key only when it has been idle this long.
    inactive_min_idle: timedelta = timedelta(days=7)
    # The longest one Vault write may take (rotator.deadlines): a write that outlives
    # its caller may land until then.
    vault_deadline: timedelta = timedelta(seconds=80)

    @classmethod
    def from_settings(cls, settings: Any) -> Timing:
        return cls(
            overlap=settings.policy.overlap,
            overlap_limit=settings.policy.overlap_limit,
            delete_after=settings.policy.delete_after,
            verify_timeout=settings.policy.verify_timeout,
            lease_ttl=settings.state.lease_ttl,
            call_deadline=call_deadline(settings.aws.call_timeout, settings.vault.timeout),
            create_deadline=iam_create_deadline(settings.aws.call_timeout),
            vault_deadline=vault_call_deadline(settings.vault.timeout),
            inactive_min_idle=settings.policy.inactive_min_idle,
        )

    def backoff(self, attempts: int, *, leaked: bool = False) -> timedelta:
        """The pause before a rotation's retry number `attempts` (1, 2, …):
        `rotator.backoff.retry_pause` from `retry_base`, capped by `retry_cap`, or by
        `leak_retry_cap` for a leak rotation (its user may have no working key)."""
        cap = self.leak_retry_cap if leaked else self.retry_cap
        return _pause(attempts, self.retry_base, cap)

    def verify_backoff(self, attempts: int) -> timedelta:
        """The pause before VERIFY looks again at a new key IAM did not accept yet."""
        return _pause(attempts, self.verify_retry_base, self.verify_retry_cap)

    def store_backoff(self, attempt: int) -> float:
        """Seconds STORE sleeps after its failed Vault write number `attempt` (1, 2, …)."""
        return retry_pause(attempt, base=self.store_pause, cap=self.store_pause_cap)


def _pause(attempt: int, base: timedelta, cap: timedelta) -> timedelta:
    """`retry_pause` in timedeltas."""
    seconds = retry_pause(attempt, base=base.total_seconds(), cap=cap.total_seconds())
    return timedelta(seconds=seconds)


# Moves that prove progress (a key is stored, or the rotation ended): only they reset the
# failure count, so a cycle of create -> cannot store -> delete -> create keeps backing off.
_PROGRESS: frozenset[State] = (
    frozenset({State.VERIFY, State.OVERLAP, State.DEACTIVATE, State.RETIRE, State.DELETE})
    | TERMINAL
)


def _boottime() -> float:
    """Seconds on a clock that keeps counting while this process is stopped (SIGSTOP) or
    the machine is suspended, so a lease is never believed longer than it lasts."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


@dataclass
class _Held:
    """A lease this engine holds, and until when by its own clock (`_boottime`)."""

    lease: Lease
    until: float


class _VaultTaken(RotatorError):
    """Vault holds a newer key written by someone else: it is not overwritten. (Found
    after Vault refused the write, so nothing of this rotation's is in flight.)"""

    answered = True
    not_applied = True


class NullNotifier:
    def notify(self, event: str, rotation: Rotation, text: str) -> None:
        return None


def new_rotation(
    account_id: str,
    user_name: str,
    reason: RotationReason,
    now: datetime,
    *,
    old_key_id: str | None,
    leaked: bool = False,
    note: str | None = None,
    overlap: timedelta | None = None,
    kind: RotationKind = RotationKind.KEY,
    create_login: bool = False,
) -> Rotation:
    return Rotation(
        id=uuid.uuid4().hex,
        account_id=account_id,
        user_name=user_name,
        reason=reason,
        state=State.PLANNED,
        created_at=now,
        updated_at=now,
        old_key_id=old_key_id,
        leaked=leaked,
        note=note,
        overlap=overlap,
        kind=kind,
        create_login=create_login,
    )


def arn_is_user(arn: str, account_id: str, user_name: str) -> bool:
    """True when `arn` is the IAM user `user_name` (any path) in `account_id`."""
    parts = arn.split(":", 5)
    return (
        len(parts) == 6
        and parts[2] == "iam"
        and parts[4] == account_id
        and parts[5].startswith("user/")
        and parts[5].rsplit("/", 1)[-1] == user_name
    )


# What the engine reports of its leases: it took one over from a holder that died or
# stalled, or the store refused a write (or a renewal) because its lease had been lost.
LeaseEvent = Literal["taken_over", "fenced"]


class Engine:
    """Advances rotations. One engine serves every thread of its process; each rotation
    is advanced by at most one thread at a time, of this process or any other (the
    lease)."""

    def __init__(
        self,
        *,
        iam: Callable[[str], IamPort],
        secrets: SecretStore,
        store: StateStore,
        timing: Timing,
        owner: str,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        sleep: Callable[[float], None] = time.sleep,
        fault: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_transition: Callable[[Rotation, State], None] | None = None,
        on_lease: Callable[[LeaseEvent], None] | None = None,
        monotonic: Callable[[], float] = _boottime,
    ) -> None:
        self._iam = iam
        self._secrets = secrets
        self._store = store
        self._timing = timing
        self._owner = owner
        self._clock: Clock = clock or (lambda: datetime.now(UTC))
        self._notifier: Notifier = notifier or NullNotifier()
        self._sleep = sleep
        self._fault = fault or (lambda point: None)
        # Shutdown: no new step starts once this says so; a running step finishes.
        self._should_stop = should_stop
        self._on_transition = on_transition
        self._on_lease = on_lease
        self._monotonic = monotonic
        # IAM calls are the cost that matters at scale: within one `advance` call the
        # user's keys are listed once, and our own writes keep that picture current.
        self._seen: dict[str, list[AccessKey]] = {}
        # The leases this engine holds, by rotation id.
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()

    # --- public -------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock()

    def open(self, rotation: Rotation, reason: str) -> Rotation:
        """Record a new rotation (PLANNED). Raises `RotationExists`."""
        created = self._store.create(rotation, reason)
        _log.info(
            "rotation.opened",
            rotation_id=created.id,
            account=created.account_id,
            user=created.user_name,
            old_key_id=created.old_key_id,
            reason=created.reason.value,
            leaked=created.leaked,
            note=created.note,
        )
        return created

    def advance(self, rotation_id: str, *, recheck_blocked: bool = False) -> Rotation:
        """Step the rotation until it is terminal or has to wait (`next_action_at` in the
        future: an overlap, a retirement, a retry, a key not accepted yet, the next look
        at a BLOCKED one). `recheck_blocked`: look at a BLOCKED rotation now (an
        operator asked: `run --once`).

        Returns the rotation as it stands. When another live process (or another thread
        of this one) holds the lease, returns it unchanged."""
        current = self._store.get(rotation_id)
        if current is None:
            raise NotFound(f"rotation {rotation_id} not found")
        if current.state in TERMINAL:
            return current
        if not self._take(rotation_id):
            _log.info("rotation.lease_held", rotation_id=rotation_id, user=current.user_name)
            return current
        try:
            stepped = False
            while True:
                fresh = self._store.get(rotation_id)
                assert fresh is not None
                current = fresh
                if current.state in TERMINAL:
                    return current
                due = current.next_action_at
                asked = recheck_blocked and current.state is State.BLOCKED and not stepped
                if due is not None and due > self.now() and not asked:
                    return current
                if (current.state is State.BLOCKED and stepped) or self._should_stop():
                    return current
                stepped = True
                try:
                    self._ensure_lease(current)
                    self._guarded_step(current)
                except StaleRotation as exc:
                    # LeaseLost among them: another process owns the rotation now.
                    _log.warning("rotation.stale", rotation_id=rotation_id, error=str(exc))
                    if isinstance(exc, LeaseLost) and self._on_lease is not None:
                        self._on_lease("fenced")
                    fresh = self._store.get(rotation_id)
                    assert fresh is not None
                    return fresh
        finally:
            self._give_back(rotation_id)

    def rollback(self, rotation: Rotation, reason: str) -> Rotation:
        """Reactivate the old key of `rotation` while it still exists; ROLLED_BACK."""
        if rotation.leaked:
            raise BadInput(
                f"rotation {rotation.id} replaced a leaked key: a rollback would turn the "
                f"leaked key {rotation.old_key_id} back on. To replace the new key, run "
                f"`{suggested('rotate', rotation.user_name)}`"
            )
        if rotation.state not in (State.DEACTIVATE, State.RETIRE, State.DELETE):
            raise BadInput(
                f"rotation {rotation.id} is {rotation.state}: only a rotation whose old key "
                "was deactivated and not yet deleted can be rolled back"
            )
        if rotation.old_key_id is None:
            raise BadInput(f"rotation {rotation.id} has no old key")
        if not self._take(rotation.id):
            raise Transient(f"rotation {rotation.id} is being advanced by another process")
        try:
            current = self._store.get(rotation.id) or rotation
            assert current.old_key_id is not None
            keys = {k.access_key_id: k for k in self._keys(current, fresh=True)}
            if current.old_key_id not in keys:
                raise BadInput(f"old key {current.old_key_id} no longer exists")
            if not keys[current.old_key_id].active:
                self._set_status(current, current.old_key_id, KeyStatus.ACTIVE)
            return self._move(
                current, State.ROLLED_BACK, f"rollback: old key reactivated ({reason})"
            )
        finally:
            self._give_back(rotation.id)

    def escalate(self, rotation: Rotation, key_id: str, reason: str) -> Rotation:
        """A key of a user with an open rotation leaked (and was set Inactive by the
        caller, which needs no lease for that): bring the rotation in line, whatever
        state it is in. When it is the rotation's old key the rotation turns into a leak
        rotation (no overlap, no retirement); when it is the rotation's new key, the key
        consumers were given, that key is deleted and the rotation makes another one,
        with the old key turned back on meanwhile if it was already off (it is then the
        user's last sound key). Raises `Transient` while another process holds the lease."""
        if not self._take(rotation.id):
            raise Transient(f"rotation {rotation.id} is being advanced by another process")
        try:
            current = self._store.get(rotation.id) or rotation
            text = f"leaked key {key_id} contained ({reason})"
            self._note(current, text)
            self._notifier.notify("leaked_contained", current, f"{current.user_name}: {text}")
            if current.state in TERMINAL:
                return current
            if key_id == current.new_key_id:
                return self._replace_leaked_new_key(current, key_id)
            if key_id == current.old_key_id and not current.leaked:
                current = self._save(
                    current,
                    leaked=True,
                    reason=RotationReason.LEAKED,
                    note=reason,
                    next_action_at=None,
                )
            return current
        finally:
            self._give_back(rotation.id)

    def _replace_leaked_new_key(self, r: Rotation, key_id: str) -> Rotation:
        with contextlib.suppress(NotFound):
            self._delete_key(r, key_id)
        keys = {k.access_key_id: k for k in self._keys(r, fresh=True)}
        old = keys.get(r.old_key_id) if r.old_key_id else None
        if old is not None and not old.active and not r.leaked:
            assert r.old_key_id is not None
            self._set_status(r, r.old_key_id, KeyStatus.ACTIVE)
            self._note(r, f"old key {r.old_key_id} reactivated: the user's last sound key")
        return self._move(
            r,
            State.MAKE_ROOM,
            f"its new key {key_id} leaked: contained and deleted; another key replaces it",
            new_key_id=None,
            intent_key_ids=None,
            intent_at=None,
            intent_until=None,
            store_started_at=None,
            stored_at=None,
            vault_version=None,
            verified_at=None,
            deactivated_at=None,
            waiting_on=None,
        )

    # --- the lease ------------------------------------------------------------------

    def _take(self, rotation_id: str) -> bool:
        """Acquire the rotation's lease; False when another process or thread holds it."""
        with self._lock:
            if rotation_id in self._held:
                return False  # another thread of this engine is advancing it
            # Reserve the slot before the store round trip, so two threads cannot both
            # pass the check above; the placeholder never authorises a write.
            self._held[rotation_id] = _Held(Lease(rotation_id, self._owner, -1), 0.0)
        started = self._monotonic()
        try:
            lease = self._store.acquire_lease(rotation_id, self._owner, self._timing.lease_ttl)
        except BaseException:
            self._drop(rotation_id)
            raise
        if lease is None:
            self._drop(rotation_id)
            return False
        with self._lock:
            self._held[rotation_id] = _Held(lease, started + self._timing.lease_ttl.total_seconds())
        self._forget(rotation_id)
        if lease.taken_over:
            # Its holder neither finished nor renewed: it died or stalled mid-step.
            _log.warning("rotation.lease_taken_over", rotation_id=rotation_id, fence=lease.token)
            if self._on_lease is not None:
                self._on_lease("taken_over")
        return True

    def _give_back(self, rotation_id: str) -> None:
        self._forget(rotation_id)
        self._drop(rotation_id)
        self._store.release_lease(rotation_id, self._owner)

    def _drop(self, rotation_id: str) -> None:
        with self._lock:
            self._held.pop(rotation_id, None)

    def _lease(self, r: Rotation) -> Lease:
        with self._lock:
            held = self._held.get(r.id)
        if held is None or held.lease.token < 0:
            raise LeaseLost(f"rotation {r.id}: this process holds no lease on it")
        return held.lease

    def _ensure_lease(self, r: Rotation, *, renew: bool = False) -> Lease:
        """Before a side effect: the lease must have one call deadline left; renew it
        otherwise (or when `renew`: to prove, with a store round trip, that it is still
        ours). Raises `LeaseLost` when another holder has taken it meanwhile."""
        lease = self._lease(r)
        need = self._timing.call_deadline.total_seconds()
        with self._lock:
            until = self._held[r.id].until
        if not renew and until - self._monotonic() >= need:
            return lease
        started = self._monotonic()
        renewed = self._store.renew_lease(lease, self._timing.lease_ttl)
        if renewed is None:
            raise LeaseLost(
                f"rotation {r.id}: lease {lease.token} was lost (stalled past it, or taken "
                "over); this process stops here"
            )
        until = started + self._timing.lease_ttl.total_seconds()
        if until - self._monotonic() < need:
            raise LeaseLost(f"rotation {r.id}: the lease cannot cover one backend call")
        with self._lock:
            self._held[r.id] = _Held(renewed, until)
        return renewed

    # --- the loop around a step ----------------------------------------------------

    def _guarded_step(self, r: Rotation) -> Rotation:
        """One step; whatever it raises is recorded on the rotation under the recovery
        rules (no exception leaves a step, and no orphan key survives one)."""
        try:
            return self._step(r)
        except StaleRotation:
            raise
        except Exception as exc:
            try:
                return self._handle(self._stored(r), exc)
            except StaleRotation:
                raise
            except Exception as again:
                # Handling the error needed a backend that failed too (a listing to
                # tell a vanished key from a vanished user, say): record both, back off.
                return self._retry_later(
                    self._stored(r), f"{_describe(exc)}; then {_describe(again)}"
                )

    def _handle(self, r: Rotation, exc: Exception) -> Rotation:
        if isinstance(exc, NotFound):
            return self._not_found(r, exc)
        if isinstance(exc, Transient | CasConflict):
            return self._retry_later(r, str(exc))
        if isinstance(exc, RotatorError):
            # A refusal (permissions, configuration, bad input, an unknown 4xx):
            # retrying will not help. Stop and say so, unless a key may be dangling.
            return self._refused(r, str(exc))
        _log.exception("rotation.unexpected_error", rotation_id=r.id, user=r.user_name)
        return self._retry_later(r, _describe(exc))

    def _stored(self, r: Rotation) -> Rotation:
        """`r` as the store holds it now. A step may have saved progress before it
        raised (CREATE's intent above all, or a move to STORE): handling the error on
        the copy the step started from would write that progress away."""
        return self._store.get(r.id) or r

    @staticmethod
    def _dangling(r: Rotation) -> bool:
        """Whether `r` may hold a key that Vault does not (or, for a console password,
        Vault may hold a password IAM does not): then it must stay open until recovery
        has dealt with it."""
        if r.kind is RotationKind.CONSOLE:
            return r.vault_version is not None or r.store_started_at is not None
        return r.state is State.STORE or (r.state is State.CREATE and r.intent_key_ids is not None)

    def _gives_up(self, r: Rotation, attempts: int) -> bool:
        """Whether a rotation stops retrying after `attempts`. A leak rotation never
        does: its old key is already off, so giving up could leave the user with no
        working key; it keeps trying every `retry_cap` until the backend is back."""
        if r.leaked and attempts >= self._timing.max_attempts:
            _log.error(
                "rotation.leak_replacement_waiting",
                rotation_id=r.id,
                user=r.user_name,
                attempts=attempts,
                retry_in=self._timing.backoff(attempts, leaked=r.leaked).total_seconds(),
            )
        return attempts >= self._timing.max_attempts and not r.leaked

    def _retry_later(self, r: Rotation, error: str) -> Rotation:
        attempts = r.attempts + 1
        if self._gives_up(r, attempts) and not self._dangling(r):
            return self._fail(
                replace(r, attempts=attempts), f"gave up after {attempts} attempts: {error}"
            )
        if self._gives_up(r, attempts) and r.kind is RotationKind.CONSOLE:
            # Vault may hold a password IAM does not: never given up, but an operator
            # hears of it (BLOCKED is looked at again every few minutes).
            return self._block(
                replace(r, attempts=attempts),
                f"{error} ({attempts} attempts). Vault may hold a new console password for "
                f"{r.user_name} that IAM does not have yet; it is set once this is fixed "
                "(looked at again every few minutes, or at once by run --once)",
            )
        delay = self._timing.backoff(attempts, leaked=r.leaked)
        _log.warning(
            "rotation.retry",
            rotation_id=r.id,
            user=r.user_name,
            state=r.state.value,
            attempts=attempts,
            error=error,
            retry_in=delay.total_seconds(),
        )
        return self._save(
            r,
            attempts=attempts,
            last_error=error,
            next_action_at=self.now() + delay,
        )

    def _refused(self, r: Rotation, error: str) -> Rotation:
        if r.kind is RotationKind.CONSOLE and self._dangling(r):
            # Vault may hold a password IAM does not have: never give up on setting it.
            return self._block(
                r,
                f"{error}. Vault may hold a new console password for {r.user_name} that IAM "
                "does not have yet; it is set once this is fixed (looked at again every few "
                "minutes, or at once by run --once)",
            )
        if self._dangling(r):
            return self._retry_later(r, error)
        if r.leaked:
            # The leaked key is off and the user may have no other: failing would leave
            # them without a key for good. Ask an operator and look again.
            return self._block(
                r,
                f"{error}. The leaked key stays off; its replacement continues once this "
                "is fixed (looked at again every few minutes, or at once by run --once)",
            )
        return self._fail(r, error)

    def _not_found(self, r: Rotation, exc: NotFound) -> Rotation:
        iam = self._iam(r.account_id)
        try:
            iam.list_access_keys(r.user_name)
        except NotFound:
            return self._move(r, State.CANCELLED, f"user {r.user_name} no longer exists")
        # The user exists: a key vanished under us. Look again at the next step.
        return self._retry_later(r, str(exc))

    def _fail(self, r: Rotation, error: str) -> Rotation:
        failed = self._move(r, State.FAILED, error, last_error=error)
        self._notifier.notify("failed", failed, f"rotation of {r.user_name} failed: {error}")
        return failed

    def _block(self, r: Rotation, reason: str) -> Rotation:
        """BLOCKED (notified once), or stay BLOCKED with the current reason."""
        recheck = self.now() + self._timing.blocked_recheck
        if r.state is State.BLOCKED:
            return self._save(r, next_action_at=recheck, last_error=reason)
        blocked = self._move(r, State.BLOCKED, reason, last_error=reason, next_action_at=recheck)
        self._notifier.notify("blocked", blocked, f"rotation of {r.user_name} blocked: {reason}")
        return blocked

    # --- persistence helpers --------------------------------------------------------

    def _save(self, r: Rotation, **changes: Any) -> Rotation:
        updated = replace(r, updated_at=self.now(), **changes)
        self._store.save(updated, "update", from_state=r.state, lease=self._lease(r))
        return updated

    def _move(self, r: Rotation, to: State, reason: str, **changes: Any) -> Rotation:
        check_transition(r.state, to, r.kind)
        changes.setdefault("next_action_at", None)
        if to is not r.state and to in _PROGRESS and "attempts" not in changes:
            changes["attempts"] = 0
            changes.setdefault("last_error", None)
        moved = replace(r, state=to, updated_at=self.now(), **changes)
        self._store.save(moved, reason, from_state=r.state, lease=self._lease(r))
        _log.info(
            "rotation.transition",
            rotation_id=r.id,
            account=r.account_id,
            user=r.user_name,
            old_key_id=moved.old_key_id,
            new_key_id=moved.new_key_id,
            **{"from": r.state.value, "to": to.value},
            reason=reason,
        )
        if self._on_transition is not None:
            self._on_transition(moved, r.state)
        self._fault(f"moved:{r.state.value}->{to.value}")
        return moved

    def _note(self, r: Rotation, reason: str) -> None:
        self._store.record(r.id, r.state, reason, lease=self._lease(r))
        _log.info(
            "rotation.note", rotation_id=r.id, user=r.user_name, state=r.state.value, reason=reason
        )

    # --- steps ----------------------------------------------------------------------

    def _step(self, r: Rotation) -> Rotation:
        if r.kind is RotationKind.CONSOLE:
            return self._console_step(r)
        handler = {
            State.PLANNED: self._planned,
            State.CONTAIN: self._contain,
            State.MAKE_ROOM: self._make_room,
            State.BLOCKED: self._make_room,
            State.CREATE: self._create,
            State.STORE: self._store_recover,
            State.VERIFY: self._verify,
            State.OVERLAP: self._overlap,
            State.DEACTIVATE: self._deactivate,
            State.RETIRE: self._retire,
            State.DELETE: self._delete,
        }[r.state]
        return handler(r)

    def _keys(self, r: Rotation, *, fresh: bool = False) -> list[AccessKey]:
        """The user's keys: listed once per `advance` call (or now, when `fresh`)."""
        with self._lock:
            seen = self._seen.get(r.id)
        if seen is not None and not fresh:
            return list(seen)
        keys = self._iam(r.account_id).list_access_keys(r.user_name)
        with self._lock:
            self._seen[r.id] = list(keys)
        return keys

    def _wrote(self, r: Rotation, key_id: str, status: KeyStatus | None) -> None:
        """Keep the listed picture current after our own write (None: deleted)."""
        with self._lock:
            seen = self._seen.get(r.id)
            if seen is None:
                return
            rest = [k for k in seen if k.access_key_id != key_id]
            if status is not None:
                before = next((k for k in seen if k.access_key_id == key_id), None)
                created = before.created_at if before else self.now()
                rest.append(AccessKey(key_id, status, created))
            self._seen[r.id] = rest

    def _forget(self, rotation_id: str) -> None:
        with self._lock:
            self._seen.pop(rotation_id, None)

    def _before_side_effect(self, r: Rotation) -> None:
        """Renew the lease with a round trip to the store: its own clock then decides
        whether the lease still holds (a host clock that stepped, a pause the local
        clock did not see), and a full lease is left for the call."""
        self._ensure_lease(r, renew=True)

    def _set_status(self, r: Rotation, key_id: str, status: KeyStatus) -> None:
        self._before_side_effect(r)
        self._iam(r.account_id).set_key_status(r.user_name, key_id, status)
        self._wrote(r, key_id, status)

    def _delete_key(self, r: Rotation, key_id: str) -> None:
        self._before_side_effect(r)
        self._iam(r.account_id).delete_access_key(r.user_name, key_id)
        self._wrote(r, key_id, None)

    def _path(self, r: Rotation) -> str:
        return self._secrets.path_for(r.account_id, r.user_name)

    def _planned(self, r: Rotation) -> Rotation:
        if r.leaked:
            return self._move(r, State.CONTAIN, "leaked key: contain it first")
        return self._move(r, State.MAKE_ROOM, "start")

    def _contain(self, r: Rotation) -> Rotation:
        keys = {k.access_key_id: k for k in self._keys(r)}
        old = keys.get(r.old_key_id) if r.old_key_id else None
        if old is not None and old.active:
            self._set_status(r, old.access_key_id or "", KeyStatus.INACTIVE)
            self._fault("contain:deactivated")
            text = f"leaked key {r.old_key_id} deactivated"
        elif old is not None:
            text = f"leaked key {r.old_key_id} was already inactive"
        else:
            text = f"leaked key {r.old_key_id} no longer exists"
        moved = self._move(r, State.MAKE_ROOM, text, deactivated_at=self.now())
        self._notifier.notify("leaked_contained", moved, f"{r.user_name}: {text}")
        return moved

    def _make_room(self, r: Rotation) -> Rotation:
        try:
            self._path(r)
        except BadInput as exc:
            return self._block(r, str(exc))
        if r.state is State.BLOCKED and r.leaked:
            # A leak replacement blocked by a Vault that refused it stays BLOCKED, quietly,
            # until Vault accepts the rotator again.
            self._secrets.check()
        keys = self._keys(r)
        if (
            not r.leaked
            and r.old_key_id is not None
            and r.new_key_id is None
            and all(k.access_key_id != r.old_key_id for k in keys)
        ):
            # Rotated or deleted by someone else since the scan that proposed this
            # rotation: a key made now would be one nobody asked for.
            return self._move(
                r,
                State.CANCELLED,
                f"old key {r.old_key_id} no longer exists (rotated or deleted since the "
                "scan that proposed this rotation): nothing to rotate",
            )
        if len(keys) < 2:
            if r.state is State.BLOCKED:
                return self._move(r, State.MAKE_ROOM, "a slot is free now")
            return self._move(r, State.CREATE, f"{2 - len(keys)} free slot(s)")
        inactive = [k for k in keys if not k.active]
        # An inactive key is deleted to make room only when it is this rotation's own
        # (a contained leak), or it has been idle for `inactive_min_idle`: a person may
        # have switched it off yesterday to see what breaks, and would switch it back.
        deletable = [k for k in inactive if self._may_delete_inactive(r, k)]
        if not inactive:
            return self._block(
                r,
                f"cap_blocked: both keys are active ({', '.join(key_ids(keys))}); "
                "deactivate the one no consumer uses, then the rotation continues",
            )
        if not deletable:
            idle = format_duration(self._timing.inactive_min_idle)
            return self._block(
                r,
                f"inactive key(s) {', '.join(key_ids(inactive))} used or created less than "
                f"{idle} ago (policy.inactive_min_idle): someone may still need them, so the "
                "rotator does not delete them. Delete one yourself to free a slot (or wait), "
                "then the rotation continues",
            )
        if r.state is State.BLOCKED:
            return self._move(r, State.MAKE_ROOM, "a key is inactive now: a slot can be freed")
        # Prefer this rotation's own old key (a contained leak); else the oldest inactive.
        victim = next(
            (k for k in deletable if k.access_key_id == r.old_key_id),
            min(deletable, key=lambda k: k.created_at),
        )
        assert victim.access_key_id is not None
        self._delete_key(r, victim.access_key_id)
        self._fault("make_room:deleted")
        return self._move(
            r, State.CREATE, f"deleted inactive key {victim.access_key_id} to free a slot"
        )

    def _may_delete_inactive(self, r: Rotation, key: AccessKey) -> bool:
        if key.access_key_id == r.old_key_id and r.leaked:
            return True
        if key.access_key_id is None or key.created_at > r.created_at:
            return False  # it appeared while this rotation ran: someone put it there
        if key.access_key_id in self._leftovers(r):
            return True

        last = self._iam(r.account_id).key_last_used(key.access_key_id).last_used_at
        idle_since = last or key.created_at
        now = self._iam(r.account_id).iam_time() or self.now()
        return now - idle_since >= self._timing.inactive_min_idle

    def _leftovers(self, r: Rotation) -> set[str]:
        """New keys of this user's earlier rotations that ended FAILED or CANCELLED: the
        rotator's own, which it may clear away once they are off."""
        earlier = self._store.list_recent(limit=20, user_name=r.user_name)
        return {
            x.new_key_id
            for x in earlier
            if x.account_id == r.account_id
            and x.id != r.id
            and x.new_key_id
            and x.state in (State.FAILED, State.CANCELLED)
        }

    def _create(self, r: Rotation) -> Rotation:
        if r.intent_key_ids is not None:
            # A previous attempt recorded its intent and then stopped: reconcile first.
            return self._reconcile(r)
        iam = self._iam(r.account_id)
        keys = self._keys(r)
        if len(keys) >= 2:
            return self._move(r, State.MAKE_ROOM, "no free slot any more: a key appeared")
        # The secret exists only until it is stored: Vault must answer for this path
        # before a key is minted (an outage, a missing mount or a refusal shows here,
        # and no key is created and then lost).
        self._secrets.read(self._path(r))
        # The journal entry comes first: if we die after CreateAccessKey, recovery knows
        # which key is ours by comparing with this list and this moment, taken on IAM's
        # clock (it stamps CreateDate), which this host's may not agree with.
        r = self._save(
            r,
            intent_key_ids=key_ids(keys),
            intent_at=iam.iam_time() or self.now(),
            intent_until=None,
            new_key_id=None,
        )
        self._fault("create:intent_recorded")
        self._before_side_effect(r)
        try:
            new = iam.create_access_key(r.user_name)
        except CapConflict:
            # Someone added a key since the listing: MAKE_ROOM must look again, not reuse
            # the listing that said a slot was free (and provoke IAM again at once).
            self._forget(r.id)
            return self._move(
                r, State.MAKE_ROOM, "IAM refused a new key: two keys exist", intent_key_ids=None
            )
        except Exception as exc:
            if isinstance(exc, RotatorError) and exc.not_applied:
                # IAM answered with a refusal: no key was minted, and any key that
                # appears now is someone else's.
                self._save(r, intent_key_ids=None, intent_at=None, new_key_id=None)
                raise
            # The call has ended, so any key it minted is older than this moment; look
            # now, while no person had time to add one, and leave the retry to the caller.
            # An answered call is settled; one that timed out may still land, so its
            # window stays open a little longer (`_window_left`).
            settled = isinstance(exc, RotatorError) and exc.answered
            r = self._save(r, intent_until=iam.iam_time() or self.now())
            recovered = self._reconcile(r, settled=settled)
            if recovered.state is State.BLOCKED:
                return recovered
            raise
        log.register_secret(new.secret_access_key)
        self._wrote(r, new.access_key_id, KeyStatus.ACTIVE)
        self._fault("create:created")
        r = self._save(r, new_key_id=new.access_key_id, intent_until=self.now())
        self._fault("create:recorded")
        r = self._move(r, State.STORE, f"created key {new.access_key_id}")
        try:
            return self._store_new(r, new)
        finally:
            # Stored, or the key deleted, or this process no longer owns the rotation:
            # either way it never holds this secret again, so the log scrubber lets go.
            log.forget_secret(new.secret_access_key)

    def _store_new(self, r: Rotation, new: NewKey) -> Rotation:
        path = self._path(r)
        error = ""
        refusal: RotatorError | None = None
        # Whether a write may have outlived its try (no answer came): it may still land.
        in_flight = False
        for attempt in range(1, self._timing.store_tries + 1):
            try:
                version = self._write_secret(r, path, new)
                break
            except StaleRotation:
                raise
            except (Transient, CasConflict) as exc:
                in_flight = in_flight or not exc.answered
                error = str(exc)
                _log.warning("vault.write_failed", rotation_id=r.id, attempt=attempt, error=error)
                if attempt < self._timing.store_tries:
                    self._sleep(self._timing.store_backoff(attempt))
            except RotatorError as exc:
                # Vault refuses us, the path holds something that is not a key pair, or
                # someone else's newer key is there: retrying will not help.
                in_flight = in_flight or not exc.answered
                error, refusal = str(exc), exc
                break
        else:
            return self._unstored(r, new, error, refusal, in_flight=in_flight)
        if refusal is not None:
            return self._unstored(r, new, error, refusal, in_flight=in_flight)
        self._fault("store:written")
        return self._stored_in_vault(r, path, version)

    def _stored_in_vault(self, r: Rotation, path: str, version: int) -> Rotation:
        # The overlap clock starts now, when this process saw the key stored; never
        # from Vault's metadata, which may describe an earlier rotation.
        return self._move(
            r,
            State.VERIFY,
            f"stored in Vault at {path} (version {version})",
            stored_at=self.now(),
            vault_version=version,
        )

    def _unstored(
        self,
        r: Rotation,
        new: NewKey,
        error: str,
        refusal: RotatorError | None,
        *,
        in_flight: bool,
    ) -> Rotation:
        """STORE could not confirm its write. The new key is deleted only once a read
        that succeeds shows Vault does not hold it; until then the key is kept and
        recovery looks again after a pause."""
        r = self._stored(r)  # with the moment the last write was sent
        path = self._path(r)
        try:
            held = self._read_key_pair(path)
        except StaleRotation:
            raise
        except Exception as exc:
            attempts = r.attempts + 1
            why = (
                f"{error}; Vault could not be read to tell whether new key "
                f"{new.access_key_id} is stored ({exc}): the key is kept, retry later"
            )
            _log.warning("rotation.store_unconfirmed", rotation_id=r.id, error=why)
            return self._save(
                r,
                attempts=attempts,
                last_error=why,
                next_action_at=self.now() + self._timing.backoff(attempts, leaked=r.leaked),
            )
        if held is not None and held.access_key_id == new.access_key_id:
            return self._stored_in_vault(r, path, held.version)
        landing = self._write_may_land(r) if in_flight else timedelta(0)
        if landing > timedelta(0):
            return self._keep_until_writes_land(r, new.access_key_id, landing, error)
        self._discard_new_key(r, new.access_key_id)
        if isinstance(refusal, _VaultTaken):
            return self._block(r, f"{error}; new key {new.access_key_id} deleted")
        if refusal is not None:
            return self._fail(r, f"{error}; new key {new.access_key_id} deleted")
        attempts = r.attempts + 1
        if self._gives_up(r, attempts):
            # Nothing dangles any more (the key is gone): stop trying and tell people.
            return self._fail(
                replace(r, attempts=attempts),
                f"gave up after {attempts} attempts: Vault would not store a new key "
                f"({error}); new key {new.access_key_id} deleted, old key untouched",
            )
        return self._move(
            r,
            State.MAKE_ROOM,
            f"Vault unavailable ({error}): new key {new.access_key_id} deleted, retry later",
            new_key_id=None,
            intent_key_ids=None,
            intent_at=None,
            intent_until=None,
            store_started_at=None,
            attempts=attempts,
            last_error=error,
            next_action_at=self.now() + self._timing.backoff(attempts, leaked=r.leaked),
        )

    def _read_key_pair(self, path: str) -> StoredSecret | None:
        """What Vault holds at `path`; None also when it holds something that is not a
        key pair (then it certainly does not hold ours)."""
        try:
            return self._secrets.read(path)
        except BadInput:
            return None

    def _write_secret(self, r: Rotation, path: str, new: NewKey) -> int:
        current = self._secrets.read(path)
        if current is not None and current.access_key_id == new.access_key_id:
            return current.version
        metadata = {
            "access_key_id": new.access_key_id,
            "rotation_id": r.id,
            "rotated_at": self.now().astimezone(UTC).isoformat(timespec="seconds"),
        }
        # A deleted latest version reads as nothing, yet still counts for check-and-set.
        cas = current.version if current else self._secrets.current_version(path)
        self._before_side_effect(r)
        # Journalled before the write is sent: a write that outlives its caller (a
        # timeout, a crash) may land until one Vault deadline after this.
        self._save(r, store_started_at=self.now())
        try:
            return self._secrets.write(path, new, metadata, cas=cas)
        except CasConflict:
            # Someone wrote since we read. Never write again blindly: only while this
            # rotation still holds its lease (proved by a round trip to the store), and
            # only over its own earlier attempt or the key it replaces.
            self._ensure_lease(r, renew=True)
            latest = self._secrets.read(path)
            if latest is not None and latest.access_key_id == new.access_key_id:
                return latest.version
            if latest is not None and self._someone_elses(r, latest):
                writer = latest.metadata.get("rotation_id")
                raise _VaultTaken(
                    f"Vault at {path} now holds key {latest.access_key_id}, active in IAM and "
                    f"written {f'by rotation {writer}' if writer else 'outside the rotator'} "
                    "while this rotation was storing its own; it is not overwritten. Check "
                    "which key consumers should use; the old key stays active"
                ) from None
            raise

    def _someone_elses(self, r: Rotation, held: StoredSecret) -> bool:
        """Whether `held` is a working key someone else put in Vault: not this rotation's
        (an earlier attempt, or a stalled copy of it), not the key it replaces, and
        Active in IAM. A key that works is never overwritten behind its writer's back."""
        if held.metadata.get("rotation_id") == r.id or held.access_key_id == r.old_key_id:
            return False
        keys = self._keys(r, fresh=True)
        return any(k.access_key_id == held.access_key_id and k.active for k in keys)

    def _discard_new_key(self, r: Rotation, key_id: str) -> None:
        with contextlib.suppress(NotFound):
            self._delete_key(r, key_id)
        self._fault("store:discarded")
        _log.warning("rotation.new_key_deleted", rotation_id=r.id, user=r.user_name, key_id=key_id)

    def _store_recover(self, r: Rotation) -> Rotation:
        # In STORE on entry means the call that held the secret is gone.
        return self._reconcile(r)

    def _attribute(self, r: Rotation, keys: list[AccessKey]) -> tuple[list[str], list[str]]:
        """Split the keys that appeared since the intent into this rotation's own (created
        inside the window of its CreateAccessKey call, or recorded as its new key) and
        strangers (anyone else's: never deleted or deactivated)."""
        before = set(r.intent_key_ids or ())
        appeared = [k for k in keys if k.access_key_id and k.access_key_id not in before]
        tolerance = self._timing.clock_tolerance
        window = None
        if r.intent_at is not None and r.new_key_id is None:
            window = (r.intent_at - tolerance, self._window_end(r))
        ours: list[str] = []
        strangers: list[str] = []
        for k in appeared:
            assert k.access_key_id is not None
            mine = k.access_key_id == r.new_key_id or (
                window is not None
                and window[0] <= k.created_at <= window[1]
                and not self._ever_used(r, k.access_key_id)
            )
            (ours if mine else strangers).append(k.access_key_id)
        return ours, strangers

    def _write_may_land(self, r: Rotation) -> timedelta:
        """How long a Vault write of this rotation's new key may still be on its way (a
        write whose caller timed out or died is not withdrawn): zero when none can."""
        if r.store_started_at is None:
            return timedelta(0)
        end = r.store_started_at + self._timing.vault_deadline
        return max(end - self.now(), timedelta(0))

    def _keep_until_writes_land(
        self, r: Rotation, key_id: str, wait: timedelta, error: str
    ) -> Rotation:
        """Vault does not hold the key yet, but a write of it may still land: deleting
        it now could leave Vault serving a deleted key. Keep it, look again then."""
        why = (
            f"{error}: Vault does not hold new key {key_id}, but a write of it may still "
            f"land for {wait.total_seconds():.0f}s more; the key is kept until then"
        )
        _log.warning("rotation.store_pending", rotation_id=r.id, key_id=key_id, wait=str(wait))
        return self._save(r, last_error=why, next_action_at=self.now() + wait)

    def _window_end(self, r: Rotation) -> datetime:
        """When, on IAM's clock, the rotation's CreateAccessKey can no longer mint a key:
        its deadline from the intent, or later when the call was seen ending later."""
        assert r.intent_at is not None
        end = r.intent_at + self._timing.create_deadline
        if r.intent_until is not None:
            end = max(end, r.intent_until)
        return end + self._timing.clock_tolerance

    def _window_left(self, r: Rotation) -> timedelta:
        """How long, on IAM's clock, a key of this rotation's CreateAccessKey call may
        still appear (zero once the window has closed)."""
        if r.intent_at is None or r.new_key_id is not None:
            return timedelta(0)  # no call, or the key it made is known
        end = self._window_end(r)
        iam_now = self._iam(r.account_id).iam_time() or self.now()
        return max(end - iam_now, timedelta(0))

    def _ever_used(self, r: Rotation, key_id: str) -> bool:
        """A key that was ever used is not an orphan of ours: its secret left somebody's
        hands, while ours never left the memory of the call that lost it."""
        return self._iam(r.account_id).key_last_used(key_id).last_used_at is not None

    def _reconcile(self, r: Rotation, *, settled: bool = False) -> Rotation:
        """Recovery for CREATE (intent recorded) and STORE: every key created by this
        rotation is either held by Vault (go on to VERIFY) or deleted (back to MAKE_ROOM);
        a key anyone else created is left alone and named (BLOCKED)."""
        keys = self._keys(r, fresh=True)
        ours, strangers = self._attribute(r, keys)
        # Nothing is deleted unless this read succeeds: while Vault cannot be read, the
        # error leaves the rotation here, to look again after a pause.
        held = self._read_key_pair(self._path(r))
        if len(ours) > 1:
            # One CreateAccessKey mints one key: someone else created another within the
            # call's window, and which is which cannot be told apart.
            kept_one = [k for k in ours if held is not None and held.access_key_id == k]
            strangers += [k for k in ours if k not in kept_one]
            ours = kept_one
        kept = next((k for k in ours if held is not None and held.access_key_id == k), None)
        doomed = [k for k in ours if k != kept]
        landing = self._write_may_land(r)
        if doomed and landing > timedelta(0):
            return self._keep_until_writes_land(r, doomed[0], landing, "recovery")
        for key_id in ours:
            if key_id != kept:
                if r.new_key_id is None:
                    # Journal which key the call made before deleting it: a recovery of
                    # this recovery then knows the call's key and needs no window.
                    r = self._save(r, new_key_id=key_id)
                self._delete_key(r, key_id)
                self._fault("recover:deleted")
                self._note(r, f"deleted orphan key {key_id}: its secret never reached Vault")
        if kept is not None and held is not None:
            if r.state is State.CREATE:
                r = self._move(r, State.STORE, f"recovered: created key {kept}", new_key_id=kept)
            return self._move(
                r,
                State.VERIFY,
                f"recovered: Vault holds key {kept}",
                new_key_id=kept,
                stored_at=self.now(),
                vault_version=held.version,
            )
        if strangers:
            return self._block(
                r,
                f"key(s) {', '.join(sorted(strangers))} appeared while this rotation was "
                "creating its key and were not created by it: the rotator leaves them alone. "
                "Delete or deactivate the one no consumer needs, then the rotation continues",
            )
        if r.state is State.CREATE and not ours:
            # A request that outlived its client's timeout may still be applied a moment
            # later: the intent stays until the call's window has closed on IAM's clock.
            open_for = timedelta(0) if settled else self._window_left(r)
            if open_for > timedelta(0):
                return self._save(r, next_action_at=self.now() + open_for)
            # CreateAccessKey never took effect: clear the intent and create now.
            return self._save(
                r, intent_key_ids=None, intent_at=None, intent_until=None, new_key_id=None
            )
        return self._move(
            r,
            State.MAKE_ROOM,
            "recovered: the new key was not in Vault and is deleted",
            new_key_id=None,
            intent_key_ids=None,
            intent_at=None,
            intent_until=None,
            store_started_at=None,
        )

    def _verify(self, r: Rotation) -> Rotation:
        path = self._path(r)
        held = self._secrets.read(path)
        if held is None or held.access_key_id != r.new_key_id:
            found = held.access_key_id if held else "nothing"
            return self._fail(r, f"Vault at {path} holds {found}, not the new key {r.new_key_id}")
        self._repair_metadata(r, path, held)
        started = r.stored_at or self.now()
        try:
            arn = self._iam(r.account_id).caller_arn(held.as_new_key())
        except Transient as exc:
            # A new key is eventually consistent. Come back shortly instead of holding
            # a thread idle: other rotations can progress meanwhile. The deadline counts
            # from when the key was stored, so it holds across processes and restarts.
            now = self.now()
            if now - started >= self._timing.verify_timeout:
                return self._verify_failed(r, f"new key did not work within verify_timeout: {exc}")
            attempts = r.attempts + 1
            return self._save(
                r,
                attempts=attempts,
                last_error=f"new key not accepted yet: {exc}",
                next_action_at=now + self._timing.verify_backoff(attempts),
            )
        if not arn_is_user(arn, r.account_id, r.user_name):
            return self._verify_failed(
                r, f"new key authenticates as {arn}, not as user {r.user_name}"
            )
        now = self.now()
        if r.leaked:
            return self._move(r, State.DELETE, "verified; leaked key goes now", verified_at=now)
        if r.old_key_id is None:
            done = self._move(r, State.DONE, "verified; first key issued", verified_at=now)
            self._notifier.notify("done", done, f"{r.user_name}: first key issued and stored")
            return done
        overlap = r.overlap if r.overlap is not None else self._timing.overlap
        return self._move(
            r,
            State.OVERLAP,
            f"verified as {arn}; old key stays active for {format_duration(overlap)}",
            verified_at=now,
            next_action_at=started + overlap,
        )

    def _repair_metadata(self, r: Rotation, path: str, held: StoredSecret) -> None:
        """Custom metadata is a second call after the data write, so a lost response or
        a crash can leave it naming the previous key: make it name the key Vault holds."""
        if (
            held.metadata.get("access_key_id") == held.access_key_id
            and held.metadata.get("rotation_id") == r.id
        ):
            return
        stored = r.stored_at or self.now()
        self._before_side_effect(r)
        self._secrets.set_metadata(
            path,
            {
                "access_key_id": held.access_key_id,
                "rotation_id": r.id,
                "rotated_at": stored.astimezone(UTC).isoformat(timespec="seconds"),
            },
        )
        self._note(r, f"custom metadata at {path} repaired to name key {held.access_key_id}")

    def _verify_failed(self, r: Rotation, error: str) -> Rotation:
        """A new key that does not work may belong to a user deleted meanwhile (its keys
        went with it): that ends the rotation CANCELLED, like any step that finds the
        user gone, not FAILED."""
        try:
            self._keys(r, fresh=True)
        except NotFound:
            return self._move(r, State.CANCELLED, f"user {r.user_name} no longer exists")
        return self._fail(r, error)

    def _replacement_problem(self, r: Rotation) -> str | None:
        """Before the old key is touched: what is wrong with its replacement (None: it
        exists, is Active, and is what Vault serves). The listing is this `advance`
        call's, so it was taken after the last wait (an overlap, a retirement)."""
        keys = {k.access_key_id: k for k in self._keys(r)}
        new = keys.get(r.new_key_id) if r.new_key_id else None
        if new is None:
            return f"its new key {r.new_key_id} no longer exists in IAM"
        if not new.active:
            return f"its new key {r.new_key_id} is {new.status.value} in IAM"
        path = self._path(r)
        held = self._secrets.read(path)
        if held is None or held.access_key_id != r.new_key_id:
            serves = held.access_key_id if held else "nothing"
            return f"Vault at {path} serves {serves}, not its new key {r.new_key_id}"
        return None

    def _halt(self, r: Rotation, problem: str) -> Rotation:
        """The replacement cannot be relied on: end without touching the old key."""
        return self._fail(
            r,
            f"{problem}: old key {r.old_key_id} left as it is (nothing deactivated or "
            "deleted). Check which key consumers use; the next scan opens a new rotation "
            "while the old key is due",
        )

    def _old_key_gone(self, r: Rotation) -> Rotation:
        """The old key no longer exists: the goal is reached, if its replacement is sound."""
        problem = None if r.leaked else self._replacement_problem(r)
        if problem is not None:
            return self._fail(
                r, f"old key {r.old_key_id} was deleted outside the rotator and {problem}"
            )
        done = self._move(
            r, State.DONE, f"old key {r.old_key_id} already gone; new key {r.new_key_id} in use"
        )
        self._notifier.notify(
            "done", done, f"{r.user_name}: key rotated, new key {r.new_key_id} in Vault"
        )
        return done

    def _overlap(self, r: Rotation) -> Rotation:
        assert r.stored_at is not None
        assert r.old_key_id is not None
        overlap = r.overlap if r.overlap is not None else self._timing.overlap
        now = self.now()
        if r.leaked:
            return self._move(r, State.DEACTIVATE, "leaked: no overlap for a leaked key")
        if now < r.stored_at + overlap:
            return self._save(r, next_action_at=r.stored_at + overlap)
        if not overlap:
            # No overlap was asked for: there is no window for consumers to switch in,
            # so whether they still use the old key changes nothing.
            return self._move(r, State.DEACTIVATE, "no overlap")
        try:
            last = self._iam(r.account_id).key_last_used(r.old_key_id).last_used_at
        except NotFound:
            if not any(k.access_key_id == r.old_key_id for k in self._keys(r, fresh=True)):
                return self._old_key_gone(r)
            raise
        still_used = last is not None and last > r.stored_at
        limit = r.stored_at + max(overlap, self._timing.overlap_limit)
        if still_used and now < limit:
            assert last is not None
            waiting = (
                f"consumers have not switched: old key {r.old_key_id} last used "
                f"{last.isoformat(timespec='seconds')}, after the new key was stored"
            )
            if r.waiting_on is None:
                self._note(r, waiting)
                self._notifier.notify("consumers_not_switched", r, f"{r.user_name}: {waiting}")
            return self._save(
                r, waiting_on=waiting, next_action_at=min(now + self._timing.recheck, limit)
            )
        if not still_used:
            return self._move(r, State.DEACTIVATE, "overlap over", waiting_on=None)
        # Kept on the rotation (status shows it; the metrics count it): consumers were
        # still on the old key when the overlap limit ended it.
        reason = f"overlap limit reached although the old key was used at {last}; deactivating"
        return self._move(r, State.DEACTIVATE, reason, waiting_on=reason)

    def _retention(self, r: Rotation) -> timedelta:
        """How long the deactivated old key is kept for a rollback. A leaked key is
        not kept: it goes at once."""
        return timedelta(0) if r.leaked else self._timing.delete_after

    def _deactivate(self, r: Rotation) -> Rotation:
        # Invariant 2: never before the replacement is stored, verified, and still sound.
        assert r.stored_at is not None
        assert r.verified_at is not None
        assert r.old_key_id is not None
        # A leaked key goes whatever became of its replacement: containment comes first.
        problem = None if r.leaked else self._replacement_problem(r)
        keys = {k.access_key_id: k for k in self._keys(r)}
        old = keys.get(r.old_key_id)
        if old is None:
            return self._old_key_gone(r)
        if problem is not None:
            return self._halt(r, problem)
        if old.active:
            try:
                self._set_status(r, r.old_key_id, KeyStatus.INACTIVE)
            except NotFound:
                self._keys(r, fresh=True)  # raises NotFound again when the user is gone
                return self._old_key_gone(r)
            self._fault("deactivate:done")
        now = self.now()
        keep = self._retention(r)
        return self._move(
            r,
            State.RETIRE,
            f"old key {r.old_key_id} deactivated; deleted after {format_duration(keep)}",
            deactivated_at=now,
            next_action_at=now + min(keep, self._timing.retire_recheck),
        )

    def _retire(self, r: Rotation) -> Rotation:
        assert r.deactivated_at is not None
        due = r.deactivated_at + self._retention(r)
        now = self.now()
        if now >= due:
            return self._move(r, State.DELETE, "retirement over")
        # The old key is off: if the new one is gone or off too, the user has no working
        # key. Look again now and then, and turn the old key back on at once if so.
        problem = self._replacement_problem(r)
        if problem is not None:
            return self._restore_old_key(r, problem)
        return self._save(r, next_action_at=min(due, now + self._timing.retire_recheck))

    def _restore_old_key(self, r: Rotation, problem: str) -> Rotation:
        """The old key is the user's last sound key: turn it back on, end FAILED. A
        leaked old key is never turned back on."""
        assert r.old_key_id is not None
        if r.leaked:
            return self._fail(r, f"{problem}; the old key leaked and stays off")
        self._set_status(r, r.old_key_id, KeyStatus.ACTIVE)
        return self._fail(
            r,
            f"{problem}: old key {r.old_key_id} reactivated so that the user keeps a "
            "working key, and not deleted. Check which key consumers use",
        )

    def _delete(self, r: Rotation) -> Rotation:
        keys = {k.access_key_id: k for k in self._keys(r)}
        old = keys.get(r.old_key_id) if r.old_key_id else None
        if old is None:
            if r.leaked or r.old_key_id is None:
                return self._done(r, f"old key {r.old_key_id} deleted")
            return self._old_key_gone(r)
        assert r.old_key_id is not None
        if old.active and not r.leaked:
            # Someone turned it back on while it was retired: that is a rollback.
            return self._move(
                r,
                State.ROLLED_BACK,
                f"old key {r.old_key_id} was reactivated outside the rotator",
            )
        if not r.leaked:
            problem = self._replacement_problem(r)
            if problem is not None:
                return self._restore_old_key(r, problem)
        if old.active:
            self._set_status(r, r.old_key_id, KeyStatus.INACTIVE)
        self._delete_key(r, r.old_key_id)
        self._fault("delete:done")
        return self._done(r, f"old key {r.old_key_id} deleted")

    # --- console passwords ------------------------------------------------------------
    #
    # The new password goes to Vault first (STORE), tagged with this rotation's id in
    # the data, and only then to IAM (SET_PASSWORD), with a reset required at the next
    # sign-in. Each step reads Vault before it acts, so a crash anywhere ends with
    # Vault holding the password IAM has, or with IAM unchanged:
    #   - STORE journals the version it writes on top of (`vault_version`) before it
    #     writes: a write whose answer was lost is recognised by its rotation id and
    #     adopted; any other version that appeared since is someone else's, and the
    #     rotation ends (FAILED, saying so) instead of writing over it;
    #   - SET_PASSWORD reads Vault after renewing its lease, sets the password (the same
    #     password twice is harmless, so it reruns after a crash), and reads Vault again:
    #     a version someone wrote meanwhile is never claimed as agreeing with IAM;
    #   - a path holding anything but a console password is never written over.
    # The password lives in this process only between Vault and IAM, registered with
    # the log scrubber meanwhile; never in the state store, an event or an error.

    def _console_step(self, r: Rotation) -> Rotation:
        if r.state is State.PLANNED:
            return self._console_planned(r)
        if r.state is State.SET_PASSWORD or (r.state is State.BLOCKED and r.stored_at is not None):
            return self._console_set(r)
        # STORE, or BLOCKED before a password IAM would take was stored.
        return self._console_store(r)

    def _console_path(self, r: Rotation) -> str:
        return self._secrets.console_path_for(r.account_id, r.user_name)

    def _read_password(self, path: str) -> StoredPassword | None:
        """What Vault holds at a console path; None also when it holds no password
        (then it certainly does not hold this rotation's)."""
        try:
            return self._secrets.read_password(path)
        except BadInput:
            return None

    def _console_planned(self, r: Rotation) -> Rotation:
        try:
            path = self._console_path(r)
        except BadInput as exc:
            return self._fail(r, str(exc))
        if not r.create_login and self._iam(r.account_id).login_profile(r.user_name) is None:
            return self._move(
                r,
                State.CANCELLED,
                f"user {r.user_name} has no console access (no login profile): nothing to "
                "rotate. To give it one: "
                + suggested("rotate", r.user_name, "--console", "--create"),
            )
        return self._move(r, State.STORE, f"a new console password goes to Vault at {path} first")

    def _console_store(self, r: Rotation) -> Rotation:
        path = self._console_path(r)
        try:
            held = self._secrets.read_password(path)
        except BadInput:
            return self._block(
                r,
                f"Vault at {path} holds data that is not a console password (no "
                "`password` field; the user's access key, when vault.console_path_template "
                "leads to the key's path): nothing is written over it. Point "
                "vault.console_path_template elsewhere, or move that data; the rotation "
                "then continues (looked at again every few minutes, or at once by run --once)",
            )
        # The version this rotation wrote on top of (or its own that IAM refused).
        base = r.vault_version
        if held is not None and held.rotation_id == r.id and (base is None or held.version > base):
            # Written by an earlier attempt whose answer was lost (or a crash after it).
            return self._console_stored(r, path, held.version)
        current = held.version if held is not None else self._secrets.current_version(path)
        if base is not None and current != base:
            return self._console_taken(r, path, held)
        password = new_password(self._iam(r.account_id).password_policy())
        log.register_secret(password)
        try:
            metadata = {
                "rotation_id": r.id,
                "rotated_at": self.now().astimezone(UTC).isoformat(timespec="seconds"),
            }
            self._before_side_effect(r)
            # Journalled before the write is sent: from now on Vault may hold a password
            # IAM does not, and the rotation never gives up before it has settled that.
            r = self._save(r, store_started_at=self.now(), vault_version=current)
            try:
                version = self._secrets.write_password(path, password, r.id, metadata, current)
            except (CasConflict, Transient) as exc:
                # Someone wrote since we read, or no answer came: the write may have been
                # applied all the same. One read tells; when it cannot be had, the next
                # attempt reads again.
                self._ensure_lease(r, renew=True)
                try:
                    latest = self._read_password(path)
                except Transient:
                    raise exc from None
                if latest is not None and latest.rotation_id == r.id and latest.version > current:
                    version = latest.version
                elif isinstance(exc, CasConflict):
                    return self._console_taken(r, path, latest)
                else:
                    raise
        finally:
            log.forget_secret(password)
        self._fault("console:stored")
        return self._console_stored(r, path, version)

    def _console_stored(self, r: Rotation, path: str, version: int) -> Rotation:
        return self._move(
            r,
            State.SET_PASSWORD,
            f"new console password stored in Vault at {path} (version {version})",
            stored_at=self.now(),
            vault_version=version,
            attempts=0,
            last_error=None,
        )

    def _console_set(self, r: Rotation) -> Rotation:
        path = self._console_path(r)
        iam = self._iam(r.account_id)
        # The lease first, then the read: what IAM is given is what Vault held a moment ago.
        self._before_side_effect(r)
        held = self._read_password(path)
        if held is None or held.rotation_id != r.id:
            return self._console_taken(r, path, held)
        create = r.create_login
        if create and iam.login_profile(r.user_name) is not None:
            if r.intent_at is None:
                return self._fail(
                    r,
                    f"user {r.user_name} got console access from elsewhere since this "
                    "rotation began (a login profile exists now): it is not replaced, and "
                    f"Vault version {held.version} at {path} holds a password IAM never "
                    "took. To rotate that password: "
                    + suggested("rotate", r.user_name, "--console"),
                )
            create = False  # this rotation's own, from an attempt whose answer was lost
        if r.intent_at is None:
            # Journalled before IAM is asked: from now on IAM may hold the new password.
            r = self._save(r, intent_at=self.now())
        log.register_secret(held.password)
        try:
            self._before_side_effect(r)
            iam.set_password(r.user_name, held.password, create=create)
        except PasswordRefused as exc:
            return self._console_refused(r, str(exc))
        except NotFound:
            if iam.login_profile(r.user_name) is not None:  # NotFound here: no user
                raise
            return self._move(
                r,
                State.CANCELLED,
                f"user {r.user_name} has no console access any more (its login profile was "
                f"deleted): IAM is unchanged, and Vault version {held.version} at {path} "
                "holds a password IAM never took",
            )
        finally:
            log.forget_secret(held.password)
        self._fault("console:set")
        return self._console_set_done(r, path, held)

    def _console_set_done(self, r: Rotation, path: str, held: StoredPassword) -> Rotation:
        """IAM has the password of Vault version `held.version`: DONE once Vault still
        serves it and this process still holds the rotation."""
        try:
            self._ensure_lease(r, renew=True)
        except LeaseLost:
            # Paused past the lease between the renewal and the call: another process
            # holds the rotation, and may have gone further. Say so if Vault moved on.
            with contextlib.suppress(Exception):
                latest = self._read_password(path)
                if latest is None or latest.rotation_id != r.id:
                    text = (
                        f"{r.user_name}: a process that had lost its lease set the console "
                        f"password of Vault version {held.version} at {path}, and Vault's "
                        "latest is another: IAM and Vault may disagree. Run: "
                        + suggested("rotate", r.user_name, "--console")
                    )
                    _log.error("console.stale_password_set", rotation_id=r.id, user=r.user_name)
                    self._notifier.notify("failed", r, text)
            raise
        latest = self._read_password(path)
        if latest is None or latest.rotation_id != r.id:
            return self._console_taken(r, path, latest)
        what = "console access given" if r.create_login else "console password rotated"
        done = self._move(
            r,
            State.DONE,
            f"{what}: the password of Vault version {held.version} at {path} set in IAM; "
            "a reset is required at the next sign-in",
            verified_at=self.now(),
        )
        self._notifier.notify(
            "done",
            done,
            f"{r.user_name}: {what}, the password in Vault at {path} "
            f"(version {held.version}); a reset is required at the next sign-in",
        )
        return done

    def _console_taken(self, r: Rotation, path: str, held: StoredPassword | None) -> Rotation:
        """Vault no longer holds (or never held) this rotation's password where it
        should: someone wrote the path, or deleted its latest version, since the rotation
        last looked. Nothing is overwritten, in Vault or IAM: the rotation FAILS, saying
        what IAM holds and what to run."""
        now_there = (
            "its latest version was deleted, or holds no password"
            if held is None
            else f"version {held.version} was written outside this rotation"
        )
        again = suggested("rotate", r.user_name, "--console")
        if r.intent_at is None:
            return self._fail(
                r,
                f"Vault at {path} changed under this rotation: {now_there}. IAM is "
                f"unchanged and nothing is overwritten. For a new password: {again}",
            )
        return self._fail(
            r,
            f"Vault at {path} changed under this rotation: {now_there}, after IAM may "
            f"have been given version {r.vault_version} (read it with: bao kv get "
            f"-version={r.vault_version} <mount>/{path}). Nothing is overwritten. To set "
            f"one password in both: {again}",
        )

    def _console_refused(self, r: Rotation, error: str) -> Rotation:
        """IAM refused the password: the account's policy changed since it was read. A
        new one is made under the policy as it is now; after three refusals in a row an
        operator is asked to look at the policy."""
        earlier = sum(
            1
            for e in self._store.events(r.id)
            if e.from_state is State.SET_PASSWORD and e.to_state is State.STORE
        )
        if earlier + 1 >= 3:
            # Looked at again with a new password (`stored_at` None: STORE's work).
            return self._block(
                replace(r, stored_at=None, intent_at=None),
                f"{error}. IAM refused {earlier + 1} passwords made to the account's "
                "password policy: check GetAccountPasswordPolicy; IAM is unchanged",
            )
        return self._move(
            r,
            State.STORE,
            f"{error}: a new password is made under the account's current policy",
            last_error=error,
            stored_at=None,
            intent_at=None,
        )

    def _done(self, r: Rotation, reason: str) -> Rotation:
        done = self._move(r, State.DONE, reason)
        self._notifier.notify(
            "done", done, f"{r.user_name}: key rotated, new key {r.new_key_id} in Vault"
        )
        return done


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, RotatorError) else f"unexpected {type(exc).__name__}: {exc}"


__all__ = ["Engine", "SimulatedCrash", "Timing", "arn_is_user", "new_rotation"]
