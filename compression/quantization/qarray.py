"""Integer grids, scales and the :class:`QArray` representation of a quantized tensor.

Conventions (shared by fake quantization, calibration, the int8 path and the ONNX export):

* **Symmetric** (the default; TensorRT's choice): zero point 0 and the *narrow* signed grid
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, i.e. ``[-127, 127]`` for 8 bits. The value ``-128`` is never produced, so
  negation is exact and ``scale = amax / 127`` maps ``+-amax`` onto the grid ends (TensorRT and
  pytorch-quantization do the same). Stored as ``int8``. ONNX ``QuantizeLinear`` saturates to ``[-128, 127]``:
  an exported graph maps inputs below ``-127.5 * scale`` to -128 where this grid clips to -127, so the two
  differ by one step on clipped negative outliers only.
* **Asymmetric**: the unsigned grid ``[0, 2^b - 1]`` (``uint8`` for 8 bits, as ONNX Runtime wants for
  activations) with ``scale = (max - min) / (2^b - 1)`` and an integer zero point in the grid; the range is
  widened to contain 0 so that zero (padding) is exact. Stored as ``uint8``.
* Quantize: ``q = clip(round(x / scale) + zero_point, qmin, qmax)`` with round-half-to-even (as ONNX
  ``QuantizeLinear``); dequantize: ``(q - zero_point) * scale``.
* **Per-channel**: ``axis`` (an int or a tuple of ints) names the axes that get their own scale; the scale then
  has the shape of those axes (e.g. ``[out]`` for a Dense kernel ``[in, out]`` with ``axis=-1``). Per-tensor:
  ``axis=None`` and a scalar scale.
* Scales are never zero or infinite: they are floored at :data:`MIN_SCALE` (an all-zero channel then
  quantizes to zeros exactly).
* **FP8** (``format="fp8"``): the E4M3FN grid of ``ml_dtypes.float8_e4m3fn`` (ONNX ``float8e4m3fn``): 4 exponent
  and 3 mantissa bits, bias 7, no infinities, largest finite value :data:`FP8_MAX` = 448, subnormals down to
  ``2^-9``. Always symmetric (zero point 0); ``scale = amax / 448``; quantize:
  ``q = fp8(clip(x / scale, -448, 448))``, rounding to the nearest E4M3 value with ties to even, as TensorRT and
  ONNX ``QuantizeLinear`` (saturating) do; dequantize: ``q * scale``. The clip comes first because the cast
  itself does not saturate (values beyond 464 become NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS, MAX_BITS = 2, 8
MIN_SCALE = 1e-8  # floor of every scale: never a zero (division) or subnormal scale
FORMATS = ("int", "fp8")  # integer grids of 2..8 bits; FP8 E4M3FN (8 bits)
FP8_MAX = 448.0  # largest finite float8_e4m3fn

Axis = int | Sequence[int] | None


def check_bits(bits: int) -> int:
    """Returns ``bits`` if it is an int in [2, 8]; raises ``ValueError`` otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"num_bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return int(bits)


def check_format(format: str, bits: int = 8, symmetric: bool = True) -> str:
    """Returns ``format`` if it is one of :data:`FORMATS` and fits ``bits``/``symmetric`` (FP8 is 8 bits and
    symmetric); raises ``ValueError`` otherwise."""
    if format not in FORMATS:
        raise ValueError(f"unknown quantization format {format!r}; known: {', '.join(FORMATS)}")
    if format == "fp8" and (bits != 8 or not symmetric):
        raise ValueError(f"the fp8 format (E4M3) is 8 bits and symmetric; got bits={bits}, symmetric={symmetric}")
    return format


def grid_max(bits: int, format: str = "int") -> float:
    """The largest magnitude of the symmetric grid: ``2^(b-1) - 1`` (127 for int8), or 448 for FP8."""
    return FP8_MAX if check_format(format, bits) == "fp8" else float(qrange(bits, True)[1])


def fp8_round(t) -> jax.Array:
    """``t`` (float32) saturated to +-448 and rounded to the nearest float8_e4m3fn (ties to even), as float32."""
    t = jnp.clip(jnp.asarray(t, jnp.float32), -FP8_MAX, FP8_MAX)
    return t.astype(jnp.float8_e4m3fn).astype(jnp.float32)


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """The integer grid ``(qmin, qmax)``: narrow signed when symmetric, unsigned otherwise."""
    bits = check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def storage_dtype(symmetric: bool):
    """``int8`` for the symmetric grid, ``uint8`` for the asymmetric one (both fit every ``bits <= 8``)."""
    return jnp.int8 if symmetric else jnp.uint8


def normalize_axes(axis: Axis, ndim: int) -> tuple[int, ...] | None:
    """Canonical non-negative, sorted, unique axes (``None`` stays ``None``: per-tensor)."""
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
            raise ValueError(f"axis {axis!r} is out of range for an array of rank {ndim}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis")
    return tuple(sorted(out))


def broadcast_param(p: jax.Array, ndim: int, axes: tuple[int, ...] | None) -> jax.Array:
    """Reshapes a per-channel parameter (shape = the sizes of ``axes``) to broadcast against a rank-``ndim`` array."""
    p = jnp.asarray(p)
    if axes is None:
        if p.ndim != 0:
            raise ValueError(f"a per-tensor scale/zero point must be a scalar, got shape {p.shape}")
        return p
    if p.ndim != len(axes):
        raise ValueError(f"a per-channel scale/zero point over axes {axes} must have rank {len(axes)}, "
                         f"got shape {p.shape}")
    shape = [1] * ndim
    for a, n in zip(axes, p.shape):
        shape[a] = n
    return p.reshape(shape)


def reduce_range(x: jax.Array, axes: tuple[int, ...] | None) -> tuple[jax.Array, jax.Array]:
    """(min, max) of ``x`` over every axis except ``axes``; shapes = the sizes of ``axes`` (scalars if None)."""
    keep = () if axes is None else axes
    red = tuple(a for a in range(x.ndim) if a not in keep)
    return jnp.min(x, axis=red), jnp.max(x, axis=red)


def reduce_amax(x: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
    """max |x| over every axis except ``axes`` (the per-channel absolute maximum)."""
    keep = () if axes is None else axes
    red = tuple(a for a in range(x.ndim) if a not in keep)
    return jnp.max(jnp.abs(x), axis=red)


def symmetric_scale(amax, bits: int, format: str = "int"):
    """``amax / qmax`` floored at :data:`MIN_SCALE` (float32); ``qmax`` = :func:`grid_max` (448 for FP8)."""
    if format == "int":
        _, qmax = qrange(bits, True)
    else:
        qmax = grid_max(bits, format)
    return jnp.maximum(jnp.asarray(amax, jnp.float32) / qmax, MIN_SCALE)


def asymmetric_params(lo, hi, bits: int):
    """(scale, zero_point) of the unsigned grid for the range [lo, hi] widened to contain 0 (float32 arrays).

    The zero point is an integer-valued float in ``[0, 2^b - 1]``.
    """
    qmin, qmax = qrange(bits, False)
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    scale = jnp.maximum((hi - lo) / (qmax - qmin), MIN_SCALE)
    zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def quantize_values(x, scale, zero_point=None, *, bits: int = 8, symmetric: bool = True, axis: Axis = None):
    """Integer grid values of ``x`` (float32 array holding integers, not yet cast); see the module docstring."""
    x = jnp.asarray(x, jnp.float32)
    axes = normalize_axes(axis, x.ndim)
    qmin, qmax = qrange(bits, symmetric)
    s = broadcast_param(jnp.maximum(jnp.asarray(scale, jnp.float32), MIN_SCALE), x.ndim, axes)
    q = jnp.round(x / s)
    if zero_point is not None:
        q = q + broadcast_param(jnp.asarray(zero_point, jnp.float32), x.ndim, axes)
    return jnp.clip(q, qmin, qmax)


@flax.struct.dataclass
class QArray:
    """A quantized tensor: ``x ~= (values - zero_point) * scale`` (broadcast over ``axis``).

    Attributes:
      values: the integers, same shape as the original; ``int8`` (symmetric) or ``uint8`` (asymmetric).
      scale: float32; a scalar (per-tensor) or the shape of the ``axis`` sizes (per-channel).
      zero_point: like ``scale``, integer-valued (int32); ``None`` for symmetric quantization.
      bits: number of bits of the grid, 2..8 (static).
      axis: the per-channel axes as a sorted tuple of non-negative ints, or ``None`` (static).

    A pytree (``jit``/``pmap``/checkpoint friendly); ``bits`` and ``axis`` are static metadata, which is what
    the export path reads to emit ``QuantizeLinear``/``DequantizeLinear`` with the right axis.
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None = None
    bits: int = flax.struct.field(pytree_node=False, default=8)
    axis: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @classmethod
    def quantize(cls, x, *, bits: int = 8, axis: Axis = None, symmetric: bool = True, scale=None,
                 zero_point=None) -> QArray:
        """Quantizes ``x``; without ``scale`` it is taken from the (per-channel) range of ``x`` itself.

        Args:
          x: float array.
          bits: 2..8.
          axis: per-channel axes (``None``: per-tensor).
          symmetric: symmetric narrow signed grid (zero point 0) or asymmetric unsigned grid.
          scale, zero_point: given quantization parameters (shape: scalar or the ``axis`` sizes); the zero
            point only when asymmetric.
        """
        bits = check_bits(bits)
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"QArray.quantize takes a float array, got dtype {x.dtype}")
        axes = normalize_axes(axis, x.ndim)
        if symmetric and zero_point is not None:
            raise ValueError("symmetric quantization has zero point 0; do not pass zero_point")
        if scale is None:
            if symmetric:
                scale = symmetric_scale(reduce_amax(x, axes), bits)
            else:
                scale, zero_point = asymmetric_params(*reduce_range(x, axes), bits)
        elif not symmetric and zero_point is None:
            raise ValueError("asymmetric quantization with a given scale needs its zero_point too")
        scale = jnp.maximum(jnp.asarray(scale, jnp.float32), MIN_SCALE)
        broadcast_param(scale, x.ndim, axes)  # validates the shape
        q = quantize_values(x, scale, zero_point, bits=bits, symmetric=symmetric, axis=axes)
        zp = None if symmetric else jnp.asarray(zero_point).astype(jnp.int32)
        return cls(values=q.astype(storage_dtype(symmetric)), scale=scale, zero_point=zp, bits=bits, axis=axes)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """``(values - zero_point) * scale`` in ``dtype``."""
        ndim = self.values.ndim
        q = self.values.astype(jnp.float32)
        if self.zero_point is not None:
            q = q - broadcast_param(self.zero_point.astype(jnp.float32), ndim, self.axis)
        return (q * broadcast_param(self.scale, ndim, self.axis)).astype(dtype)
