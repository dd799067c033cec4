"""pydantic's validation errors in the operator's language: `path.in.file: what is wrong`,
with the value as YAML shows it, a suggestion for a misspelt key, and the environment
variable a bad value came from. The Vault token and the state store's URL (which may
hold a password) are described by their kind, never shown.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from rotator.config.models import Settings
from rotator.config.rules import RULE_ERROR
from rotator.config.views import inner_model
from rotator.quoting import kind_of, shown

__all__ = ["dotted", "pydantic_problems"]

_SECRET_LOCS = {("vault", "auth", "token"), ("state", "url")}

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


def dotted(loc: tuple[str | int, ...]) -> str:
    """A location as the operator finds it in the file: `aws.accounts[0].id`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "top level"


def pydantic_problems(exc: ValidationError, sources: Mapping[str, str]) -> list[str]:
    """One problem per field error, in pydantic's order. `sources`: which dotted path
    came from which environment variable (the operator will not find it in the file).

    A broken cross-field rule is left out: the loader runs the rules on the raw file, which
    reports it even beside invalid fields, where pydantic skips the rules."""
    problems = []
    for error in exc.errors(include_url=False):
        if error["type"] == RULE_ERROR:
            continue
        loc = tuple(error["loc"])
        if error["type"] == "invalid_key":
            # A non-string key, e.g. "90: x": the key is what is wrong, not an index.
            path = f"{dotted(loc[:-1])}.{loc[-1]}" if loc[:-1] else str(loc[-1])
            problems.append(f"{path}: unknown key")
            continue
        message = _describe(error, loc)
        path = dotted(loc)
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
        model = inner_model(field.annotation) if field else None
    if model is None or not isinstance(loc[-1], str):
        return ""
    names = [field.alias or name for name, field in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""
