"""Precision policies: 16-bit compute over float32 master weights, with switchable float32 islands.

A policy is a :class:`compression.transform.Transform`. Its ``wrap`` does, at every call of the model:

1. casts the floating leaves of the ``params`` collection (float32 master weights) to the compute dtype.
   Gradients flow back through the cast, so they arrive in float32 at the master weights. Other
   collections (quantization scales, gates, statistics) keep their dtype;
2. casts floating positional and keyword inputs to the compute dtype (integer ids and masks are untouched);
3. intercepts every float32 island (:class:`compression.sites.Island`) whose kind is switched off and runs
   its function on compute-dtype inputs, returning compute dtype (islands left on keep their default
   float32 behaviour). Models build LayerNorm with ``force_float32_reductions=False``, so with the
   ``layernorm`` island off the mean and variance really are computed in the compute dtype;
4. casts the floating leaves of the output to ``output_dtype`` (float32 by default, so losses and metrics
   are taken in float32).

Models take ``dtype=None`` (follow the parameters), so casting the parameters is what sets the compute
dtype of every ``nn.Dense``/``nn.Embed``/``nn.LayerNorm`` of any family; the policy needs no model flag.

Library choice. jmp (DeepMind's mixed precision library) has the same ``Policy`` idea (param / compute /
output dtypes and tree casts) but it is a few dozen lines, its last release is from 2023, and it knows
nothing of islands or Flax interception, which are most of this module. Flax has no policy object. So the
policy is written here in jmp's spirit without the dependency; dynamic loss scaling does use Flax's
maintained ``DynamicScale`` (see :mod:`compression.loss_scale`).

Float16 training needs loss scaling: calling a float16-wrapped model with ``train=True`` outside
:func:`compression.loss_scale.loss_scaled_step` emits a :class:`PrecisionWarning`; trainers configured up
front call :func:`check_loss_scaling` at start-up.

Example::

    apply = precision.policy("bf16", islands={"softmax": False}).wrap(model.apply)
    out = apply({"params": params}, input_ids)        # bfloat16 compute, float32 logits
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compression.sites import ISLAND_KINDS, Island
from compression.transform import Transform, identity

POLICY_NAMES = {
    "float32": jnp.float32, "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16,
}


class PrecisionWarning(UserWarning):
    """Warns about a precision set-up that trains badly (float16 without loss scaling)."""


_LOSS_SCALED = contextvars.ContextVar("nlpress_loss_scaled", default=False)


@contextlib.contextmanager
def loss_scaling_active():
    """Marks the code traced inside as loss-scaled (used by :mod:`compression.loss_scale`)."""
    token = _LOSS_SCALED.set(True)
    try:
        yield
    finally:
        _LOSS_SCALED.reset(token)


def dtype_from_name(name: str):
    """Maps a policy/dtype name (``"float32"``, ``"bf16"``, ``"fp16"``, ...) to a jnp dtype."""
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(POLICY_NAMES)}")
    return POLICY_NAMES[name]


def _is_float_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree: Any, dtype) -> Any:
    """Casts every floating array leaf of ``tree`` to ``dtype``; other leaves (ints, bools, Python values)
    are returned as they are."""
    return jax.tree.map(lambda x: x.astype(dtype) if _is_float_array(x) else x, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A mixed-precision policy.

    Attributes:
      compute_dtype: dtype parameters and floating inputs are cast to at apply time.
      output_dtype: dtype of the floating outputs; ``None`` leaves them as computed.
      islands_on: the island kinds that stay float32 (the others run in ``compute_dtype``).
    """

    compute_dtype: Any
    output_dtype: Any
    islands_on: frozenset

    @property
    def name(self) -> str:
        off = sorted(set(ISLAND_KINDS) - self.islands_on)
        suffix = f",islands_off={'+'.join(off)}" if off else ""
        return f"precision[{jnp.dtype(self.compute_dtype).name}{suffix}]"

    def _island_interceptor(self, next_fun, args, kwargs, context):
        module = context.module
        if (isinstance(module, Island) and context.method_name == "__call__"
                and module.kind not in self.islands_on):
            # The result is cast too: flax's LayerNorm multiplies by its scale re-cast to param_dtype
            # (float32), which would otherwise leak float32 into the rest of the model.
            fn, *xs = args
            return cast_floating(fn(*cast_floating(xs, self.compute_dtype)), self.compute_dtype)
        return next_fun(*args, **kwargs)

    def wrap(self, apply_fn):
        """``apply_fn`` (same signature as ``model.apply``) with the policy in effect."""
        intercept = len(self.islands_on) < len(ISLAND_KINDS)
        float16 = jnp.dtype(self.compute_dtype) == jnp.float16

        def wrapped(variables, *args, **kwargs):
            if float16 and kwargs.get("train", False) and not _LOSS_SCALED.get():
                warnings.warn(
                    "float16 training without loss scaling: small gradients underflow to zero in float16. "
                    "Train through compression.loss_scale.loss_scaled_step (dynamic loss scaling), or use "
                    "bfloat16, which has float32's exponent range.", PrecisionWarning, stacklevel=2)
            if "params" in variables:
                variables = {**variables, "params": cast_floating(variables["params"], self.compute_dtype)}
            args = cast_floating(args, self.compute_dtype)
            kwargs = {k: cast_floating(v, self.compute_dtype) for k, v in kwargs.items()}
            with nn.intercept_methods(self._island_interceptor) if intercept else contextlib.nullcontext():
                out = apply_fn(variables, *args, **kwargs)
            if self.output_dtype is None:
                return out
            # Flax returns (y, state) whenever ``mutable`` is not False (even ``[]``) or intermediates are captured.
            if kwargs.get("mutable", False) is not False or kwargs.get("capture_intermediates", False):
                y, state = out
                return cast_floating(y, self.output_dtype), state
            return cast_floating(out, self.output_dtype)

        return wrapped

    def transform(self) -> Transform:
        """The policy as a :class:`Transform` (its ``init`` adds nothing: a policy has no state)."""
        return Transform(self.name, identity().init, self.wrap)


def make_policy(name: str, *, islands: Mapping[str, bool] | None = None,
                output_dtype: str | None = "float32") -> Policy:
    """Builds a :class:`Policy`.

    Args:
      name: compute precision: ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``.
      islands: ``{kind: bool}`` for kinds in ``compression.sites.ISLAND_KINDS`` (``softmax``,
        ``attention_scores``, ``layernorm``, ``logits``); a kind left out stays on (float32). ``False``
        switches the island off so that it computes in ``name``'s dtype: the ablation of that island.
      output_dtype: dtype name the floating outputs are cast to, or ``None`` to leave them as computed.
    """
    compute = dtype_from_name(name)
    islands = dict(islands or {})
    unknown = sorted(set(islands) - set(ISLAND_KINDS))
    if unknown:
        raise ValueError(f"unknown island kind(s) {unknown}; known kinds: {', '.join(ISLAND_KINDS)}")
    for kind, on in islands.items():
        if not isinstance(on, bool):
            raise TypeError(f"islands[{kind!r}] must be True or False, got {on!r}")
    out = None if output_dtype is None else dtype_from_name(output_dtype)
    on = frozenset(k for k in ISLAND_KINDS if islands.get(k, True))
    return Policy(compute_dtype=compute, output_dtype=out, islands_on=on)


def policy(name: str, *, islands: Mapping[str, bool] | None = None,
           output_dtype: str | None = "float32") -> Transform:
    """The precision :class:`Transform` for ``name``; arguments as in :func:`make_policy`."""
    return make_policy(name, islands=islands, output_dtype=output_dtype).transform()


def check_loss_scaling(precision: str | Policy, loss_scaling: bool) -> None:
    """Start-up check for trainers: warns (:class:`PrecisionWarning`) when float16 training is configured
    without loss scaling. ``precision`` is a policy name or a :class:`Policy`."""
    dtype = precision.compute_dtype if isinstance(precision, Policy) else dtype_from_name(precision)
    if jnp.dtype(dtype) == jnp.float16 and not loss_scaling:
        warnings.warn(
            "float16 training configured without loss scaling: small gradients will underflow to zero. "
            "Enable dynamic loss scaling (compression.loss_scale) or train in bfloat16.",
            PrecisionWarning, stacklevel=2)
