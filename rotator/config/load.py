"""Reading the settings: the file, the environment, and one list of every problem.

`load_settings` reads the file, `parse_settings` validates what YAML produced. Either
returns a frozen `Settings` or raises one `ConfigError` listing every problem, each
starting with its dotted path in the file, grouped by section in the order the file
documents them: within a section the field problems first, then the cross-field ones.

The environment fills in what the file leaves unset (`VAULT_ADDR`, `VAULT_TOKEN`,
`AWS_ENDPOINT_URL`, `AWS_REGION`), except `ROTATOR_STATE_URL`, which replaces
`state.url` whatever the file says: it may hold the database's password, which the file
may not.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rotator.config.messages import dotted, pydantic_problems
from rotator.config.models import REDACTED, SECTIONS, Settings
from rotator.config.rules import (
    STATE_URL_ENV,
    raw_problems,
    state_url_problems,
    url_passwords,
    vault_login_problems,
)
from rotator.config.views import RawFields, is_model_list
from rotator.errors import ConfigError
from rotator.quoting import kind_of

__all__ = ["DEFAULT_CONFIG_PATH", "config_path", "load_settings", "parse_settings"]

DEFAULT_CONFIG_PATH = Path("/etc/rotator/rotator.yaml")


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
    return f"expected a mapping of sections ({', '.join(SECTIONS)}), got {kind_of(data)}"


# --- YAML ---------------------------------------------------------------------------------


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
                    f"{dotted((*loc, key))}: appears twice (lines {seen[key]} and {line}); "
                    "only the last one would count"
                )
            seen.setdefault(key, line)
            problems.extend(_duplicate_keys(value_node, (*loc, key)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems.extend(_duplicate_keys(item, (*loc, index)))
    return problems


# --- validation ---------------------------------------------------------------------------


def _validate(
    data: Mapping[str, Any] | None, env: Mapping[str, str], *, need_vault: bool = True
) -> tuple[Settings | None, list[str]]:
    raw, sources = _with_env_defaults(data or {}, env)
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, sources))
    problems.extend(vault_login_problems(RawFields(Settings, raw), need_vault=need_vault))
    problems.extend(state_url_problems(RawFields(Settings, data or {})))
    problems.extend(raw_problems(Settings, raw))
    secrets = [_secret_value(raw), env.get("VAULT_TOKEN")]
    secrets += [*_url_passwords(data or {}), *_url_passwords(raw)]
    return settings, _scrub(_in_file_order(problems), secrets)


def _in_file_order(problems: list[str]) -> list[str]:
    """Unique problems grouped by section, in the order the sections are documented."""

    def section(problem: str) -> int:
        name = re.split(r"[.\[:]", problem, maxsplit=1)[0]
        return SECTIONS.index(name) if name in SECTIONS else len(SECTIONS)

    return sorted(dict.fromkeys(problems), key=section)


def _with_env_defaults(
    data: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A copy of `data` with environment defaults filled in, and which path came from
    which variable (named in messages, since the operator will not find it in the file)."""
    raw: dict[str, Any] = dict(data)
    sources: dict[str, str] = {}
    for name in SECTIONS:
        if name in raw and raw[name] is None:
            # "vault:" with every key commented out; "rules:" with every rule.
            raw[name] = [] if is_model_list(Settings.model_fields[name].annotation) else {}
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
    # Not a default but an override: the deployment's URL (often from a secret, with
    # its password) wins over the one in the file, which may not hold a password.
    state = raw.get("state", {})
    if env.get(STATE_URL_ENV) and isinstance(state, Mapping):
        raw["state"] = {**state, "url": env[STATE_URL_ENV]}
        sources["state.url"] = STATE_URL_ENV
    return raw, sources


# --- secrets ------------------------------------------------------------------------------


def _secret_value(raw: Mapping[str, Any]) -> object:
    vault = raw.get("vault")
    auth = vault.get("auth") if isinstance(vault, Mapping) else None
    return auth.get("token") if isinstance(auth, Mapping) else None


def _url_passwords(raw: Mapping[str, Any]) -> list[str]:
    state = raw.get("state")
    url = state.get("url") if isinstance(state, Mapping) else None
    return url_passwords(url) if isinstance(url, str) else []


def _scrub(problems: list[str], secrets: list[object]) -> list[str]:
    """Belt and braces: no message may carry a token, whatever path it took there."""
    for secret in secrets:
        # A very short "token" would blank out ordinary words; such a value is no secret.
        if isinstance(secret, str) and len(secret) >= 6:
            for form in (secret, json.dumps(secret, ensure_ascii=False)[1:-1]):
                problems = [p.replace(form, REDACTED) for p in problems]
    return problems
