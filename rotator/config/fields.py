"""Field types of the settings and the checks that need nothing but the field's own value.

Each check raises ValueError with the sentence an operator reads after the field's path
(`"vault:8200" is not an http(s) URL`); a rule that relates two fields is in `rules`.
"""

from __future__ import annotations

import ipaddress
import re
import string
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, PlainSerializer, PlainValidator

from rotator.cron import SCHEDULE_HINT, parse_schedule
from rotator.digests import is_email_address
from rotator.durations import DURATION_HINT, format_duration, parse_duration
from rotator.quoting import quoted, shown

__all__ = [
    "DEFAULT_QUARANTINE_POLICIES",
    "ROLE_ARN_RE",
    "AccountId",
    "ConsoleModeText",
    "Duration",
    "EmailAddress",
    "FilePath",
    "GroupName",
    "HttpUrl",
    "IamPath",
    "KvMount",
    "Listen",
    "NonEmptyStr",
    "PathTemplate",
    "PolicyArn",
    "PolicyOnly",
    "PolicyRef",
    "PositiveDuration",
    "RoleArn",
    "RoleName",
    "RuleName",
    "ScheduleText",
    "SnsArn",
    "TagValues",
    "UserGlob",
    "distinct_durations",
    "not_empty_list",
    "split_listen",
    "template_fields",
]

# AWS attaches one of these to a user whose key it found exposed. The first is also the
# example in PolicyArn's message.
DEFAULT_QUARANTINE_POLICIES: tuple[str, ...] = (
    "arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantine",
    "arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantineV2",
    "arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantineV3",
)


# --- durations and schedules --------------------------------------------------------------


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


ScheduleText = Annotated[str, PlainValidator(_validate_schedule_text)]
"""A 5-field cron expression or an interval, kept as (whitespace-normalised) text."""


# --- console mode -------------------------------------------------------------------------

_CONSOLE_MODES = ("off", "report", "rotate")


def _console_mode(value: object) -> str:
    # YAML 1.1 reads an unquoted `off` as false: that is what the operator wrote.
    if value is False:
        return "off"
    if isinstance(value, str) and value in _CONSOLE_MODES:
        return value
    expected = ", ".join(quoted(m) for m in _CONSOLE_MODES)
    message = f"expected one of {expected}, got {shown(value)}"
    if value is True:
        message += " (YAML reads unquoted yes/on/true as true; write report or rotate)"
    raise ValueError(message)


ConsoleModeText = Annotated[str, PlainValidator(_console_mode)]
"""`console`: off | report | rotate (`rotator.model.ConsoleMode`); YAML's `off` (false)
is read as "off"."""


# --- strings, paths and lists -------------------------------------------------------------


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def not_empty_list(value: tuple[Any, ...]) -> tuple[Any, ...]:
    """An AfterValidator for a list that must hold at least one item."""
    # Not Field(min_length=1): pydantic also reports that when an item is merely invalid.
    if not value:
        raise ValueError("must not be empty")
    return value


def distinct_durations(value: tuple[timedelta, ...]) -> tuple[timedelta, ...]:
    """An AfterValidator for a list of durations that must not name one twice."""
    seen: set[timedelta] = set()
    for item in value:
        if item in seen:
            raise ValueError(f"names {format_duration(item)} twice")
        seen.add(item)
    return value


def _email_address(value: str) -> str:
    if not is_email_address(value):
        raise ValueError(f"{quoted(value)} is not an email address")
    return value


EmailAddress = Annotated[str, AfterValidator(_email_address)]


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


NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
FilePath = Annotated[Path, PlainValidator(_path), PlainSerializer(str, when_used="json")]


# --- AWS names ----------------------------------------------------------------------------


def _account_id(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"expected a 12-digit string in quotes, got the number {value} "
            "(YAML drops the leading zeros of unquoted digits)"
        )
    if isinstance(value, str) and re.fullmatch(r"[0-9]{12}", value):
        return value
    raise ValueError(f'{shown(value)} is not an account id (12 digits, e.g. "123456789012")')


# Group 1 is the account the role is in (rules.role_in_its_account).
ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::([0-9]{12}):role/[\w+=,.@/-]+")
_POLICY_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::(aws|[0-9]{12}):policy/[\w+=,.@/-]+")
_SNS_ARN_RE = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[\w.-]+")
_ROLE_NAME_RE = re.compile(r"[\w+=,.@-]{1,64}")


def _matching(pattern: re.Pattern[str], what: str, example: str) -> AfterValidator:
    def check(value: str) -> str:
        if pattern.fullmatch(value) is None:
            raise ValueError(f"{shown(value)} is not {what} (e.g. {quoted(example)})")
        return value

    return AfterValidator(check)


def _role_name(value: str) -> str:
    if not _ROLE_NAME_RE.fullmatch(value):
        raise ValueError(f"{quoted(value)} is not an IAM role name")
    return value


def _iam_path(value: str) -> str:
    if not (value.startswith("/") and value.endswith("/")):
        raise ValueError(
            f'{shown(value)} must start and end with "/" (an IAM path such as "/service/")'
        )
    return value


_NAME_RE = re.compile(r"[\w+=,.@-]{1,128}")


def _policy_ref(value: str) -> str:
    if value.startswith("arn:"):
        if _POLICY_ARN_RE.fullmatch(value) is None:
            raise ValueError(
                f"{shown(value)} is not an IAM policy ARN "
                "(e.g. arn:aws:iam::aws:policy/AdministratorAccess)"
            )
    elif _NAME_RE.fullmatch(value) is None:
        raise ValueError(
            f"{shown(value)} is neither a policy name (e.g. AdministratorAccess) nor a "
            "policy ARN (e.g. arn:aws:iam::aws:policy/AdministratorAccess)"
        )
    return value


def _group_name(value: str) -> str:
    if _NAME_RE.fullmatch(value) is None:
        raise ValueError(f"{shown(value)} is not an IAM group name (1 to 128 of A-Za-z0-9+=,.@_-)")
    return value


# A bracket expression of a glob: [abc], [a-z], [!0-9] (a "]" first is one of the set).
_GLOB_SET_RE = re.compile(r"\[!?\]?[^\]]*\]")
_GLOB_REST_RE = re.compile(r"[A-Za-z0-9+=,.@_*?-]+")


def _user_glob(value: str) -> str:
    """A glob on user names (fnmatch, case-sensitive) that can match one: besides
    * ? and [...] only what an IAM user name holds."""
    rest = _GLOB_SET_RE.sub("", value)
    if "[" in rest or "]" in rest:
        raise ValueError(f"{shown(value)} has a [ without its ] (e.g. ci-* or build-[0-9]*)")
    if rest and _GLOB_REST_RE.fullmatch(rest) is None:
        raise ValueError(
            f"{shown(value)} can match no IAM user name: use letters, digits and +=,.@_- "
            "with the wildcards * ? [...] (e.g. ci-*)"
        )
    return value


def _tag_values(value: dict[str, str]) -> dict[str, str]:
    if not value:
        raise ValueError("must name at least one tag (e.g. {type: human})")
    return value


def _rule_name(value: str) -> str:
    if value == "default":
        raise ValueError(
            '"default" names the policy section in plan (the rule for users no rule '
            "matches): choose another name"
        )
    return value


def _policy_only(value: object) -> None:
    raise ValueError(
        "a rule cannot set this: it applies to every rotation alike, whichever rule "
        "opened it; set it under policy"
    )


AccountId = Annotated[str, PlainValidator(_account_id)]
RoleArn = Annotated[
    str, _matching(ROLE_ARN_RE, "an IAM role ARN", "arn:aws:iam::123456789012:role/rotator")
]
PolicyArn = Annotated[
    str, _matching(_POLICY_ARN_RE, "an IAM policy ARN", DEFAULT_QUARANTINE_POLICIES[0])
]
SnsArn = Annotated[
    str, _matching(_SNS_ARN_RE, "an SNS topic ARN", "arn:aws:sns:us-east-1:123456789012:rotator")
]
RoleName = Annotated[str, AfterValidator(_role_name)]
IamPath = Annotated[str, AfterValidator(_iam_path)]
PolicyRef = Annotated[str, AfterValidator(_policy_ref)]
"""A managed policy by name (any policy of that name) or by ARN."""
GroupName = Annotated[str, AfterValidator(_group_name)]
UserGlob = Annotated[str, AfterValidator(_non_empty), AfterValidator(_user_glob)]
TagValues = Annotated[dict[NonEmptyStr, str], AfterValidator(_tag_values)]
RuleName = Annotated[str, AfterValidator(_non_empty), AfterValidator(_rule_name)]
PolicyOnly = Annotated[object, PlainValidator(_policy_only)]
"""A key of `policy` that a rule may not set: any value is refused, saying why."""


# --- Vault paths --------------------------------------------------------------------------


def _kv_mount(value: str) -> str:
    if not value or value.startswith("/") or value.endswith("/"):
        raise ValueError(f'{shown(value)} must be a mount name without leading or trailing "/"')
    return value


_TEMPLATE_FIELDS = ("account_id", "user_name")


def template_fields(template: str) -> set[str]:
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
    if "user_name" not in template_fields(value):
        raise ValueError("must contain {user_name}: every user needs a secret path of its own")
    if value.startswith("/") or value.endswith("/"):
        raise ValueError('must not start or end with "/" (it is a path inside the mount)')
    return value


KvMount = Annotated[str, AfterValidator(_kv_mount)]
PathTemplate = Annotated[str, AfterValidator(_path_template)]


# --- the HTTP listener --------------------------------------------------------------------

_PORT_RE = re.compile(r"[0-9]+")


def split_listen(value: str) -> tuple[str, int]:
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
    split_listen(value)
    return value


Listen = Annotated[str, AfterValidator(_listen)]
