"""Dynamic loss scaling for float16 training, built on Flax's ``DynamicScale``.

Float16 has a narrow exponent range (smallest normal 6.1e-5, subnormals to 6e-8): backpropagated
activation gradients below that flush to zero. Loss scaling multiplies the loss by a large factor S before
differentiation, so the float16 cotangents inside the model are S times larger, and divides the float32
parameter gradients by S afterwards. S is adapted: halved (and the update skipped) whenever a gradient is
inf/NaN, doubled after a run of finite steps.

Library choice: ``flax.training.dynamic_scale.DynamicScale`` is maintained with Flax, is a pytree
(``scale`` and ``fin_steps`` are leaves; the factors and interval are static fields), averages the
gradients over ``axis_name`` under pmap/shard_map and then checks finiteness, so every device sees the same
``finite`` flag: a single device with an inf makes the pmean inf everywhere. It does not skip the update;
:func:`loss_scaled_step` adds that (params and optimizer state kept with ``jnp.where``).

Growth convention (Flax's): with ``growth_interval=N`` the scale is multiplied by ``growth_factor`` on the
first finite step that follows N consecutive finite steps, i.e. step N+1 uses the old scale and its update
leaves the grown scale for step N+2. A non-finite step resets the run.

The state lives in a TrainState field (``dynamic_scale``) and checkpoints with it; build it with
:func:`dynamic_scale` so that its leaves are arrays of fixed dtype (float32 scale, int32 counter) from the
first step on (Python scalars would retrace the jitted step once and checkpoint as Python values).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax.training.dynamic_scale import DynamicScale

from compression.precision import loss_scaling_active

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]


def dynamic_scale(init_scale: float = 2.0 ** 15, growth_interval: int = 2000, growth_factor: float = 2.0,
                  backoff_factor: float = 0.5, minimum_scale: float = 1.0) -> DynamicScale:
    """A fresh loss-scale state.

    Args:
      init_scale: the first scale S (2**15 as in most float16 recipes).
      growth_interval: finite steps in a row before the scale grows (see the module docstring).
      growth_factor: > 1, what the scale is multiplied by on growth.
      backoff_factor: in (0, 1), what the scale is multiplied by on a non-finite step.
      minimum_scale: the scale never goes below this (1.0: never amplify tiny gradients' rounding).
    """
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    if growth_interval < 1:
        raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
    if not growth_factor > 1.0:
        raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
    if not 0 < minimum_scale <= init_scale:
        raise ValueError(f"minimum_scale must be in (0, init_scale={init_scale}], got {minimum_scale}")
    return DynamicScale(growth_factor=growth_factor, backoff_factor=backoff_factor,
                        growth_interval=growth_interval, fin_steps=jnp.zeros((), jnp.int32),
                        scale=jnp.asarray(init_scale, jnp.float32), minimum_scale=minimum_scale)


def select_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``finite`` (a bool scalar) else ``old``, leaf by leaf: how a skipped step keeps the
    parameters and optimizer state (``jnp.where``, no host round trip and no control flow)."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def scaled_value_and_grad(loss_fn: Callable[..., tuple[jax.Array, Any]], dyn_scale: DynamicScale, *,
                          axis_name: str | None = None) -> Callable:
    """Loss-scaled ``jax.value_and_grad(loss_fn, has_aux=True)`` over the first argument.

    Args:
      loss_fn: ``loss_fn(params, *args) -> (loss, aux)``; ``loss`` a float32 scalar (take losses on float32
        outputs: the precision policy's ``output_dtype`` does that), else a ValueError at trace time.
      dyn_scale: the current state (:func:`dynamic_scale`).
      axis_name: the pmap/shard_map axis the gradients are averaged over before the finiteness check, or
        ``None``. A single device's inf makes the average inf everywhere, so all devices agree.

    Returns:
      ``fn(params, *args) -> (new dyn_scale, finite bool [], (loss, aux), grads)`` with the loss unscaled
      and the gradients unscaled float32 (averaged over ``axis_name``). Tracing happens inside
      :func:`compression.precision.loss_scaling_active`, so a float16 policy does not warn.
    """

    def checked(params, *args):
        loss, aux = loss_fn(params, *args)
        if jnp.ndim(loss) != 0 or jnp.result_type(loss) != jnp.float32:
            raise ValueError(f"loss_fn must return a float32 scalar loss for loss scaling, got "
                             f"{jnp.result_type(loss)} of shape {jnp.shape(loss)}; compute the loss on float32 "
                             "outputs")
        return loss, aux

    grad_fn = dyn_scale.value_and_grad(checked, has_aux=True, axis_name=axis_name)

    def fn(params, *args):
        with loss_scaling_active():
            return grad_fn(params, *args)

    return fn


def loss_scaled_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                     axis_name: str | None = None) -> Callable:
    """Wraps a loss and an optax optimizer into one loss-scaled update.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> (loss, aux)``; ``loss`` a float32 scalar.
      optimizer: the optax transformation whose ``update``/``apply_updates`` make the step.
      axis_name: the pmap/shard_map axis to average gradients and the loss over, or ``None``.

    Returns:
      ``step(params, opt_state, dyn_scale, batch, rng) -> (params, opt_state, dyn_scale, metrics, aux)``.
      ``metrics`` holds ``loss`` (unscaled; averaged over ``axis_name``), ``grads_finite`` (bool; the same
      on every device) and ``loss_scale`` (the scale this step used). On a non-finite step ``params`` and
      ``opt_state`` are returned unchanged and the scale is lowered.
    """

    def step(params, opt_state, dyn_scale: DynamicScale, batch, rng):
        new_scale, finite, (loss, aux), grads = scaled_value_and_grad(loss_fn, dyn_scale, axis_name=axis_name)(
            params, batch, rng)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        params, opt_state = select_finite(finite, (optax.apply_updates(params, updates), new_opt_state),
                                          (params, opt_state))
        if axis_name is not None:
            loss = jax.lax.pmean(loss, axis_name)
        metrics = {"loss": loss, "grads_finite": finite, "loss_scale": dyn_scale.scale}
        return params, opt_state, new_scale, metrics, aux

    return step
