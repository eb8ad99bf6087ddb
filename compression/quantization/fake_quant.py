"""Fake quantization (quantize-dequantize) with a straight-through gradient.

``fake_quantize(x, scale, zero_point)`` returns ``(clip(round(x / s) + z, qmin, qmax) - z) * s`` on the grid of
:mod:`compression.quantization.qarray` (symmetric narrow signed or asymmetric unsigned, per-tensor or
per-channel). The rounding has no useful derivative, so the backward pass is the straight-through estimator
(Bengio et al. 2013; Jacob et al. 2018):

* w.r.t. ``x``: identity where ``x`` lies inside the clipping range (``qmin <= x / s + z <= qmax``), zero
  outside it (a clipped value does not move when ``x`` moves);
* w.r.t. ``scale`` (learned step size, Esser et al. 2020, "LSQ"): inside ``round(x/s) - x/s``, outside
  ``qmin - z`` or ``qmax - z``, summed over the elements that share the scale;
* w.r.t. ``zero_point``: ``-s`` outside the range, 0 inside, summed likewise.

The quantization itself runs in float32 whatever the dtype of ``x``; the result has the dtype of ``x``.

**FP8** (``format="fp8"``, E4M3FN, see :mod:`compression.quantization.qarray`): ``fp8(clip(x / s, -448, 448)) * s``,
the nearest E4M3 value with ties to even (TensorRT's and ONNX's FP8 ``QuantizeLinear``). The gradients are the
same straight-through ones with the E4M3 rounding in place of ``round`` and ``[-448, 448]`` as the range:
identity for ``x`` inside ``|x / s| <= 448``, zero outside; for ``scale``, ``fp8(x/s) - x/s`` inside and
``+-448`` outside.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from compression.quantization.qarray import (
    MIN_SCALE,
    Axis,
    FP8_MAX,
    broadcast_param,
    check_bits,
    check_format,
    fp8_round,
    normalize_axes,
    qrange,
)


def _sum_to(g: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
    """Sums a full-shape cotangent down to the parameter shape (scalar, or the sizes of ``axes``)."""
    keep = () if axes is None else axes
    return jnp.sum(g, axis=tuple(a for a in range(g.ndim) if a not in keep))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fq(x, scale, zero_point, qmin, qmax, axes, format):
    return _fq_fwd(x, scale, zero_point, qmin, qmax, axes, format)[0]


def _fq_fwd(x, scale, zero_point, qmin, qmax, axes, format):
    xf = x.astype(jnp.float32)
    s = broadcast_param(jnp.maximum(scale.astype(jnp.float32), MIN_SCALE), x.ndim, axes)
    z = broadcast_param(zero_point.astype(jnp.float32), x.ndim, axes)
    t = xf / s
    r = jnp.round(t) if format == "int" else fp8_round(t)
    q = jnp.clip(r + z, qmin, qmax)
    y = ((q - z) * s).astype(x.dtype)
    return y, (t, r, s, z, scale, zero_point)


def _fq_bwd(qmin, qmax, axes, format, res, g):
    del format  # the same straight-through rule on either grid
    t, r, s, z, scale, zero_point = res
    gf = g.astype(jnp.float32)
    u = t + z  # position on the integer grid before rounding
    below, above = u < qmin, u > qmax
    inside = ~(below | above)
    dx = jnp.where(inside, gf, 0.0).astype(g.dtype)
    ds_elem = jnp.where(inside, r - t, jnp.where(below, qmin - z, qmax - z))
    dz_elem = jnp.where(inside, 0.0, -s)
    ds = _sum_to(gf * ds_elem, axes).astype(scale.dtype)
    dz = _sum_to(gf * dz_elem, axes).astype(zero_point.dtype)
    return dx, ds, dz


_fq.defvjp(_fq_fwd, _fq_bwd)


def fake_quantize(x: jax.Array, scale, zero_point=None, *, bits: int = 8, symmetric: bool = True,
                  axis: Axis = None, format: str = "int") -> jax.Array:
    """Quantize-dequantize ``x`` with the straight-through gradient described in the module docstring.

    Args:
      x: float array of any shape and float dtype.
      scale: float; a scalar (``axis=None``, per-tensor) or the shape of the ``axis`` sizes (per-channel).
        Floored at ``MIN_SCALE``.
      zero_point: asymmetric only (like ``scale``, integer-valued); ``None`` for symmetric.
      bits: 2..8.
      symmetric: narrow signed grid with zero point 0 (TensorRT), or unsigned grid with ``zero_point``.
      axis: per-channel axes of ``x`` (int or tuple), or ``None``.
      format: ``"int"`` (the integer grid of ``bits``) or ``"fp8"`` (E4M3FN; 8 bits, symmetric only).

    Returns:
      An array like ``x`` (same shape and dtype) on the quantization grid.
    """
    bits = check_bits(bits)
    check_format(format, bits, symmetric)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"fake_quantize takes a float array, got dtype {x.dtype}")
    axes = normalize_axes(axis, x.ndim)
    scale = jnp.asarray(scale)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        scale = scale.astype(jnp.float32)
    if symmetric:
        if zero_point is not None:
            raise ValueError("symmetric fake quantization has zero point 0; do not pass zero_point")
        zero_point = jnp.zeros_like(scale)
    elif zero_point is None:
        raise ValueError("asymmetric fake quantization needs a zero_point")
    zero_point = jnp.asarray(zero_point)
    if not jnp.issubdtype(zero_point.dtype, jnp.floating):
        zero_point = zero_point.astype(jnp.float32)
    if zero_point.shape != scale.shape:
        raise ValueError(f"zero_point shape {zero_point.shape} differs from scale shape {scale.shape}")
    broadcast_param(scale, x.ndim, axes)  # validates the scale's shape against axis
    if axes is not None:
        expected = tuple(x.shape[a] for a in axes)
        if scale.shape != expected:
            raise ValueError(f"per-channel scale over axes {axes} of an array {x.shape} must have shape "
                             f"{expected}, got {scale.shape}")
    qmin, qmax = qrange(bits, symmetric) if format == "int" else (-FP8_MAX, FP8_MAX)
    return _fq(x, scale, zero_point, qmin, qmax, axes, format)
