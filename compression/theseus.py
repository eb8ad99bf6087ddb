"""Progressive module replacement (BERT-of-Theseus, Xu et al. 2020) for any pair of modules.

The predecessor's layers are grouped into modules; each module has a successor (fewer layers, possibly a
different architecture such as multi-query attention) with the same interface ``(x, *args) -> x``. During
training every module independently runs its successor with probability ``p`` (sampled inside the jitted step
from the ``"theseus"`` RNG stream, through ``nn.cond``: one compiled graph, only the chosen branch runs);
predecessor modules are frozen. In the second phase (``p = 1``) the successor model trains alone, and the
successors are extracted into a plain smaller model.

Schedules follow the reference implementation: constant rate ``p = r`` for ``replacing_steps`` steps then 1,
and the linear curriculum ``p = min(1, k * t + b)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

THESEUS_RNG = "theseus"


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
    """p(t) = rate while t < replacing_steps, then 1 (the successor alone). ``replacing_steps=None``: always rate."""

    rate: float
    replacing_steps: int | None = None

    def __post_init__(self):
        _check_rate("replacement rate", self.rate)

    def __call__(self, step):
        step = jnp.asarray(step)
        if self.replacing_steps is None:
            return jnp.full(step.shape, self.rate, jnp.float32)
        return jnp.where(step < self.replacing_steps, self.rate, 1.0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LinearSchedule:
    """The curriculum p(t) = min(1, k * t + b) of the paper: replacement grows until only successors run."""

    k: float
    b: float

    def __post_init__(self):
        _check_rate("base replacement rate b", self.b)
        if self.k < 0:
            raise ValueError(f"linear schedule slope k must be >= 0, got {self.k}")

    def __call__(self, step):
        return jnp.minimum(1.0, self.k * jnp.asarray(step, jnp.float32) + self.b)


def make_schedule(kind: str, **kwargs) -> ConstantSchedule | LinearSchedule:
    """``kind`` in {"constant", "linear"}; keyword arguments as the schedule classes take them."""
    schedules = {"constant": ConstantSchedule, "linear": LinearSchedule}
    if kind not in schedules:
        raise ValueError(f"unknown replacement schedule {kind!r}; known: {sorted(schedules)}")
    return schedules[kind](**kwargs)


def sample_replacement(key: jax.Array, p, num_modules: int) -> jax.Array:
    """[num_modules] bool: True where the successor runs. ``p`` may be traced (no retracing per value)."""
    return jax.random.bernoulli(key, jnp.asarray(p, jnp.float32), (num_modules,))


class Replaceable(nn.Module):
    """Runs ``predecessor`` or ``successor`` (same interface ``(x, *args) -> x``) as ``replace`` says.

    ``replace`` is a Python bool (a fixed choice, traced once) or a scalar bool array (chosen at run time
    through ``nn.cond``; only the chosen branch executes). Initialisation creates both branches' parameters.
    Construct both modules with ``parent=None`` so that their parameters live under ``predecessor`` and
    ``successor`` in this module's scope.
    """

    predecessor: nn.Module
    successor: nn.Module

    @nn.compact
    def __call__(self, x, *args, replace):
        if self.is_initializing():
            succ = self.successor(x, *args)
            pred = self.predecessor(x, *args)
            if jax.tree.structure(succ) != jax.tree.structure(pred) or jax.tree.map(jnp.shape, succ) != \
                    jax.tree.map(jnp.shape, pred):
                raise ValueError(f"module {'/'.join(self.path)}: successor output "
                                 f"{jax.tree.map(jnp.shape, succ)} does not match the predecessor's "
                                 f"{jax.tree.map(jnp.shape, pred)}; they must share the interface")
            return pred
        if isinstance(replace, bool):
            return (self.successor if replace else self.predecessor)(x, *args)
        return nn.cond(replace, lambda m, x, *a: m.successor(x, *a), lambda m, x, *a: m.predecessor(x, *a),
                       self, x, *args)


def check_grouping(num_predecessor_layers: int, num_modules: int) -> int:
    """Layers per predecessor module; raises when the depth does not divide into ``num_modules`` modules."""
    if num_modules < 1 or num_predecessor_layers % num_modules:
        raise ValueError(f"a predecessor of {num_predecessor_layers} layers does not divide into {num_modules} "
                         "modules of equal size")
    return num_predecessor_layers // num_modules


def freeze(params: Any, trainable: Callable[[tuple[str, ...]], bool]) -> Any:
    """``stop_gradient`` on every leaf whose path (tuple of keys) is not ``trainable``: no gradient reaches it."""
    def leaf(path, x):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        return x if trainable(keys) else jax.lax.stop_gradient(x)

    return jax.tree_util.tree_map_with_path(leaf, params)


def mean_pool_kv_heads(kernel: jax.Array, bias: jax.Array, num_kv_heads: int, head_dim: int):
    """Initialises a grouped/multi-query key or value projection from a multi-head one.

    kernel: [H, N * D] and bias [N * D] of N heads; returns kernel [H, K * D] and bias [K * D] whose head g is
    the mean of the predecessor heads g*N/K .. (g+1)*N/K - 1 (the group that shares it, in the head order our
    attention uses: query head n reads key/value head n // (N / K)). When the heads of each group are identical
    the new model reproduces the old one exactly.
    """
    hidden, width = kernel.shape
    if width % head_dim:
        raise ValueError(f"projection width {width} is not a multiple of head_dim {head_dim}")
    n = width // head_dim
    if num_kv_heads < 1 or n % num_kv_heads:
        raise ValueError(f"{num_kv_heads} key/value heads do not divide the predecessor's {n} heads")
    g = n // num_kv_heads
    k = kernel.reshape(hidden, num_kv_heads, g, head_dim).mean(axis=2).reshape(hidden, num_kv_heads * head_dim)
    b = bias.reshape(num_kv_heads, g, head_dim).mean(axis=1).reshape(num_kv_heads * head_dim)
    return k, b


MODES = ("mixed", "predecessor", "successor")


def replacement_flags(module: nn.Module, mode: str, p, num_modules: int) -> list:
    """Per-module choices inside a model's call.

    ``mode="mixed"``: sampled with probability ``p`` from the ``theseus`` RNG stream (training);
    ``"predecessor"`` / ``"successor"``: every module fixed to that side (``p`` ignored).
    """
    if mode not in MODES:
        raise ValueError(f"unknown replacement mode {mode!r}; known: {MODES}")
    if mode != "mixed":
        return [mode == "successor"] * num_modules
    if p is None:
        raise ValueError("mode='mixed' needs a replacement probability p")
    flags = sample_replacement(module.make_rng(THESEUS_RNG), p, num_modules)
    return [flags[i] for i in range(num_modules)]
