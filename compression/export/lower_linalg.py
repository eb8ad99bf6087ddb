"""Lowering rules for contractions and reductions: dot_general (MatMul), conv_general_dilated (Conv),
reduce_* and argmax/argmin.

A Dense layer's ``dot_general`` (contract the last lhs axis with axis 0 of a 2-D kernel) becomes one
``MatMul`` on the [..., K] input, never Gemm or Einsum: onnxruntime's fusers and TensorRT's int8 rules
look for MatMul. When the quantization plan names the op's module, both MatMul (or Conv) inputs get
explicit int8 Q/DQ (:mod:`compression.export.qdq`). Other contractions are transposed to [batch..., M, K] x
[batch..., K, N], merged with reshapes where several axes are free or contracted, and multiplied.
"""

from __future__ import annotations

import math

import numpy as np

from compression.export import qdq
from compression.export.converter import register
from compression.export.graph import Value, onnx_dtype
from compression.export.lower_shape import reshape
from compression.export.program import ExportError, dims_equal


def _transpose(ctx, x: Value, perm) -> Value:
    perm = list(perm)
    if perm == list(range(len(perm))):
        return x
    return Value(ctx.graph.op("Transpose", [x], perm=perm), tuple(x.shape[p] for p in perm), x.dtype)


def _reshape(ctx, x: Value, shape) -> Value:
    shape = tuple(shape)
    if len(shape) == x.rank and all(dims_equal(a, b) for a, b in zip(shape, x.shape)):
        return x
    return Value(reshape(ctx, x, shape), shape, x.dtype)


def _cast(ctx, x: Value, dtype) -> Value:
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    return Value(ctx.graph.op("Cast", [x], to=onnx_dtype(dtype)), x.shape, dtype)


@register("dot_general")
def _dot_general(ctx, op, lhs, rhs):
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    lc, rc, lb, rb = map(list, (lc, rc, lb, rb))
    pref = op.params.get("preferred_element_type")
    out_shape = tuple(op.outputs[0].aval.shape)
    integer = np.issubdtype(lhs.dtype, np.integer)
    if integer:
        if lhs.dtype not in (np.int8, np.uint8) or rhs.dtype not in (np.int8, np.uint8):
            raise ExportError(f"integer dot_general on {lhs.dtype} x {rhs.dtype} (only int8/uint8 -> int32)")
    elif pref is not None and np.dtype(pref) != lhs.dtype:
        lhs, rhs = _cast(ctx, lhs, pref), _cast(ctx, rhs, pref)
    matmul = "MatMulInteger" if integer else "MatMul"

    lfree = [i for i in range(lhs.rank) if i not in lc and i not in lb]
    rfree = [i for i in range(rhs.rank) if i not in rc and i not in rb]
    # Dense: [..., K] x [K, N] (or a tied embedding [N, K] read transposed).
    if not lb and rhs.rank == 2 and lc == [lhs.rank - 1] and len(rfree) == 1:
        kernel = rhs if rc == [0] else _transpose(ctx, rhs, [1, 0])
        spec = ctx.quant.get(ctx.module_path()) if ctx.quant else None
        if spec is not None:
            ctx.quant_used.add(ctx.module_path())
            a, w = qdq.quantize_matmul_inputs(ctx, lhs, kernel, spec)
            return ctx.graph.op("MatMul", [a, w])
        return ctx.graph.op(matmul, [lhs, kernel])

    batch = [lhs.shape[i] for i in lb]
    lt = _transpose(ctx, lhs, lb + lfree + lc)
    rt = _transpose(ctx, rhs, rb + rc + rfree)
    m = math.prod([lhs.shape[i] for i in lfree])
    k = math.prod([lhs.shape[i] for i in lc])
    n = math.prod([rhs.shape[i] for i in rfree])
    lt = _reshape(ctx, lt, batch + [m, k])
    rt = _reshape(ctx, rt, batch + [k, n])
    y = Value(ctx.graph.op(matmul, [lt, rt]), tuple(batch + [m, n]), np.dtype(op.outputs[0].aval.dtype))
    return _reshape(ctx, y, out_shape)


def _axes_input(ctx, axes) -> str:
    return ctx.const(np.asarray(list(axes), np.int64))


def _reduce(onnx_op):
    def rule(ctx, op, x):
        axes = [int(a) for a in op.params["axes"]]
        if not axes:
            return x
        g = ctx.graph
        if onnx_op == "ReduceSum" or ctx.opset >= 18:
            return g.op(onnx_op, [x, _axes_input(ctx, axes)], keepdims=0)
        return g.op(onnx_op, [x], axes=axes, keepdims=0)

    return rule


for _prim, _onnx in {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
                     "reduce_prod": "ReduceProd"}.items():
    register(_prim)(_reduce(_onnx))


@register("reduce_and", "reduce_or")
def _reduce_bool(ctx, op, x):
    g = ctx.graph
    as_int = Value(g.op("Cast", [x], to=onnx_dtype(np.int32)), x.shape, np.dtype(np.int32))
    red = _reduce("ReduceMin" if op.name == "reduce_and" else "ReduceMax")(ctx, op, as_int)
    return g.op("Cast", [red], to=onnx_dtype(np.bool_))


@register("argmax", "argmin")
def _argmax(ctx, op, x):
    axes = list(op.params["axes"])
    if len(axes) != 1:
        raise ExportError(f"{op.name} over {len(axes)} axes")
    g = ctx.graph
    y = g.op("ArgMax" if op.name == "argmax" else "ArgMin", [x], axis=int(axes[0]), keepdims=0, select_last_index=0)
    dtype = np.dtype(op.params["index_dtype"])
    return g.op("Cast", [y], to=onnx_dtype(dtype)) if dtype != np.int64 else y


@register("conv_general_dilated")
def _conv(ctx, op, lhs, rhs):
    """Conv with any layout: transpose to NC... / OI..., ONNX Conv, transpose back."""
    p = op.params
    dn = p["dimension_numbers"]
    if p.get("batch_group_count", 1) != 1:
        raise ExportError("conv with batch_group_count > 1")
    if p.get("preferred_element_type") not in (None, lhs.dtype):
        lhs, rhs = _cast(ctx, lhs, p["preferred_element_type"]), _cast(ctx, rhs, p["preferred_element_type"])
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    x = _transpose(ctx, lhs, lhs_spec)  # lhs_spec = (batch, feature, spatial...)
    if rhs.const is not None and list(rhs_spec) != list(range(rhs.rank)):
        # a kernel parameter: stored in ONNX's (out, in, spatial...) layout under its own name
        w = Value(None, tuple(rhs.shape[p] for p in rhs_spec), rhs.dtype,
                  const=np.ascontiguousarray(np.transpose(rhs.const, rhs_spec)),
                  hint=f"{rhs.hint}_out_in_spatial" if rhs.hint else None)
    else:
        w = _transpose(ctx, rhs, rhs_spec)  # rhs_spec = (out feature, in feature, spatial...)
    spec = ctx.quant.get(ctx.module_path()) if ctx.quant else None
    if spec is not None:
        ctx.quant_used.add(ctx.module_path())
        x, w = qdq.quantize_inputs(ctx, x, w, spec, weight_axis=0)
    nsp = len(lhs_spec) - 2
    if any(int(d) != 1 for d in (p.get("lhs_dilation") or (1,) * nsp)):
        raise ExportError("conv with lhs (transposed-convolution) dilation")
    pads = [int(a) for a, _ in p["padding"]] + [int(b) for _, b in p["padding"]]
    if any(v < 0 for v in pads):
        raise ExportError(f"conv with negative padding {p['padding']}")
    y = ctx.graph.op("Conv", [x, w], strides=[int(s) for s in p["window_strides"]], pads=pads,
                     dilations=[int(d) for d in (p.get("rhs_dilation") or (1,) * nsp)],
                     group=int(p.get("feature_group_count", 1)))
    # y is in (batch, feature, spatial...) order; out_spec[j] is the output axis holding that logical dim.
    inv = [0] * len(out_spec)
    for logical, axis in enumerate(out_spec):
        inv[axis] = logical
    if inv != list(range(len(inv))):
        y = ctx.graph.op("Transpose", [y], perm=inv)
    return y
