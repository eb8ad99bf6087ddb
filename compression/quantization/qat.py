"""The fake-quantization transform: simulated int8 or FP8 for PTQ evaluation and quantization-aware training.

::

    t = fake_quant(rules, scales="fixed")
    variables = t.init(key, variables, model.apply, batch)   # one-batch max calibration (or use calibrate())
    apply = t.wrap(model.apply)                               # same signature as model.apply

Every module selected by the rules (see :mod:`compression.quantization.rules`) runs with its weight
fake-quantized (symmetric, per output channel, scale = max |w| per channel recomputed at every call, no gradient
through the scale) and its input activation fake-quantized per-tensor with the scale held in the ``"quant"``
collection, on the grid of its rule's format (int8, or FP8 E4M3 for ``format="fp8"`` rules, e.g.
:data:`~compression.quantization.rules.FP8_RULES`). Gradients are straight-through
(:func:`compression.quantization.fake_quant.fake_quantize`), so the wrapped model trains with any loss (task,
distillation).

A Dense layer whose weight and (symmetric) input are both on an integer grid -- the layers the int8 path runs as
int8 matmuls (:func:`integer_dense`) -- computes its product the way the int8 kernel does: the integer grid values of
both operands multiplied in float32 (exact while the sums stay below 2^24, i.e. always for contractions up to
1040 terms and in practice far beyond), then one rescale by ``s_x * s_w``. The simulated and the real int8
model then agree to the bit instead of up to float32 rounding (which, in a deep model, occasionally moves an
activation across a rounding boundary of the next quantizer). The backward pass is that of the plain product
of the dequantized operands.

Activation scales during training (``scales=``):

* ``"fixed"``: the calibrated scales, no gradient (the usual QAT after calibration).
* ``"ema"``: when the ``"quant"`` collection is mutable (``apply(..., mutable=["quant"])``), each call moves the
  scale toward the batch's ``max |x| / qmax`` (asymmetric: min/max) with decay ``ema_decay`` and uses the new
  value; otherwise (evaluation) the stored scale is used. A shared scale is updated once per call.
* ``"learned"``: the scale receives the straight-through (LSQ) gradient; differentiate with respect to
  ``variables["quant"]`` as well as ``variables["params"]`` and give it to the optimizer. Zero points (asymmetric)
  stay fixed. An optimizer step can push a scale to zero or below: apply :func:`project_scales` after each
  update (the forward pass floors scales at ``MIN_SCALE`` anyway, but the saved state must hold usable ones).

**QAT with experiments/runtime/trainer.py.** The trainer's loss is pluggable (``loss_fn(params, batch, rng, extras)``)
and the scales travel in ``extras``; :func:`qat_loss` turns any loss builder (a function of ``apply_fn``, e.g.
``trainer.classification_loss`` or a distillation loss around the student's apply) into a QAT loss::

    variables = ptq.post_training_quantize(model.apply, params, calib_batches, "percentile:99.99", inputs=...)
    loss_fn = qat_loss(trainer.classification_loss, model.apply, scales="ema")
    state = trainer.TrainState.create(variables["params"], tx, key, extras={"quant": variables["quant"]})
    train_step = trainer.make_train_step(loss_fn, tx, steps_per_epoch)
    predict = trainer.classification_predict(fake_quant().wrap(model.apply))   # evaluation, simulated int8

``"fixed"`` keeps ``extras["quant"]`` as calibrated; ``"ema"`` returns the EMA-updated scales (averaged over the
data-parallel axis, so every device keeps the same) as the new extras. ``"learned"`` needs gradients with
respect to the scales, which the trainer (it differentiates ``params`` only) does not take: use a custom step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from compression.quantization.calibration import (
    Call,
    check_not_quantized,
    collect_statistics,
    compute_scales,
)
from compression.quantization.fake_quant import fake_quantize
from compression.quantization.qarray import (
    MIN_SCALE,
    asymmetric_params,
    normalize_axes,
    reduce_amax,
    reduce_range,
    symmetric_scale,
)
from compression.quantization.rules import (
    DEFAULT_RULES,
    QUANT,
    QuantRule,
    Target,
    check_rules,
    hooked_call,
    quant_interceptor,
    read_input_qparams,
    scale_owner,
)
from compression.transform import Transform

SCALE_MODES = ("fixed", "ema", "learned")

__all__ = ["SCALE_MODES", "fake_quant", "fake_quant_call", "fake_quant_hook", "fake_quant_operands", "grid_dot",
           "integer_dense", "project_scales", "qat_loss", "quantize_weight", "weight_scale"]


def weight_scale(w: jax.Array, target: Target) -> jax.Array:
    """The symmetric weight scale: max |w| / qmax per channel on ``target.weight_axes`` (no gradient), float32."""
    axes = normalize_axes(target.weight_axes, w.ndim)
    return jax.lax.stop_gradient(symmetric_scale(reduce_amax(w.astype(jnp.float32), axes), target.rule.bits,
                                                 target.rule.format))


def quantize_weight(w: jax.Array, target: Target) -> jax.Array:
    """Symmetric fake quantization of a weight, per channel on ``target.weight_axes`` (max scale, no gradient)."""
    axes = normalize_axes(target.weight_axes, w.ndim)
    return fake_quantize(w, weight_scale(w, target), bits=target.rule.bits, symmetric=True, axis=axes,
                         format=target.rule.format)


def integer_dense(target: Target) -> bool:
    """Whether ``target`` is a Dense call whose weight and symmetric input are both quantized on an integer grid:
    the layers the int8 path converts, and whose fake-quantized product is computed on the integer grid (an FP8
    Dense multiplies its dequantized operands in float32, as the exported graph does)."""
    return (target.kind == "Dense" and target.quantize_weight and target.quantize_input
            and target.rule.symmetric and target.rule.format == "int" and target.method == "__call__")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def grid_dot(lhs, rhs, s_x, s_w, dimension_numbers):
    """``dot_general(lhs, rhs)`` of operands on quantization grids (``lhs = q_x * s_x``, ``rhs = q_w * s_w``, ``s_w``
    per output channel [N] or a scalar): ``(q_x . q_w) * (s_x * s_w)`` with the integer products summed in float32,
    as an int8 x int8 -> int32 kernel computes them. Gradients: those of the plain product (none to the scales).
    """
    return _grid_dot_fwd(lhs, rhs, s_x, s_w, dimension_numbers)[0]


def _grid_dot_fwd(lhs, rhs, s_x, s_w, dimension_numbers):
    q_x = jnp.round(lhs.astype(jnp.float32) / s_x)  # exact recovery of the grid values (|q| <= 127)
    q_w = jnp.round(rhs.astype(jnp.float32) / s_w)
    acc = jax.lax.dot_general(q_x, q_w, dimension_numbers, preferred_element_type=jnp.float32)
    return (acc * (s_x * s_w)).astype(lhs.dtype), (lhs, rhs, s_x, s_w)


def _grid_dot_bwd(dimension_numbers, res, g):
    lhs, rhs, s_x, s_w = res
    _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dimension_numbers), lhs, rhs)
    d_lhs, d_rhs = vjp(g.astype(jnp.result_type(lhs, rhs)))
    return d_lhs, d_rhs, jnp.zeros_like(s_x), jnp.zeros_like(s_w)


grid_dot.defvjp(_grid_dot_fwd, _grid_dot_bwd)


@dataclasses.dataclass
class _CallState:
    """Per-call bookkeeping: shared EMA scales already updated in this call."""

    updated: set = dataclasses.field(default_factory=set)


def _ema_update(module: nn.Module, target: Target, x, scale, zero_point, decay: float, state: _CallState):
    owner = scale_owner(module, target)
    key = (target.owner, target.scale_name)
    if not owner.is_mutable_collection(QUANT) or key in state.updated:
        return scale, zero_point
    state.updated.add(key)
    xf = jax.lax.stop_gradient(x.astype(jnp.float32))
    if target.rule.symmetric:
        new_scale = decay * scale + (1 - decay) * symmetric_scale(reduce_amax(xf, None), target.rule.bits,
                                                                  target.rule.format)
        owner.put_variable(QUANT, target.scale_name, new_scale)
        return new_scale, zero_point
    obs_scale, obs_zp = asymmetric_params(*reduce_range(xf, None), target.rule.bits)
    new_scale = decay * scale + (1 - decay) * obs_scale
    new_zp = jnp.round(decay * zero_point + (1 - decay) * obs_zp)
    owner.put_variable(QUANT, target.scale_name, new_scale)
    owner.put_variable(QUANT, target.zero_point_name, new_zp)
    return new_scale, new_zp


def fake_quant_operands(target: Target, module: nn.Module, ops: list, scales: str = "fixed",
                        ema_decay: float = 0.99, state: _CallState | None = None, used: dict | None = None) -> list:
    """Fake-quantizes the activation and the weight among a module's promoted operands (see module doc).

    ``used``, if given, receives the scales applied: ``"input"`` (float32 [], floored) and ``"weight"``.
    """
    rule = target.rule
    used = {} if used is None else used
    if target.quantize_input:
        x = ops[target.input_index]
        if x is not None and jnp.issubdtype(x.dtype, jnp.floating):
            scale, zero_point = read_input_qparams(module, target)
            if scales == "ema":
                scale, zero_point = _ema_update(module, target, x, scale, zero_point, ema_decay,
                                                state if state is not None else _CallState())
            if scales != "learned":
                scale = jax.lax.stop_gradient(scale)
            if zero_point is not None:
                zero_point = jax.lax.stop_gradient(zero_point)
            ops[target.input_index] = fake_quantize(x, scale, zero_point, bits=rule.bits, symmetric=rule.symmetric,
                                                    format=rule.format)
            used["input"] = jnp.maximum(jnp.asarray(scale, jnp.float32), MIN_SCALE)
    if target.quantize_weight:
        w = ops[target.weight_index]
        if jnp.issubdtype(w.dtype, jnp.floating):
            used["weight"] = weight_scale(w, target)
            axes = normalize_axes(target.weight_axes, w.ndim)
            ops[target.weight_index] = fake_quantize(w, used["weight"], bits=rule.bits, symmetric=True, axis=axes,
                                                     format=rule.format)
    return ops


def fake_quant_hook(target: Target, module: nn.Module, scales: str = "fixed", ema_decay: float = 0.99,
                    state: _CallState | None = None, used: dict | None = None):
    """The ``promote_dtype`` hook of one fake-quantized module call (see :func:`fake_quant_operands`).

    Raises if the weight is already an integer array: variables converted by ``convert_to_int8`` run under
    ``quantization.int8().wrap``, not here (the int8 values would otherwise be read as floats).
    """

    def hook(promote, args, dtype, inexact):
        w = args[target.weight_index]
        if target.quantize_weight and not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise ValueError(f"module {target.name}: its weight is {jnp.result_type(w)} (converted to int8); run "
                             "converted variables with quantization.int8().wrap, not fake_quant")
        ops = list(promote(*args, dtype=dtype, inexact=inexact))
        return fake_quant_operands(target, module, ops, scales, ema_decay, state, used)

    return hook


def fake_quant_call(target: Target, module: nn.Module, next_fun, args, kwargs, scales: str = "fixed",
                    ema_decay: float = 0.99, state: _CallState | None = None):
    """Runs one intercepted module call fake-quantized; an :func:`integer_dense` layer multiplies on the
    integer grid (:func:`grid_dot`) with the scales its operands were quantized with."""
    used: dict = {}
    hook = fake_quant_hook(target, module, scales, ema_decay, state, used)
    if not (integer_dense(target) and module.dot_general_cls is None):
        return hooked_call(module, next_fun, args, kwargs, hook)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type
        if "input" not in used or "weight" not in used:  # e.g. an integer input: nothing was quantized
            return jax.lax.dot_general(lhs, rhs, dimension_numbers)
        return grid_dot(lhs, rhs, used["input"], used["weight"], dimension_numbers)

    return hooked_call(module, next_fun, args, kwargs, hook, dot_general=dot_general)


def fake_quant(rules: Sequence[QuantRule] = DEFAULT_RULES, *, scales: str = "fixed",
               ema_decay: float = 0.99) -> Transform:
    """The fake-quantization :class:`~compression.transform.Transform` (see the module docstring).

    ``init(key, variables, apply_fn, *args, **kwargs)`` calibrates the activation scales on that one sample
    batch with the rules' calibrators (use :func:`~compression.quantization.calibration.calibrate` for real
    calibration sets) and raises if the variables already have a ``"quant"`` collection (quantized twice).
    """
    rules = check_rules(rules)
    if scales not in SCALE_MODES:
        raise ValueError(f"unknown scales mode {scales!r}; known: {', '.join(SCALE_MODES)}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")

    def init(key, variables, apply_fn, *args, **kwargs):
        del key
        check_not_quantized(variables, "fake_quant.init")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("mutable", "rngs")}
        stats = collect_statistics(apply_fn, variables, [Call(args, kwargs)], rules)
        return {**variables, QUANT: compute_scales(stats)}

    def wrap(apply_fn: Callable) -> Callable:
        def wrapped(variables, *args, **kwargs):
            state = _CallState()

            def on_target(target, module, next_fun, a, kw):
                return fake_quant_call(target, module, next_fun, a, kw, scales, ema_decay, state)

            with nn.intercept_methods(quant_interceptor(rules, on_target)):
                return apply_fn(variables, *args, **kwargs)

        return wrapped

    return Transform(f"fake_quant({scales})", init, wrap)


def project_scales(quant: Mapping) -> dict:
    """A "quant" tree with every scale floored at ``MIN_SCALE`` (after an optimizer step on learned scales)."""
    flat = traverse_util.flatten_dict(dict(quant))
    return traverse_util.unflatten_dict({k: jnp.maximum(v, MIN_SCALE) if "scale" in str(k[-1]) else v
                                         for k, v in flat.items()})


def qat_loss(make_loss: Callable[[Callable], Callable], apply_fn: Callable,
             rules: Sequence[QuantRule] = DEFAULT_RULES, *, scales: str = "fixed", ema_decay: float = 0.99,
             axis_name: str | None = "batch") -> Callable:
    """A quantization-aware loss for ``experiments.runtime.trainer`` (see the module docstring).

    Args:
      make_loss: ``make_loss(apply_fn) -> loss_fn(params, batch, rng, extras) -> (loss, aux)``, the trainer's
        loss convention (``aux`` a flax struct with an ``extras`` field, like ``trainer.LossAux``); it is given
        the fake-quantized apply.
      apply_fn: the model's apply (e.g. ``model.apply``, or a precision policy's wrapped apply).
      rules: the quantization rules the scales were calibrated with.
      scales: ``"fixed"`` or ``"ema"``.
      ema_decay: EMA decay for ``scales="ema"``.
      axis_name: the data-parallel axis the EMA scales are averaged over (``None``: no averaging, for use
        outside pmap/shard_map).

    Returns:
      ``loss_fn(params, batch, rng, extras)``; ``extras`` must hold the calibrated ``"quant"`` collection. With
      ``"ema"``, the returned ``aux.extras`` carries the updated scales (if ``make_loss`` applies the model
      several times, the scales of its last call are kept).
    """
    if scales == "learned":
        raise ValueError("qat_loss: scales='learned' needs gradients w.r.t. the scales, which "
                         "experiments.runtime.trainer "
                         "does not take (it differentiates params only); use 'fixed' or 'ema', or a custom step "
                         "that differentiates variables['quant'] (see fake_quant)")
    quant_apply = fake_quant(rules, scales=scales, ema_decay=ema_decay).wrap(apply_fn)

    def check(extras):
        if not isinstance(extras, Mapping) or QUANT not in extras:
            raise ValueError(f"qat_loss: extras must hold the calibrated {QUANT!r} collection (e.g. "
                             "TrainState.create(params, tx, key, extras={'quant': variables['quant']})); got "
                             f"{sorted(extras) if isinstance(extras, Mapping) else type(extras).__name__}")

    if scales == "fixed":
        base = make_loss(quant_apply)

        def fixed_loss(params, batch, rng, extras):
            check(extras)
            return base(params, batch, rng, extras)

        return fixed_loss

    def ema_loss(params, batch, rng, extras):
        check(extras)
        updated = {}

        def ema_apply(variables, *args, **kwargs):
            if kwargs.get("mutable"):
                raise ValueError("qat_loss(scales='ema'): the loss must not pass mutable= to apply itself")
            out, state = quant_apply(variables, *args, **{**kwargs, "mutable": [QUANT]})
            updated[QUANT] = state[QUANT]
            return out

        loss, aux = make_loss(ema_apply)(params, batch, rng, extras)
        if QUANT not in updated:
            raise ValueError("qat_loss(scales='ema'): the loss never applied the model")
        new = jax.lax.stop_gradient(updated[QUANT])
        if axis_name is not None:  # every device keeps the same scales; zero points stay integers
            new = jax.tree.map_with_path(
                lambda p, v: jnp.round(v) if "zero_point" in str(p[-1].key) else v, jax.lax.pmean(new, axis_name))
        base_extras = extras if aux.extras is None else aux.extras
        return loss, aux.replace(extras={**base_extras, QUANT: new})

    return ema_loss
