"""Frozen value types shared by the core and the adapters. No I/O here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from rotator.machine import RotationKind as RotationKind  # re-exported: a value type
from rotator.machine import State

# IAM's rule for user names: 1 to 64 of these characters (ASCII only: `\w` would also let
# other alphabets through). Used wherever a user name comes from a person or a request.
IAM_USER_NAME = re.compile(r"[A-Za-z0-9+=,.@_-]{1,64}")


def is_user_name(name: object) -> bool:
    """Whether `name` can be an IAM user name."""
    return isinstance(name, str) and IAM_USER_NAME.fullmatch(name) is not None


class KeyStatus(StrEnum):
    ACTIVE = "Active"
    INACTIVE = "Inactive"


class Decision(StrEnum):
    OK = "ok"
    WARN = "warn"
    ROTATE = "rotate"
    LEAKED = "leaked"
    BLOCKED = "blocked"
    EXEMPT = "exempt"
    UNUSED = "unused"
    # Console decisions only (a user's login profile, not a key):
    NO_MFA = "no_mfa"  # console access without an MFA device
    STALE_CONSOLE = "stale_console"  # no sign-in for `console_unused_after`


# The decisions a key can get; the rest are a console password's only.
KEY_DECISIONS: tuple[Decision, ...] = tuple(
    d for d in Decision if d not in (Decision.NO_MFA, Decision.STALE_CONSOLE)
)


class ConsoleMode(StrEnum):
    """What a rule does with console passwords (`console`): nothing, show them in
    `plan`, or rotate them into Vault."""

    OFF = "off"
    REPORT = "report"
    ROTATE = "rotate"


class RotationReason(StrEnum):
    AGE = "age"
    LEAKED = "leaked"
    MANUAL = "manual"
    UNUSED = "unused"


@dataclass(frozen=True)
class AccessKey:
    """One access key as IAM reports it. `access_key_id` is None when only the
    credential report (which carries no key ids) has been read for this user."""

    access_key_id: str | None
    status: KeyStatus
    created_at: datetime
    last_used_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.status is KeyStatus.ACTIVE


@dataclass(frozen=True)
class IamGroup:
    """An IAM group a user belongs to, with the managed policies attached to it (which
    apply to every member as if attached to each)."""

    name: str
    attached_policy_arns: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ConsoleAccess:
    """A user's console sign-in as the credential report tells it (only users with a
    login profile have one). Dates are None where the report says N/A or
    no_information."""

    password_last_changed: datetime | None
    password_last_used: datetime | None
    mfa_active: bool


@dataclass(frozen=True)
class IamUser:
    account_id: str
    user_name: str
    arn: str
    path: str = "/"
    tags: Mapping[str, str] = field(default_factory=dict)
    # Managed policies attached to the user itself (a quarantine policy always is).
    attached_policy_arns: frozenset[str] = frozenset()
    keys: tuple[AccessKey, ...] = ()
    # The user's groups: read by the bulk listing only (`IamPort.iter_users_with_details`).
    groups: tuple[IamGroup, ...] = ()
    # Console access from the credential report: None when the user has no login
    # profile, or when no report could be read.
    console: ConsoleAccess | None = None


# The rule name of a decision no rule of `rules` decided: the `policy` section's.
DEFAULT_RULE = "default"


@dataclass(frozen=True)
class KeyDecision:
    user: IamUser
    key: AccessKey
    decision: Decision
    reason: str
    # Created before the user's quarantine policy was first seen: possibly the leaked
    # key (contained when Active; an Inactive one stays flagged in the plan).
    suspect: bool = False
    # The rule the user falls under (`rotator.policy.Rules.rule_for`), and why it
    # matched (None for the default: no rule matched).
    rule: str = DEFAULT_RULE
    rule_match: str | None = None
    # Since when the key counts as idle: its last use, else its creation, or when an
    # operator turned it back on, whichever is latest. The clock of `unused_after` and
    # `inactive_delete_after`.
    idle_since: datetime | None = None
    # An Inactive key idle longer than its rule's `inactive_delete_after`: the next pass
    # deletes it.
    delete_due: bool = False


@dataclass(frozen=True)
class ConsoleDecision:
    """What the policy decides for one user's console password (`kind: console` in
    `plan`). `decision`: ok, warn, rotate, no_mfa, stale_console or exempt. `due_at`:
    when the password reaches its rule's `password_max_age` (None when its age is not
    known)."""

    user: IamUser
    access: ConsoleAccess
    decision: Decision
    reason: str
    mode: ConsoleMode
    rule: str = DEFAULT_RULE
    rule_match: str | None = None
    password_age: timedelta | None = None
    due_at: datetime | None = None


@dataclass(frozen=True)
class NewKey:
    """A freshly minted key. The secret is returned by IAM exactly once; it is hidden
    from `repr` and `str` so that it cannot slip into a log line or a traceback."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    def __str__(self) -> str:
        return f"NewKey({self.access_key_id})"


@dataclass(frozen=True)
class StoredSecret:
    """What Vault holds at a path: the key pair, its version and custom metadata."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    version: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)

    def as_new_key(self) -> NewKey:
        return NewKey(self.access_key_id, self.secret_access_key)


@dataclass(frozen=True)
class StoredPassword:
    """What Vault holds at a console path: the password, the rotation that wrote it
    (kept beside it in the data, so that a write whose answer was lost is recognised),
    the version and custom metadata. The password is hidden from `repr`."""

    password: str = field(repr=False)
    rotation_id: str | None = None
    version: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"StoredPassword(version={self.version}, rotation_id={self.rotation_id})"


@dataclass(frozen=True)
class LoginProfile:
    """A user's console access (`GetLoginProfile`): never the password, which IAM does
    not return."""

    created_at: datetime
    reset_required: bool


@dataclass(frozen=True)
class PasswordPolicy:
    """What the account asks of a password (`GetAccountPasswordPolicy`); `IAM_DEFAULT`
    when the account has none."""

    minimum_length: int = 8
    require_symbols: bool = False
    require_numbers: bool = False
    require_uppercase: bool = False
    require_lowercase: bool = False


@dataclass(frozen=True)
class ForcedRotation:
    """A request to replace one user's key now: `rotate`, the HTTP trigger, a leak."""

    user_name: str
    account_id: str | None = None
    key_id: str | None = None
    leaked: bool = False
    reason: str | None = None
    overlap: timedelta | None = None
    # Rotate a user that is exempt or excluded (`selection`) all the same.
    force: bool = False
    # Rotate the console password instead of the key; `create`: give a user without
    # console access a login profile (never done unless asked).
    kind: RotationKind = RotationKind.KEY
    create: bool = False


@dataclass(frozen=True)
class Rotation:
    """One rotation of one user's key: a row in the state store. Never holds a secret."""

    id: str
    account_id: str
    user_name: str
    reason: RotationReason
    state: State
    created_at: datetime
    updated_at: datetime
    old_key_id: str | None = None
    new_key_id: str | None = None
    leaked: bool = False
    note: str | None = None
    # CREATE's journal: the key ids that existed before CreateAccessKey, and when.
    intent_key_ids: tuple[str, ...] | None = None
    intent_at: datetime | None = None
    # When CreateAccessKey had certainly ended (returned, failed, or its deadline
    # passed): a key created after this moment is not this rotation's.
    intent_until: datetime | None = None
    # When STORE last began writing the new key to Vault (this host's clock): a write
    # still on its way may land until one Vault deadline after this.
    store_started_at: datetime | None = None
    stored_at: datetime | None = None
    vault_version: int | None = None
    verified_at: datetime | None = None
    deactivated_at: datetime | None = None
    overlap: timedelta | None = None
    next_action_at: datetime | None = None
    attempts: int = 0
    last_error: str | None = None
    waiting_on: str | None = None
    # What it replaces: the user's access key (the default) or its console password. A
    # user has at most one open rotation of each kind. A console rotation holds no key
    # ids; `vault_version` is the Vault version holding its new password, and
    # `store_started_at` when it began writing it.
    kind: RotationKind = RotationKind.KEY
    # A console rotation that may give a user without console access a login profile
    # (`rotate --console --create`); without it such a user is left alone.
    create_login: bool = False

    def is_due(self, now: datetime) -> bool:
        """Whether a tick should advance this rotation at `now` (a BLOCKED one is looked
        at again every `blocked_recheck`, and at once by `run --once`)."""
        return self.next_action_at is None or self.next_action_at <= now


@dataclass(frozen=True)
class Lease:
    """The right to advance one rotation. `token` (the fencing token) grows with every
    acquisition by a new holder; the state store refuses a write whose lease is no
    longer the current one, so a process that stalled past its lease cannot write
    over the progress of the one that took over."""

    rotation_id: str
    owner: str
    token: int
    # This acquisition took the lease from another owner that had neither released it
    # nor renewed it in time (a process that died or stalled). Not part of equality.
    taken_over: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class ScanLease:
    """The right to scan one account: across every daemon sharing a state store, only
    its holder scans that account, so N daemons make one scan per account per period.
    The holder renews it on every tick; when it stops doing so (a daemon died) another
    takes it over once it expires, with a greater `token` (the fencing token).

    `last_scan_at`: when the account's last scan finished, by whichever daemon (None
    before the first). `taken_over`: this acquisition took the lease from another
    owner whose lease had expired (a renewal, or a first holder, is not a takeover)."""

    account_id: str
    owner: str
    token: int
    expires_at: datetime
    last_scan_at: datetime | None = None
    taken_over: bool = False


@dataclass(frozen=True)
class Event:
    """One recorded transition (or a note on a rotation that stayed in its state)."""

    rotation_id: str
    at: datetime
    from_state: State | None
    to_state: State
    reason: str
    # The lease it was written under (owner `host:pid:random`, fencing token); None for
    # a write that needs none (a rotation's creation, an operator's command). Along one
    # trail the tokens never go down: two processes never advanced it at once.
    owner: str | None = None
    token: int | None = None
