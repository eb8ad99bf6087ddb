"""Real int8 execution: int8 weights, int8 x int8 -> int32 matmuls, one dequantization per layer.

::

    variables = calibrate(model.apply, variables, batches, rules)          # activation scales
    t = int8(rules)
    variables8 = t.init(key, variables, model.apply, batch)              # int8 kernels + kernel scales
    apply8 = t.wrap(model.apply)

:func:`convert_to_int8` replaces the kernel of every ``nn.Dense`` whose rule quantizes both its weight and its
(symmetric) input by its int8 values (symmetric, per output channel unless the rule says per-tensor: the same
grid the fake-quantized model uses) and stores the float32 scales at ``quant/<path>/kernel_scale``. The
wrapped apply then runs those Dense layers as::

    x_q = clip(round(x / s_x), -127, 127)                      int8, per-tensor calibrated s_x
    acc = lax.dot_general(x_q, w_q, preferred_element_type=int32)
    y   = acc * (s_x * s_w[channel]) + bias                     float, one dequantization

which computes the same numbers as the fake-quantized model, bit for bit: its Dense layers multiply the same integer
grid values in float32 (:func:`~compression.quantization.qat.grid_dot`; exact below 2^24) and rescale the same way.
Other selected modules (Conv, Einsum, DenseGeneral, Embed, weight-only or asymmetric rules) keep float
kernels and run fake-quantized.

:func:`int8_weights` reads the converted kernels back as :class:`~compression.quantization.qarray.QArray`
(what the export path emits as int8 initializers); :func:`dense_quant_scales` gives the export path the
weight and activation scales of every int8 Dense, from float or converted variables, and :func:`qdq_scales` those
of every quantized Dense and Conv in its format (int8 or FP8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from compression.quantization.qarray import (
    MIN_SCALE,
    QArray,
    normalize_axes,
    quantize_values,
    reduce_amax,
    symmetric_scale,
)
from compression.quantization.qat import fake_quant_call, integer_dense, weight_scale
from compression.quantization.rules import (
    DEFAULT_RULES,
    QUANT,
    QuantRule,
    Target,
    check_rules,
    check_scales,
    find_input_qparams,
    hooked_call,
    quant_interceptor,
    read_input_qparams,
    trace_targets,
)
from compression.transform import Transform, intercepting

KERNEL_SCALE = "kernel_scale"


def runs_in_int8(target: Target) -> bool:
    """Whether a target's module executes as an int8 matmul after conversion (see
    :func:`~compression.quantization.qat.integer_dense`)."""
    return integer_dense(target)


def convert_to_int8(apply_fn: Callable, variables: Mapping, *args, rules: Sequence[QuantRule] = DEFAULT_RULES,
                    **kwargs) -> dict:
    """Int8 kernels and kernel scales for every Dense that :func:`runs_in_int8`; returns new variables.

    Traces ``apply_fn(variables, *args, **kwargs)`` (abstractly, nothing runs) to find the modules. Raises if
    the variables are not calibrated (no ``"quant"`` collection) or were already converted.
    """
    rules = check_rules(rules)
    if QUANT not in variables:
        raise ValueError(f"convert_to_int8: the variables have no {QUANT!r} collection; calibrate first "
                         "(quantization.calibrate) so that activations have scales")
    check_scales(variables[QUANT], "convert_to_int8")
    targets = trace_targets(apply_fn, variables, *args, rules=rules, what="convert_to_int8", **kwargs)
    params = traverse_util.flatten_dict(dict(variables["params"]))
    quant = traverse_util.flatten_dict(dict(variables[QUANT]))
    converted = 0
    for t in targets:
        if not runs_in_int8(t):
            continue
        key = t.path + ("kernel",)
        kernel = params[key]
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise ValueError(f"convert_to_int8: the kernel of {t.name} is already {kernel.dtype}: the model was "
                             "converted to int8 before")
        axis = -1 if t.weight_axes is not None else None
        q = QArray.quantize(kernel.astype(jnp.float32), bits=t.rule.bits, axis=axis)
        params[key] = q.values
        quant[t.path + (KERNEL_SCALE,)] = q.scale
        converted += 1
    if not converted:
        raise ValueError("convert_to_int8: no nn.Dense whose weights and (symmetric) inputs are both quantized")
    return {**variables, "params": traverse_util.unflatten_dict(params), QUANT: traverse_util.unflatten_dict(quant)}


def dense_quant_scales(apply_fn: Callable, variables: Mapping, *args, rules: Sequence[QuantRule] = DEFAULT_RULES,
                       **kwargs) -> dict[str, tuple[np.ndarray, float]]:
    """Per-Dense int8 scales for Q/DQ export: ``{module path: (weight_scale [N] or [], activation_scale)}``.

    For every Dense that :func:`runs_in_int8`, from calibrated (float or converted) variables: the weight scale
    per output channel (per tensor if the rule says so) exactly as the fake-quantized and int8 models use it,
    and the per-tensor activation scale. Only 8-bit rules export (ONNX int8).
    """
    rules = check_rules(rules)
    if QUANT not in variables:
        raise ValueError(f"dense_quant_scales: the variables have no {QUANT!r} collection; calibrate first")
    check_scales(variables[QUANT], "dense_quant_scales")
    targets = trace_targets(apply_fn, variables, *args, rules=rules, what="dense_quant_scales", **kwargs)
    params = traverse_util.flatten_dict(dict(variables["params"]))
    quant = traverse_util.flatten_dict(dict(variables[QUANT]))
    out = {}
    for t in targets:
        if not runs_in_int8(t):
            continue
        if t.rule.bits != 8:
            raise ValueError(f"dense_quant_scales: {t.name} is quantized to {t.rule.bits} bits; ONNX int8 Q/DQ "
                             "export needs 8-bit rules")
        kernel = params[t.path + ("kernel",)]
        if t.path + (KERNEL_SCALE,) in quant:
            w_scale = quant[t.path + (KERNEL_SCALE,)]
        else:
            axes = normalize_axes(-1, kernel.ndim) if t.weight_axes is not None else None
            w_scale = symmetric_scale(reduce_amax(kernel.astype(jnp.float32), axes), t.rule.bits)
        a_scale, _ = find_input_qparams(variables[QUANT], t.path)
        out[t.name] = (np.asarray(w_scale, np.float32), float(a_scale))
    return out


def qdq_scales(apply_fn: Callable, variables: Mapping, *args, rules: Sequence[QuantRule] = DEFAULT_RULES,
               **kwargs) -> dict[str, tuple[np.ndarray, float, str]]:
    """Q/DQ export scales of every Dense and Conv whose weight and symmetric input are quantized, in each one's
    format: ``{module path: (weight_scale [N] or [], activation_scale, "int8" | "fp8")}``.

    What :func:`dense_quant_scales` gives for int8 Dense layers, extended to Conv layers and FP8 rules (a
    precision plan may mix both), so that the exported graph quantizes every module the fake-quantized model
    quantizes: the weight scale per output channel (per tensor if the rule says so) as the fake-quantized model
    computes it (or as converted int8 variables store it) and the per-tensor activation scale. Integer rules
    must be 8-bit; asymmetric, weight-only and input-only rules have no Q/DQ form here and are left out.
    """
    rules = check_rules(rules)
    if QUANT not in variables:
        raise ValueError(f"qdq_scales: the variables have no {QUANT!r} collection; calibrate first")
    check_scales(variables[QUANT], "qdq_scales")
    targets = trace_targets(apply_fn, variables, *args, rules=rules, what="qdq_scales", **kwargs)
    params = traverse_util.flatten_dict(dict(variables["params"]))
    quant = traverse_util.flatten_dict(dict(variables[QUANT]))
    out = {}
    for t in targets:
        if not (t.kind in ("Dense", "Conv") and t.method == "__call__" and t.quantize_weight and t.quantize_input
                and t.rule.symmetric):
            continue
        if t.rule.format == "int" and t.rule.bits != 8:
            raise ValueError(f"qdq_scales: {t.name} is quantized to {t.rule.bits} bits; ONNX int8 Q/DQ export needs "
                             "8-bit rules")
        kernel = params[t.path + ("kernel",)]
        if t.path + (KERNEL_SCALE,) in quant:
            w_scale = quant[t.path + (KERNEL_SCALE,)]
        else:
            w_scale = weight_scale(jnp.asarray(kernel), t)
        a_scale, _ = find_input_qparams(variables[QUANT], t.path)
        out[t.name] = (np.asarray(w_scale, np.float32), float(a_scale), "int8" if t.rule.format == "int" else "fp8")
    return out


def int8_weights(variables: Mapping) -> dict[str, QArray]:
    """The converted kernels as ``{slash-joined module path: QArray}`` (int8 values, per-channel scales)."""
    params = traverse_util.flatten_dict(dict(variables["params"]))
    quant = traverse_util.flatten_dict(dict(variables.get(QUANT, {})))
    out = {}
    for key, scale in quant.items():
        if key[-1] != KERNEL_SCALE:
            continue
        values = params[key[:-1] + ("kernel",)]
        axis = None if jnp.ndim(scale) == 0 else normalize_axes(-1, values.ndim)
        out["/".join(key[:-1])] = QArray(values=values, scale=scale, zero_point=None, bits=8, axis=axis)
    return out


def _int8_dense(target: Target, module: nn.Dense, next_fun, args, kwargs):
    if module.dot_general_cls is not None:
        raise ValueError(f"{target.name}: int8 execution cannot replace a custom dot_general_cls")
    s_x, _ = read_input_qparams(module, target)
    s_x = jnp.maximum(jnp.asarray(s_x, jnp.float32), MIN_SCALE)  # the scale the quantizer itself uses
    s_w = module.get_variable(QUANT, KERNEL_SCALE)
    bits = target.rule.bits
    out = {}

    def operands(promote, ops, dtype, inexact):
        x, kernel, bias = ops
        x, bias = promote(x, bias, dtype=dtype, inexact=inexact)
        out["dtype"] = x.dtype
        x_q = quantize_values(x, s_x, bits=bits, symmetric=True).astype(jnp.int8)
        return [x_q, kernel, bias]

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type
        acc = jax.lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * (s_x * s_w)).astype(out["dtype"])

    return hooked_call(module, next_fun, args, kwargs, operands, dot_general=dot_general)


def int8(rules: Sequence[QuantRule] = DEFAULT_RULES) -> Transform:
    """The int8 execution :class:`~compression.transform.Transform`.

    ``init(key, variables, apply_fn, *args, **kwargs)`` is :func:`convert_to_int8` (needs calibrated
    variables); ``wrap`` runs converted Dense layers in int8 and every other selected module fake-quantized
    with fixed scales.
    """
    rules = check_rules(rules)

    def init(key, variables, apply_fn, *args, **kwargs):
        del key
        kwargs = {k: v for k, v in kwargs.items() if k not in ("mutable", "rngs")}
        return convert_to_int8(apply_fn, variables, *args, rules=rules, **kwargs)

    def on_target(target, module, next_fun, args, kwargs):
        if runs_in_int8(target) and module.has_variable(QUANT, KERNEL_SCALE):
            return _int8_dense(target, module, next_fun, args, kwargs)
        return fake_quant_call(target, module, next_fun, args, kwargs, "fixed")

    return Transform("int8", init, intercepting("int8", quant_interceptor(rules, on_target)).wrap)
