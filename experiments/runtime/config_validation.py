"""Typed schemas for experiment configs, checked at start-up before any work.

A schema is a nested dict whose leaves are :class:`Field` (type, allowed values, bounds). :func:`validate`
walks an ``ml_collections.ConfigDict`` against it and raises one :class:`ConfigError` listing every problem:
unknown fields (with the closest known name), missing fields, wrong types and values outside the allowed
set or range.

A job's schema is not written out: :func:`derive_schema` derives it from the job's reference config (its
``get_config()``, where every field is declared once, with its default and a comment), taking each field's
type from its default, and adds the constraints (``min``/``max``/``choices``) that the job and its techniques
declare beside their fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

from ml_collections import ConfigDict, FieldReference


class ConfigError(ValueError):
    """An invalid experiment config; the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field.

    Attributes:
      type: the Python type (``float`` fields also take ints; ``bool`` is never an ``int``).
      choices: allowed values, or ``None``.
      min, max: inclusive bounds for numbers, or ``None``.
      nullable: whether ``None`` is allowed.
    """

    type: type
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    nullable: bool = False

    def problems(self, name: str, value: Any) -> list[str]:
        if value is None:
            return [] if self.nullable else [f"{name} must be set (a {self.type.__name__}), got None"]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if self.type is float
              else isinstance(value, int) and not isinstance(value, bool) if self.type is int
              else isinstance(value, self.type))
        if not ok:
            return [f"{name} must be a {self.type.__name__}, got {type(value).__name__} {value!r}"]
        if self.type is float and not abs(value) < float("inf"):  # NaN and +-inf; NaN passes every bound
            return [f"{name}={value!r} is not a finite number"]
        if self.choices is not None and value not in self.choices:
            return [f"{name}={value!r} is not allowed; allowed: {list(self.choices)}"]
        if self.min is not None and value < self.min:
            return [f"{name}={value!r} is below the minimum {self.min}"]
        if self.max is not None and value > self.max:
            return [f"{name}={value!r} is above the maximum {self.max}"]
        return []


Schema = Mapping[str, "Field | Schema"]


def _problems(config: Mapping, schema: Schema, prefix: str) -> list[str]:
    out = []
    keys = set(config.keys())
    for key in sorted(keys - set(schema)):
        close = difflib.get_close_matches(key, list(schema), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        out.append(f"unknown field {prefix}{key}{hint}; known fields here: {sorted(schema)}")
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        if key not in keys:
            out.append(f"missing field {name}")
            continue
        value = config[key]
        if isinstance(spec, Field):
            out.extend(spec.problems(name, value))
        elif not isinstance(value, Mapping) and not hasattr(value, "keys"):
            out.append(f"{name} must be a section with fields {sorted(spec)}, got {type(value).__name__}")
        else:
            out.extend(_problems(value, spec, name + "."))
    return out


def validate(config: Mapping, schema: Schema) -> None:
    """Raises :class:`ConfigError` naming every unknown/missing field, wrong type or disallowed value."""
    problems = _problems(config, schema, "config.")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _field_of(value, constraint: Mapping | None) -> Field:
    """The Field of a reference config's value: the default's type; nullable when the default is None or the
    field is a typed ``FieldReference`` (how a config declares "a str, or None")."""
    nullable = value is None or isinstance(value, FieldReference)
    kind = value.get_type() if isinstance(value, FieldReference) else type(value)
    if kind is type(None):
        kind = object
    return Field(kind, nullable=nullable, **dict(constraint or {}))


def derive_schema(reference: ConfigDict, constraints: Mapping[str, Mapping] | None = None) -> Schema:
    """The schema of configs shaped like ``reference``: every field of it, typed by its default.

    Args:
      reference: the job's default config (every field declared, with its default).
      constraints: ``{"section.field": {"min": .., "max": .., "choices": (..)}}``; a path that names no field
        of ``reference`` is a programming error (raised here, so a renamed field cannot leave a stale rule).
    """
    constraints = dict(constraints or {})
    used = set()

    def walk(node: ConfigDict, prefix: str) -> dict:
        out = {}
        for key, value in node.items(preserve_field_references=True):
            path = prefix + key
            if isinstance(value, ConfigDict):
                out[key] = walk(value, path + ".")
            else:
                used.add(path)
                out[key] = _field_of(value, constraints.get(path))
        return out

    schema = walk(reference, "")
    stale = sorted(set(constraints) - used)
    if stale:
        raise ValueError(f"constraints on fields the reference config does not have: {stale}")
    return schema


def prefixed(prefix: str, constraints: Mapping[str, Mapping]) -> dict[str, Mapping]:
    """``constraints`` of a config section, keyed by their full paths (``prefix.field``)."""
    return {f"{prefix}.{k}": v for k, v in constraints.items()}
