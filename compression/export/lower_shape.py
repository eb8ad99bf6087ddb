"""Lowering rules for layout primitives: reshape, broadcast, squeeze, transpose, concatenate, slicing,
split, padding, reversal, iota and gather.

Shapes may hold symbolic dimensions (``batch``, ``sequence``). Reshape targets copy an input dimension
with 0 where it is unchanged, use -1 for one remaining unknown, and otherwise compute the dimension from
the input shapes, so the graph stays valid at every batch and sequence size.
"""

from __future__ import annotations

import numpy as np

from compression.export.converter import register
from compression.export.graph import Value, onnx_dtype
from compression.export.program import Const, ExportError, dims_equal, is_static

_INT64_MIN = np.iinfo(np.int64).min


def _ints(ctx, values) -> str:
    return ctx.const(np.asarray(values, np.int64))


def reshape(ctx, x: Value, shape) -> str:
    """Reshape ``x`` to ``shape`` (ints and symbolic dims); a constant target where possible."""
    g = ctx.graph
    shape = tuple(shape)
    if all(is_static(d) for d in shape) and all(int(d) > 0 for d in shape):
        return g.op("Reshape", [x, _ints(ctx, [int(d) for d in shape])])
    target: list = []
    for i, d in enumerate(shape):
        if is_static(d):
            target.append(int(d))
        elif i < x.rank and dims_equal(d, x.shape[i]):
            target.append(0)  # copy the input's dimension i
        else:
            target.append(None)
    unknown = [i for i, t in enumerate(target) if t is None]
    static_zero = any(t == 0 and is_static(shape[i]) for i, t in enumerate(target))
    if not static_zero and len(unknown) <= 1:
        if unknown:
            target[unknown[0]] = -1
        return g.op("Reshape", [x, _ints(ctx, target)])
    # several computed dims (or an empty axis): the full target shape, computed from the input shapes
    return g.op("Reshape", [x, g.shape_tensor(shape)], allowzero=1 if static_zero else None)


@register("reshape")
def _reshape(ctx, op, x, *dyn):
    if op.params.get("dimensions") is not None:
        raise ExportError("reshape with a dimensions permutation")
    if dyn:
        raise ExportError("reshape with dynamic shape operands")
    shape = tuple(op.params["new_sizes"])
    out = Value(reshape(ctx, x, shape), shape, x.dtype)
    k = len(shape) - x.rank
    if k > 0 and all(dims_equal(d, 1) for d in shape[:k]) and all(dims_equal(a, b) for a, b in zip(shape[k:], x.shape)):
        out.unit_expanded_from = x
    return out


@register("broadcast_in_dim")
def _broadcast_in_dim(ctx, op, x, *dyn):
    if dyn:
        raise ExportError("broadcast_in_dim with dynamic shape operands")
    g = ctx.graph
    shape = tuple(op.params["shape"])
    bdims = tuple(op.params["broadcast_dimensions"])
    new_axes = [i for i in range(len(shape)) if i not in bdims]
    y = ctx.name(x)
    if new_axes:
        y = g.op("Unsqueeze", [y, _ints(ctx, new_axes)])
    current = [1] * len(shape)
    for j, i in enumerate(bdims):
        current[i] = x.shape[j]
    needs_expand = not all(dims_equal(c, s) for c, s in zip(current, shape))
    if needs_expand:
        y = g.op("Expand", [y, g.shape_tensor(shape)])
    out = Value(y, shape, x.dtype)
    if not needs_expand and new_axes == list(range(len(new_axes))) and new_axes:
        out.unit_expanded_from = x
    return out


@register("squeeze")
def _squeeze(ctx, op, x):
    dims = [d % x.rank for d in op.params["dimensions"]]
    if not dims:
        return x
    return ctx.graph.op("Squeeze", [x, _ints(ctx, dims)])


@register("expand_dims")
def _expand_dims(ctx, op, x):
    return ctx.graph.op("Unsqueeze", [x, _ints(ctx, list(op.params["dimensions"]))])


@register("transpose")
def _transpose(ctx, op, x):
    perm = [int(p) for p in op.params["permutation"]]
    if perm == list(range(len(perm))):
        return x
    return ctx.graph.op("Transpose", [x], perm=perm)


@register("concatenate")
def _concatenate(ctx, op, *xs):
    return ctx.graph.op("Concat", list(xs), axis=int(op.params["dimension"]))


@register("slice")
def _slice(ctx, op, x):
    g = ctx.graph
    starts, limits = op.params["start_indices"], op.params["limit_indices"]
    strides = op.params.get("strides") or (1,) * x.rank
    axes = [i for i in range(x.rank)
            if not (dims_equal(starts[i], 0) and dims_equal(limits[i], x.shape[i]) and int(strides[i]) == 1)]
    if not axes:
        return x
    return g.op("Slice", [x, g.shape_tensor([starts[i] for i in axes]), g.shape_tensor([limits[i] for i in axes]),
                          _ints(ctx, axes), _ints(ctx, [int(strides[i]) for i in axes])])


@register("dynamic_slice")
def _dynamic_slice(ctx, op, x, *starts):
    g = ctx.graph
    sizes = tuple(op.params["slice_sizes"])
    if all(s.const is not None for s in starts) and all(is_static(d) for d in x.shape):
        # Static start indices: clamp as XLA does (the slice stays inside the operand).
        begin = [int(np.clip(int(s.const), 0, int(d) - int(n))) for s, d, n in zip(starts, x.shape, sizes)]
        return g.op("Slice", [x, _ints(ctx, begin), _ints(ctx, [b + int(n) for b, n in zip(begin, sizes)]),
                              _ints(ctx, list(range(x.rank)))])
    pieces = []
    for s, d, n in zip(starts, x.shape, sizes):
        s64 = g.op("Cast", [s], to=onnx_dtype(np.int64)) if s.dtype != np.int64 else ctx.name(s)
        hi = g.op("Sub", [g.scalar_dim(d), g.scalar_dim(n)])
        clamped = g.op("Max", [g.op("Min", [s64, hi]), _ints(ctx, 0)])
        pieces.append(g.op("Unsqueeze", [clamped, _ints(ctx, [0])]))
    begin = g.op("Concat", pieces, axis=0)
    end = g.op("Add", [begin, g.shape_tensor(sizes)])
    return g.op("Slice", [x, begin, end, _ints(ctx, list(range(x.rank)))])


@register("split")
def _split(ctx, op, x):
    g = ctx.graph
    sizes = op.params["sizes"]
    return g.ops("Split", [x, g.shape_tensor(sizes)], len(sizes), axis=int(op.params["axis"]))


@register("pad")
def _pad(ctx, op, x, value):
    g = ctx.graph
    config = op.params["padding_config"]
    if any(int(interior) != 0 for _, _, interior in config):
        raise ExportError("pad with interior padding")
    lo = [max(int(a), 0) for a, _, _ in config]
    hi = [max(int(b), 0) for _, b, _ in config]
    y = ctx.name(x)
    if any(lo) or any(hi):
        y = g.op("Pad", [y, _ints(ctx, lo + hi), value], mode="constant")
    neg = [i for i, (a, b, _) in enumerate(config) if int(a) < 0 or int(b) < 0]
    if neg:
        out_shape = op.outputs[0].aval.shape
        begin = [-min(int(config[i][0]), 0) for i in neg]
        end = g.shape_tensor([b + out_shape[i] for b, i in zip(begin, neg)])
        y = g.op("Slice", [y, _ints(ctx, begin), end, _ints(ctx, neg)])
    return y


@register("rev")
def _rev(ctx, op, x):
    dims = [int(d) for d in op.params["dimensions"]]
    if not dims:
        return x
    n = len(dims)
    return ctx.graph.op("Slice", [x, _ints(ctx, [-1] * n), _ints(ctx, [_INT64_MIN] * n), _ints(ctx, dims),
                                  _ints(ctx, [-1] * n)])


@register("iota")
def _iota(ctx, op, *dyn):
    if dyn:
        raise ExportError("iota with dynamic shape operands")
    g = ctx.graph
    shape, dim = tuple(op.params["shape"]), int(op.params["dimension"])
    dtype = np.dtype(op.params["dtype"])
    rng = g.op("Range", [_ints(ctx, 0), g.scalar_dim(shape[dim]), _ints(ctx, 1)])
    if dtype != np.int64:
        rng = g.op("Cast", [rng], to=onnx_dtype(dtype))
    other = [i for i in range(len(shape)) if i != dim]
    if other:
        rng = g.op("Unsqueeze", [rng, _ints(ctx, other)])
        if not all(dims_equal(shape[i], 1) for i in other):
            rng = g.op("Expand", [rng, g.shape_tensor(shape)])
    return rng


def _unwrapped_indices(ctx, op, axis_size):
    """The original indices when ``op``'s index operand is jnp's negative-index wrap
    ``where(i < 0, i + n, i)`` expanded by a trailing unit axis; ONNX Gather wraps negatives itself."""
    prog = ctx.program
    src = prog.producer_op(op.inputs[1])
    if src is None or src.name not in ("broadcast_in_dim", "reshape"):
        return None
    sel = prog.producer_op(src.inputs[0])
    if sel is None or sel.name != "select_n" or len(sel.inputs) != 3:
        return None
    pred, raw, wrapped = prog.producer_op(sel.inputs[0]), sel.inputs[1], prog.producer_op(sel.inputs[2])
    if pred is None or pred.name != "lt" or pred.inputs[0] is not raw:
        return None
    if not isinstance(pred.inputs[1], Const) or np.any(pred.inputs[1].value != 0):
        return None
    if wrapped is None or wrapped.name != "add" or wrapped.inputs[0] is not raw:
        return None
    n = wrapped.inputs[1]
    if not isinstance(n, Const) or not is_static(axis_size) or np.any(n.value != int(axis_size)):
        return None
    value = ctx.value(raw)
    if tuple(value.shape) != tuple(op.inputs[1].aval.shape[:-1]):
        return None
    return value


@register("gather")
def _gather(ctx, op, operand, indices):
    g = ctx.graph
    dn = op.params["dimension_numbers"]
    sizes = tuple(op.params["slice_sizes"])
    if getattr(dn, "operand_batching_dims", ()) or len(dn.start_index_map) != 1 \
            or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map):
        raise ExportError(f"gather form {dn} (only single-axis take/embedding lookups are supported)")
    a = int(dn.start_index_map[0])
    r = operand.rank
    if not dims_equal(sizes[a], 1) or not all(dims_equal(sizes[i], operand.shape[i]) for i in range(r) if i != a):
        raise ExportError(f"gather with partial slices {sizes} of an operand {operand.shape}")
    if indices.rank == 0 or not dims_equal(indices.shape[-1], 1):
        raise ExportError("gather indices without a trailing index-vector axis of size 1")
    idx = _unwrapped_indices(ctx, op, operand.shape[a])
    if idx is None:
        idx = g.op("Squeeze", [indices, _ints(ctx, [indices.rank - 1])])
    nb = indices.rank - 1
    y = g.op("Gather", [operand, idx], axis=a)
    onnx_labels = [("op", i) for i in range(a)] + [("idx", j) for j in range(nb)] + [("op", i) for i in range(a + 1, r)]
    offset = list(dn.offset_dims)
    op_dims = iter([i for i in range(r) if i != a])
    idx_dims = iter(range(nb))
    jax_labels = [("op", next(op_dims)) if p in offset else ("idx", next(idx_dims)) for p in range(nb + r - 1)]
    perm = [onnx_labels.index(lab) for lab in jax_labels]
    if perm != list(range(len(perm))):
        y = g.op("Transpose", [y], perm=perm)
    return y


@register("stack")
def _stack(ctx, op, *xs):
    g = ctx.graph
    axis = int(op.params["axis"])
    axes = _ints(ctx, [axis])
    return g.op("Concat", [g.op("Unsqueeze", [x, axes]) for x in xs], axis=axis)
