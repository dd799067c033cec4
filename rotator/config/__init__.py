"""Settings: the YAML file plus a few environment defaults, validated in one go.

`load_settings` reads the file, `parse_settings` validates what YAML produced. Either
returns a frozen `Settings` or raises one `ConfigError` listing every problem, each
starting with its dotted path in the file (`aws.accounts[0].id: ...`), so that an operator
fixes the file in one round instead of one error per run.

The environment is an explicit argument (default: `os.environ` read at call time):
`VAULT_ADDR`, `VAULT_TOKEN`, `AWS_ENDPOINT_URL` and `AWS_REGION` / `AWS_DEFAULT_REGION`
fill in the matching keys when the file leaves them unset or null.

The package, one concern per module:

- `fields`: the field types and the checks that need only the field's own value
  (durations via `rotator.durations`, schedules via `rotator.cron`);
- `models`: the section models and `Settings`; each names its cross-field rules;
- `rules`: those rules, each written once, and the two places they run (on a validated
  model, and on the raw file so that they are reported beside invalid fields);
- `views`: what a rule sees of a section, over a model or over raw data;
- `messages`: pydantic's errors in the operator's language;
- `load`: the file, YAML duplicate keys, environment defaults, and the one problem list.
"""

from __future__ import annotations

from rotator.config.fields import DEFAULT_QUARANTINE_POLICIES, Duration, PositiveDuration
from rotator.config.load import DEFAULT_CONFIG_PATH, config_path, load_settings, parse_settings
from rotator.config.models import (
    AccountSettings,
    AwsSettings,
    HttpSettings,
    LeaksSettings,
    MatchSettings,
    NotifySettings,
    PolicySettings,
    RuleSettings,
    ScheduleSettings,
    SelectionSettings,
    Settings,
    StateSettings,
    VaultAuthSettings,
    VaultSettings,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_QUARANTINE_POLICIES",
    "AccountSettings",
    "AwsSettings",
    "Duration",
    "HttpSettings",
    "LeaksSettings",
    "MatchSettings",
    "NotifySettings",
    "PolicySettings",
    "PositiveDuration",
    "RuleSettings",
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
