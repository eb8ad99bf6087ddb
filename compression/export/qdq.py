"""Explicit int8 and FP8 quantization in the exported graph: QuantizeLinear/DequantizeLinear (Q/DQ) pairs
around the inputs of a Dense ``MatMul`` or a ``Conv``, with scales supplied by our calibration or QAT state.

The form is the one TensorRT runs in int8 without its own calibration: symmetric, zero point 0, int8
(never uint8), per-channel weight scales along the output axis, a per-tensor activation scale.
Constant weights are stored already quantized (int8 initializer + DequantizeLinear), as TensorRT and
onnxruntime expect. The quantization library supplies a ``{module path: MatMulQuant}`` plan; the
converter applies it to the Dense ``dot_general`` or the ``conv_general_dilated`` whose Flax module path
matches.

Activations saturate to [-128, 127] (QuantizeLinear's int8 range), while our fake quantization clips
symmetric activations to [-127, 127]: the two differ only for an input below -127.5 scales, i.e. beyond
the calibrated range on the negative side, by one step.

FP8 (``MatMulQuant(format="fp8")``): the same structure in ``float8e4m3fn`` (zero points are float8 zeros,
weights float8 initializers), TensorRT's FP8 recipe. QuantizeLinear saturates to +-448 and rounds to the
nearest E4M3 value, ties to even (``saturate=1``, the default), exactly as our FP8 fake quantization; float8
Q/DQ needs opset 19 (:data:`FP8_OPSET`). A module's format is its own, so one graph can hold both.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from compression.export.graph import Value
from compression.export.program import ExportError

WEIGHT_QMAX = 127  # symmetric narrow range [-127, 127] for weights
ACT_QMIN, ACT_QMAX = -128, 127  # QuantizeLinear int8 saturation for activations
FORMATS = ("int8", "fp8")
FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = 448.0
FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear take float8 from opset 19


@dataclasses.dataclass(frozen=True)
class MatMulQuant:
    """Int8 or FP8 scales for one Dense layer ``y = x @ W`` (W: [K, N]) or convolution (N output features).

    Attributes:
      weight_scale: float32 [N] per output channel, or a scalar (per tensor): W ~= q * scale, q in
        [-127, 127] (int8) or E4M3 in [-448, 448] (fp8).
      activation_scale: positive float, per tensor: x ~= q * scale, q in [-128, 127] or E4M3.
      format: ``"int8"`` or ``"fp8"`` (float8e4m3fn).
    """

    weight_scale: np.ndarray
    activation_scale: float
    format: str = "int8"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        ws = np.asarray(self.weight_scale, np.float32)
        if ws.ndim > 1 or not np.all(np.isfinite(ws)) or np.any(ws <= 0):
            raise ValueError(f"weight_scale must be positive and finite, scalar or [N]; got shape {ws.shape}")
        a = float(self.activation_scale)
        if not np.isfinite(a) or a <= 0:
            raise ValueError(f"activation_scale must be positive and finite, got {self.activation_scale}")
        object.__setattr__(self, "weight_scale", ws)
        object.__setattr__(self, "activation_scale", a)


def fake_quantize_weight(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The int8 codes of ``w`` with ``scale`` broadcast against it (round half to even, clip to +-127)."""
    return np.clip(np.round(w / scale), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)


def fp8_weight(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float8e4m3fn codes of ``w`` (float32) with ``scale`` broadcast against it: ``w / scale`` in float32,
    saturated to +-448, rounded to the nearest E4M3 (ties to even), as QuantizeLinear and our fake
    quantization compute them."""
    t = np.asarray(w, np.float32) / np.asarray(scale, np.float32)
    return np.clip(t, -FP8_MAX, FP8_MAX).astype(FP8)


def quantize_matmul_inputs(ctx, x: Value, w: Value, spec: MatMulQuant) -> tuple[str, str]:
    """Emits Q/DQ for the activation ``x`` [..., K] and weight ``w`` [K, N]; returns the dequantized names."""
    return quantize_inputs(ctx, x, w, spec, weight_axis=1)


def quantize_inputs(ctx, x: Value, w: Value, spec: MatMulQuant, weight_axis: int) -> tuple[str, str]:
    """Emits Q/DQ for an activation ``x`` (per tensor) and a weight ``w`` whose output channels are along
    ``weight_axis`` (1 for a MatMul's [K, N], 0 for a Conv's [F, C, ...]); returns the dequantized names.
    A constant weight is stored as an int8 initializer followed by DequantizeLinear."""
    g = ctx.graph
    n = w.shape[weight_axis]
    ws = spec.weight_scale
    if ws.ndim == 1 and ws.shape[0] != n:
        raise ExportError(f"module {ctx.module_path()!r}: weight_scale has {ws.shape[0]} channels for a "
                          f"kernel with {n} outputs")
    if np.dtype(x.dtype) != np.float32 or np.dtype(w.dtype) != np.float32:
        raise ExportError(f"module {ctx.module_path()!r}: Q/DQ export needs float32 inputs, "
                          f"got {x.dtype} x {w.dtype}")
    # Scales and zero points are initializers of their module (not shared with equal ones elsewhere):
    # onnxruntime's common-subexpression elimination would otherwise merge the Q/DQ pairs of modules
    # reading one tensor with one scale (query/key/value), and a DequantizeLinear with several consumers
    # keeps onnxruntime from fusing them into integer matmuls (they then run dequantized, in float).
    if spec.format == "fp8" and ctx.opset < FP8_OPSET:
        raise ExportError(f"module {ctx.module_path()!r}: FP8 Q/DQ needs opset {FP8_OPSET}, the graph is opset "
                          f"{ctx.opset}")
    code = np.int8 if spec.format == "int8" else FP8
    module = ctx.module_path() or "qdq"
    a_scale = g.const(np.float32(spec.activation_scale), hint=f"{module}/input_scale")
    a_zero = g.const(np.zeros((), code), hint=f"{module}/input_zero_point")
    xq = g.op("QuantizeLinear", [x, a_scale, a_zero])
    xd = g.op("DequantizeLinear", [xq, a_scale, a_zero])
    per_channel = ws.ndim == 1
    w_scale = g.const(ws.astype(np.float32), hint=f"{module}/kernel_scale")
    w_zero = g.const(np.zeros(ws.shape, code), hint=f"{module}/kernel_zero_point")
    axis = weight_axis if per_channel else None
    if w.const is not None:
        shape = [1] * w.rank
        shape[weight_axis] = -1
        to_codes = fake_quantize_weight if spec.format == "int8" else fp8_weight
        q = to_codes(np.asarray(w.const, np.float32), ws.reshape(shape) if per_channel else ws)
        wq = g.const(q, hint=f"{w.hint}_{spec.format}" if w.hint else None)
    else:
        wq = g.op("QuantizeLinear", [w, w_scale, w_zero], axis=axis)
    wd = g.op("DequantizeLinear", [wq, w_scale, w_zero], axis=axis)
    return xd, wd
