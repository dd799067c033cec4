"""In-memory fakes of the ports, for tests of the core (as `structlog.testing` is for logs).

`FakeIam`, `FakeSecrets` and `FakeStateStore` behave as `AwsIam`, `VaultStore` and
`SqliteStateStore` do: the same answers, and the same `rotator.errors` types (with the
same `answered`/`not_applied` flags) for the same situations. The contract suites in
`tests/contracts/` run every test against a fake and against the real adapter on a real
server, so a fake that drifts from its adapter fails there. Where a fake follows AWS
rather than moto (moto is not AWS everywhere), the method says so.

Each fake also has a few helpers that act on the backend directly, as an operator or
another process would (`FakeIam.add_user`, `FakeSecrets.delete_latest`...): they are not
part of the port, send no "call", and mirror `rotator.sandbox.LocalAws` where it has the
same helper, so a test can seed either one the same way. `before_call`, given an operation
name (`iam:CreateAccessKey`, `vault:write`...), runs before every call and may raise to
simulate an outage or a refusal.

No I/O and no SDK here: this module imports no boto3, hvac or sqlite3 (an import-linter
contract keeps it that way), so a test of the core needs no server at all.
"""

from __future__ import annotations

import csv
import io
import secrets
import string
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rotator.errors import (
    BackendUnavailable,
    BadInput,
    CapConflict,
    CasConflict,
    LeaseLost,
    NotFound,
    PasswordRefused,
    RotationExists,
    RotatorError,
    StaleRotation,
    Transient,
)
from rotator.machine import TERMINAL, State
from rotator.model import (
    AccessKey,
    Event,
    IamGroup,
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
from rotator.passwords import IAM_DEFAULT, problems
from rotator.paths import (
    ACCESS_KEY_FIELD,
    DEFAULT_CONSOLE_PATH_TEMPLATE,
    PASSWORD_FIELD,
    ROTATION_ID_FIELD,
    SECRET_KEY_FIELD,
    secret_path,
)
from rotator.ports import Clock, KeyLastUsed
from rotator.sandbox import ACCOUNT_ID, SeedKey

if TYPE_CHECKING:
    from rotator.ports import IamPort, Notifier, SecretStore, StateStore

__all__ = [
    "MAX_DEAD_LETTERS",
    "CapturingNotifier",
    "FakeClock",
    "FakeIam",
    "FakeSecrets",
    "FakeStateStore",
    "Notification",
]

# As many dead letters as `rotator.state` keeps (the contract suite holds both to it).
MAX_DEAD_LETTERS = 1000


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def _refusal(error: RotatorError) -> RotatorError:
    """Mark `error` as the backend's own refusal, as the adapters mark a 4xx answer: the
    call certainly had no effect (the engine relies on this after CreateAccessKey)."""
    error.answered = True
    error.not_applied = True
    return error


# --------------------------------------------------------------------------- clock


class FakeClock:
    """A clock that moves only when told. `sleep` moves it too, so retries and waits cost
    no real time; `monotonic` reads it as seconds, for `Engine(monotonic=...)`."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or _wall_clock()
        self.slept: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)

    def monotonic(self) -> float:
        return self.now.timestamp()


# ------------------------------------------------------------------------ notifier


@dataclass(frozen=True)
class Notification:
    event: str
    rotation: Rotation
    text: str


class CapturingNotifier:
    """A `Notifier` that keeps what it was told, in order."""

    def __init__(self) -> None:
        self.sent: list[Notification] = []
        self._lock = threading.Lock()

    def notify(self, event: str, rotation: Rotation, text: str) -> None:
        with self._lock:
            self.sent.append(Notification(event, rotation, text))

    def events(self) -> list[str]:
        with self._lock:
            return [n.event for n in self.sent]


# ----------------------------------------------------------------------------- IAM

_KEY_ID_ALPHABET = string.ascii_uppercase + "234567"
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"
# AWS regenerates the credential report at most every four hours; until then a
# GenerateCredentialReport answers COMPLETE and the old report is served.
_REPORT_LIFETIME = timedelta(hours=4)
_REPORT_HEADER = (
    "user",
    "arn",
    "user_creation_time",
    "password_enabled",
    "password_last_used",
    "password_last_changed",
    "password_next_rotation",
    "mfa_active",
    "access_key_1_active",
    "access_key_1_last_rotated",
    "access_key_1_last_used_date",
    "access_key_1_last_used_region",
    "access_key_1_last_used_service",
    "access_key_2_active",
    "access_key_2_last_rotated",
    "access_key_2_last_used_date",
    "access_key_2_last_used_region",
    "access_key_2_last_used_service",
    "cert_1_active",
    "cert_1_last_rotated",
    "cert_2_active",
    "cert_2_last_rotated",
)
# A user with no console password, MFA device or signing certificate.
_REPORT_FLAGS = dict.fromkeys(
    ("password_enabled", "mfa_active", "cert_1_active", "cert_2_active"), "false"
)


@dataclass
class _Key:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    status: KeyStatus
    created_at: datetime
    last_used_at: datetime | None = None


@dataclass
class _User:
    user_name: str
    path: str
    arn: str
    created_at: datetime
    tags: dict[str, str] = field(default_factory=dict)
    policies: set[str] = field(default_factory=set)
    keys: list[_Key] = field(default_factory=list)
    # Console access: the password (None: no login profile), as IAM keeps it.
    password: str | None = field(default=None, repr=False)
    reset_required: bool = False
    password_changed_at: datetime | None = None
    password_last_used: datetime | None = None
    profile_created_at: datetime | None = None
    mfa: bool = False


@dataclass
class _Group:
    name: str
    path: str
    policies: set[str] = field(default_factory=set)
    # Member user names, in the order they were added (as IAM keeps them).
    members: list[str] = field(default_factory=list)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _report_time(moment: datetime | None) -> str:
    return "N/A" if moment is None else _aware(moment).strftime("%Y-%m-%dT%H:%M:%S+00:00")


class FakeIam:
    """`IamPort` for one account, in memory. `calls` counts calls by operation name as
    `AwsIam.calls` does (`iam:ListAccessKeys`, `sts:GetCallerIdentity`...)."""

    def __init__(
        self,
        account_id: str = ACCOUNT_ID,
        *,
        clock: Clock | None = None,
        before_call: Callable[[str], None] | None = None,
    ) -> None:
        self._account_id = account_id
        self._clock: Clock = clock or _wall_clock
        self.before_call = before_call
        self.calls: Counter[str] = Counter()
        self._users: dict[str, _User] = {}
        self._groups: dict[str, _Group] = {}
        self._report: tuple[datetime, bytes] | None = None
        self._answered = False
        # None: the account has no password policy (IAM's own minimums apply).
        self.account_password_policy: PasswordPolicy | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"FakeIam(account_id={self._account_id!r}, users={len(self._users)})"

    def _call(self, operation: str) -> None:
        with self._lock:
            self.calls[operation] += 1
        if self.before_call is not None:
            self.before_call(operation)
        with self._lock:
            self._answered = True

    def _user(self, action: str, user_name: str) -> _User:
        user = self._users.get(user_name)
        if user is None:
            raise _refusal(NotFound(f"{action}: The user with name {user_name} cannot be found."))
        return user

    def _key(self, action: str, user: _User, access_key_id: str) -> _Key:
        # IAM looks the key up among the named user's keys only: another user's key is
        # as unknown as one that never existed.
        for key in user.keys:
            if key.access_key_id == access_key_id:
                return key
        raise _refusal(
            NotFound(f"{action}: The Access Key with id {access_key_id} cannot be found")
        )

    def _iam_user(self, user: _User, *, with_groups: bool = False) -> IamUser:
        groups = (
            tuple(
                IamGroup(g.name, frozenset(g.policies))
                for _, g in sorted(self._groups.items())
                if user.user_name in g.members
            )
            if with_groups
            else ()
        )
        return IamUser(
            account_id=self._account_id,
            user_name=user.user_name,
            arn=user.arn,
            path=user.path,
            tags=dict(user.tags),
            attached_policy_arns=frozenset(user.policies),
            groups=groups,
        )

    # --- identity -----------------------------------------------------------------

    def account_id(self) -> str:
        # As `AwsIam` built with an account id: known without a call.
        return self._account_id

    def iam_time(self) -> datetime | None:
        """The fake's clock, once any call has been answered (None before, as AwsIam)."""
        with self._lock:
            return self._clock() if self._answered else None

    def caller_arn(self, key: NewKey) -> str:
        """The ARN the key pair authenticates as. Follows AWS, not moto: AWS refuses a key
        that does not exist (any more), is Inactive, or is signed with another secret
        (`InvalidClientTokenId`, `SignatureDoesNotMatch`), which `AwsIam` reports as
        `Transient` (a new key may be refused for a while). moto checks none of this: it
        answers with the key's user, or with a default `user/moto` ARN."""
        self._call("sts:GetCallerIdentity")
        with self._lock:
            for user in self._users.values():
                for k in user.keys:
                    if k.access_key_id != key.access_key_id:
                        continue
                    if k.secret_access_key != key.secret_access_key:
                        raise Transient(
                            "sts:GetCallerIdentity: new key not accepted yet "
                            "(SignatureDoesNotMatch)"
                        )
                    if k.status is not KeyStatus.ACTIVE:
                        break
                    return user.arn
        raise Transient("sts:GetCallerIdentity: new key not accepted yet (InvalidClientTokenId)")

    # --- users --------------------------------------------------------------------

    def iter_users_with_details(self) -> Iterator[IamUser]:
        """Every user with its groups (and what they attach) from one call, as
        GetAccountAuthorizationDetails with the User and Group filters gives them."""
        self._call("iam:GetAccountAuthorizationDetails")
        with self._lock:
            users = [self._iam_user(u, with_groups=True) for _, u in sorted(self._users.items())]
        yield from users

    def user_details(self, user_name: str) -> IamUser:
        """GetUser, ListUserTags and ListAttachedUserPolicies: no groups, as `AwsIam`."""
        self._call("iam:GetUser")
        with self._lock:
            self._user("iam:GetUser", user_name)
        self._call("iam:ListUserTags")
        self._call("iam:ListAttachedUserPolicies")
        with self._lock:
            return self._iam_user(self._user("iam:GetUser", user_name))

    # --- credential report ----------------------------------------------------------

    def generate_credential_report(self) -> str:
        """STARTED when a report is made now (a snapshot of every user's keys), COMPLETE
        while the last one is younger than four hours. Follows AWS: the report is that
        snapshot, so a key or user added later is missing from it (moto renders its
        report anew at every GetCredentialReport)."""
        self._call("iam:GenerateCredentialReport")
        now = self._clock()
        with self._lock:
            if self._report is not None and now - self._report[0] < _REPORT_LIFETIME:
                return "COMPLETE"
            self._report = (now, self._render_report())
        return "STARTED"

    def get_credential_report(self) -> bytes | None:
        self._call("iam:GetCredentialReport")
        with self._lock:
            return None if self._report is None else self._report[1]

    def _render_report(self) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_REPORT_HEADER)
        for _, user in sorted(self._users.items()):
            row = {h: "N/A" for h in _REPORT_HEADER}
            row.update(_REPORT_FLAGS)
            row.update(
                user=user.user_name,
                arn=user.arn,
                user_creation_time=_report_time(user.created_at),
            )
            if user.password is not None:
                row["password_enabled"] = "true"  # noqa: S105 - a report column
                row["password_last_changed"] = _report_time(user.password_changed_at)
                row["password_last_used"] = (
                    "no_information"
                    if user.password_last_used is None
                    else _report_time(user.password_last_used)
                )
            else:
                row["password_last_used"] = "not_supported"  # noqa: S105 - a report column
            row["mfa_active"] = "true" if user.mfa else "false"
            for n in (1, 2):
                key = user.keys[n - 1] if len(user.keys) >= n else None
                row[f"access_key_{n}_active"] = (
                    "true" if key is not None and key.status is KeyStatus.ACTIVE else "false"
                )
                if key is not None:
                    row[f"access_key_{n}_last_rotated"] = _report_time(key.created_at)
                    row[f"access_key_{n}_last_used_date"] = _report_time(key.last_used_at)
            writer.writerow([row[h] for h in _REPORT_HEADER])
        return out.getvalue().encode()

    # --- keys -----------------------------------------------------------------------

    def list_access_keys(self, user_name: str) -> list[AccessKey]:
        self._call("iam:ListAccessKeys")
        with self._lock:
            user = self._user("iam:ListAccessKeys", user_name)
            return [AccessKey(k.access_key_id, k.status, k.created_at) for k in user.keys]

    def key_last_used(self, access_key_id: str) -> KeyLastUsed:
        self._call("iam:GetAccessKeyLastUsed")
        with self._lock:
            for user in self._users.values():
                for k in user.keys:
                    if k.access_key_id == access_key_id:
                        return KeyLastUsed(user.user_name, k.last_used_at)
        raise _refusal(
            NotFound(
                f"iam:GetAccessKeyLastUsed: The Access Key with id {access_key_id} cannot be found"
            )
        )

    def create_access_key(self, user_name: str) -> NewKey:
        self._call("iam:CreateAccessKey")
        with self._lock:
            user = self._user("iam:CreateAccessKey", user_name)
            # IAM's cap: at most two keys per user, Inactive ones included.
            if len(user.keys) >= 2:
                raise _refusal(
                    CapConflict("iam:CreateAccessKey: Cannot exceed quota for AccessKeysPerUser: 2")
                )
            # IAM stamps CreateDate in whole seconds, on its own clock.
            created = _aware(self._clock()).replace(microsecond=0)
            key = self._mint(user, KeyStatus.ACTIVE, created)
        return NewKey(key.access_key_id, key.secret_access_key)

    def set_key_status(self, user_name: str, access_key_id: str, status: KeyStatus) -> None:
        self._call("iam:UpdateAccessKey")
        with self._lock:
            user = self._user("iam:UpdateAccessKey", user_name)
            self._key("iam:UpdateAccessKey", user, access_key_id).status = status

    def delete_access_key(self, user_name: str, access_key_id: str) -> None:
        self._call("iam:DeleteAccessKey")
        with self._lock:
            user = self._user("iam:DeleteAccessKey", user_name)
            user.keys.remove(self._key("iam:DeleteAccessKey", user, access_key_id))

    # --- console access ---------------------------------------------------------------

    def login_profile(self, user_name: str) -> LoginProfile | None:
        self._call("iam:GetLoginProfile")
        with self._lock:
            user = self._user("iam:GetLoginProfile", user_name)
            if user.password is None:
                return None
            assert user.profile_created_at is not None
            return LoginProfile(user.profile_created_at, user.reset_required)

    def password_policy(self) -> PasswordPolicy:
        self._call("iam:GetAccountPasswordPolicy")
        with self._lock:
            return self.account_password_policy or IAM_DEFAULT

    def set_password(self, user_name: str, password: str, *, create: bool = False) -> None:
        """As IAM: the account's policy is enforced (`PasswordRefused`), an update needs a
        login profile (`NotFound`), and a reset is required at the next sign-in."""
        operation = "iam:CreateLoginProfile" if create else "iam:UpdateLoginProfile"
        self._call(operation)
        with self._lock:
            user = self._user(operation, user_name)
            if user.password is None and not create:
                raise _refusal(NotFound(f"{operation}: Login profile for {user_name} not found"))
            if user.password is not None and create:
                raise _refusal(
                    RotatorError(
                        f"{operation}: refused: EntityAlreadyExists: Login Profile for user "
                        f"{user_name} already exists."
                    )
                )
            broken = problems(password, self.account_password_policy or IAM_DEFAULT)
            if broken:
                raise _refusal(
                    PasswordRefused(f"{operation}: PasswordPolicyViolation: {'; '.join(broken)}")
                )
            if user.password is None:
                user.profile_created_at = self._clock()
            if user.password != password:
                user.password_changed_at = self._clock()
            user.password = password
            user.reset_required = True

    def _mint(self, user: _User, status: KeyStatus, created: datetime) -> _Key:
        key = _Key(
            access_key_id="AKIA" + "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(16)),
            secret_access_key="".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40)),
            status=status,
            created_at=created,
        )
        user.keys.append(key)
        return key

    # --- the backend's side (no calls): what LocalAws offers on moto ---------------

    def add_user(
        self,
        name: str,
        *,
        path: str = "/",
        tags: Mapping[str, str] | None = None,
        policies: Iterable[str] = (),
        keys: Iterable[SeedKey] = (),
        now: datetime | None = None,
    ) -> list[NewKey]:
        """Create a user with tags, attached managed policies and backdated keys (the
        seed may exceed IAM's cap of two keys only as far as IAM does: not at all)."""
        with self._lock:
            if name in self._users:
                raise ValueError(f"user {name} exists already")
            self._users[name] = _User(
                user_name=name,
                path=path,
                arn=f"arn:aws:iam::{self._account_id}:user{path}{name}",
                created_at=_aware(now or self._clock()),
                tags=dict(tags or {}),
                policies=set(policies),
            )
        return [self.add_key(name, spec, now=now) for spec in keys]

    def add_login_profile(
        self,
        user_name: str,
        password: str,
        *,
        age: timedelta = timedelta(0),
        last_sign_in_ago: timedelta | None = None,
        mfa: bool = False,
    ) -> None:
        """Console access set `age` ago (as `LocalAws.add_login_profile`)."""
        now = self._clock()
        with self._lock:
            user = self._users[user_name]
            user.password = password
            user.profile_created_at = user.password_changed_at = now - age
            user.password_last_used = None if last_sign_in_ago is None else now - last_sign_in_ago
            user.mfa = mfa

    def login_password(self, user_name: str) -> tuple[str, bool] | None:
        """The user's password and whether a reset is required (as
        `LocalAws.login_profile`); None without a login profile."""
        with self._lock:
            user = self._users[user_name]
            return None if user.password is None else (user.password, user.reset_required)

    def add_key(self, user_name: str, spec: SeedKey, *, now: datetime | None = None) -> NewKey:
        """A key created `spec.age` before `now`, with the given status and last use."""
        moment = _aware(now or self._clock())
        with self._lock:
            user = self._users[user_name]
            if len(user.keys) >= 2:
                raise ValueError(f"user {user_name} holds two keys already (IAM's cap)")
            key = self._mint(user, spec.status, moment - spec.age)
            if spec.last_used_ago is not None:
                key.last_used_at = moment - spec.last_used_ago
        return NewKey(key.access_key_id, key.secret_access_key)

    def set_last_used(self, user_name: str, key_id: str, when: datetime) -> None:
        with self._lock:
            self._key("set_last_used", self._users[user_name], key_id).last_used_at = _aware(when)

    def keys(self, user_name: str) -> dict[str, KeyStatus]:
        """The user's keys as {id: status} (no call counted)."""
        with self._lock:
            return {k.access_key_id: k.status for k in self._users[user_name].keys}

    def delete_user(self, user_name: str) -> None:
        """Remove the user and its keys, as an operator would (IAM takes it out of its
        groups first)."""
        with self._lock:
            del self._users[user_name]
            for group in self._groups.values():
                if user_name in group.members:
                    group.members.remove(user_name)

    def attach_user_policy(self, user_name: str, policy_arn: str) -> None:
        with self._lock:
            self._users[user_name].policies.add(policy_arn)

    def detach_user_policy(self, user_name: str, policy_arn: str) -> None:
        with self._lock:
            self._users[user_name].policies.discard(policy_arn)

    def add_group(
        self,
        name: str,
        *,
        path: str = "/",
        policies: Iterable[str] = (),
        users: Iterable[str] = (),
    ) -> None:
        """Create a group with attached managed policies and the given members."""
        with self._lock:
            if name in self._groups:
                raise ValueError(f"group {name} exists already")
            self._groups[name] = _Group(name, path, set(policies))
        for user_name in users:
            self.add_user_to_group(name, user_name)

    def add_user_to_group(self, group_name: str, user_name: str) -> None:
        with self._lock:
            if user_name not in self._users:
                raise ValueError(f"no user {user_name}")
            group = self._groups[group_name]
            if user_name not in group.members:
                group.members.append(user_name)

    def attach_group_policy(self, group_name: str, policy_arn: str) -> None:
        with self._lock:
            self._groups[group_name].policies.add(policy_arn)


# ---------------------------------------------------------------------- secret store


@dataclass
class _Version:
    data: dict[str, str] = field(repr=False)
    deleted: bool = False


@dataclass
class _Secret:
    versions: list[_Version] = field(default_factory=list)
    custom_metadata: dict[str, str] = field(default_factory=dict)


class FakeSecrets:
    """`SecretStore` as a KV version 2 mount, in memory: every write adds a version,
    check-and-set compares with the current version (deleted ones count), custom
    metadata lives on the path, not on a version."""

    def __init__(
        self,
        path_template: str = "aws/{account_id}/{user_name}",
        *,
        console_path_template: str = DEFAULT_CONSOLE_PATH_TEMPLATE,
        mount: str = "secret",
        before_call: Callable[[str], None] | None = None,
    ) -> None:
        self.path_template = path_template
        self.console_path_template = console_path_template
        self.mount = mount
        self.before_call = before_call
        self.calls: Counter[str] = Counter()
        self._paths: dict[str, _Secret] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"FakeSecrets(mount={self.mount!r}, paths={len(self._paths)})"

    def _call(self, operation: str) -> None:
        with self._lock:
            self.calls[operation] += 1
        if self.before_call is not None:
            self.before_call(operation)

    def path_for(self, account_id: str, user_name: str) -> str:
        return secret_path(self.path_template, account_id, user_name)

    def _latest(self, path: str, *fields: str) -> tuple[dict[str, str], int, dict[str, str]] | None:
        """The latest version's data, number and the path's custom metadata, None when
        nothing (or a deleted version) is there; a refusal (`BadInput`) when the data
        lacks one of `fields`, as VaultStore answers."""
        self._call("vault:read")
        with self._lock:
            secret = self._paths.get(path)
            if secret is None or not secret.versions or secret.versions[-1].deleted:
                # KV v2 shows nothing when the latest version is deleted, not an older one.
                return None
            version = len(secret.versions)
            data = dict(secret.versions[-1].data)
            if not all(data.get(f) for f in fields):
                raise _refusal(
                    BadInput(
                        f"Vault secret {self.mount}/data/{path} (version {version}) lacks "
                        f"{' and '.join(fields)}"
                    )
                )
            return data, version, dict(secret.custom_metadata)

    def read(self, path: str) -> StoredSecret | None:
        found = self._latest(path, ACCESS_KEY_FIELD, SECRET_KEY_FIELD)
        if found is None:
            return None
        data, version, custom = found
        return StoredSecret(data[ACCESS_KEY_FIELD], data[SECRET_KEY_FIELD], version, custom)

    def write(self, path: str, key: NewKey, metadata: Mapping[str, str], cas: int) -> int:
        payload = {ACCESS_KEY_FIELD: key.access_key_id, SECRET_KEY_FIELD: key.secret_access_key}
        return self._write_data(path, payload, metadata, cas)

    def console_path_for(self, account_id: str, user_name: str) -> str:
        return secret_path(self.console_path_template, account_id, user_name)

    def read_password(self, path: str) -> StoredPassword | None:
        found = self._latest(path, PASSWORD_FIELD)
        if found is None:
            return None
        data, version, custom = found
        return StoredPassword(data[PASSWORD_FIELD], data.get(ROTATION_ID_FIELD), version, custom)

    def write_password(
        self,
        path: str,
        password: str,
        rotation_id: str,
        metadata: Mapping[str, str],
        cas: int,
    ) -> int:
        payload = {PASSWORD_FIELD: password, ROTATION_ID_FIELD: rotation_id}
        return self._write_data(path, payload, metadata, cas)

    def _write_data(
        self, path: str, payload: Mapping[str, str], metadata: Mapping[str, str], cas: int
    ) -> int:
        """One step here, where `VaultStore` makes two calls (data with check-and-set,
        then custom metadata): the fake cannot lose the second one."""
        self._call("vault:write")
        with self._lock:
            secret = self._paths.setdefault(path, _Secret())
            if cas != len(secret.versions):
                raise _refusal(
                    CasConflict(
                        f"Vault secret {self.mount}/data/{path} is no longer at version {cas}: "
                        "someone else wrote it"
                    )
                )
            secret.versions.append(_Version(dict(payload)))
            secret.custom_metadata = {str(k): str(v) for k, v in metadata.items()}
            return len(secret.versions)

    def current_version(self, path: str) -> int:
        self._call("vault:read-metadata")
        with self._lock:
            secret = self._paths.get(path)
            return 0 if secret is None else len(secret.versions)

    def set_metadata(self, path: str, metadata: Mapping[str, str]) -> None:
        """Replace the custom metadata. As Vault does, on a path with no secret this
        creates the metadata alone: `read` still shows nothing, the version stays 0."""
        self._call("vault:write-metadata")
        with self._lock:
            secret = self._paths.setdefault(path, _Secret())
            secret.custom_metadata = {str(k): str(v) for k, v in metadata.items()}

    def check(self) -> None:
        self._call("vault:check")

    # --- the backend's side (no calls) ------------------------------------------------

    def put_data(self, path: str, data: Mapping[str, str]) -> int:
        """Write a new version holding `data` without check-and-set, as another writer
        (a person, another tool) would; custom metadata is left as it is."""
        with self._lock:
            secret = self._paths.setdefault(path, _Secret())
            secret.versions.append(_Version(dict(data)))
            return len(secret.versions)

    def delete_latest(self, path: str) -> None:
        """Soft-delete the latest version (`vault kv delete`): reads show nothing, the
        version number still counts for check-and-set."""
        with self._lock:
            self._paths[path].versions[-1].deleted = True


# ----------------------------------------------------------------------- state store


@dataclass
class _LeaseRow:
    owner: str
    token: int
    expires_at: datetime


@dataclass
class _DeadLetter:
    received_at: datetime
    error: str
    body: str = field(repr=False)


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: the store keeps aware UTC times")
    return value.astimezone(UTC)


def _stored(rotation: Rotation) -> Rotation:
    """`rotation` as the store keeps it: every time in UTC, a naive one refused."""
    changes: dict[str, Any] = {}
    for f in fields(rotation):
        value = getattr(rotation, f.name)
        if isinstance(value, datetime):
            changes[f.name] = _utc(value)
    if rotation.intent_key_ids is not None:
        changes["intent_key_ids"] = tuple(rotation.intent_key_ids)
    return replace(rotation, **changes)


class FakeStateStore:
    """`StateStore` in memory: one open rotation per (account, user, kind), an
    append-only trail, fenced leases on the store's own clock, bounded dead letters.

    A fake lives in one process, so the SQLite store's takeover of a lease whose holder
    process died on this host has no counterpart here: a lease ends when released or
    when it expires on `clock`."""

    def __init__(
        self, clock: Clock | None = None, *, max_dead_letters: int = MAX_DEAD_LETTERS
    ) -> None:
        self._clock: Clock = clock or _wall_clock
        self.max_dead_letters = max_dead_letters
        self._rows: dict[str, tuple[int, Rotation]] = {}
        self._seq = 0
        self._events: dict[str, list[Event]] = {}
        self._leases: dict[str, _LeaseRow] = {}
        self._dead: dict[tuple[str, str], _DeadLetter] = {}
        self._leaks: dict[tuple[str, str], tuple[str, str | None, datetime, str]] = {}
        self._quarantines: dict[str, dict[str, tuple[str, datetime]]] = {}
        self._scans: dict[str, ScanLease] = {}
        # (account, key id) -> {stage: due moment}
        self._warnings: dict[tuple[str, str], dict[str, datetime]] = {}
        self._closed = False
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"FakeStateStore(rotations={len(self._rows)})"

    def _now(self) -> datetime:
        return _utc(self._clock())

    def _open(self) -> None:
        if self._closed:
            raise BackendUnavailable("state store (in memory) is closed")

    def _other_open(self, rotation: Rotation) -> str | None:
        for _, r in self._rows.values():
            if (
                r.id != rotation.id
                and r.account_id == rotation.account_id
                and r.user_name == rotation.user_name
                and r.kind == rotation.kind
                and r.state not in TERMINAL
            ):
                return r.id
        return None

    def _exists_error(self, rotation: Rotation, other: str) -> RotationExists:
        # The words of `rotator.state.shared.rotation_conflict`: a console one says so.
        kind = "" if rotation.kind == RotationKind.KEY else f"{RotationKind(rotation.kind)} "
        return RotationExists(
            f"user {rotation.user_name} in account {rotation.account_id} already has "
            f"open {kind}rotation {other}"
        )

    def _append(
        self,
        rotation_id: str,
        from_state: State | None,
        to: State,
        reason: str,
        lease: Lease | None = None,
    ) -> None:
        owner, token = (None, None) if lease is None else (lease.owner, lease.token)
        self._events.setdefault(rotation_id, []).append(
            Event(rotation_id, self._now(), from_state, to, reason, owner, token)
        )

    def _fence(self, rotation_id: str, lease: Lease) -> None:
        if lease.rotation_id != rotation_id:
            raise ValueError(f"lease of {lease.rotation_id} used to write {rotation_id}")
        row = self._leases.get(rotation_id)
        if row is None or row.owner != lease.owner or row.token != lease.token:
            raise LeaseLost(f"rotation {rotation_id}: lease {lease.token} was taken over")
        if row.expires_at <= self._now():
            raise LeaseLost(f"rotation {rotation_id}: lease {lease.token} has expired")

    # --- rotations ------------------------------------------------------------------

    def create(self, rotation: Rotation, reason: str) -> Rotation:
        stored = _stored(rotation)
        with self._lock:
            self._open()
            taken = stored.id in self._rows
            other = self._other_open(stored)
            if taken or (stored.state not in TERMINAL and other is not None):
                if other is not None:
                    raise self._exists_error(stored, other)
                raise RotatorError(f"rotation {stored.id} already exists")
            self._seq += 1
            self._rows[stored.id] = (self._seq, stored)
            self._append(stored.id, None, stored.state, reason)
            return stored

    def get(self, rotation_id: str) -> Rotation | None:
        with self._lock:
            self._open()
            row = self._rows.get(rotation_id)
            return None if row is None else row[1]

    def _ordered(self, *, newest_first: bool) -> list[tuple[int, Rotation]]:
        return sorted(
            self._rows.values(), key=lambda sr: (sr[1].created_at, sr[0]), reverse=newest_first
        )

    def open_for(
        self, account_id: str, user_name: str, kind: RotationKind = RotationKind.KEY
    ) -> Rotation | None:
        with self._lock:
            self._open()
            for _, r in self._ordered(newest_first=False):
                if (r.account_id, r.user_name, r.kind) == (
                    account_id,
                    user_name,
                    kind,
                ) and r.state not in TERMINAL:
                    return r
            return None

    def latest_for(
        self, account_id: str, user_name: str, kind: RotationKind = RotationKind.KEY
    ) -> Rotation | None:
        with self._lock:
            self._open()
            for _, r in self._ordered(newest_first=True):
                if (r.account_id, r.user_name, r.kind) == (account_id, user_name, kind):
                    return r
            return None

    def list_open(self) -> list[Rotation]:
        """Every open rotation, oldest first."""
        with self._lock:
            self._open()
            return [r for _, r in self._ordered(newest_first=False) if r.state not in TERMINAL]

    def list_recent(self, limit: int = 50, user_name: str | None = None) -> list[Rotation]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        with self._lock:
            self._open()
            rows = [
                r
                for _, r in self._ordered(newest_first=True)
                if user_name is None or r.user_name == user_name
            ]
        open_ = [r for r in rows if r.state not in TERMINAL]
        closed = [r for r in rows if r.state in TERMINAL][:limit]
        keep = {r.id for r in open_ + closed}
        return [r for r in rows if r.id in keep]

    def save(
        self,
        rotation: Rotation,
        reason: str,
        from_state: State | None = None,
        *,
        lease: Lease | None = None,
    ) -> None:
        stored = _stored(rotation)
        with self._lock:
            self._open()
            if lease is not None:
                self._fence(stored.id, lease)
            row = self._rows.get(stored.id)
            if row is None:
                raise NotFound(f"rotation {stored.id} not found")
            if from_state is not None and row[1].state != from_state:
                # Someone else moved it on meanwhile: never overwrite their progress.
                raise StaleRotation(f"rotation {stored.id} is in {row[1].state}, not {from_state}")
            other = self._other_open(stored)
            if stored.state not in TERMINAL and other is not None:
                raise self._exists_error(stored, other)
            self._rows[stored.id] = (row[0], stored)
            if from_state is not None and from_state != stored.state:
                self._append(stored.id, from_state, stored.state, reason, lease)

    def record(
        self, rotation_id: str, state: State, reason: str, *, lease: Lease | None = None
    ) -> None:
        with self._lock:
            self._open()
            if rotation_id not in self._rows:
                raise NotFound(f"rotation {rotation_id} not found")
            if lease is not None:
                self._fence(rotation_id, lease)
            self._append(rotation_id, state, state, reason, lease)

    def events(self, rotation_id: str) -> list[Event]:
        with self._lock:
            self._open()
            return list(self._events.get(rotation_id, ()))

    def replacement_key_ids(self, account_id: str) -> set[str]:
        with self._lock:
            self._open()
            return {
                r.new_key_id
                for _, r in self._rows.values()
                if r.account_id == account_id
                and r.leaked
                and r.new_key_id is not None
                and r.state not in (State.FAILED, State.CANCELLED)
            }

    # --- leases ---------------------------------------------------------------------

    def acquire_lease(self, rotation_id: str, owner: str, ttl: timedelta) -> Lease | None:
        if ttl <= timedelta(0):
            raise ValueError(f"lease ttl must be positive, not {ttl}")
        with self._lock:
            self._open()
            now = self._now()
            if rotation_id not in self._rows:
                raise NotFound(f"rotation {rotation_id} not found")
            held = self._leases.get(rotation_id)
            token, taken_over = 1, False
            if held is not None:
                live = held.expires_at > now
                if live and held.owner != owner:
                    return None
                # Only the holder's renewal of a live lease keeps the token.
                token = held.token if live else held.token + 1
                # A released lease has no owner: taking it is no takeover.
                taken_over = held.owner not in (owner, "")
            self._leases[rotation_id] = _LeaseRow(owner, token, now + ttl)
            return Lease(rotation_id, owner, token, taken_over)

    def renew_lease(self, lease: Lease, ttl: timedelta) -> Lease | None:
        if ttl <= timedelta(0):
            raise ValueError(f"lease ttl must be positive, not {ttl}")
        with self._lock:
            self._open()
            now = self._now()
            row = self._leases.get(lease.rotation_id)
            if (
                row is None
                or row.owner != lease.owner
                or row.token != lease.token
                or row.expires_at <= now
            ):
                return None
            row.expires_at = now + ttl
            return lease

    def release_lease(self, rotation_id: str, owner: str) -> None:
        # The row stays, with its token, so that the next holder's token is greater.
        with self._lock:
            self._open()
            row = self._leases.get(rotation_id)
            if row is not None and row.owner == owner:
                row.owner, row.expires_at = "", self._now()

    # --- scan leases -----------------------------------------------------------------

    def hold_scan_lease(self, account_id: str, owner: str, ttl: timedelta) -> ScanLease | None:
        if ttl <= timedelta(0):
            raise ValueError(f"lease ttl must be positive, not {ttl}")
        with self._lock:
            self._open()
            now = self._now()
            held = self._scans.get(account_id)
            token, last, taken_over = 1, None, False
            if held is not None:
                live = held.expires_at > now
                if live and held.owner != owner:
                    return None
                token = held.token if live and held.owner == owner else held.token + 1
                # A released lease has no owner: taking it is no takeover.
                last, taken_over = held.last_scan_at, held.owner not in (owner, "")
            lease = ScanLease(account_id, owner, token, now + ttl, last, taken_over)
            self._scans[account_id] = replace(lease, taken_over=False)
            return lease

    def scan_finished(self, lease: ScanLease) -> ScanLease:
        with self._lock:
            self._open()
            now = self._now()
            held = self._scans.get(lease.account_id)
            if held is None or held.owner != lease.owner or held.token != lease.token:
                raise LeaseLost(f"scan of {lease.account_id}: lease {lease.token} was taken over")
            if held.expires_at <= now:
                raise LeaseLost(f"scan of {lease.account_id}: lease {lease.token} has expired")
            self._scans[lease.account_id] = replace(held, last_scan_at=now)
            return replace(lease, last_scan_at=now)

    def release_scan_lease(self, account_id: str, owner: str) -> None:
        with self._lock:
            self._open()
            held = self._scans.get(account_id)
            if held is not None and held.owner == owner:
                self._scans[account_id] = replace(held, owner="", expires_at=self._now())

    def scan_leases(self) -> list[ScanLease]:
        with self._lock:
            self._open()
            return [self._scans[a] for a in sorted(self._scans)]

    # --- leak bookkeeping -------------------------------------------------------------

    def add_dead_letter(self, source: str, message_id: str, error: str, body: str) -> None:
        with self._lock:
            self._open()
            self._dead.setdefault((source, message_id), _DeadLetter(self._now(), error, body))
            # Insertion order is age: drop the oldest beyond the cap.
            for stale in list(self._dead)[: max(0, len(self._dead) - self.max_dead_letters)]:
                del self._dead[stale]

    def dead_letters(self) -> list[tuple[str, str, datetime, str]]:
        with self._lock:
            self._open()
            return [(s, m, d.received_at, d.error) for (s, m), d in self._dead.items()]

    def leak_report_seen(self, event_id: str, key_id: str) -> bool:
        with self._lock:
            self._open()
            return (event_id, key_id) in self._leaks

    def add_leak_report(
        self, event_id: str, key_id: str, account_id: str, user_name: str | None, result: str
    ) -> None:
        with self._lock:
            self._open()
            self._leaks.setdefault((event_id, key_id), (account_id, user_name, self._now(), result))

    def quarantines(self, account_id: str) -> dict[str, datetime]:
        with self._lock:
            self._open()
            seen = self._quarantines.get(account_id, {})
            return {user: first for user, (_, first) in seen.items()}

    def note_quarantines(self, account_id: str, seen: Mapping[str, tuple[str, datetime]]) -> None:
        noted = {user: (policy, _utc(first)) for user, (policy, first) in seen.items()}
        with self._lock:
            self._open()
            known = self._quarantines.setdefault(account_id, {})
            for user in set(known) - set(noted):
                del known[user]
            for user, sighting in noted.items():
                known.setdefault(user, sighting)

    def warning_stages_sent(
        self, account_id: str, key_ids: Iterable[str]
    ) -> dict[str, dict[str, datetime]]:
        with self._lock:
            self._open()
            return {
                k: dict(self._warnings[(account_id, k)])
                for k in set(key_ids)
                if (account_id, k) in self._warnings
            }

    def record_warning_stage(
        self, account_id: str, user_name: str, key_id: str, stage: str, due_at: datetime
    ) -> None:
        with self._lock:
            self._open()
            self._warnings.setdefault((account_id, key_id), {})[stage] = _utc(due_at)

    # --- health ---------------------------------------------------------------------

    def check(self) -> None:
        with self._lock:
            self._open()

    def close(self) -> None:
        with self._lock:
            self._closed = True


if TYPE_CHECKING:
    # mypy holds each fake to its port.
    _iam: IamPort = FakeIam()
    _secrets: SecretStore = FakeSecrets()
    _store: StateStore = FakeStateStore()
    _notifier: Notifier = CapturingNotifier()
