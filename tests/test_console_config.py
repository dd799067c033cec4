"""Settings for console passwords: `console`, `password_max_age`, `password_warn_age` and
`console_unused_after` under `policy` and in each rule, `vault.console_path_template` and
`leaks.reset_console_password`; what `config check` refuses, named by path."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from rotator.config import load_settings, parse_settings
from rotator.errors import ConfigError
from rotator.model import ConsoleMode
from rotator.policy import Rules
from tests.rig import rotator

TOKEN_ENV = {"VAULT_TOKEN": "test-token-from-env"}
D = timedelta(days=1)
ACCOUNT_A = "111122223333"
ACCOUNT_B = "444455556666"


def problems_of(data: object) -> list[str]:
    """The problems parse_settings reports for `data` (fails if it accepts it)."""
    with pytest.raises(ConfigError) as info:
        parse_settings(data, TOKEN_ENV)
    return info.value.problems


def test_console_settings_default_to_report_90d_80d_and_no_unused_limit() -> None:
    """No file: console report, password_max_age 90d, password_warn_age 80d,
    console_unused_after null, the console path beside the key's, no reset on a leak."""
    s = parse_settings(None, TOKEN_ENV)
    assert s.policy.console == "report"
    assert s.policy.password_max_age == 90 * D
    assert s.policy.password_warn_age == 80 * D
    assert s.policy.console_unused_after is None
    assert s.vault.console_path_template == "aws/{account_id}/{user_name}/console"
    assert s.vault.console_secret_path("123456789012", "alice") == "aws/123456789012/alice/console"
    assert s.leaks.reset_console_password is False
    shown = s.redacted_dict()
    assert shown["policy"]["password_max_age"] == "90d"
    assert shown["policy"]["console"] == "report"


def test_rules_of_the_issue_with_console_keys_load_and_resolve_from_policy(
    tmp_path: Path,
) -> None:
    """A rule sets console and password_max_age; what it leaves unset (its
    password_warn_age, console_unused_after) comes from policy when resolved."""
    path = tmp_path / "rotator.yaml"
    path.write_text(
        "policy:\n"
        "  password_warn_age: 20d\n"
        "  console_unused_after: 60d\n"
        "rules:\n"
        "  - name: admins\n"
        "    match: {attached_policy: AdministratorAccess}\n"
        "    console: rotate\n"
        "    password_max_age: 30d\n"
        "  - name: robots\n"
        "    match: {path: /ci/}\n"
        "    console: off\n"
        "    password_warn_age: 10d\n"
    )
    settings = load_settings(path, TOKEN_ENV)
    admins, robots = settings.rules
    assert (admins.console, admins.password_max_age) == ("rotate", 30 * D)
    assert admins.password_warn_age is None
    # YAML reads an unquoted `off` as false: it means off all the same.
    assert robots.console == "off"
    rules = Rules.from_settings(settings)
    resolved_admins, resolved_robots = rules.rules
    assert resolved_admins.console is ConsoleMode.ROTATE
    assert resolved_admins.password_max_age == 30 * D
    assert resolved_admins.password_warn_age == 20 * D
    assert resolved_admins.console_unused_after == 60 * D
    assert resolved_robots.console is ConsoleMode.OFF
    assert resolved_robots.password_max_age == 90 * D
    assert rules.default.console is ConsoleMode.REPORT
    assert rules.default.console_unused_after == 60 * D


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            {"policy": {"console": "sometimes"}},
            'policy.console: expected one of "off", "report", "rotate", got "sometimes"',
            id="unknown-mode",
        ),
        pytest.param(
            {"policy": {"console": True}},
            'policy.console: expected one of "off", "report", "rotate", got true (YAML reads '
            "unquoted yes/on/true as true; write report or rotate)",
            id="yaml-on",
        ),
        pytest.param(
            {"rules": [{"name": "r", "match": {}, "console": "ROTATE"}]},
            'rules[0].console: expected one of "off", "report", "rotate", got "ROTATE"',
            id="rule-mode-case",
        ),
        pytest.param(
            {"policy": {"password_max_age": "0s"}},
            "policy.password_max_age: must be longer than 0s",
            id="zero-max-age",
        ),
        pytest.param(
            {"policy": {"console_unused_after": "45"}},
            'policy.console_unused_after: "45" is not a duration',
            id="bare-number",
        ),
        pytest.param(
            {"leaks": {"reset_console_password": "yes please"}},
            'leaks.reset_console_password: expected true or false, got "yes please"',
            id="reset-not-a-bool",
        ),
        pytest.param(
            {"vault": {"console_path_template": "aws/{account_id}/console"}},
            "vault.console_path_template: must contain {user_name}",
            id="no-user-name",
        ),
        pytest.param(
            {"vault": {"console_path_template": "aws/{user}/console"}},
            "vault.console_path_template: unknown placeholder {user}",
            id="unknown-placeholder",
        ),
        pytest.param(
            {"vault": {"console_path_template": "/aws/{user_name}/console"}},
            'vault.console_path_template: must not start or end with "/"',
            id="leading-slash",
        ),
    ],
)
def test_each_bad_console_setting_is_named_by_its_path(data: object, message: str) -> None:
    """A bad value under policy, a rule, vault or leaks is one problem, by its path."""
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(message), problems


def test_policy_password_warn_age_must_be_below_password_max_age() -> None:
    """Equal or longer: refused (a password would be due before any warning); one day
    shorter: accepted."""
    assert problems_of({"policy": {"password_max_age": "60d", "password_warn_age": "60d"}}) == [
        "policy.password_warn_age: 60d is not below password_max_age 60d; a console "
        "password would be due before any warning"
    ]
    assert problems_of({"policy": {"password_max_age": "60d", "password_warn_age": "61d"}})
    ok = parse_settings(
        {"policy": {"password_max_age": "60d", "password_warn_age": "59d"}}, TOKEN_ENV
    )
    assert ok.policy.password_warn_age == 59 * D


def test_a_rule_whose_password_warn_age_is_not_below_its_max_age_is_named() -> None:
    """A rule's own password_warn_age against the policy's password_max_age, and the
    other way round: each names the rule and where each value comes from."""
    own_warn = problems_of({"rules": [{"name": "slow", "match": {}, "password_warn_age": "95d"}]})
    assert own_warn == [
        'rules[0]: rule "slow" has password_warn_age 95d, not below its password_max_age 90d '
        "(from policy.password_max_age): its console passwords would be due without a "
        "warning first; set a shorter password_warn_age in the rule"
    ]
    both = problems_of(
        {
            "rules": [
                {"name": "ok", "match": {"user": "a*"}, "password_max_age": "30d",
                 "password_warn_age": "20d"},
                {"name": "bad", "match": {}, "password_max_age": "30d",
                 "password_warn_age": "30d"},
            ]
        }
    )  # fmt: skip
    assert both == [
        'rules[1]: rule "bad" has password_warn_age 30d, not below its password_max_age 30d: '
        "its console passwords would be due without a warning first; set a shorter "
        "password_warn_age in the rule"
    ]


@pytest.mark.parametrize(
    "console",
    [
        "kv/{account_id}/{user_name}",
        "kv//{account_id}/{user_name}",
        "kv/{account_id}/./{user_name}",
        "kv/{account_id}/x/../{user_name}",
    ],
)
def test_the_console_path_must_not_lead_where_the_key_is(console: str) -> None:
    """A console_path_template that Vault reads as the key's path (the same template, or
    one with `//`, `.` or `..` segments Vault cleans away) would put the password where
    consumers read the key: refused, naming both templates."""
    template = "kv/{account_id}/{user_name}"
    assert problems_of(
        {"vault": {"path_template": template, "console_path_template": console}}
    ) == [
        f'vault.console_path_template: "{console}" leads to the same Vault path as '
        f'path_template "{template}": a console password would overwrite the user\'s '
        "access key"
    ]


def test_several_accounts_need_account_id_in_the_console_path_too() -> None:
    """With two accounts, a console path without {account_id} would be shared by users
    of the same name in both."""
    problems = problems_of(
        {
            "aws": {"accounts": [{"id": ACCOUNT_A}, {"id": ACCOUNT_B}]},
            "vault": {"console_path_template": "console/{user_name}"},
        }
    )
    assert problems == [
        "vault.console_path_template: must contain {account_id} when several accounts are "
        "listed, or users with the same name in two accounts would share one secret"
    ]


def test_reset_console_password_reads_a_yaml_boolean(tmp_path: Path) -> None:
    """`reset_console_password: true` in the file is True on Settings."""
    path = tmp_path / "rotator.yaml"
    path.write_text("leaks:\n  reset_console_password: true\n")
    assert load_settings(path, TOKEN_ENV).leaks.reset_console_password is True


def test_config_check_names_a_bad_console_rule_and_exits_2(tmp_path: Path) -> None:
    """`rotator config check` on a rule with password_warn_age above its
    password_max_age exits 2 naming the rule by its path."""
    path = tmp_path / "rotator.yaml"
    path.write_text(
        f"state: {{path: {tmp_path / 'state.db'}}}\n"
        "rules:\n"
        "  - name: admins\n"
        "    match: {user: adm-*}\n"
        "    password_max_age: 30d\n"
        "    password_warn_age: 40d\n"
    )
    done = rotator("--config", str(path), "config", "check")
    assert done.returncode == 2, done.stdout
    assert 'rules[0]: rule "admins" has password_warn_age 40d' in done.stderr
