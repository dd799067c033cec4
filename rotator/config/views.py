"""What a cross-field rule sees of a section: its fields, validated one at a time.

The same rule runs on two kinds of input. On a validated model every field is valid
(`ModelFields`). On the raw file (`RawFields`) each field is validated on its own, so a
rule still runs when a neighbouring field is invalid; a field that fails its own
validation reads as `INVALID` (its problem is reported by pydantic already) and any rule
that needs it stays silent.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, Protocol

from pydantic import BaseModel, TypeAdapter, ValidationError

__all__ = [
    "INVALID",
    "Fields",
    "Inherited",
    "ModelFields",
    "RawFields",
    "inner_model",
    "is_model_list",
]


class _Invalid:
    """Marks a field whose own validation failed, so no rule builds on its value."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = _Invalid()


class Fields(Protocol):
    """One section (or list item) of the settings, as a rule reads it."""

    def get(self, name: str) -> object:
        """The field's validated value (its default when unset), or `INVALID`."""
        ...

    def given(self, name: str) -> bool:
        """Whether the field is set to something other than null, valid or not."""
        ...

    def section(self, name: str) -> Fields:
        """The sub-section `name`."""
        ...

    def items(self, name: str) -> list[Fields]:
        """The items of the list of sub-sections `name` ([] when it is unset or no list)."""
        ...


class ModelFields:
    """`Fields` of a validated model: every value is valid."""

    def __init__(self, model: BaseModel) -> None:
        self._model = model

    def get(self, name: str) -> object:
        return getattr(self._model, name)

    def given(self, name: str) -> bool:
        return getattr(self._model, name) is not None

    def section(self, name: str) -> Fields:
        return ModelFields(getattr(self._model, name))

    def items(self, name: str) -> list[Fields]:
        return [ModelFields(item) for item in getattr(self._model, name) or ()]


class RawFields:
    """`Fields` of raw data (what YAML produced, environment defaults filled in) for
    `model`. `raw` that is not a mapping (reported as a type error) has every field
    `INVALID`."""

    def __init__(self, model: type[BaseModel], raw: object) -> None:
        self._model = model
        self._raw = raw if isinstance(raw, Mapping) else None

    def get(self, name: str) -> object:
        if self._raw is None:
            return INVALID
        field = self._model.model_fields[name]
        if name not in self._raw:
            # A missing required field is reported as missing; nothing builds on it.
            return INVALID if field.is_required() else field.get_default(call_default_factory=True)
        try:
            return _field_adapter(self._model, name).validate_python(self._raw[name])
        except ValidationError:
            return INVALID

    def given(self, name: str) -> bool:
        return self._raw is not None and self._raw.get(name) is not None

    def section(self, name: str) -> Fields:
        # An absent section is all defaults (the loader turned a null section into {}).
        value = self._raw.get(name, {}) if self._raw is not None else None
        return RawFields(self._nested(name), value)

    def items(self, name: str) -> list[Fields]:
        value = self._raw.get(name) if self._raw is not None else None
        if not isinstance(value, list):
            return []
        model = self._nested(name)
        return [RawFields(model, item) for item in value]

    def _nested(self, name: str) -> type[BaseModel]:
        model = inner_model(self._model.model_fields[name].annotation)
        if model is None:
            raise TypeError(f"{self._model.__name__}.{name} holds no settings section")
        return model


class Inherited:
    """`Fields` of a rule as it applies: the rule's own value of a key where it sets
    one, the `policy` section's otherwise (`rotator.policy.resolve` does the same for
    the decisions), so that a rule about policy keys judges a rule too."""

    def __init__(self, own: Fields, policy: Fields) -> None:
        self._own = own
        self._policy = policy

    def inherits(self, name: str) -> bool:
        """Whether the value of `name` is the policy's (the rule does not set it)."""
        return not self._own.given(name)

    def get(self, name: str) -> object:
        return self._policy.get(name) if self.inherits(name) else self._own.get(name)

    def given(self, name: str) -> bool:
        return self._own.given(name) or self._policy.given(name)

    def section(self, name: str) -> Fields:
        return self._own.section(name)

    def items(self, name: str) -> list[Fields]:
        return self._own.items(name)


@cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    return TypeAdapter(model.model_fields[name].rebuild_annotation())


def inner_model(annotation: object) -> type[BaseModel] | None:
    """The model inside `X`, `X | None` or `tuple[X, ...]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = inner_model(arg)
            if found is not None:
                return found
    return None


def is_model_list(annotation: object) -> bool:
    """Whether `annotation` is `tuple[X, ...]` (or that `| None`) of a model `X`."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return inner_model(annotation) is not None
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(is_model_list(arg) for arg in typing.get_args(annotation))
    return False
