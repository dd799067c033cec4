"""Settings: YAML + environment loading, durations, schedules and error reporting."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from rotator.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_QUARANTINE_POLICIES,
    PolicySettings,
    Settings,
    config_path,
    load_settings,
    parse_settings,
    rules,
)
from rotator.config import models as config_models
from rotator.cron import Schedule, parse_schedule
from rotator.durations import format_duration, parse_duration
from rotator.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "rotator.example.yaml"
TOKEN_ENV = {"VAULT_TOKEN": "test-token-from-env"}
SECRET = "hvs.CAESIJ-very-secret-token"


def problems_of(data: object, env: dict[str, str] | None = None) -> list[str]:
    """The problems parse_settings reports for `data` (fails if it accepts it)."""
    with pytest.raises(ConfigError) as info:
        parse_settings(data, TOKEN_ENV if env is None else env)
    return info.value.problems


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rotator.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and the environment ---------------------------------------------------------


def test_empty_file_gives_documented_defaults() -> None:
    """An empty file (None from YAML) yields every default INTERFACE.md documents."""
    s = parse_settings(None, TOKEN_ENV)
    assert s.aws.region == "us-east-1"
    assert s.aws.endpoint_url is None
    assert s.aws.accounts is None
    assert s.aws.concurrency == 8
    assert s.aws.iam_calls_per_second == 20.0
    assert s.vault.url == "http://127.0.0.1:8200"
    assert s.vault.auth.method == "token"
    assert s.vault.auth.token == "test-token-from-env"
    assert s.vault.mount == "secret"
    assert s.vault.path_template == "aws/{account_id}/{user_name}"
    assert s.state.path == Path("/var/lib/rotator/state.db")
    assert s.state.lease_ttl == timedelta(minutes=5)
    assert s.selection.include_paths == ("/",)
    assert s.selection.exclude_users == ()
    assert s.selection.exempt_tag == "rotator:exempt"
    assert s.policy.max_age == timedelta(days=90)
    assert s.policy.warn_age == timedelta(days=80)
    assert s.policy.overlap == timedelta(hours=24)
    assert s.policy.overlap_limit == timedelta(days=7)
    assert s.policy.delete_after == timedelta(days=7)
    assert s.policy.verify_timeout == timedelta(seconds=60)
    assert s.leaks.quarantine_policies == DEFAULT_QUARANTINE_POLICIES
    assert len(DEFAULT_QUARANTINE_POLICIES) == 3
    assert s.leaks.sqs_queue_url is None
    assert s.schedule.scan == "0 * * * *"
    assert s.schedule.tick == timedelta(seconds=60)
    assert (s.http.listen, s.http.host, s.http.port) == ("127.0.0.1:9464", "127.0.0.1", 9464)
    assert s.http.trigger_token_file is None
    assert s.notify.webhook_url is None
    assert s.notify.sns_topic_arn is None


def test_empty_yaml_file_loads_like_no_data(tmp_path: Path) -> None:
    """A file with only comments loads to the same settings as parse_settings(None)."""
    path = write(tmp_path, "# nothing set yet\n")
    assert load_settings(path, TOKEN_ENV) == parse_settings(None, TOKEN_ENV)


def test_empty_sections_mean_defaults() -> None:
    """A section whose keys are all commented out (YAML null) takes the defaults."""
    s = parse_settings({"vault": None, "policy": None}, TOKEN_ENV)
    assert s.policy == PolicySettings()


def test_environment_fills_unset_keys() -> None:
    """VAULT_ADDR, VAULT_TOKEN, AWS_ENDPOINT_URL and AWS_REGION apply when the file is silent."""
    env = {
        "VAULT_ADDR": "https://vault.example:8200",
        "VAULT_TOKEN": "env-token",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "us-west-2",
    }
    s = parse_settings({}, env)
    assert s.vault.url == "https://vault.example:8200"
    assert s.vault.auth.token == "env-token"
    assert s.aws.endpoint_url == "http://127.0.0.1:5000"
    assert s.aws.region == "eu-west-1"


def test_aws_default_region_used_without_aws_region() -> None:
    """AWS_DEFAULT_REGION is the fallback when AWS_REGION is absent or empty."""
    s = parse_settings({}, {**TOKEN_ENV, "AWS_REGION": "", "AWS_DEFAULT_REGION": "ap-south-1"})
    assert s.aws.region == "ap-south-1"


def test_file_values_win_over_environment() -> None:
    """A value set in the file is kept even when the environment has one too."""
    data = {
        "aws": {"region": "eu-central-1", "endpoint_url": "http://moto:5000"},
        "vault": {"url": "http://file:8200", "auth": {"token": "file-token"}},
    }
    env = {
        "VAULT_ADDR": "http://env:8200",
        "VAULT_TOKEN": "env-token",
        "AWS_REGION": "us-east-2",
        "AWS_ENDPOINT_URL": "http://env:5000",
    }
    s = parse_settings(data, env)
    assert (s.aws.region, s.aws.endpoint_url) == ("eu-central-1", "http://moto:5000")
    assert (s.vault.url, s.vault.auth.token) == ("http://file:8200", "file-token")


def test_null_env_backed_keys_fall_back_to_defaults() -> None:
    """`url: null` / `region: null` without the variables set mean the built-in defaults."""
    s = parse_settings({"vault": {"url": None}, "aws": {"region": None}}, TOKEN_ENV)
    assert (s.vault.url, s.aws.region) == ("http://127.0.0.1:8200", "us-east-1")


def test_os_environ_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit env, os.environ is read when parse_settings runs."""
    monkeypatch.setenv("VAULT_TOKEN", "late-token")
    monkeypatch.setenv("VAULT_ADDR", "http://late:8200")
    s = parse_settings({})
    assert (s.vault.auth.token, s.vault.url) == ("late-token", "http://late:8200")


def test_bad_environment_value_names_its_variable() -> None:
    """A bad value that came from the environment is reported with the variable's name."""
    problems = problems_of({}, {**TOKEN_ENV, "VAULT_ADDR": "vault:8200"})
    assert problems == ['vault.url: "vault:8200" is not an http(s) URL (from VAULT_ADDR)']


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0s", timedelta(0)),
        ("45s", timedelta(seconds=45)),
        ("15m", timedelta(minutes=15)),
        ("24h", timedelta(hours=24)),
        ("90d", timedelta(days=90)),
        ("007d", timedelta(days=7)),
    ],
)
def test_parse_duration_accepts_integer_and_unit(text: str, expected: timedelta) -> None:
    """An integer followed by s, m, h or d parses to the matching timedelta."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["9x", "", "90", "d", "-1d", "1.5d", "1h30m", " 90d", "90d ", "90D", "٣d"]
)
def test_parse_duration_rejects_anything_else(text: str) -> None:
    """Units other than s/m/h/d, signs, fractions, spaces and compounds are refused."""
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(0), "0s"),
        (timedelta(days=90), "90d"),
        (timedelta(hours=36), "36h"),
        (timedelta(hours=24), "1d"),
        (timedelta(minutes=90), "90m"),
        (timedelta(seconds=61), "61s"),
    ],
)
def test_format_duration_gives_shortest_exact_form(value: timedelta, expected: str) -> None:
    """format_duration picks the largest unit that divides the value exactly."""
    assert format_duration(value) == expected


@pytest.mark.parametrize("value", [timedelta(seconds=-1), timedelta(milliseconds=1500)])
def test_format_duration_refuses_inexpressible_values(value: timedelta) -> None:
    """Negative or sub-second values have no duration string and raise ValueError."""
    with pytest.raises(ValueError, match="whole, non-negative"):
        format_duration(value)


@given(st.integers(min_value=0, max_value=10**9))
def test_format_then_parse_round_trips(seconds: int) -> None:
    """Any whole number of seconds survives format_duration then parse_duration."""
    value = timedelta(seconds=seconds)
    assert parse_duration(format_duration(value)) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9x", 'policy.max_age: "9x" is not a duration (an integer and s, m, h or d, e.g. "90d")'),
        (90, 'policy.max_age: 90 is not a duration (an integer and s, m, h or d, e.g. "90d")'),
        ("", 'policy.max_age: "" is not a duration (an integer and s, m, h or d, e.g. "90d")'),
        (None, "policy.max_age: null is not a duration"),
        ("0s", "policy.max_age: must be longer than 0s"),
    ],
)
def test_bad_duration_setting_is_named_by_path(value: object, message: str) -> None:
    """A bad duration in the file is reported with its path and the offending value."""
    problems = problems_of({"policy": {"max_age": value, "warn_age": "0s"}})
    assert len(problems) == 1
    assert problems[0].startswith(message)


# --- unknown keys and many problems at once -----------------------------------------------


def test_unknown_keys_at_every_depth_are_named_by_path() -> None:
    """Misspelt keys at the top, in a section, in vault.auth and in a list item are errors."""
    data = {
        "polcy": {},
        "policy": {"max_agee": "30d"},
        "vault": {"auth": {"role": "x"}},
        "aws": {"accounts": [{"id": "123456789012", "rolearn": "x"}]},
    }
    problems = problems_of(data)
    assert "policy.max_agee: unknown key (did you mean max_age?)" in problems
    assert "polcy: unknown key (did you mean policy?)" in problems
    assert any(p.startswith("vault.auth.role: unknown key") for p in problems)
    assert "aws.accounts[0].rolearn: unknown key (did you mean role_arn?)" in problems
    assert len(problems) == 4


def test_three_mistakes_in_one_file_are_all_reported(tmp_path: Path) -> None:
    """A type error, a bad duration and a cross-field problem come back in one ConfigError."""
    path = write(
        tmp_path,
        "aws:\n  concurrency: lots\n"
        "policy:\n  max_age: 9x\n"
        "vault:\n  auth:\n    method: approle\n    secret_id_file: /run/secret-id\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert info.value.problems == [
        'aws.concurrency: expected an integer, got "lots"',
        'vault.auth: method "approle" needs role_id',
        'policy.max_age: "9x" is not a duration (an integer and s, m, h or d, e.g. "90d")',
    ]


def test_cross_field_problem_reported_beside_field_error_in_same_section() -> None:
    """warn_age > max_age is reported even when the policy section has another error."""
    problems = problems_of({"policy": {"max_age": "10d", "warn_age": "20d", "overlap": 5}})
    assert len(problems) == 2
    assert problems[0].startswith("policy.overlap: 5 is not a duration")
    assert problems[1].startswith("policy.warn_age: 20d is longer than max_age 10d")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"aws": {"concurrency": 0}}, "aws.concurrency: must be at least 1, got 0"),
        ({"aws": {"concurrency": 65}}, "aws.concurrency: must be at most 64, got 65"),
        ({"aws": {"concurrency": "8"}}, 'aws.concurrency: expected an integer, got "8"'),
        ({"aws": {"iam_calls_per_second": 0}}, "aws.iam_calls_per_second: must be greater than"),
        ({"aws": {"region": False}}, "aws.region: expected a string, got false (YAML reads"),
        ({"aws": []}, "aws: expected a mapping"),
        (
            {"selection": {"include_paths": "/"}},
            'selection.include_paths: expected a list, got "/"',
        ),
        ({"selection": {"include_paths": ["/ci"]}}, 'selection.include_paths[0]: "/ci" must start'),
        ({"selection": {"include_paths": []}}, "selection.include_paths: must not be empty"),
        ({"vault": {"auth": {"method": "ldap"}}}, 'vault.auth.method: expected one of "token", "'),
        ({"vault": {"mount": "/secret/"}}, 'vault.mount: "/secret/" must be a mount name'),
        ({"vault": {"url": "ftp://vault"}}, 'vault.url: "ftp://vault" is not an http(s) URL'),
        ({"notify": {"webhook_url": "hooks.slack.com"}}, "notify.webhook_url: "),
        ({"aws": {"endpoint_url": "localhost:5000"}}, "aws.endpoint_url: "),
        ({"notify": {"sns_topic_arn": "my-topic"}}, 'notify.sns_topic_arn: "my-topic" is not an'),
        ({"state": {"path": ""}}, "state.path: must not be empty"),
        ({"http": {"listen": "127.0.0.1"}}, 'http.listen: "127.0.0.1" is not host:port'),
        ({"http": {"listen": "0.0.0.0:0"}}, 'http.listen: "0.0.0.0:0": the port must be'),
        ({"http": {"listen": "h:65536"}}, 'http.listen: "h:65536": the port must be'),
        (
            {"http": {"listen": "::1:9464"}},
            'http.listen: "::1:9464": write an IPv6 address in brackets',
        ),
        ({"leaks": {"quarantine_policies": ["Quarantine"]}}, "leaks.quarantine_policies[0]: "),
        ({"schedule": {"tick": "0s"}}, "schedule.tick: must be longer than 0s"),
        ({"schedule": {"scan": 15}}, "schedule.scan: expected a 5-field cron expression"),
        ({"state": {"lease_ttl": "5 m"}}, 'state.lease_ttl: "5 m" is not a duration'),
        ({"policy": {"overlap": "2d", "overlap_limit": "1d"}}, "policy.overlap_limit: 1d is"),
        (["aws"], "top level: expected a mapping of sections (aws, vault, state,"),
    ],
)
def test_each_invalid_setting_is_reported_by_path(data: object, message: str) -> None:
    """Each kind of bad value yields one problem that starts with its path and says why."""
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(message), problems


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "0.0.0.0:1", "localhost:65535", "[::1]:80"])
def test_valid_listen_addresses_split_into_host_and_port(listen: str) -> None:
    """host:port and [IPv6]:port are accepted, and host/port expose the parts."""
    s = parse_settings({"http": {"listen": listen}}, TOKEN_ENV)
    assert f"{s.http.host}:{s.http.port}".replace("::1", "[::1]") == listen


def test_settings_are_frozen() -> None:
    """Validated settings cannot be modified after loading."""
    s = parse_settings(None, TOKEN_ENV)
    with pytest.raises(ValidationError):
        s.policy.max_age = timedelta(days=1)  # type: ignore[misc]


# --- schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0 * * * *", Schedule(interval=None, cron="0 * * * *")),
        ("  */15   9-17 * * mon-FRI ", Schedule(interval=None, cron="*/15 9-17 * * mon-FRI")),
        ("0 0 1 jan,Jul *", Schedule(interval=None, cron="0 0 1 jan,Jul *")),
        ("0 0 * * 7", Schedule(interval=None, cron="0 0 * * 7")),
        ("0-30/10 0,12 * * *", Schedule(interval=None, cron="0-30/10 0,12 * * *")),
        ("0 0 29 2 *", Schedule(interval=None, cron="0 0 29 2 *")),
        ("15m", Schedule(interval=timedelta(minutes=15), cron=None)),
        ("1d", Schedule(interval=timedelta(days=1), cron=None)),
    ],
)
def test_parse_schedule_accepts_cron_and_intervals(text: str, expected: Schedule) -> None:
    """5-field cron (ranges, steps, lists, names, weekday 7) and intervals are accepted."""
    assert parse_schedule(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("61 * * * *", 'minute "61" out of range 0-59'),
        ("0 24 * * *", 'hour "24" out of range 0-23'),
        ("0 0 0 * *", 'day-of-month "0" out of range 1-31'),
        ("0 0 * 13 *", 'month "13" out of range 1-12'),
        ("0 0 * * 8", 'day-of-week "8" out of range 0-7'),
        ("* * * *", "has 4 fields; expected 5"),
        ("0 0 * * * *", "has 6 fields; expected 5"),
        ("*/0 * * * *", 'minute "*/0": step "0" out of range 1-60'),
        ("*/x * * * *", 'minute "*/x": step "x" is not a number'),
        ("5/10 * * * *", 'minute "5/10": a step needs "*" or a range'),
        ("30-10 * * * *", 'minute "30-10": the range runs backwards'),
        ("1,,2 * * * *", 'minute "1,,2" has an empty list item'),
        ("0 0 * foo *", 'month "foo" is not a number (1-12) or a name (jan-dec)'),
        ("0 0 * * funday", 'day-of-week "funday" is not a number (0-7) or a name (sun-sat)'),
        ("0 mon * * *", 'hour "mon" is not a number (0-23)'),
        ("0 0 31 2 *", 'day-of-month "31" never occurs in month "2"'),
        ("0 0 1 * mon", "are both restricted"),
        ("0s", '"0s" is an interval of zero'),
        ("15x", '"15x" is neither a 5-field cron expression'),
        ("@hourly", '"@hourly" is neither a 5-field cron expression'),
        ("", "empty"),
    ],
)
def test_parse_schedule_says_which_field_is_bad(text: str, message: str) -> None:
    """An invalid schedule raises ValueError naming the field and the reason."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_schedule(text)


def test_bad_scan_schedule_is_reported_under_its_path() -> None:
    """A bad cron in the file is reported as schedule.scan with the field-level reason."""
    assert problems_of({"schedule": {"scan": "61 * * * *"}}) == [
        'schedule.scan: minute "61" out of range 0-59'
    ]


def test_cron_fields_spell_weekdays_for_apscheduler_3() -> None:
    """cron_fields gives explicit values and weekday names, since APScheduler 3 counts
    Monday as 0 while cron counts Sunday as 0."""
    fields = parse_schedule("*/20 9-11 * jan,dec 0,5-6").cron_fields()
    assert fields == {
        "minute": "0,20,40",
        "hour": "9,10,11",
        "day": "*",
        "month": "1,12",
        "day_of_week": "sun,fri,sat",
    }
    # 1-7 covers every day once 7 is read as Sunday.
    assert parse_schedule("0 0 * * 1-7").cron_fields()["day_of_week"] == "*"
    assert parse_schedule("0 0 * * 7").cron_fields()["day_of_week"] == "sun"


def test_scan_schedule_property_parses_the_setting() -> None:
    """settings.schedule.scan_schedule exposes the scan setting as a Schedule."""
    s = parse_settings({"schedule": {"scan": "30m"}}, TOKEN_ENV)
    assert s.schedule.scan_schedule == Schedule(interval=timedelta(minutes=30), cron=None)


# --- vault auth, path template, accounts --------------------------------------------------


def test_approle_without_role_id_is_reported() -> None:
    """method approle needs role_id (and secret_id_file); each missing one is named."""
    assert problems_of({"vault": {"auth": {"method": "approle"}}}) == [
        'vault.auth: method "approle" needs role_id',
        'vault.auth: method "approle" needs secret_id_file',
    ]
    s = parse_settings(
        {"vault": {"auth": {"method": "approle", "role_id": "r", "secret_id_file": "/run/s"}}},
        {},
    )
    assert s.vault.auth.secret_id_file == Path("/run/s")


def test_token_method_needs_a_token_from_file_or_environment() -> None:
    """method token without vault.auth.token and without VAULT_TOKEN is a problem."""
    assert problems_of(None, {}) == [
        'vault.auth: method "token" needs a token (vault.auth.token or VAULT_TOKEN)'
    ]
    assert parse_settings({"vault": {"auth": {"token": "t"}}}, {}).vault.auth.token == "t"


def test_token_file_method_needs_token_file() -> None:
    """method token_file without token_file is a problem; with it the path is kept."""
    assert problems_of({"vault": {"auth": {"method": "token_file"}}}, {}) == [
        'vault.auth: method "token_file" needs token_file'
    ]
    s = parse_settings({"vault": {"auth": {"method": "token_file", "token_file": "/t"}}}, {})
    assert s.vault.auth.token_file == Path("/t")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("aws/{user}", "vault.path_template: unknown placeholder {user}"),
        ("aws/{account_id}", "vault.path_template: must contain {user_name}"),
        ("aws/{user_name!r}", "vault.path_template: unknown placeholder {user_name!r}"),
        ("aws/{}", "vault.path_template: unknown placeholder {}"),
        ("aws/{user_name", "vault.path_template: "),
        ("/aws/{user_name}", 'vault.path_template: must not start or end with "/"'),
    ],
)
def test_path_template_allows_only_known_placeholders(template: str, message: str) -> None:
    """path_template may use {account_id} and {user_name} only, and needs {user_name}."""
    problems = problems_of({"vault": {"path_template": template}})
    assert len(problems) == 1
    assert problems[0].startswith(message)


def test_path_template_formats_secret_paths() -> None:
    """A template with just {user_name} is fine for one account and fills in the name."""
    s = parse_settings({"vault": {"path_template": "iam/{user_name}"}}, TOKEN_ENV)
    assert s.vault.secret_path("123456789012", "alice") == "iam/alice"


def test_several_accounts_need_account_id_in_path_template() -> None:
    """With two accounts, a template without {account_id} would mix users' secrets."""
    data = {
        "aws": {"accounts": [{"id": "111111111111"}, {"id": "222222222222"}]},
        "vault": {"path_template": "aws/{user_name}"},
    }
    problems = problems_of(data)
    assert len(problems) == 1
    assert problems[0].startswith("vault.path_template: must contain {account_id}")


def test_accounts_are_validated_item_by_item() -> None:
    """Unquoted ids, duplicates, foreign role ARNs and a lone external_id are all named."""
    data = {
        "aws": {
            "accounts": [
                {"id": 123456789012},
                {"id": "111111111111", "role_arn": "arn:aws:iam::222222222222:role/r"},
                {"id": "111111111111", "external_id": "xyz"},
                {"role_arn": None},
            ]
        }
    }
    problems = problems_of(data)
    assert problems == [
        "aws.accounts[0].id: expected a 12-digit string in quotes, got the number "
        "123456789012 (YAML drops the leading zeros of unquoted digits)",
        "aws.accounts[3].id: required, but missing",
        "aws.accounts[1].role_arn: the role is in account 222222222222, not in 111111111111",
        "aws.accounts[2].external_id: only used with role_arn, which is not set",
        'aws.accounts[2].id: "111111111111" is already listed as accounts[1]',
    ]


def test_valid_accounts_are_kept_in_order() -> None:
    """A list of accounts with roles loads as typed account settings."""
    role = "arn:aws:iam::111111111111:role/rotator"
    s = parse_settings(
        {"aws": {"accounts": [{"id": "111111111111", "role_arn": role, "external_id": "e"}]}},
        TOKEN_ENV,
    )
    assert s.aws.accounts is not None
    assert [(a.id, a.role_arn, a.external_id) for a in s.aws.accounts] == [
        ("111111111111", role, "e")
    ]


# --- cross-field policy checks ------------------------------------------------------------


def test_warn_age_longer_than_max_age_is_reported() -> None:
    """warn_age must not exceed max_age."""
    assert problems_of({"policy": {"max_age": "30d", "warn_age": "31d"}}) == [
        "policy.warn_age: 31d is longer than max_age 30d; a key would be rotated before any warning"
    ]
    assert parse_settings({"policy": {"max_age": "30d", "warn_age": "30d"}}, TOKEN_ENV)


def test_policy_built_in_python_is_checked_too() -> None:
    """Constructing PolicySettings directly still enforces warn_age <= max_age."""
    with pytest.raises(ValidationError, match="warn_age"):
        PolicySettings(max_age=timedelta(days=1), warn_age=timedelta(days=2))
    assert PolicySettings(overlap=timedelta(0), overlap_limit=timedelta(0)).overlap_limit == (
        timedelta(0)
    )


# --- every cross-field rule, on both paths ------------------------------------------------

ACCOUNT_A, ACCOUNT_B = "111111111111", "222222222222"
# One file per rule a model names in `cross_checks`, with the exact problem it reports.
RULE_CASES: dict[Callable[..., object], tuple[dict[str, object], str]] = {
    rules.warn_age_within_max_age: (
        {"policy": {"max_age": "30d", "warn_age": "31d"}},
        "policy.warn_age: 31d is longer than max_age 30d; a key would be rotated before any "
        "warning",
    ),
    rules.overlap_limit_covers_overlap: (
        {"policy": {"overlap": "2d", "overlap_limit": "1d"}},
        "policy.overlap_limit: 1d is shorter than overlap 2d",
    ),
    rules.external_id_needs_role_arn: (
        {"aws": {"accounts": [{"id": ACCOUNT_A, "external_id": "e"}]}},
        "aws.accounts[0].external_id: only used with role_arn, which is not set",
    ),
    rules.role_in_its_account: (
        {"aws": {"accounts": [{"id": ACCOUNT_A, "role_arn": f"arn:aws:iam::{ACCOUNT_B}:role/r"}]}},
        f"aws.accounts[0].role_arn: the role is in account {ACCOUNT_B}, not in {ACCOUNT_A}",
    ),
    rules.accounts_listed_once: (
        {"aws": {"accounts": [{"id": ACCOUNT_A}, {"id": ACCOUNT_A}]}},
        f'aws.accounts[1].id: "{ACCOUNT_A}" is already listed as accounts[0]',
    ),
    rules.accounts_or_organization: (
        {"aws": {"accounts": [{"id": ACCOUNT_A}], "organization": {"role_name": "rotator"}}},
        "aws.organization: give either aws.accounts or aws.organization",
    ),
    rules.lease_covers_a_call: (
        {"state": {"lease_ttl": "10s"}},
        "state.lease_ttl: 10s cannot cover a backend call: it must be at least twice the "
        "longest call deadline (160s with aws.call_timeout 15s and vault.timeout 10s)",
    ),
    rules.path_template_tells_accounts_apart: (
        {
            "aws": {"accounts": [{"id": ACCOUNT_A}, {"id": ACCOUNT_B}]},
            "vault": {"path_template": "aws/{user_name}"},
        },
        "vault.path_template: must contain {account_id} when several accounts are listed, "
        "or users with the same name in two accounts would share one secret",
    ),
    rules.inactive_delete_after_covers_min_idle: (
        {"policy": {"inactive_delete_after": "3d"}},
        "policy.inactive_delete_after: 3d is shorter than inactive_min_idle 7d: a key someone "
        "switched off to see what breaks would be deleted sooner than a rotation may delete it",
    ),
    rules.unused_action_needs_unused_after: (
        {"rules": [{"name": "humans", "match": {}, "unused_action": "deactivate"}]},
        "rules[0].unused_action: only used with unused_after, which is not set",
    ),
    rules.rule_names_unique: (
        {"rules": [{"name": "ci", "match": {"path": "/ci/"}}, {"name": "ci", "match": {}}]},
        'rules[1].name: "ci" is already the name of rules[0]',
    ),
    rules.rules_warn_before_rotating: (
        {"rules": [{"name": "admins", "match": {}, "max_age": "30d"}]},
        'rules[0]: rule "admins" has warn_age 80d (from policy.warn_age), not below its '
        "max_age 30d: its keys would be rotated without a warning first; set a shorter "
        "warn_age in the rule",
    ),
    rules.rules_keep_inactive_min_idle: (
        {"rules": [{"name": "ci", "match": {}, "inactive_delete_after": "1d"}]},
        "rules[0].inactive_delete_after: 1d is shorter than inactive_min_idle 7d: a key "
        "someone switched off to see what breaks would be deleted sooner than a rotation may "
        "delete it",
    ),
    rules.unused_keys_can_be_reactivated: (
        {
            "policy": {"inactive_delete_after": "30d"},
            "rules": [
                {
                    "name": "humans",
                    "match": {},
                    "unused_after": "45d",
                    "unused_action": "deactivate",
                }
            ],
        },
        'rules[0].unused_after: rule "humans" deactivates keys unused for 45d, but '
        "inactive_delete_after 30d (from policy.inactive_delete_after) deletes them as soon as "
        "they are inactive: nobody could reactivate one; make inactive_delete_after longer "
        "than unused_after",
    ),
    rules.rules_match_listed_accounts: (
        {
            "aws": {"accounts": [{"id": ACCOUNT_A}]},
            "rules": [{"name": "b", "match": {"account": ACCOUNT_B}}],
        },
        f'rules[0].match.account: "{ACCOUNT_B}" is not in aws.accounts: the rule would never match',
    ),
    rules.password_warn_age_below_max_age: (
        {"policy": {"password_max_age": "60d", "password_warn_age": "60d"}},
        "policy.password_warn_age: 60d is not below password_max_age 60d; a console "
        "password would be due before any warning",
    ),
    rules.rules_warn_before_console_rotation: (
        {"rules": [{"name": "admins", "match": {}, "password_max_age": "30d"}]},
        'rules[0]: rule "admins" has password_warn_age 80d (from policy.password_warn_age), '
        "not below its password_max_age 30d: its console passwords would be due without a "
        "warning first; set a shorter password_warn_age in the rule",
    ),
    rules.console_path_apart_from_key_path: (
        {"vault": {"console_path_template": "aws/{account_id}/{user_name}"}},
        'vault.console_path_template: "aws/{account_id}/{user_name}" leads to the same '
        'Vault path as path_template "aws/{account_id}/{user_name}": a console password '
        "would overwrite the user's access key",
    ),
}


def test_every_model_rule_has_a_case() -> None:
    """RULE_CASES covers every rule a settings model names, so none escapes the next test."""
    named = {
        rule
        for model in vars(config_models).values()
        if isinstance(model, type) and issubclass(model, BaseModel)
        for rule in getattr(model, "cross_checks", ())
    }
    assert named == set(RULE_CASES)


@pytest.mark.parametrize(
    ("data", "message"),
    [pytest.param(*case, id=rule.__name__) for rule, case in RULE_CASES.items()],
)
def test_each_rule_is_reported_on_load_and_enforced_in_python(
    data: dict[str, object], message: str
) -> None:
    """A cross-field rule, written once, is reported by parse_settings with its path and
    refuses the same settings built in Python (where its message is relative to the model)."""
    assert problems_of(data) == [message]
    with pytest.raises(ValidationError) as info:
        Settings.model_validate(data)
    assert any(message.endswith(str(error["msg"])) for error in info.value.errors())


def test_rule_is_reported_beside_invalid_fields_of_its_list_items() -> None:
    """Duplicate accounts are found even when other items, or the same ones, are invalid."""
    data = {"aws": {"accounts": [{"id": ACCOUNT_A, "rolearn": "x"}, "x", {"id": ACCOUNT_A}]}}
    assert problems_of(data) == [
        "aws.accounts[0].rolearn: unknown key (did you mean role_arn?)",
        'aws.accounts[1]: expected a mapping (key: value lines), got "x"',
        f'aws.accounts[2].id: "{ACCOUNT_A}" is already listed as accounts[0]',
    ]


# --- rules --------------------------------------------------------------------------------

ISSUE_RULES = """
rules:
  - name: admins
    match: {attached_policy: AdministratorAccess}
    max_age: 30d
    warn_age: 23d
  - name: humans
    match: {tag: {type: human}}
    unused_after: 45d
    unused_action: deactivate
  - name: ci
    match: {path: /ci/, user: "ci-*", group: deployers, account: "111122223333"}
    max_age: 180d
    overlap: 48h
"""


def test_the_rules_of_the_issue_load_in_order_with_what_they_set(tmp_path: Path) -> None:
    """The example rules load as written, in order; a key a rule does not set stays
    unset in the settings (the policy's value applies, `rotator.policy.resolve`)."""
    settings = load_settings(write(tmp_path, ISSUE_RULES), TOKEN_ENV)
    admins, humans, ci = settings.rules
    assert [r.name for r in settings.rules] == ["admins", "humans", "ci"]
    assert admins.match.attached_policy == "AdministratorAccess"
    assert (admins.max_age, admins.warn_age) == (timedelta(days=30), timedelta(days=23))
    assert humans.match.tag == {"type": "human"}
    assert (humans.unused_after, humans.unused_action) == (timedelta(days=45), "deactivate")
    assert humans.max_age is None
    assert (ci.match.path, ci.match.user, ci.match.group, ci.match.account) == (
        "/ci/",
        "ci-*",
        "deployers",
        "111122223333",
    )
    assert ci.overlap == timedelta(hours=48)
    assert json.loads(json.dumps(settings.redacted_dict()))["rules"][2]["overlap"] == "2d"


def test_no_rules_is_the_default_and_an_emptied_rules_key_is_none() -> None:
    """Without `rules`, or with every rule commented out (YAML null), there are none."""
    assert parse_settings(None, TOKEN_ENV).rules == ()
    assert parse_settings({"rules": None}, TOKEN_ENV).rules == ()


def test_unknown_keys_in_a_rule_or_its_match_are_named_by_path() -> None:
    """A misspelt key in a rule or in its match is an error with a suggestion."""
    data = {"rules": [{"name": "a", "match": {"tags": {"x": "y"}}, "max_agee": "30d"}]}
    assert problems_of(data) == [
        "rules[0].match.tags: unknown key (did you mean tag?)",
        "rules[0].max_agee: unknown key (did you mean max_age?)",
    ]


@pytest.mark.parametrize(
    "key",
    ["overlap_limit", "delete_after", "verify_timeout", "retry_failed_after", "inactive_min_idle"],
)
def test_a_policy_key_that_applies_to_every_rotation_is_refused_in_a_rule(key: str) -> None:
    """The keys the engine applies to every rotation alike cannot be set by a rule, and
    the message says where they belong."""
    assert problems_of({"rules": [{"name": "a", "match": {}, key: "1d"}]}) == [
        f"rules[0].{key}: a rule cannot set this: it applies to every rotation alike, "
        "whichever rule opened it; set it under policy"
    ]


def test_a_rule_whose_warn_age_equals_its_max_age_is_named() -> None:
    """A rule's warn_age must be strictly below its max_age (the policy may set them
    equal); a rule that sets neither is the policy's business."""
    data = {"rules": [{"name": "ci", "match": {}, "max_age": "80d"}, {"name": "x", "match": {}}]}
    assert problems_of(data) == [
        'rules[0]: rule "ci" has warn_age 80d (from policy.warn_age), not below its max_age '
        "80d: its keys would be rotated without a warning first; set a shorter warn_age in "
        "the rule"
    ]
    valid = {"rules": [{"name": "ci", "match": {}, "max_age": "80d", "warn_age": "70d"}]}
    assert parse_settings(valid, TOKEN_ENV).rules[0].warn_age == timedelta(days=70)


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ({"path": "ci"}, 'rules[0].match.path: "ci" must start and end with "/"'),
        ({"user": "ci-["}, 'rules[0].match.user: "ci-[" has a [ without its ]'),
        ({"user": "ci/*"}, 'rules[0].match.user: "ci/*" can match no IAM user name'),
        ({"user": ""}, "rules[0].match.user: must not be empty"),
        ({"attached_policy": "Admin Access"}, 'rules[0].match.attached_policy: "Admin Access" is'),
        ({"attached_policy": "arn:aws:iam::aws:role/x"}, "rules[0].match.attached_policy: "),
        ({"group": "dev ops"}, 'rules[0].match.group: "dev ops" is not an IAM group name'),
        ({"account": 111122223333}, "rules[0].match.account: expected a 12-digit string"),
        ({"tag": {}}, "rules[0].match.tag: must name at least one tag"),
        ({"tag": {"admin": True}}, "rules[0].match.tag.admin: expected a string, got true"),
        ("admins", 'rules[0].match: expected a mapping (key: value lines), got "admins"'),
    ],
)
def test_each_bad_match_condition_is_reported_by_path(match: object, message: str) -> None:
    """A path that is not an IAM path, a glob that can match no user name, a policy that is
    neither name nor ARN, a bad group or account, an empty or non-string tag."""
    [problem] = problems_of({"rules": [{"name": "r", "match": match}]})
    assert problem.startswith(message), problem


def test_valid_globs_on_user_names_are_accepted() -> None:
    """Wildcards and bracket sets over IAM's user-name characters are fine."""
    for glob in ("ci-*", "build-[0-9]*", "svc-?", "[!x]*", "a.b@c+d=e,f_g"):
        rule = {"name": "r", "match": {"user": glob}}
        assert parse_settings({"rules": [rule]}, TOKEN_ENV).rules[0].match.user == glob


def test_a_rule_needs_a_name_other_than_default_and_a_match() -> None:
    """`name` and `match` are required; "default" is what plan calls the policy."""
    assert problems_of({"rules": [{"overlap": "1h"}]}) == [
        "rules[0].name: required, but missing",
        "rules[0].match: required, but missing",
    ]
    [problem] = problems_of({"rules": [{"name": "default", "match": {}}]})
    assert problem.startswith('rules[0].name: "default" names the policy section in plan')


# --- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [SECRET, 'hvs.with"quote\\and-' + "x" * 80])
@pytest.mark.parametrize("in_file", [True, False])
def test_token_never_appears_in_any_problem(secret: str, in_file: bool) -> None:
    """Whatever is wrong around it, the Vault token value is never echoed in a message,
    neither verbatim nor in its quoted (escaped) form."""
    auth = {"method": secret, "tokn": secret, "token_file": [secret]}
    data = {
        "vault": {
            "url": secret,
            "token": secret,
            "auth": {**auth, "token": secret} if in_file else auth,
            "mount": secret + "/",
        },
        "policy": {"max_age": secret},
    }
    with pytest.raises(ConfigError) as info:
        parse_settings(data, {} if in_file else {"VAULT_TOKEN": secret})
    assert len(info.value.problems) >= 6
    escaped = json.dumps(secret)[1:-1]
    for text in (str(info.value), *info.value.problems):
        assert secret not in text
        assert escaped not in text
    assert 'vault.url: "***" is not an http(s) URL' in info.value.problems


def test_token_of_wrong_type_is_described_not_shown() -> None:
    """A token that is not a string is reported by its kind, not by its value."""
    assert problems_of({"vault": {"auth": {"token": 918273645546}}}) == [
        "vault.auth.token: expected a string, got a number"
    ]


def test_token_hidden_from_repr_and_redacted_dict() -> None:
    """repr(settings) omits the token and redacted_dict replaces it with ***."""
    s = parse_settings({"policy": {"overlap": "36h"}}, {"VAULT_TOKEN": SECRET})
    assert s.vault.auth.token == SECRET
    assert SECRET not in repr(s)
    shown = s.redacted_dict()
    assert shown["vault"]["auth"]["token"] == "***"
    assert SECRET not in str(shown)
    assert shown["policy"]["overlap"] == "36h"
    assert shown["state"]["path"] == "/var/lib/rotator/state.db"


# --- files --------------------------------------------------------------------------------


def test_example_file_loads_to_the_defaults() -> None:
    """config/rotator.example.yaml is valid and sets every key to its default."""
    assert load_settings(EXAMPLE, TOKEN_ENV) == parse_settings(None, TOKEN_ENV)


def test_example_file_documents_every_key() -> None:
    """Every settings key appears in the example file."""
    text = EXAMPLE.read_text(encoding="utf-8")
    shown = parse_settings(None, TOKEN_ENV).redacted_dict()
    for section, keys in shown.items():
        assert f"\n{section}:\n" in text
        for key in keys:
            assert f" {key}:" in text, f"{section}.{key}"
    for key in ("method", "token", "token_file", "role_id", "secret_id_file"):
        assert f"    {key}:" in text


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A path that does not exist is reported as exactly that."""
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, TOKEN_ENV)
    assert info.value.problems == [f"{path}: no such file"]


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    """Malformed YAML is reported with the file, line and column of the problem."""
    path = write(tmp_path, "policy:\n  max_age: 90d\n  warn_age: [80d\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, TOKEN_ENV)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: YAML syntax error at line 4, column 1:")


def test_duplicate_keys_are_reported(tmp_path: Path) -> None:
    """A key given twice is a problem (YAML would silently keep the last one)."""
    path = write(tmp_path, "policy:\n  max_age: 30d\n  max_age: 60d\npolicy: {}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, TOKEN_ENV)
    assert info.value.problems == [
        "policy.max_age: appears twice (lines 2 and 3); only the last one would count",
        "policy: appears twice (lines 1 and 4); only the last one would count",
    ]


def test_top_level_list_is_rejected(tmp_path: Path) -> None:
    """A file whose top level is not a mapping is reported with the file name."""
    path = write(tmp_path, "- aws\n- vault\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, TOKEN_ENV)
    assert info.value.problems == [
        f"{path}: expected a mapping of sections (aws, vault, state, selection, policy, "
        "rules, leaks, schedule, http, notify), got a list"
    ]


def test_load_settings_reads_a_real_file(tmp_path: Path) -> None:
    """Values written in YAML come back typed (durations, paths, tuples)."""
    path = write(
        tmp_path,
        "policy:\n  max_age: 30d\n  warn_age: 20d\nstate:\n  path: ./state.db\n"
        "selection:\n  include_paths: [/ci/, /svc/]\n",
    )
    s = load_settings(str(path), TOKEN_ENV)
    assert (s.policy.max_age, s.policy.warn_age) == (timedelta(days=30), timedelta(days=20))
    assert s.state.path == Path("state.db")
    assert s.selection.include_paths == ("/ci/", "/svc/")


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("/x/flag.yaml", {"ROTATOR_CONFIG": "/x/env.yaml"}, (Path("/x/flag.yaml"), True)),
        (None, {"ROTATOR_CONFIG": "/x/env.yaml"}, (Path("/x/env.yaml"), True)),
        (None, {}, (DEFAULT_CONFIG_PATH, False)),
        (None, {"ROTATOR_CONFIG": ""}, (Path("/etc/rotator/rotator.yaml"), False)),
    ],
)
def test_config_path_precedence(
    flag: str | None, env: dict[str, str], expected: tuple[Path, bool]
) -> None:
    """--config beats ROTATOR_CONFIG beats the default, and says if it was explicit."""
    assert config_path(flag, env) == expected


def test_settings_default_constructor_has_no_token() -> None:
    """Settings() builds without I/O or environment: the token stays unset."""
    assert Settings().vault.auth.token is None


# --- the PostgreSQL state store's URL -----------------------------------------------------

DB_PASSWORD = "db-pw-5f3a9c1e"


def test_state_url_is_unset_by_default_and_sqlite_path_stays() -> None:
    """Without `state.url` the store is SQLite at `state.path`; both URL schemes libpq
    reads are accepted as they are."""
    s = parse_settings(None, TOKEN_ENV)
    assert s.state.url is None
    assert s.state.path == Path("/var/lib/rotator/state.db")
    for url in ("postgresql://rotator@db:5432/rotator", "postgres://rotator@db/rotator"):
        assert parse_settings({"state": {"url": url}}, TOKEN_ENV).state.url == url


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://rotator:{DB_PASSWORD}@db:5432/rotator",
        f"postgres://rotator@db/rotator?sslmode=require&password={DB_PASSWORD}",
    ],
)
def test_a_password_in_the_files_state_url_is_refused_pointing_to_pgpassword(url: str) -> None:
    """A password written in `state.url` (user info or `password=` parameter) is refused,
    saying to use PGPASSWORD or a libpq password file; no message repeats it."""
    problems = problems_of({"state": {"url": url}})
    assert problems == [
        "state.url: must not hold a password, which anyone who can read this file would "
        "read: give it in PGPASSWORD or a libpq password file (~/.pgpass, or the file "
        "PGPASSFILE names), or set the whole URL in ROTATOR_STATE_URL"
    ]


def test_a_password_in_the_file_is_refused_even_when_rotator_state_url_replaces_it() -> None:
    """The environment's URL replaces the file's, but the file still holds a password in
    clear: that is refused all the same."""
    file_url = f"postgresql://rotator:{DB_PASSWORD}@db-from-file/rotator"
    env = {**TOKEN_ENV, "ROTATOR_STATE_URL": "postgresql://rotator@db-from-env/rotator"}
    problems = problems_of({"state": {"url": file_url}}, env)
    assert [p.split(":")[0] for p in problems] == ["state.url"]
    assert "must not hold a password" in problems[0]


def test_a_state_url_that_is_not_postgresql_is_refused_without_its_password() -> None:
    """Another scheme is refused, and the message does not repeat the URL."""
    problems = problems_of({"state": {"url": f"mysql://rotator:{DB_PASSWORD}@db/rotator"}})
    assert problems[0] == (
        "state.url: must start with postgresql:// or postgres:// "
        "(e.g. postgresql://rotator@db.example.com:5432/rotator)"
    )
    assert all(DB_PASSWORD not in p for p in problems)


def test_rotator_state_url_overrides_the_file_and_may_hold_a_password() -> None:
    """ROTATOR_STATE_URL replaces the file's `state.url` (it is not merely a default),
    and its password is accepted but kept out of repr."""
    env_url = f"postgresql://rotator:{DB_PASSWORD}@db-from-env:5432/rotator"
    s = parse_settings(
        {"state": {"url": "postgresql://rotator@db-from-file/rotator"}},
        {**TOKEN_ENV, "ROTATOR_STATE_URL": env_url},
    )
    assert s.state.url == env_url
    assert DB_PASSWORD not in repr(s)
    assert parse_settings(None, {**TOKEN_ENV, "ROTATOR_STATE_URL": env_url}).state.url == env_url


def test_a_bad_rotator_state_url_is_reported_naming_the_variable() -> None:
    """An invalid URL from the environment names ROTATOR_STATE_URL, not its text."""
    problems = problems_of(None, {**TOKEN_ENV, "ROTATOR_STATE_URL": f"db:{DB_PASSWORD}@x"})
    assert len(problems) == 1
    assert problems[0].startswith("state.url: ")
    assert problems[0].endswith("(from ROTATOR_STATE_URL)")
    assert DB_PASSWORD not in problems[0]


def test_redacted_dict_masks_the_state_url_password_only() -> None:
    """`redacted_dict` (what `config check --show` prints) shows the URL with the
    password replaced by ***, in the user info and in a `password` parameter."""
    env_url = f"postgresql://rotator:{DB_PASSWORD}@db:5432/rotator?password={DB_PASSWORD}"
    s = parse_settings(None, {**TOKEN_ENV, "ROTATOR_STATE_URL": env_url})
    shown = s.redacted_dict()
    assert shown["state"]["url"] == "postgresql://rotator:***@db:5432/rotator?password=***"
    assert DB_PASSWORD not in json.dumps(shown)


def test_config_check_show_never_prints_the_state_url_password(tmp_path: Path) -> None:
    """`rotator config check --show` with ROTATOR_STATE_URL holding a password prints
    the URL without it; the same URL in the file is refused (exit 2), also unprinted."""
    from tests.rig import rotator

    path = write(tmp_path, "state:\n  url: postgresql://rotator@db-from-file/rotator\n")
    env_url = f"postgresql://rotator:{DB_PASSWORD}@db-from-env:5432/rotator"
    env = {"VAULT_TOKEN": "test-token-not-real", "ROTATOR_STATE_URL": env_url}
    done = rotator("--config", str(path), "config", "check", "--show", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout[: done.stdout.rindex("}") + 1])["state"]["url"] == (
        "postgresql://rotator:***@db-from-env:5432/rotator"
    )
    assert DB_PASSWORD not in done.stdout + done.stderr

    write(tmp_path, f"state:\n  url: {env_url}\n")
    refused = rotator(
        "--config", str(path), "config", "check", "--show", env={**env, "ROTATOR_STATE_URL": ""}
    )
    assert refused.returncode == 2
    assert "state.url: must not hold a password" in refused.stderr
    assert DB_PASSWORD not in refused.stdout + refused.stderr


# --- owner warnings (notify) -------------------------------------------------------------


def test_owner_warning_settings_default_to_the_owner_tag_and_14_7_1_days() -> None:
    """Unset, owners are read from the `owner` tag and warned 14, 7 and 1 days ahead;
    no fallback owner, no email; `from` is spelled so in the file and in the display."""
    notify = parse_settings(None, {"VAULT_TOKEN": "t"}).notify
    assert notify.owner_tag == "owner"
    assert notify.warn_before == (timedelta(days=14), timedelta(days=7), timedelta(days=1))
    assert notify.fallback_owner is None
    assert notify.email.from_ is None
    assert notify.email.region is None
    given = parse_settings(
        {"notify": {"email": {"from": "rotator@example.com", "region": "eu-west-1"}}},
        {"VAULT_TOKEN": "t"},
    )
    assert given.notify.email.from_ == "rotator@example.com"
    assert given.redacted_dict()["notify"]["email"] == {
        "from": "rotator@example.com",
        "region": "eu-west-1",
    }


@pytest.mark.parametrize(
    ("notify", "message"),
    [
        ({"warn_before": ["7d", "168h"]}, "notify.warn_before: names 7d twice"),
        ({"warn_before": ["0s"]}, "notify.warn_before[0]: must be longer than 0s"),
        ({"warn_before": ["soon"]}, "notify.warn_before[0]: "),
        ({"owner_tag": ""}, "notify.owner_tag: must not be empty"),
        ({"email": {"from": "rotator"}}, 'notify.email.from: "rotator" is not an email address'),
        ({"email": {"frm": "a@b.io"}}, "notify.email.frm: unknown key (did you mean from?)"),
    ],
)
def test_owner_warning_settings_refuse_bad_values_by_their_path(
    notify: dict[str, object], message: str
) -> None:
    """Duplicate or non-positive warning distances, an empty tag name and a sender that
    is no address are refused, each named by its path in the file."""
    with pytest.raises(ConfigError) as caught:
        parse_settings({"notify": notify}, {"VAULT_TOKEN": "t"})
    assert message in str(caught.value)
