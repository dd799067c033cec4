"""The settings model: one frozen pydantic model per section of the file, and `Settings`.

A section names its cross-field rules in `cross_checks` (the functions are in `rules`);
they run on every validated instance, and the loader runs the same ones on the raw file.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    model_validator,
)
from pydantic_core import PydanticCustomError

from rotator.compliance import OWNER_TAG

# `checks`: the `rules` module; `Settings.rules` is the field of that name.
from rotator.config import rules as checks
from rotator.config.fields import (
    DEFAULT_QUARANTINE_POLICIES,
    AccountId,
    ConsoleModeText,
    Duration,
    EmailAddress,
    FilePath,
    GroupName,
    HttpUrl,
    IamPath,
    KvMount,
    Listen,
    NonEmptyStr,
    PathTemplate,
    PolicyArn,
    PolicyOnly,
    PolicyRef,
    PositiveDuration,
    RoleArn,
    RoleName,
    RuleName,
    ScheduleText,
    SnsArn,
    TagValues,
    UserGlob,
    distinct_durations,
    not_empty_list,
    split_listen,
)
from rotator.cron import Schedule, parse_schedule
from rotator.paths import secret_path

__all__ = [
    "REDACTED",
    "SECTIONS",
    "AccountSettings",
    "AwsSettings",
    "EmailSettings",
    "HttpSettings",
    "LeaksSettings",
    "MatchSettings",
    "NotifySettings",
    "OrganizationSettings",
    "PolicySettings",
    "RuleSettings",
    "ScheduleSettings",
    "SelectionSettings",
    "Settings",
    "StateSettings",
    "VaultAuthSettings",
    "VaultSettings",
]

REDACTED = "***"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The section's rules (rotator.config.rules), run once every field is valid.
    cross_checks: ClassVar[tuple[checks.Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        problems = checks.model_problems(self)
        if problems:
            # Through the context: the template's own braces would be read as placeholders.
            text = "; ".join(problems)
            raise PydanticCustomError(checks.RULE_ERROR, "{problems}", {"problems": text})
        return self


class AccountSettings(_Section):
    """One AWS account to rotate in. Without `role_arn` the credentials act directly."""

    id: AccountId
    role_arn: RoleArn | None = None
    external_id: NonEmptyStr | None = None

    cross_checks = (checks.external_id_needs_role_arn, checks.role_in_its_account)


class OrganizationSettings(_Section):
    """Discover the accounts with Organizations `ListAccounts` (from the management
    account's credentials) and assume `role_name` in each of them."""

    role_name: RoleName
    external_id: NonEmptyStr | None = None
    include: tuple[AccountId, ...] = ()
    exclude: tuple[AccountId, ...] = ()


class AwsSettings(_Section):
    """Where and how to reach IAM."""

    region: NonEmptyStr = "us-east-1"
    endpoint_url: HttpUrl | None = None
    # None: the credentials' own account.
    accounts: Annotated[tuple[AccountSettings, ...], AfterValidator(not_empty_list)] | None = None
    organization: OrganizationSettings | None = None
    concurrency: StrictInt = Field(default=8, ge=1, le=64)
    # A client-side cap per account: IAM publishes no rate limit, it just starts throttling.
    iam_calls_per_second: StrictFloat = Field(default=20.0, gt=0, allow_inf_nan=False)
    # Read timeout of one IAM call attempt; with the connect timeout and the retries it
    # bounds a call's total deadline (rotator.deadlines), which the lease must cover.
    call_timeout: PositiveDuration = timedelta(seconds=15)

    cross_checks = (checks.accounts_listed_once, checks.accounts_or_organization)


class VaultAuthSettings(_Section):
    """How to log in to Vault. `token` holds the resolved token (file, else VAULT_TOKEN);
    it is hidden from `repr`. That the chosen method has what it needs is checked by the
    loader (`checks.vault_login_problems`), not here, so that tests can build settings
    without a token."""

    method: Literal["token", "token_file", "approle"] = "token"
    token: NonEmptyStr | None = Field(default=None, repr=False)
    token_file: FilePath | None = None
    role_id: NonEmptyStr | None = None
    secret_id_file: FilePath | None = None


class VaultSettings(_Section):
    """The Vault (KV version 2) that consumers read the keys from."""

    url: HttpUrl = "http://127.0.0.1:8200"
    auth: VaultAuthSettings = Field(default_factory=VaultAuthSettings)
    mount: KvMount = "secret"
    path_template: PathTemplate = "aws/{account_id}/{user_name}"
    # Where a user's console password goes (data key `password`), beside its key.
    console_path_template: PathTemplate = "aws/{account_id}/{user_name}/console"
    # Connect and read timeout of one Vault request (rotator.deadlines).
    timeout: PositiveDuration = timedelta(seconds=10)

    cross_checks = (checks.console_path_apart_from_key_path,)

    def secret_path(self, account_id: str, user_name: str) -> str:
        """The KV path (inside `mount`) that holds this user's key."""
        return secret_path(self.path_template, account_id, user_name)

    def console_secret_path(self, account_id: str, user_name: str) -> str:
        """The KV path (inside `mount`) that holds this user's console password."""
        return secret_path(self.console_path_template, account_id, user_name)


def _state_url(value: str) -> str:
    """A PostgreSQL URL as libpq reads it. The value is not repeated in the message:
    text that is no URL has no password we could find and mask."""
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError(
            "must start with postgresql:// or postgres:// "
            "(e.g. postgresql://rotator@db.example.com:5432/rotator)"
        )
    return value


StateUrl = Annotated[str, AfterValidator(_state_url)]


class StateSettings(_Section):
    """The state store: SQLite at `path` (one host), or PostgreSQL at `url` when it is set
    (several daemons sharing the work; `path` is then unused). `url` is hidden from
    `repr`: it may hold a password, when it comes from ROTATOR_STATE_URL. `lease_ttl`:
    how long a process may hold a rotation unrenewed."""

    path: FilePath = Path("/var/lib/rotator/state.db")
    url: StateUrl | None = Field(default=None, repr=False)
    lease_ttl: PositiveDuration = timedelta(minutes=5)


class SelectionSettings(_Section):
    """Which IAM users are considered at all."""

    include_paths: Annotated[tuple[IamPath, ...], AfterValidator(not_empty_list)] = ("/",)
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
    # A pass deletes an inactive key idle (last used, else created) this long; None: off.
    inactive_delete_after: PositiveDuration | None = None
    # Console passwords (a user's login profile), from the credential report: off (not
    # looked at), report (plan shows them) or rotate (the pass rotates them into Vault).
    console: ConsoleModeText = "report"
    # A console password older than this is due; from password_warn_age on, `warn`.
    password_max_age: PositiveDuration = timedelta(days=90)
    password_warn_age: Duration = timedelta(days=80)
    # No console sign-in for this long (never: since the password was set) is
    # `stale_console`; None: not judged.
    console_unused_after: PositiveDuration | None = None

    cross_checks = (
        checks.warn_age_within_max_age,
        checks.overlap_limit_covers_overlap,
        checks.inactive_delete_after_covers_min_idle,
        checks.password_warn_age_below_max_age,
    )


class MatchSettings(_Section):
    """Which users a rule applies to: every condition given must hold ({} matches every
    user). `attached_policy`: a managed policy's name or ARN, attached to the user or to
    one of its groups; `tag`: tags with exactly these values; `path`: an IAM path
    prefix; `user`: a glob on the user name; `group`: a group the user is in;
    `account`: the user's account."""

    attached_policy: PolicyRef | None = None
    tag: TagValues | None = None
    path: IamPath | None = None
    user: UserGlob | None = None
    group: GroupName | None = None
    account: AccountId | None = None


def _policy_only() -> Any:
    # Declared so that a rule setting it is told why it cannot (not "unknown key"); never
    # part of the settings (excluded from dumps).
    return Field(default=None, exclude=True)


class RuleSettings(_Section):
    """One rule: the users it `match`es, and the keys of `policy` it sets for them (what
    it does not set comes from `policy`), plus what to do with unused keys. The keys that
    govern every rotation alike (`overlap_limit`, `delete_after`, `verify_timeout`,
    `retry_failed_after`, `inactive_min_idle`) are refused in a rule."""

    name: RuleName
    match: MatchSettings
    max_age: PositiveDuration | None = None
    warn_age: Duration | None = None
    overlap: Duration | None = None
    inactive_delete_after: PositiveDuration | None = None
    # An Active key not used (a key never used: not since its creation) for this long is
    # `unused`; None: the rule judges no key unused.
    unused_after: PositiveDuration | None = None
    # report: shown by plan only. deactivate: the next pass sets it Inactive. Default report.
    unused_action: Literal["report", "deactivate"] | None = None
    # Console passwords of the rule's users, as under `policy` (None: the policy's value).
    console: ConsoleModeText | None = None
    password_max_age: PositiveDuration | None = None
    password_warn_age: Duration | None = None
    console_unused_after: PositiveDuration | None = None
    overlap_limit: PolicyOnly = _policy_only()
    delete_after: PolicyOnly = _policy_only()
    verify_timeout: PolicyOnly = _policy_only()
    retry_failed_after: PolicyOnly = _policy_only()
    inactive_min_idle: PolicyOnly = _policy_only()

    cross_checks = (checks.unused_action_needs_unused_after,)


class LeaksSettings(_Section):
    """How leaked keys are recognised."""

    quarantine_policies: tuple[PolicyArn, ...] = DEFAULT_QUARANTINE_POLICIES
    sqs_queue_url: HttpUrl | None = None
    # When a leaked key is contained, also reset the user's console password (whoever
    # holds the key may have changed it).
    reset_console_password: StrictBool = False


class ScheduleSettings(_Section):
    """When the daemon scans (`scan`: cron or interval) and advances rotations (`tick`)."""

    scan: ScheduleText = "0 * * * *"
    tick: PositiveDuration = timedelta(seconds=60)

    @property
    def scan_schedule(self) -> Schedule:
        """`scan` parsed into an interval or a cron expression."""
        return parse_schedule(self.scan)


class HttpSettings(_Section):
    """The daemon's HTTP endpoint (health, metrics, and the trigger when enabled)."""

    listen: Listen = "127.0.0.1:9464"
    trigger_token_file: FilePath | None = None

    @property
    def host(self) -> str:
        """The address to bind, without brackets for IPv6."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """The port to bind."""
        return split_listen(self.listen)[1]


class EmailSettings(_Section):
    """Owner warnings by email through Amazon SES (off while `from` is unset)."""

    # `from` in the file: a Python keyword, hence the alias.
    from_: EmailAddress | None = Field(default=None, alias="from")
    region: NonEmptyStr | None = None  # None: `aws.region`


class NotifySettings(_Section):
    """Where alerts go (done / failed / blocked / leaked), and who is warned before a
    key is rotated or deactivated (`owner_tag`, `warn_before`)."""

    webhook_url: HttpUrl | None = None
    sns_topic_arn: SnsArn | None = None
    owner_tag: NonEmptyStr = OWNER_TAG
    warn_before: Annotated[tuple[PositiveDuration, ...], AfterValidator(distinct_durations)] = (
        timedelta(days=14),
        timedelta(days=7),
        timedelta(days=1),
    )
    fallback_owner: NonEmptyStr | None = None
    email: EmailSettings = Field(default_factory=EmailSettings)


class Settings(_Section):
    """The whole configuration, validated and frozen."""

    aws: AwsSettings = Field(default_factory=AwsSettings)
    vault: VaultSettings = Field(default_factory=VaultSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    # Ordered: the first whose match holds for a user decides; none: `policy`.
    rules: tuple[RuleSettings, ...] = ()
    leaks: LeaksSettings = Field(default_factory=LeaksSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)

    cross_checks = (
        checks.lease_covers_a_call,
        checks.path_template_tells_accounts_apart,
        checks.rule_names_unique,
        checks.rules_warn_before_rotating,
        checks.rules_warn_before_console_rotation,
        checks.rules_keep_inactive_min_idle,
        checks.unused_keys_can_be_reactivated,
        checks.rules_match_listed_accounts,
    )

    def redacted_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able data for display, secrets replaced by "***"."""
        data = self.model_dump(mode="json", by_alias=True)  # `notify.email.from`
        if data["vault"]["auth"]["token"] is not None:
            data["vault"]["auth"]["token"] = REDACTED
        if data["state"]["url"] is not None:
            data["state"]["url"] = checks.redacted_url(data["state"]["url"])
        return data


# The sections in the order the file documents them (and problems are listed in).
SECTIONS = tuple(Settings.model_fields)
