"""Settings: the YAML file plus a few environment defaults, validated in one go.

`load_settings` reads the file, `parse_settings` validates what YAML produced. Either
returns a frozen `Settings` or raises one `ConfigError` listing every problem, each
starting with its dotted path in the file (`aws.accounts[0].id: ...`), so that an operator
fixes the file in one round instead of one error per run.

The environment is an explicit argument (default: `os.environ` read at call time):
`VAULT_ADDR`, `VAULT_TOKEN`, `AWS_ENDPOINT_URL` and `AWS_REGION` / `AWS_DEFAULT_REGION`
fill in the matching keys when the file leaves them unset or null.

Durations are strings such as `"90d"` (parsed by `rotator.durations`; `Duration` here is
the field type). Schedules are a 5-field cron expression or an interval, validated by
`rotator.cron`; the daemon turns them into triggers.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import string
import types
import typing
from collections.abc import Mapping
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from rotator.cron import SCHEDULE_HINT, Schedule, parse_schedule
from rotator.deadlines import lease_problem
from rotator.durations import DURATION_HINT, format_duration, parse_duration
from rotator.errors import ConfigError
from rotator.paths import secret_path
from rotator.quoting import kind_of, quoted, shown

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_QUARANTINE_POLICIES",
    "AccountSettings",
    "AwsSettings",
    "Duration",
    "HttpSettings",
    "LeaksSettings",
    "NotifySettings",
    "PolicySettings",
    "PositiveDuration",
    "ScheduleSettings",
    "SelectionSettings",
    "Settings",
    "StateSettings",
    "VaultAuthSettings",
    "VaultSettings",
    "config_path",
    "load_settings",
    "parse_settings",
]

DEFAULT_CONFIG_PATH = Path("/etc/rotator/rotator.yaml")

DEFAULT_QUARANTINE_POLICIES: tuple[str, ...] = (
    "arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantine",
    "arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantineV2",
    "arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantineV3",
)

_REDACTED = "***"

# Context flag for parse_settings: the cross-field checks then run on the raw data (so
# they are reported even when the same section has other errors) instead of inside the
# model validators, which pydantic skips as soon as one field of the model is bad.
_DEFER_CHECKS = "rotator.defer_cross_checks"


# --- durations and schedules as field types -----------------------------------------------


def _validate_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        # Built in Python rather than read from YAML: hold it to what a file could say.
        format_duration(value)
        return value
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"{shown(value)} is not a duration ({DURATION_HINT})")


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than 0s")
    return value


Duration = Annotated[
    timedelta,
    PlainValidator(_validate_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
"""A duration field: `"90d"` in the file, a `timedelta` in Python, `"90d"` again in JSON."""

PositiveDuration = Annotated[Duration, AfterValidator(_positive)]


def _validate_schedule_text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {SCHEDULE_HINT}, got {shown(value)}")
    parse_schedule(value)
    return " ".join(value.split())


# --- field types with their own checks ----------------------------------------------------


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _not_empty_list(value: tuple[Any, ...]) -> tuple[Any, ...]:
    # Not Field(min_length=1): pydantic also reports that when an item is merely invalid.
    if not value:
        raise ValueError("must not be empty")
    return value


def _http_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{shown(value)} is not an http(s) URL")
    return value


def _path(value: object) -> Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value.strip():
        return Path(value)
    if isinstance(value, str):
        raise ValueError("must not be empty")
    raise ValueError(f"expected a file path, got {shown(value)}")


def _account_id(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"expected a 12-digit string in quotes, got the number {value} "
            "(YAML drops the leading zeros of unquoted digits)"
        )
    if isinstance(value, str) and re.fullmatch(r"[0-9]{12}", value):
        return value
    raise ValueError(f'{shown(value)} is not an account id (12 digits, e.g. "123456789012")')


_ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::([0-9]{12}):role/[\w+=,.@/-]+")
_POLICY_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::(aws|[0-9]{12}):policy/[\w+=,.@/-]+")
_SNS_ARN_RE = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[\w.-]+")


def _matching(pattern: re.Pattern[str], what: str, example: str) -> AfterValidator:
    def check(value: str) -> str:
        if pattern.fullmatch(value) is None:
            raise ValueError(f"{shown(value)} is not {what} (e.g. {quoted(example)})")
        return value

    return AfterValidator(check)


def _iam_path(value: str) -> str:
    if not (value.startswith("/") and value.endswith("/")):
        raise ValueError(
            f'{shown(value)} must start and end with "/" (an IAM path such as "/service/")'
        )
    return value


def _kv_mount(value: str) -> str:
    if not value or value.startswith("/") or value.endswith("/"):
        raise ValueError(f'{shown(value)} must be a mount name without leading or trailing "/"')
    return value


_TEMPLATE_FIELDS = ("account_id", "user_name")


def _template_fields(template: str) -> set[str]:
    """The placeholders of a path template; ValueError if it has a malformed one."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{shown(template)} is not a valid template: {exc}") from None
    found: set[str] = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in _TEMPLATE_FIELDS or spec or conversion:
            placeholder = "{" + field + ("!" + conversion if conversion else "")
            placeholder += (":" + spec if spec else "") + "}"
            raise ValueError(
                f"unknown placeholder {placeholder}; use only {{account_id}} and {{user_name}}"
            )
        found.add(field)
    return found


def _path_template(value: str) -> str:
    if "user_name" not in _template_fields(value):
        raise ValueError("must contain {user_name}: every user needs a secret path of its own")
    if value.startswith("/") or value.endswith("/"):
        raise ValueError('must not start or end with "/" (it is a path inside the mount)')
    return value


_PORT_RE = re.compile(r"[0-9]+")


def _split_listen(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:port`) into host and port; ValueError if malformed."""
    bad = f"{shown(value)} is not host:port (e.g. 127.0.0.1:9464 or [::1]:9464)"
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(bad) from None
        if not sep:
            raise ValueError(bad)
    else:
        host, sep, port_text = value.rpartition(":")
        if ":" in host:
            raise ValueError(f"{shown(value)}: write an IPv6 address in brackets, e.g. [::1]:9464")
        if not sep or not host:
            raise ValueError(bad)
    if _PORT_RE.fullmatch(port_text) is None or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{shown(value)}: the port must be a number in 1-65535")
    return host, int(port_text)


def _listen(value: str) -> str:
    _split_listen(value)
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
FilePath = Annotated[Path, PlainValidator(_path), PlainSerializer(str, when_used="json")]
AccountId = Annotated[str, PlainValidator(_account_id)]
RoleArn = Annotated[
    str, _matching(_ROLE_ARN_RE, "an IAM role ARN", "arn:aws:iam::123456789012:role/rotator")
]
PolicyArn = Annotated[
    str, _matching(_POLICY_ARN_RE, "an IAM policy ARN", DEFAULT_QUARANTINE_POLICIES[0])
]
SnsArn = Annotated[
    str, _matching(_SNS_ARN_RE, "an SNS topic ARN", "arn:aws:sns:us-east-1:123456789012:rotator")
]
IamPath = Annotated[str, AfterValidator(_iam_path)]


# --- the cross-field checks, shared by the models and parse_settings ---------------------
# Each takes field values that may be `_INVALID` (the field itself is bad and has been
# reported) and returns problems as "relative.path: message".


class _Invalid:
    """Marks a field whose own validation failed, so no check builds on its value."""


_INVALID = _Invalid()


def _policy_problems(
    max_age: object, warn_age: object, overlap: object, overlap_limit: object
) -> list[str]:
    problems = []
    if isinstance(max_age, timedelta) and isinstance(warn_age, timedelta) and warn_age > max_age:
        problems.append(
            f"warn_age: {format_duration(warn_age)} is longer than max_age "
            f"{format_duration(max_age)}; a key would be rotated before any warning"
        )
    if (
        isinstance(overlap, timedelta)
        and isinstance(overlap_limit, timedelta)
        and overlap_limit < overlap
    ):
        problems.append(
            f"overlap_limit: {format_duration(overlap_limit)} is shorter than overlap "
            f"{format_duration(overlap)}"
        )
    return problems


def _account_problems(account_id: object, role_arn: object, external_id: object) -> list[str]:
    problems = []
    if isinstance(external_id, str) and role_arn is None:
        problems.append("external_id: only used with role_arn, which is not set")
    if isinstance(account_id, str) and isinstance(role_arn, str):
        match = _ROLE_ARN_RE.fullmatch(role_arn)
        if match and match.group(1) != account_id:
            # The role is assumed *in* the account whose users it rotates.
            problems.append(
                f"role_arn: the role is in account {match.group(1)}, not in {account_id}"
            )
    return problems


def _duplicate_account_problems(ids: list[object]) -> list[str]:
    problems = []
    first_index: dict[str, int] = {}
    for index, account_id in enumerate(ids):
        if not isinstance(account_id, str):
            continue
        if account_id in first_index:
            problems.append(
                f"accounts[{index}].id: {quoted(account_id)} is already listed "
                f"as accounts[{first_index[account_id]}]"
            )
        else:
            first_index[account_id] = index
    return problems


def _template_problems(template: object, account_count: int) -> list[str]:
    if not isinstance(template, str) or account_count < 2:
        return []
    try:
        fields = _template_fields(template)
    except ValueError:
        return []
    if "account_id" in fields:
        return []
    return [
        "vault.path_template: must contain {account_id} when several accounts are listed, "
        "or users with the same name in two accounts would share one secret"
    ]


def _auth_problems(method: object, present: Mapping[str, bool]) -> list[str]:
    needs: dict[str, tuple[tuple[str, str], ...]] = {
        "token": (("token", "a token (vault.auth.token or VAULT_TOKEN)"),),
        "token_file": (("token_file", "token_file"),),
        "approle": (("role_id", "role_id"), ("secret_id_file", "secret_id_file")),
    }
    if not isinstance(method, str) or method not in needs:
        return []
    return [
        f"auth: method {quoted(method)} needs {what}"
        for key, what in needs[method]
        if not present.get(key, False)
    ]


def _checks_deferred(info: ValidationInfo) -> bool:
    return isinstance(info.context, Mapping) and bool(info.context.get(_DEFER_CHECKS))


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


# --- the settings model -------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AccountSettings(_Section):
    """One AWS account to rotate in. Without `role_arn` the credentials act directly."""

    id: AccountId
    role_arn: RoleArn | None = None
    external_id: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Self:
        if not _checks_deferred(info):
            _raise_problems(_account_problems(self.id, self.role_arn, self.external_id))
        return self


_ROLE_NAME_RE = re.compile(r"[\w+=,.@-]{1,64}")


def _role_name(value: str) -> str:
    if not _ROLE_NAME_RE.fullmatch(value):
        raise ValueError(f"{quoted(value)} is not an IAM role name")
    return value


class OrganizationSettings(_Section):
    """Discover the accounts with Organizations `ListAccounts` (from the management
    account's credentials) and assume `role_name` in each of them."""

    role_name: Annotated[str, AfterValidator(_role_name)]
    external_id: NonEmptyStr | None = None
    include: tuple[AccountId, ...] = ()
    exclude: tuple[AccountId, ...] = ()


class AwsSettings(_Section):
    """Where and how to reach IAM."""

    region: NonEmptyStr = "us-east-1"
    endpoint_url: HttpUrl | None = None
    # None: the credentials' own account.
    accounts: Annotated[tuple[AccountSettings, ...], AfterValidator(_not_empty_list)] | None = None
    organization: OrganizationSettings | None = None
    concurrency: StrictInt = Field(default=8, ge=1, le=64)
    # A client-side cap per account: IAM publishes no rate limit, it just starts throttling.
    iam_calls_per_second: StrictFloat = Field(default=20.0, gt=0, allow_inf_nan=False)
    # Read timeout of one IAM call attempt; with the connect timeout and the retries it
    # bounds a call's total deadline (rotator.deadlines), which the lease must cover.
    call_timeout: PositiveDuration = timedelta(seconds=15)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Self:
        if not _checks_deferred(info) and self.accounts:
            _raise_problems(_duplicate_account_problems([a.id for a in self.accounts]))
        if not _checks_deferred(info) and self.accounts and self.organization:
            _raise_problems(["aws.organization: give either aws.accounts or aws.organization"])
        return self


class VaultAuthSettings(_Section):
    """How to log in to Vault. `token` holds the resolved token (file, else VAULT_TOKEN);
    it is hidden from `repr`. That the chosen method has what it needs is checked by
    `parse_settings`, not here, so that tests can build settings without a token."""

    method: Literal["token", "token_file", "approle"] = "token"
    token: NonEmptyStr | None = Field(default=None, repr=False)
    token_file: FilePath | None = None
    role_id: NonEmptyStr | None = None
    secret_id_file: FilePath | None = None


class VaultSettings(_Section):
    """The Vault (KV version 2) that consumers read the keys from."""

    url: HttpUrl = "http://127.0.0.1:8200"
    auth: VaultAuthSettings = Field(default_factory=VaultAuthSettings)
    mount: Annotated[str, AfterValidator(_kv_mount)] = "secret"
    path_template: Annotated[str, AfterValidator(_path_template)] = "aws/{account_id}/{user_name}"
    # Connect and read timeout of one Vault request (rotator.deadlines).
    timeout: PositiveDuration = timedelta(seconds=10)

    def secret_path(self, account_id: str, user_name: str) -> str:
        """The KV path (inside `mount`) that holds this user's key."""
        return secret_path(self.path_template, account_id, user_name)


class StateSettings(_Section):
    """The state store. `lease_ttl`: how long a process may hold a rotation unrenewed."""

    path: FilePath = Path("/var/lib/rotator/state.db")
    lease_ttl: PositiveDuration = timedelta(minutes=5)


class SelectionSettings(_Section):
    """Which IAM users are considered at all."""

    include_paths: Annotated[tuple[IamPath, ...], AfterValidator(_not_empty_list)] = ("/",)
    exclude_users: tuple[str, ...] = ()
    exempt_tag: NonEmptyStr = "rotator:exempt"


class PolicySettings(_Section):
    """When keys are rotated and how long the old one lives on.

    `overlap_limit`: how long OVERLAP may hold beyond `overlap` while consumers still
    use the old key (at least `overlap`)."""

    max_age: PositiveDuration = timedelta(days=90)
    warn_age: Duration = timedelta(days=80)
    overlap: Duration = timedelta(hours=24)
    overlap_limit: Duration = timedelta(days=7)
    delete_after: Duration = timedelta(days=7)
    verify_timeout: PositiveDuration = timedelta(seconds=60)
    # After a rotation FAILED, how long before a scan opens the next one for that user
    # (a leak is contained and replaced at once regardless).
    retry_failed_after: Duration = timedelta(hours=24)
    # MAKE_ROOM deletes an inactive key only when it was last used (or, never used,
    # created) this long ago: a person may have switched it off to see what breaks.
    inactive_min_idle: Duration = timedelta(days=7)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Self:
        if not _checks_deferred(info):
            _raise_problems(
                _policy_problems(self.max_age, self.warn_age, self.overlap, self.overlap_limit)
            )
        return self


class LeaksSettings(_Section):
    """How leaked keys are recognised."""

    quarantine_policies: tuple[PolicyArn, ...] = DEFAULT_QUARANTINE_POLICIES
    sqs_queue_url: HttpUrl | None = None


class ScheduleSettings(_Section):
    """When the daemon scans (`scan`: cron or interval) and advances rotations (`tick`)."""

    scan: Annotated[str, PlainValidator(_validate_schedule_text)] = "0 * * * *"
    tick: PositiveDuration = timedelta(seconds=60)

    @property
    def scan_schedule(self) -> Schedule:
        """`scan` parsed into an interval or a cron expression."""
        return parse_schedule(self.scan)


class HttpSettings(_Section):
    """The daemon's HTTP endpoint (health, metrics, and the trigger when enabled)."""

    listen: Annotated[str, AfterValidator(_listen)] = "127.0.0.1:9464"
    trigger_token_file: FilePath | None = None

    @property
    def host(self) -> str:
        """The address to bind, without brackets for IPv6."""
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """The port to bind."""
        return _split_listen(self.listen)[1]


class NotifySettings(_Section):
    """Where alerts go (done / failed / blocked / leaked)."""

    webhook_url: HttpUrl | None = None
    sns_topic_arn: SnsArn | None = None


class Settings(_Section):
    """The whole configuration, validated and frozen."""

    aws: AwsSettings = Field(default_factory=AwsSettings)
    vault: VaultSettings = Field(default_factory=VaultSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    leaks: LeaksSettings = Field(default_factory=LeaksSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Self:
        if not _checks_deferred(info):
            count = len(self.aws.accounts or ())
            _raise_problems(_template_problems(self.vault.path_template, count))
        return self

    def redacted_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able data for display, secrets replaced by "***"."""
        data = self.model_dump(mode="json")
        if data["vault"]["auth"]["token"] is not None:
            data["vault"]["auth"]["token"] = _REDACTED
        return data


_SECTIONS = tuple(Settings.model_fields)


# --- loading ------------------------------------------------------------------------------


def config_path(cli_value: str | None, env: Mapping[str, str] | None = None) -> tuple[Path, bool]:
    """The config file to read: `--config`, else `ROTATOR_CONFIG`, else the default path.

    The flag is True when the path was chosen explicitly (flag or environment), so the
    caller can tell "the file you named is missing" from "no file at the default place".
    """
    env = os.environ if env is None else env
    if cli_value:
        return Path(cli_value), True
    if env.get("ROTATOR_CONFIG"):
        return Path(env["ROTATOR_CONFIG"]), True
    return DEFAULT_CONFIG_PATH, False


def load_settings(
    path: str | Path, env: Mapping[str, str] | None = None, *, need_vault: bool = True
) -> Settings:
    """Read and validate a YAML config file.

    Raises ConfigError naming every problem: a missing or unreadable file, a YAML syntax
    error (with line and column), a duplicated key, and every invalid setting. With
    `need_vault=False` (commands that never talk to Vault) a missing Vault token is not
    a problem.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a file"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    data, problems = _load_yaml(text, path)
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError([*problems, f"{path}: {_top_level_problem(data)}"])
    settings, more = _validate(data, os.environ if env is None else env, need_vault=need_vault)
    problems.extend(more)
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def parse_settings(
    data: object, env: Mapping[str, str] | None = None, *, need_vault: bool = True
) -> Settings:
    """Validate what YAML produced (None, for an empty file, means all defaults).

    Environment defaults are applied from `env` (default: `os.environ`). Raises
    ConfigError listing every problem, each starting with its dotted path.
    """
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError([f"top level: {_top_level_problem(data)}"])
    settings, problems = _validate(data, os.environ if env is None else env, need_vault=need_vault)
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def _top_level_problem(data: object) -> str:
    return f"expected a mapping of sections ({', '.join(_SECTIONS)}), got {kind_of(data)}"


def _load_yaml(text: str, path: str | Path) -> tuple[object, list[str]]:
    """Parse YAML; duplicated keys are reported too (plain PyYAML keeps the last one)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        problems = _duplicate_keys(node, ())
        return loader.construct_document(node), problems
    except yaml.MarkedYAMLError as exc:
        where = ""
        if exc.problem_mark is not None:
            mark = exc.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        # Only the problem text: str(exc) would quote the offending line of the file.
        raise ConfigError([f"{path}: YAML syntax error{where}: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML syntax error: {type(exc).__name__}"]) from None
    finally:
        loader.dispose()


def _duplicate_keys(node: yaml.Node, loc: tuple[str | int, ...]) -> list[str]:
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    f"{_dotted((*loc, key))}: appears twice (lines {seen[key]} and {line}); "
                    "only the last one would count"
                )
            seen.setdefault(key, line)
            problems.extend(_duplicate_keys(value_node, (*loc, key)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems.extend(_duplicate_keys(item, (*loc, index)))
    return problems


def _validate(
    data: Mapping[str, Any] | None, env: Mapping[str, str], *, need_vault: bool = True
) -> tuple[Settings | None, list[str]]:
    raw, sources = _with_env_defaults(data or {}, env)
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(raw, context={_DEFER_CHECKS: True})
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, sources))
    problems.extend(_cross_field_problems(raw, need_vault=need_vault))
    secrets = [_secret_value(raw), env.get("VAULT_TOKEN")]
    return settings, _scrub(_in_file_order(problems), secrets)


def _in_file_order(problems: list[str]) -> list[str]:
    """Unique problems grouped by section, in the order the sections are documented."""

    def section(problem: str) -> int:
        name = re.split(r"[.\[:]", problem, maxsplit=1)[0]
        return _SECTIONS.index(name) if name in _SECTIONS else len(_SECTIONS)

    return sorted(dict.fromkeys(problems), key=section)


def _with_env_defaults(
    data: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A copy of `data` with environment defaults filled in, and which path came from
    which variable (named in messages, since the operator will not find it in the file)."""
    raw: dict[str, Any] = dict(data)
    sources: dict[str, str] = {}
    for name in _SECTIONS:
        if name in raw and raw[name] is None:
            raw[name] = {}  # "vault:" with every key commented out
    vault = raw.get("vault", {})
    if isinstance(vault, Mapping) and vault.get("auth", {}) is None:
        raw["vault"] = {**vault, "auth": {}}

    def fill(section: tuple[str, ...], key: str, names: tuple[str, ...]) -> None:
        parent: dict[str, Any] = raw
        for part in section:
            child = parent.get(part, {})
            if not isinstance(child, Mapping):
                return  # reported as a type error by the model
            parent[part] = child = dict(child)
            parent = child
        if parent.get(key) is not None:
            return
        for var in names:
            if env.get(var):
                parent[key] = env[var]
                sources[".".join((*section, key))] = var
                return
        # Null means "not set": the model's default applies.
        parent.pop(key, None)

    fill(("vault",), "url", ("VAULT_ADDR",))
    fill(("vault", "auth"), "token", ("VAULT_TOKEN",))
    fill(("aws",), "endpoint_url", ("AWS_ENDPOINT_URL",))
    fill(("aws",), "region", ("AWS_REGION", "AWS_DEFAULT_REGION"))
    return raw, sources


def _secret_value(raw: Mapping[str, Any]) -> object:
    vault = raw.get("vault")
    auth = vault.get("auth") if isinstance(vault, Mapping) else None
    return auth.get("token") if isinstance(auth, Mapping) else None


def _scrub(problems: list[str], secrets: list[object]) -> list[str]:
    """Belt and braces: no message may carry a token, whatever path it took there."""
    for secret in secrets:
        # A very short "token" would blank out ordinary words; such a value is no secret.
        if isinstance(secret, str) and len(secret) >= 6:
            for form in (secret, json.dumps(secret, ensure_ascii=False)[1:-1]):
                problems = [p.replace(form, _REDACTED) for p in problems]
    return problems


# --- turning pydantic's errors into the operator's language ------------------------------

_SECRET_LOCS = {("vault", "auth", "token")}

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)",
    "dict_type": "a mapping (key: value lines)",
}


def _dotted(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "top level"


def _pydantic_problems(exc: ValidationError, sources: Mapping[str, str]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "invalid_key":
            # A non-string key, e.g. "90: x": the key is what is wrong, not an index.
            path = f"{_dotted(loc[:-1])}.{loc[-1]}" if loc[:-1] else str(loc[-1])
            problems.append(f"{path}: unknown key")
            continue
        message = _describe(error, loc)
        path = _dotted(loc)
        if path in sources:
            message += f" (from {sources[path]})"
        problems.append(f"{path}: {message}")
    return problems


def _describe(error: Any, loc: tuple[str | int, ...]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    secret = loc in _SECRET_LOCS
    given = kind_of(value) if secret else shown(value)
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(loc)
    if kind == "missing":
        return "required, but missing"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {given}"
        if kind == "string_type" and isinstance(value, bool):
            message += " (YAML reads unquoted yes/no/on/off/true/false as booleans; quote it)"
        return message
    if kind == "literal_error":
        return f"expected one of {str(ctx['expected']).replace(chr(39), chr(34))}, got {given}"
    bounds = {"greater_than": "greater than", "greater_than_equal": "at least"}
    bounds |= {"less_than": "less than", "less_than_equal": "at most"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}, got {given}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "finite_number":
        return f"must be a finite number, got {given}"
    return str(error["msg"])


def _suggestion(loc: tuple[str | int, ...]) -> str:
    model: type[BaseModel] | None = Settings
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _inner_model(field.annotation) if field else None
    if model is None or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _inner_model(annotation: object) -> type[BaseModel] | None:
    """The model inside `X`, `X | None` or `tuple[X, ...]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None


# --- cross-field checks on the raw data ---------------------------------------------------


@cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    return TypeAdapter(model.model_fields[name].rebuild_annotation())


def _resolve(model: type[BaseModel], section: Mapping[str, Any], name: str) -> object:
    """The validated value of one field as the model would see it, or `_INVALID`."""
    if name not in section:
        return model.model_fields[name].get_default(call_default_factory=True)
    try:
        return _field_adapter(model, name).validate_python(
            section[name], context={_DEFER_CHECKS: True}
        )
    except ValidationError:
        return _INVALID


def _mapping(parent: Mapping[str, Any] | None, name: str) -> Mapping[str, Any] | None:
    """A sub-section, {} when absent, None when it is not a mapping (reported already)."""
    if parent is None:
        return None
    value = parent.get(name, {})
    return value if isinstance(value, Mapping) else None


def _cross_field_problems(raw: Mapping[str, Any], *, need_vault: bool = True) -> list[str]:
    problems: list[str] = []

    policy = _mapping(raw, "policy")
    if policy is not None:
        names = ("max_age", "warn_age", "overlap", "overlap_limit")
        values = [_resolve(PolicySettings, policy, name) for name in names]
        problems += [f"policy.{p}" for p in _policy_problems(*values)]

    vault = _mapping(raw, "vault")
    auth = _mapping(vault, "auth")
    if auth is not None:
        method = _resolve(VaultAuthSettings, auth, "method")
        # A value of the wrong type is present (and reported); only absence counts here.
        present = {key: auth.get(key) is not None for key in VaultAuthSettings.model_fields}
        if not need_vault and method == "token":
            # A token usually comes from the environment of the command that uses Vault;
            # a command that never talks to Vault (plan, status) must not demand one.
            present["token"] = True
        problems += [f"vault.{p}" for p in _auth_problems(method, present)]

    aws = _mapping(raw, "aws")
    state = _mapping(raw, "state")
    lease_ttl = _resolve(StateSettings, state or {}, "lease_ttl")
    call_timeout = _resolve(AwsSettings, aws or {}, "call_timeout")
    vault_timeout = _resolve(VaultSettings, vault or {}, "timeout")
    if (
        isinstance(lease_ttl, timedelta)
        and isinstance(call_timeout, timedelta)
        and isinstance(vault_timeout, timedelta)
    ):
        problem = lease_problem(lease_ttl, call_timeout, vault_timeout)
        if problem:
            problems.append(f"state.lease_ttl: {problem}")

    accounts = aws.get("accounts") if aws is not None else None
    if isinstance(accounts, list):
        ids: list[object] = []
        for index, item in enumerate(accounts):
            if not isinstance(item, Mapping):
                ids.append(_INVALID)
                continue
            # `id` has no default: when it is missing, that is reported already.
            account_id = _resolve(AccountSettings, item, "id") if "id" in item else _INVALID
            role_arn = _resolve(AccountSettings, item, "role_arn")
            external_id = _resolve(AccountSettings, item, "external_id")
            ids.append(account_id)
            problems += [
                f"aws.accounts[{index}].{p}"
                for p in _account_problems(account_id, role_arn, external_id)
            ]
        problems += [f"aws.{p}" for p in _duplicate_account_problems(ids)]
        if vault is not None:
            template = _resolve(VaultSettings, vault, "path_template")
            problems += _template_problems(template, len(accounts))
    return problems
