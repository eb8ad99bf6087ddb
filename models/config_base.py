"""Typed, validated model configs shared by the three model families.

Every family's config is a frozen dataclass deriving from :class:`ModelConfig`. Configs round-trip through
plain dicts (``to_dict`` / ``from_dict``) so that model directories are self-describing JSON, and they are
validated on construction: an unknown field, a wrong type or a value outside its allowed set is a
``ValueError`` that names the field.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str | None):
    """Maps a dtype name (or ``None``: follow the inputs/parameters) to a jnp dtype."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_type(cls_name: str, field: str, value: Any, hint: Any) -> None:
    """Checks ``value`` against a (simple) type hint; raises naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for a in args:
            try:
                _check_type(cls_name, field, value, a)
                return
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"{cls_name}.{field}: {value!r} is not of type {hint}")
    if hint is type(None):
        if value is not None:
            raise TypeError(f"{cls_name}.{field}: expected None, got {value!r}")
        return
    if origin is tuple:
        if not isinstance(value, tuple):
            raise TypeError(f"{cls_name}.{field}: expected a tuple, got {type(value).__name__}")
        elem = args[0] if args else Any
        for v in value:
            _check_type(cls_name, field, v, elem)
        return
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{cls_name}.{field}: {value!r} is not allowed; allowed: {list(args)}")
        return
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{cls_name}.{field}: expected a number, got {type(value).__name__} {value!r}")
        return
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{cls_name}.{field}: expected an int, got {type(value).__name__} {value!r}")
        return
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError(f"{cls_name}.{field}: expected {hint.__name__}, got {type(value).__name__} {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of the families' configs: validated fields, dict round trip, a ``family`` name."""

    family: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # JSON gives lists; store tuples so configs stay hashable
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            _check_type(type(self).__name__, f.name, value, hints[f.name])
        self.validate()

    def validate(self) -> None:
        """Family-specific value checks; raise ``ValueError`` naming the field."""

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} field(s) {unknown}")
        return dataclasses.replace(self, **changes)
