"""How a value from the configuration is shown in an error message: as the operator would
write it in YAML. One definition for the settings, durations and schedules."""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["kind_of", "quoted", "shown"]


def quoted(text: str) -> str:
    """`text` in double quotes, as the operator would write it in YAML."""
    return json.dumps(text, ensure_ascii=False)


def kind_of(value: object) -> str:
    """The YAML kind of a value, for messages that must not show the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def shown(value: object) -> str:
    """A scalar as written in YAML; only the kind of a list or mapping. Never truncated,
    so that the settings loader can find and blank out a secret in the message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, int | float):
        return repr(value)
    return kind_of(value)
