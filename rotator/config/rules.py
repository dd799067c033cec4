"""The rules that relate two or more settings, each written once.

A rule is a function of one section's `Fields` (views.py) that yields its problems as
`relative.path: message`. A model names its rules in `cross_checks` (models.py), and the
same functions run in two places:

- `model_problems`, from the models' validator, on every validated model, so settings
  built in Python obey them too;
- `raw_problems`, from the loader, on the raw file, because pydantic skips a model's
  validators as soon as one of its fields is invalid, and an operator should see every
  problem of the file at once. There each field is validated on its own, and a rule is
  silent only when a field it needs is invalid itself.

The loader lists rule problems from the raw run only, after the field problems of their
section; pydantic's copy of them (error type `RULE_ERROR`) is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel

from rotator.config.fields import ROLE_ARN_RE, template_fields
from rotator.config.views import (
    Fields,
    Inherited,
    ModelFields,
    RawFields,
    inner_model,
    is_model_list,
)
from rotator.deadlines import lease_problem
from rotator.durations import format_duration
from rotator.quoting import quoted

__all__ = [
    "RULE_ERROR",
    "STATE_URL_ENV",
    "Rule",
    "accounts_listed_once",
    "accounts_or_organization",
    "console_path_apart_from_key_path",
    "external_id_needs_role_arn",
    "inactive_delete_after_covers_min_idle",
    "lease_covers_a_call",
    "model_problems",
    "overlap_limit_covers_overlap",
    "password_warn_age_below_max_age",
    "path_template_tells_accounts_apart",
    "raw_problems",
    "redacted_url",
    "role_in_its_account",
    "rule_names_unique",
    "rules_keep_inactive_min_idle",
    "rules_match_listed_accounts",
    "rules_warn_before_console_rotation",
    "rules_warn_before_rotating",
    "state_url_problems",
    "unused_action_needs_unused_after",
    "unused_keys_can_be_reactivated",
    "url_passwords",
    "vault_login_problems",
    "warn_age_within_max_age",
]

Rule = Callable[[Fields], Iterable[str]]

# The pydantic error type of a broken rule, raised by the models' validator.
RULE_ERROR = "config_rule"


# --- policy -------------------------------------------------------------------------------


def warn_age_within_max_age(policy: Fields) -> Iterator[str]:
    """A key is warned about before it is rotated."""
    max_age, warn_age = policy.get("max_age"), policy.get("warn_age")
    if isinstance(max_age, timedelta) and isinstance(warn_age, timedelta) and warn_age > max_age:
        yield (
            f"warn_age: {format_duration(warn_age)} is longer than max_age "
            f"{format_duration(max_age)}; a key would be rotated before any warning"
        )


def password_warn_age_below_max_age(policy: Fields) -> Iterator[str]:
    """A console password is warned about before it is due."""
    max_age, warn_age = policy.get("password_max_age"), policy.get("password_warn_age")
    if isinstance(max_age, timedelta) and isinstance(warn_age, timedelta) and warn_age >= max_age:
        yield (
            f"password_warn_age: {format_duration(warn_age)} is not below password_max_age "
            f"{format_duration(max_age)}; a console password would be due before any warning"
        )


def overlap_limit_covers_overlap(policy: Fields) -> Iterator[str]:
    """OVERLAP may outlast `overlap`, never end before it."""
    overlap, overlap_limit = policy.get("overlap"), policy.get("overlap_limit")
    if (
        isinstance(overlap, timedelta)
        and isinstance(overlap_limit, timedelta)
        and overlap_limit < overlap
    ):
        yield (
            f"overlap_limit: {format_duration(overlap_limit)} is shorter than overlap "
            f"{format_duration(overlap)}"
        )


def inactive_delete_after_covers_min_idle(policy: Fields) -> Iterator[str]:
    """Deleting idle inactive keys never takes one MAKE_ROOM would still keep."""
    delete_after = policy.get("inactive_delete_after")
    min_idle = policy.get("inactive_min_idle")
    if (
        isinstance(delete_after, timedelta)
        and isinstance(min_idle, timedelta)
        and delete_after < min_idle
    ):
        yield (
            f"inactive_delete_after: {format_duration(delete_after)} is shorter than "
            f"inactive_min_idle {format_duration(min_idle)}: a key someone switched off to "
            "see what breaks would be deleted sooner than a rotation may delete it"
        )


# --- rules --------------------------------------------------------------------------------


def unused_action_needs_unused_after(rule: Fields) -> Iterator[str]:
    """What to do with unused keys means nothing until the rule says when one is."""
    if rule.given("unused_action") and not rule.given("unused_after"):
        yield "unused_action: only used with unused_after, which is not set"


def _rule_label(rule: Fields) -> str:
    name = rule.get("name")
    return f"rule {quoted(name)}" if isinstance(name, str) else "the rule"


def _origin(rule: Inherited, name: str) -> str:
    return f" (from policy.{name})" if rule.inherits(name) else ""


def rule_names_unique(settings: Fields) -> Iterator[str]:
    """Each rule has a name of its own: plan, logs and reports name the rule that decided."""
    first_index: dict[str, int] = {}
    for index, rule in enumerate(settings.items("rules")):
        name = rule.get("name")
        if not isinstance(name, str):
            continue
        if name in first_index:
            yield (
                f"rules[{index}].name: {quoted(name)} is already the name of "
                f"rules[{first_index[name]}]"
            )
        else:
            first_index[name] = index


def _rules_warn_first(settings: Fields, max_key: str, warn_key: str, what: str) -> Iterator[str]:
    """Each rule that sets `max_key` or `warn_key` has its `warn_key` (its own or the
    policy's) below its `max_key`: `what` would otherwise be due without a warning."""
    policy = settings.section("policy")
    for index, own in enumerate(settings.items("rules")):
        if not (own.given(max_key) or own.given(warn_key)):
            continue  # the policy's own values, judged under policy
        rule = Inherited(own, policy)
        max_age, warn_age = rule.get(max_key), rule.get(warn_key)
        if (
            isinstance(max_age, timedelta)
            and isinstance(warn_age, timedelta)
            and warn_age >= max_age
        ):
            yield (
                f"rules[{index}]: {_rule_label(own)} has {warn_key} "
                f"{format_duration(warn_age)}{_origin(rule, warn_key)}, not below its "
                f"{max_key} {format_duration(max_age)}{_origin(rule, max_key)}: {what} "
                f"without a warning first; set a shorter {warn_key} in the rule"
            )


def rules_warn_before_rotating(settings: Fields) -> Iterator[str]:
    """A rule that sets max_age or warn_age warns before it rotates: its warn_age (its
    own or the policy's) is below its max_age."""
    yield from _rules_warn_first(settings, "max_age", "warn_age", "its keys would be rotated")


def rules_warn_before_console_rotation(settings: Fields) -> Iterator[str]:
    """A rule that sets password_max_age or password_warn_age warns before a console
    password is due: its password_warn_age (its own or the policy's) is below its
    password_max_age."""
    yield from _rules_warn_first(
        settings,
        "password_max_age",
        "password_warn_age",
        "its console passwords would be due",
    )


def rules_keep_inactive_min_idle(settings: Fields) -> Iterator[str]:
    """`inactive_delete_after_covers_min_idle`, for each rule that sets its own."""
    policy = settings.section("policy")
    for index, own in enumerate(settings.items("rules")):
        if own.given("inactive_delete_after"):
            for problem in inactive_delete_after_covers_min_idle(Inherited(own, policy)):
                yield f"rules[{index}].{problem}"


def unused_keys_can_be_reactivated(settings: Fields) -> Iterator[str]:
    """A key deactivated as unused stays long enough to be turned back on: it is deleted
    as idle (`inactive_delete_after`) only some time after it was deactivated."""
    policy = settings.section("policy")
    for index, own in enumerate(settings.items("rules")):
        if own.get("unused_action") != "deactivate":
            continue
        rule = Inherited(own, policy)
        unused_after = own.get("unused_after")
        delete_after = rule.get("inactive_delete_after")
        if (
            isinstance(unused_after, timedelta)
            and isinstance(delete_after, timedelta)
            and delete_after <= unused_after
        ):
            yield (
                f"rules[{index}].unused_after: {_rule_label(own)} deactivates keys unused for "
                f"{format_duration(unused_after)}, but inactive_delete_after "
                f"{format_duration(delete_after)}{_origin(rule, 'inactive_delete_after')} "
                "deletes them as soon as they are inactive: nobody could reactivate one; "
                "make inactive_delete_after longer than unused_after"
            )


def rules_match_listed_accounts(settings: Fields) -> Iterator[str]:
    """A rule about an account names one of `aws.accounts` (when they are listed)."""
    aws = settings.section("aws")
    if not aws.given("accounts"):
        return  # the credentials' own account, or the organization's: not known here
    listed = [account.get("id") for account in aws.items("accounts")]
    if not all(isinstance(account_id, str) for account_id in listed):
        return  # an invalid id is reported as such
    for index, rule in enumerate(settings.items("rules")):
        account = rule.section("match").get("account")
        if isinstance(account, str) and account not in listed:
            yield (
                f"rules[{index}].match.account: {quoted(account)} is not in aws.accounts: "
                "the rule would never match"
            )


# --- accounts -----------------------------------------------------------------------------


def external_id_needs_role_arn(account: Fields) -> Iterator[str]:
    """An external id is only ever sent with AssumeRole."""
    if isinstance(account.get("external_id"), str) and account.get("role_arn") is None:
        yield "external_id: only used with role_arn, which is not set"


def role_in_its_account(account: Fields) -> Iterator[str]:
    """The role is assumed *in* the account whose users it rotates."""
    account_id, role_arn = account.get("id"), account.get("role_arn")
    if isinstance(account_id, str) and isinstance(role_arn, str):
        match = ROLE_ARN_RE.fullmatch(role_arn)
        if match and match.group(1) != account_id:
            yield f"role_arn: the role is in account {match.group(1)}, not in {account_id}"


def accounts_listed_once(aws: Fields) -> Iterator[str]:
    """Each account appears once in `aws.accounts` (an invalid id is not compared)."""
    first_index: dict[str, int] = {}
    for index, account in enumerate(aws.items("accounts")):
        account_id = account.get("id")
        if not isinstance(account_id, str):
            continue
        if account_id in first_index:
            yield (
                f"accounts[{index}].id: {quoted(account_id)} is already listed "
                f"as accounts[{first_index[account_id]}]"
            )
        else:
            first_index[account_id] = index


def accounts_or_organization(aws: Fields) -> Iterator[str]:
    """The accounts are listed, or discovered from the organization, not both."""
    if aws.given("accounts") and aws.given("organization"):
        yield "organization: give either aws.accounts or aws.organization"


# --- across sections ----------------------------------------------------------------------


def lease_covers_a_call(settings: Fields) -> Iterator[str]:
    """The lease outlasts the longest backend call (rotator.deadlines)."""
    lease_ttl = settings.section("state").get("lease_ttl")
    call_timeout = settings.section("aws").get("call_timeout")
    vault_timeout = settings.section("vault").get("timeout")
    if (
        isinstance(lease_ttl, timedelta)
        and isinstance(call_timeout, timedelta)
        and isinstance(vault_timeout, timedelta)
    ):
        problem = lease_problem(lease_ttl, call_timeout, vault_timeout)
        if problem:
            yield f"state.lease_ttl: {problem}"


def path_template_tells_accounts_apart(settings: Fields) -> Iterator[str]:
    """With several accounts, each user's secret paths (key and console) name the
    account."""
    # Invalid accounts count too: the operator listed them, and will fix them.
    if len(settings.section("aws").items("accounts")) < 2:
        return
    for name in ("path_template", "console_path_template"):
        template = settings.section("vault").get(name)
        if isinstance(template, str) and "account_id" not in template_fields(template):
            yield (
                f"vault.{name}: must contain {{account_id}} when several accounts are "
                "listed, or users with the same name in two accounts would share one secret"
            )


def _path_vault_reads(template: str) -> tuple[str, ...] | None:
    """The path Vault serves for `template` filled with sample values, as Vault cleans
    it (empty and `.` segments dropped, `..` resolved); None when it cannot be filled."""
    try:
        path = template.format(account_id="111122223333", user_name="alice")
    except (KeyError, IndexError, ValueError):
        return None
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return tuple(segments)


def console_path_apart_from_key_path(vault: Fields) -> Iterator[str]:
    """A console password never lands where consumers read the user's key: the two
    templates lead to different paths as Vault reads them (`aws//{user_name}` is
    `aws/{user_name}` to Vault)."""
    key, console = vault.get("path_template"), vault.get("console_path_template")
    if not (isinstance(key, str) and isinstance(console, str)):
        return
    same = _path_vault_reads(key)
    if same is not None and same == _path_vault_reads(console):
        yield (
            f"console_path_template: {quoted(console)} leads to the same Vault path as "
            f"path_template {quoted(key)}: a console password would overwrite the user's "
            "access key"
        )


# --- the loader's own rule ----------------------------------------------------------------

_LOGIN_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "token": (("token", "a token (vault.auth.token or VAULT_TOKEN)"),),
    "token_file": (("token_file", "token_file"),),
    "approle": (("role_id", "role_id"), ("secret_id_file", "secret_id_file")),
}


def vault_login_problems(settings: Fields, *, need_vault: bool) -> list[str]:
    """The Vault login method has what it needs (a value of the wrong type is there, and
    reported as such).

    Checked by the loader, not by the models: a token usually comes from the environment
    of the command that uses Vault, so tests build settings without one, and a command
    that never talks to Vault (plan, status) passes `need_vault=False` to need none.
    """
    auth = settings.section("vault").section("auth")
    method = auth.get("method")
    if not isinstance(method, str) or method not in _LOGIN_NEEDS:
        return []
    return [
        f"vault.auth: method {quoted(method)} needs {what}"
        for key, what in _LOGIN_NEEDS[method]
        if not auth.given(key) and (key != "token" or need_vault)
    ]


# --- the state store's URL ----------------------------------------------------------------

# The environment variable whose URL replaces `state.url`; unlike the file, it may hold
# a password (set from a Kubernetes Secret, a systemd credential...).
STATE_URL_ENV = "ROTATOR_STATE_URL"


def url_passwords(url: str) -> list[str]:
    """The passwords a libpq URL carries, in its user info (`user:password@`) or as a
    `password` parameter, each as written and as decoded: [] when it holds none."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password is not None else []
        found += [value for key, value in parse_qsl(parts.query) if key == "password"]
    except ValueError:
        return []
    return [form for p in found if p for form in dict.fromkeys((p, unquote(p)))]


def redacted_url(url: str) -> str:
    """`url` with every password in it replaced by `***`, to show or log."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostinfo = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
        query = parts.query
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "password" for key, _ in pairs):
            redacted = [(k, "***" if k == "password" else v) for k, v in pairs]
            query = urlencode(redacted, safe="*/", quote_via=quote)
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "(a URL that cannot be read)"


def state_url_problems(file: Fields) -> list[str]:
    """No password is written in `state.url` of the file, where anyone who may read the
    file reads it; libpq takes it from PGPASSWORD or a password file instead. `file` is
    what the file says, without the environment: a URL from ROTATOR_STATE_URL may hold
    one (and a password in the file is refused even when that variable replaces it).

    Checked by the loader, not by the models: only the loader can tell the file from the
    environment, and settings built with the environment's URL must keep it."""
    url = file.section("state").get("url")
    if not isinstance(url, str) or not url_passwords(url):
        return []
    return [
        "state.url: must not hold a password, which anyone who can read this file would "
        "read: give it in PGPASSWORD or a libpq password file (~/.pgpass, or the file "
        f"PGPASSFILE names), or set the whole URL in {STATE_URL_ENV}"
    ]


# --- running them -------------------------------------------------------------------------


def _rules_of(model: type[BaseModel]) -> tuple[Rule, ...]:
    rules: tuple[Rule, ...] = getattr(model, "cross_checks", ())
    return rules


def model_problems(model: BaseModel) -> list[str]:
    """The problems of a validated model's own rules (its sections checked theirs)."""
    fields = ModelFields(model)
    return [problem for rule in _rules_of(type(model)) for problem in rule(fields)]


def raw_problems(model: type[BaseModel], raw: Mapping[str, Any], where: str = "") -> list[str]:
    """The problems of every rule of `model` and of its sections, run on raw data.

    A section's rules run before those of the section that holds it, so that within a
    section the problems come out as the file reads: accounts item by item, then the
    accounts as a list. `where` is the dotted path of `raw` in the file.
    """
    problems: list[str] = []
    for name, field in model.model_fields.items():
        section = inner_model(field.annotation)
        if section is None:
            continue
        value = raw.get(name)
        if is_model_list(field.annotation):
            if isinstance(value, list):
                for index, item in enumerate(value):
                    if isinstance(item, Mapping):
                        problems += raw_problems(section, item, f"{_join(where, name)}[{index}]")
        elif isinstance(value, Mapping):
            problems += raw_problems(section, value, _join(where, name))
    fields = RawFields(model, raw)
    problems += [_join(where, p) for rule in _rules_of(model) for p in rule(fields)]
    return problems


def _join(where: str, path: str) -> str:
    return f"{where}.{path}" if where else path
