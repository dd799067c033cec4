"""The narrow interfaces the core talks to. Adapters implement them; tests use fakes.

Errors crossing these seams are the project's own (`rotator.errors`), never a
backend's: a backend type must not leak into the core.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from rotator.machine import State
from rotator.model import (
    AccessKey,
    Event,
    IamUser,
    KeyStatus,
    Lease,
    LoginProfile,
    NewKey,
    PasswordPolicy,
    Rotation,
    RotationKind,
    ScanLease,
    StoredPassword,
    StoredSecret,
)


class Clock(Protocol):
    def __call__(self) -> datetime:
        """Return the current time, timezone-aware (UTC)."""
        ...


@dataclass(frozen=True)
class KeyLastUsed:
    user_name: str | None
    last_used_at: datetime | None


class IamPort(Protocol):
    """IAM for one account, plus STS to prove that a key works."""

    def account_id(self) -> str: ...

    def iter_users_with_details(self) -> Iterator[IamUser]:
        """Every user with path, tags, groups, and the managed policies attached to it
        and to its groups (bulk pages, groups included). Keys are not filled in."""
        ...

    def user_details(self, user_name: str) -> IamUser:
        """One user with tags and attached policies (no groups: reading them would need
        more IAM actions); raises `NotFound`."""
        ...

    def generate_credential_report(self) -> str:
        """Ask for a credential report; return its state (STARTED, INPROGRESS, COMPLETE)."""
        ...

    def get_credential_report(self) -> bytes | None:
        """The report's CSV, or None when it is not ready yet."""
        ...

    def list_access_keys(self, user_name: str) -> list[AccessKey]:
        """The user's keys with ids and status (no last-used); raises `NotFound`."""
        ...

    def key_last_used(self, access_key_id: str) -> KeyLastUsed: ...

    def create_access_key(self, user_name: str) -> NewKey:
        """Mint a key. Called once, never retried: it is not idempotent."""
        ...

    def set_key_status(self, user_name: str, access_key_id: str, status: KeyStatus) -> None: ...

    def delete_access_key(self, user_name: str, access_key_id: str) -> None: ...

    # --- console access -------------------------------------------------------------

    def login_profile(self, user_name: str) -> LoginProfile | None:
        """The user's console access (`GetLoginProfile`), None when it has none; raises
        `NotFound` when the user does not exist."""
        ...

    def password_policy(self) -> PasswordPolicy:
        """The account's password policy (`GetAccountPasswordPolicy`), or
        `rotator.passwords.IAM_DEFAULT` when it has none."""
        ...

    def set_password(self, user_name: str, password: str, *, create: bool = False) -> None:
        """Set the user's console password with a reset required at the next sign-in
        (`UpdateLoginProfile`; `CreateLoginProfile` when `create` and the user has no
        login profile). Idempotent: setting the same password twice changes nothing.
        Raises `NotFound` (no login profile and not `create`), `PasswordRefused`. No
        error text holds the password."""
        ...

    def iam_time(self) -> datetime | None:
        """IAM's clock now, as its latest answer showed it (None before any answer)."""
        ...

    def caller_arn(self, key: NewKey) -> str:
        """`sts:GetCallerIdentity` signed with `key`: the ARN it authenticates as."""
        ...


class SecretStore(Protocol):
    """Where new keys and console passwords live (Vault KV v2)."""

    def path_for(self, account_id: str, user_name: str) -> str:
        """The user's secret path; raises `BadInput` when the user name cannot be one."""
        ...

    def read(self, path: str) -> StoredSecret | None:
        """The latest version at `path`, or None when nothing (or a deleted version) is
        there. Raises `BadInput` when the path holds something that is not a key pair,
        `ConfigError` when the mount does not exist."""
        ...

    def write(self, path: str, key: NewKey, metadata: Mapping[str, str], cas: int) -> int:
        """Write a new version with check-and-set `cas` (0: must not exist yet) and set
        custom metadata; return the new version. Raises `CasConflict`."""
        ...

    def current_version(self, path: str) -> int:
        """The path's current version number, also when its latest version is deleted
        (0: no secret was ever written there); the check-and-set value for a write."""
        ...

    def set_metadata(self, path: str, metadata: Mapping[str, str]) -> None:
        """Replace the custom metadata at `path` (repairs a write whose second call,
        the metadata, was lost)."""
        ...

    def console_path_for(self, account_id: str, user_name: str) -> str:
        """The user's console password path (`vault.console_path_template`); raises
        `BadInput` when the user name cannot be one."""
        ...

    def read_password(self, path: str) -> StoredPassword | None:
        """The latest version at a console path, or None (nothing, or deleted). Raises
        `BadInput` when it holds no password."""
        ...

    def write_password(
        self,
        path: str,
        password: str,
        rotation_id: str,
        metadata: Mapping[str, str],
        cas: int,
    ) -> int:
        """Write a new version holding `password` and `rotation_id` with check-and-set
        `cas`, set custom metadata; return the new version. Raises `CasConflict`."""
        ...

    def check(self) -> None:
        """Raise unless the store is reachable, unsealed and the credentials are valid."""
        ...


class StateStore(Protocol):
    """Durable rotations, their event trail, and leases between processes."""

    def create(self, rotation: Rotation, reason: str) -> Rotation:
        """Insert a new rotation and its first event. Raises `RotationExists` when an open
        rotation for the same (account, user) is already there."""
        ...

    def get(self, rotation_id: str) -> Rotation | None: ...

    def open_for(
        self, account_id: str, user_name: str, kind: RotationKind = RotationKind.KEY
    ) -> Rotation | None:
        """The user's open rotation of that kind (a user has at most one of each)."""
        ...

    def latest_for(
        self, account_id: str, user_name: str, kind: RotationKind = RotationKind.KEY
    ) -> Rotation | None:
        """The user's newest rotation of that kind, open or closed."""
        ...

    def list_open(self) -> list[Rotation]: ...

    def list_recent(self, limit: int = 50, user_name: str | None = None) -> list[Rotation]:
        """Every open rotation and at most `limit` of the newest closed ones, newest first."""
        ...

    def save(
        self,
        rotation: Rotation,
        reason: str,
        from_state: State | None = None,
        *,
        lease: Lease | None = None,
    ) -> None:
        """Persist `rotation`. When `from_state` is given, the stored row must still be in
        `from_state` (else `StaleRotation`), and when it differs from `rotation.state` an
        event (from, to, reason) is appended in the same transaction. When `lease` is
        given, the write happens only while that lease is the rotation's current,
        unexpired one by the store's own clock (else `LeaseLost`, nothing written)."""
        ...

    def add_dead_letter(self, source: str, message_id: str, error: str, body: str) -> None:
        """Keep an event that could not be parsed, out of its queue's way (a bounded
        number: the oldest go first)."""
        ...

    def dead_letters(self) -> list[tuple[str, str, datetime, str]]: ...

    def leak_report_seen(self, event_id: str, key_id: str) -> bool:
        """Whether this key of this leak event was handled already (replays are no-ops)."""
        ...

    def add_leak_report(
        self, event_id: str, key_id: str, account_id: str, user_name: str | None, result: str
    ) -> None:
        """Record that this key of this leak event was handled; idempotent."""
        ...

    def quarantines(self, account_id: str) -> dict[str, datetime]:
        """User -> when the rotator first saw its quarantine policy attached."""
        ...

    def note_quarantines(self, account_id: str, seen: Mapping[str, tuple[str, datetime]]) -> None:
        """Record what a full scan of the account saw quarantined (user -> (policy,
        first seen)); keep earlier sightings, forget users no longer quarantined."""
        ...

    def warning_stages_sent(
        self, account_id: str, key_ids: Iterable[str]
    ) -> dict[str, dict[str, datetime]]:
        """Key id -> {warning stage: the due moment it was sent for} of the owner
        warnings already handed out for these keys of `account_id` (keys with none are
        left out)."""
        ...

    def record_warning_stage(
        self, account_id: str, user_name: str, key_id: str, stage: str, due_at: datetime
    ) -> None:
        """Record that the owner was warned of `key_id` at `stage` (`"7d"`) before
        `due_at`; idempotent. Recording it again for another due moment replaces it."""
        ...

    def replacement_key_ids(self, account_id: str) -> set[str]:
        """Key ids issued to replace a contained leak (by rotations that did not fail)."""
        ...

    def record(
        self, rotation_id: str, state: State, reason: str, *, lease: Lease | None = None
    ) -> None:
        """Append a note to the trail of a rotation that stays in `state`; fenced by
        `lease` as `save` is."""
        ...

    def events(self, rotation_id: str) -> list[Event]: ...

    def acquire_lease(self, rotation_id: str, owner: str, ttl: timedelta) -> Lease | None:
        """Take or renew the lease on a rotation for `ttl` from now by the store's clock;
        None when another live owner holds it. A renewal by the holder of an unexpired
        lease keeps its token; any other acquisition gets a greater token than every
        earlier one of that rotation, and `taken_over` says whether it took the lease
        from another owner that had not released it. Raises `NotFound` for an unknown
        rotation."""
        ...

    def renew_lease(self, lease: Lease, ttl: timedelta) -> Lease | None:
        """Extend `lease` for `ttl` from now by the store's clock while it is still the
        rotation's current, unexpired lease; None otherwise, changing nothing."""
        ...

    def release_lease(self, rotation_id: str, owner: str) -> None:
        """End the lease now if `owner` holds it; a no-op otherwise. The token stays and
        the lease has no owner (""): taking it next is no takeover."""
        ...

    def hold_scan_lease(self, account_id: str, owner: str, ttl: timedelta) -> ScanLease | None:
        """Take or renew the scan lease of `account_id` for `ttl` from now by the store's
        clock; None when another owner holds an unexpired one. A renewal by the holder
        of an unexpired lease keeps its token; any other acquisition gets a greater token
        than every earlier one of that account, and `taken_over` says whether it took
        the lease from a different owner."""
        ...

    def scan_finished(self, lease: ScanLease) -> ScanLease:
        """Record that a scan of the lease's account finished now (store clock) and
        return the lease with that `last_scan_at`. Fenced: raises `LeaseLost`, writing
        nothing, unless `lease` is still the account's current, unexpired scan lease."""
        ...

    def release_scan_lease(self, account_id: str, owner: str) -> None:
        """End the scan lease now if `owner` holds it (a daemon stopping); a no-op
        otherwise. The lease is left with no owner (""), so the next holder's taking it
        is no takeover; the token and `last_scan_at` stay."""
        ...

    def scan_leases(self) -> list[ScanLease]:
        """Every account's scan lease as stored (expired ones too), by account id."""
        ...

    def check(self) -> None:
        """Raise unless the store is writable."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class QueueMessage:
    message_id: str
    receipt: str = field(repr=False)
    body: str = field(repr=False)
    receive_count: int = 1


class LeakQueue(Protocol):
    """Where AWS Health events arrive (EventBridge -> SQS), delivered at least once."""

    def receive(self, *, max_messages: int = 10, wait_seconds: int = 20) -> list[QueueMessage]:
        """One long poll: the messages that arrived, at most `max_messages`."""
        ...

    def delete(self, message: QueueMessage) -> None:
        """The message is handled: it does not come back."""
        ...

    def postpone(self, message: QueueMessage, seconds: int) -> None:
        """Hide the message for `seconds` (a transient failure: try again later)."""
        ...


class Notifier(Protocol):
    def notify(self, event: str, rotation: Rotation, text: str) -> None:
        """Tell people about `event` (done, failed, blocked, leaked_contained,
        consumers_not_switched). Never raises, never blocks a rotation."""
        ...


class OwnerNotifier(Protocol):
    def warn_owner(self, owner: str, subject: str, text: str, key_ids: Sequence[str]) -> bool:
        """Hand one owner's warning digest (naming `key_ids`) to the channels; True when
        it was accepted for sending (a send that fails later is retried there), False
        when there is no channel or no room. Never raises, never blocks a pass."""
        ...


def key_ids(keys: Iterable[AccessKey]) -> tuple[str, ...]:
    return tuple(sorted(k.access_key_id for k in keys if k.access_key_id))
