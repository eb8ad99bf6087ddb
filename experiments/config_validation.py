"""Typed schemas for experiment configs, checked at start-up before any work.

A schema is a nested dict whose leaves are :class:`Field` (type, allowed values, bounds). :func:`validate`
walks an ``ml_collections.ConfigDict`` against it and raises one :class:`ConfigError` listing every problem:
unknown fields (with the closest known name), missing fields, wrong types and values outside the allowed
set or range. :data:`FINETUNE_SCHEMA` describes the config of :func:`experiments.train.train_and_evaluate`;
later stages extend it with their own sections (``dict(FINETUNE_SCHEMA, distill={...})``).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

from compression.precision import POLICY_NAMES
from experiments.parallel import MODES
from experiments.trainer import SCHEDULES


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


POSITIVE = dict(min=1)

FINETUNE_SCHEMA: Schema = {
    "task": Field(str),
    "data_dir": Field(str, nullable=True),
    "model_dir": Field(str, nullable=True),
    "max_length": Field(int, min=8, max=4096),
    "synthetic_size": Field(int, min=2),
    "seed": Field(int, min=0),
    "parallelism": Field(str, choices=MODES),
    "precision": Field(str, choices=tuple(POLICY_NAMES)),
    "loss_scale": {
        "dynamic": Field(bool),
        "init_scale": Field(float, min=1.0),
        "growth_interval": Field(int, **POSITIVE),
        "minimum_scale": Field(float, min=1e-30),
    },
    "layers": {
        "init": Field(str, choices=("all", "every_other")),
        "layerdrop": Field(float, min=0.0, max=0.99),
    },
    "qat": {
        "enabled": Field(bool),
        "calibrator": Field(str),
        "calibration_batches": Field(int, **POSITIVE),
    },
    "model": {
        "hidden_size": Field(int, **POSITIVE),
        "num_layers": Field(int, **POSITIVE),
        "num_heads": Field(int, **POSITIVE),
        "intermediate_size": Field(int, **POSITIVE),
        "dropout_rate": Field(float, min=0.0, max=0.99),
    },
    "optimizer": {
        "learning_rate": Field(float, min=0.0),
        "schedule": Field(str, choices=SCHEDULES),
        "warmup_fraction": Field(float, min=0.0, max=1.0),
        "weight_decay": Field(float, min=0.0),
        "b1": Field(float, min=0.0, max=1.0),
        "b2": Field(float, min=0.0, max=1.0),
        "eps": Field(float, min=0.0),
        "grad_clip_norm": Field(float, min=0.0),
        "no_decay_regex": Field(str),
        "freeze_regex": Field(str),
    },
    "batch_size": Field(int, **POSITIVE),
    "eval_batch_size": Field(int, **POSITIVE),
    "num_epochs": Field(float, min=0.0),
    "num_train_steps": Field(int, min=-1),
    "log_every_steps": Field(int, **POSITIVE),
    "eval_every_steps": Field(int, min=0),
    "checkpoint": {
        "every_steps": Field(int, min=0),
        "keep": Field(int, **POSITIVE),
        "best_metric": Field(str, nullable=True),
        "best_mode": Field(str, choices=("max", "min")),
        "async_save": Field(bool),
    },
    "export": Field(str, choices=("best", "last")),
    "progress_bar": Field(str, choices=("auto", "on", "off")),
}
