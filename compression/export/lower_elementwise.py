"""Lowering rules for elementwise primitives: arithmetic, comparisons, selects, casts, transcendental
functions. JAX's binary ops broadcast like numpy (size-1 axes and scalars), as ONNX does, so operands
are passed through; a constant reshaped only to gain leading size-1 axes (a bias [F] -> [1, 1, F]) is
read at its original rank so that ``Add`` gets a plain 1-D initializer.
"""

from __future__ import annotations

import numpy as np

from compression.export.converter import register
from compression.export.graph import Value, onnx_dtype
from compression.export.program import ExportError


def operand(ctx, v: Value, out_rank: int, other: Value | None) -> Value:
    """``v`` or the lower-rank value it was unit-expanded from, when broadcasting makes them equivalent."""
    while v.unit_expanded_from is not None and (other is None or other.rank == out_rank):
        v = v.unit_expanded_from
    return v


def _binary(onnx_op):
    def rule(ctx, op, x, y):
        rank = len(op.outputs[0].aval.shape)
        return ctx.graph.op(onnx_op, [operand(ctx, x, rank, y), operand(ctx, y, rank, x)])

    return rule


for _prim, _onnx in {"add": "Add", "add_any": "Add", "sub": "Sub", "mul": "Mul", "max": "Max", "min": "Min",
                     "pow": "Pow", "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
                     "ge": "GreaterOrEqual"}.items():
    register(_prim)(_binary(_onnx))


@register("and", "or", "xor", "not")
def _logical(ctx, op, *args):
    if any(a.dtype != np.bool_ for a in args):
        raise ExportError(f"bitwise {op.name} on {args[0].dtype} is not supported (only booleans)")
    if op.name == "not":
        return ctx.graph.op("Not", [args[0]])
    rank = len(op.outputs[0].aval.shape)
    x, y = args
    return ctx.graph.op(op.name.capitalize(), [operand(ctx, x, rank, y), operand(ctx, y, rank, x)])


@register("div")
def _div(ctx, op, x, y):
    rank = len(op.outputs[0].aval.shape)
    # lax.div rounds integer quotients toward zero, as ONNX Div does.
    return ctx.graph.op("Div", [operand(ctx, x, rank, y), operand(ctx, y, rank, x)])


@register("rem")
def _rem(ctx, op, x, y):
    rank = len(op.outputs[0].aval.shape)
    return ctx.graph.op("Mod", [operand(ctx, x, rank, y), operand(ctx, y, rank, x)], fmod=1)


@register("ne")
def _ne(ctx, op, x, y):
    rank = len(op.outputs[0].aval.shape)
    return ctx.graph.op("Not", [ctx.graph.op("Equal", [operand(ctx, x, rank, y), operand(ctx, y, rank, x)])])


_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "erf": "Erf", "sqrt": "Sqrt",
          "logistic": "Sigmoid", "abs": "Abs", "sign": "Sign", "floor": "Floor", "ceil": "Ceil", "sin": "Sin",
          "cos": "Cos", "tan": "Tan", "asin": "Asin", "acos": "Acos", "atan": "Atan", "sinh": "Sinh",
          "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh", "atanh": "Atanh"}


def _unary(onnx_op):
    return lambda ctx, op, x: ctx.graph.op(onnx_op, [x])


for _prim, _onnx in _UNARY.items():
    register(_prim)(_unary(_onnx))


def _scalar(ctx, value, dtype) -> str:
    return ctx.const(np.array(value, dtype=dtype))


@register("rsqrt")
def _rsqrt(ctx, op, x):
    # 1 / Sqrt(x): Div rather than Reciprocal, which older TensorRT releases lack.
    return ctx.graph.op("Div", [_scalar(ctx, 1, x.dtype), ctx.graph.op("Sqrt", [x])])


@register("erfc")
def _erfc(ctx, op, x):
    # ONNX has no Erfc: 1 - Erf(x).
    return ctx.graph.op("Sub", [_scalar(ctx, 1, x.dtype), ctx.graph.op("Erf", [x])])


@register("square")
def _square(ctx, op, x):
    return ctx.graph.op("Mul", [x, x])


@register("integer_pow")
def _integer_pow(ctx, op, x):
    y = int(op.params["y"])
    if y == 0:
        return ctx.graph.op("Add", [ctx.graph.op("Mul", [x, _scalar(ctx, 0, x.dtype)]), _scalar(ctx, 1, x.dtype)])
    if 1 <= abs(y) <= 4:
        acc = ctx.name(x)
        for _ in range(abs(y) - 1):
            acc = ctx.graph.op("Mul", [acc, x])
        return acc if y > 0 else ctx.graph.op("Div", [_scalar(ctx, 1, x.dtype), acc])
    return ctx.graph.op("Pow", [x, _scalar(ctx, y, x.dtype)])


@register("exp2")
def _exp2(ctx, op, x):
    return ctx.graph.op("Pow", [_scalar(ctx, 2, x.dtype), x])


@register("log1p")
def _log1p(ctx, op, x):
    return ctx.graph.op("Log", [ctx.graph.op("Add", [x, _scalar(ctx, 1, x.dtype)])])


@register("expm1")
def _expm1(ctx, op, x):
    return ctx.graph.op("Sub", [ctx.graph.op("Exp", [x]), _scalar(ctx, 1, x.dtype)])


@register("round")
def _round(ctx, op, x):
    method = int(op.params.get("rounding_method", 0))
    if method == 1:  # ROUND_TO_NEAREST_EVEN, as ONNX Round
        return ctx.graph.op("Round", [x])
    # AWAY_FROM_ZERO: sign(x) * floor(|x| + 0.5)
    g = ctx.graph
    magnitude = g.op("Floor", [g.op("Add", [g.op("Abs", [x]), _scalar(ctx, 0.5, x.dtype)])])
    return g.op("Mul", [g.op("Sign", [x]), magnitude])


@register("is_finite")
def _is_finite(ctx, op, x):
    g = ctx.graph
    return g.op("Not", [g.op("Or", [g.op("IsNaN", [x]), g.op("IsInf", [x])])])


@register("stop_gradient", "copy", "copy_p", "optimization_barrier", "reduce_precision")
def _identity(ctx, op, *xs):
    # Pure aliases: no node. reduce_precision only matters for bf16 emulation, not for export.
    return list(xs) if len(op.outputs) > 1 else xs[0]


@register("convert_element_type")
def _convert(ctx, op, x):
    dtype = np.dtype(op.params["new_dtype"])
    if dtype == x.dtype:
        return Value(x.name, tuple(op.outputs[0].aval.shape), dtype, x.const, x.hint, x.unit_expanded_from)
    if dtype == np.bool_:  # JAX: x != 0; ONNX Cast to bool agrees
        return ctx.graph.op("Cast", [x], to=onnx_dtype(dtype))
    return ctx.graph.op("Cast", [x], to=onnx_dtype(dtype))


@register("select_n")
def _select_n(ctx, op, pred, *cases):
    g = ctx.graph
    rank = len(op.outputs[0].aval.shape)
    cases = [operand(ctx, c, rank, pred) for c in cases]
    if pred.dtype == np.bool_:
        if len(cases) != 2:
            raise ExportError(f"select_n with a boolean predicate and {len(cases)} cases")
        return g.op("Where", [pred, cases[1], cases[0]])
    out = ctx.name(cases[0])
    for i in range(1, len(cases)):
        out = g.op("Where", [g.op("Equal", [pred, _scalar(ctx, i, pred.dtype)]), cases[i], out])
    return out


@register("clamp")
def _clamp(ctx, op, lo, x, hi):
    g = ctx.graph
    if lo.rank == 0 and hi.rank == 0:
        return g.op("Clip", [x, lo, hi])
    return g.op("Max", [g.op("Min", [x, hi]), lo])
