"""Lowering rules for control flow: ``scan`` -> ONNX ``Loop``.

The LSTM families run ``lax.scan`` over time with the input projection hoisted out of the loop, so the
loop body holds only the recurrent matmul and the gates. The body jaxpr is lowered into the Loop's body
graph with the same rules (and patterns); constants and parameters the body reads stay initializers of
the main graph, referenced from the body by name (ONNX outer scope). The trip count is the scan length,
a dimension expression (``sequence``) computed from the input shapes, so the Loop runs at every
sequence length. Per-step inputs are ``Gather``-ed at the iteration index (``length - 1 - i`` for
``reverse=True``); per-step outputs are Loop scan outputs, stacked along axis 0 (and flipped back for
``reverse=True``).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from compression.export import patterns
from compression.export.converter import Context, lower_ops, register
from compression.export.graph import Graph, Value, prune, value_info
from compression.export.program import flatten_body

_INT64_MIN = np.iinfo(np.int64).min


@register("scan")
def _scan(ctx, op, *args):
    p = op.params
    n_consts, n_carry = int(p["num_consts"]), int(p["num_carry"])
    consts, init, xs = args[:n_consts], args[n_consts:n_consts + n_carry], args[n_consts + n_carry:]
    body = flatten_body(p["jaxpr"], op.scope, ctx.program.dim_names)
    g = ctx.graph
    trip = g.scalar_dim(p["length"])

    child = Graph(ctx.opset, parent=g)
    sub = Context(child, body, ctx.quant)
    sub.quant_used = ctx.quant_used
    iter_name, cond_in = child.fresh("iter"), child.fresh("cond_in")
    body_inputs = [helper.make_tensor_value_info(iter_name, TensorProto.INT64, []),
                   helper.make_tensor_value_info(cond_in, TensorProto.BOOL, [])]
    in_vars = body.inputs
    for var, v in zip(in_vars[:n_consts], consts):
        sub.env[var] = v  # outer values: read by name from the body
    for i, var in enumerate(in_vars[n_consts:n_consts + n_carry]):
        name = child.fresh(f"carry_in_{i}")
        body_inputs.append(value_info(name, var.aval.dtype, var.aval.shape))
        sub.env[var] = Value(name, tuple(var.aval.shape), np.dtype(var.aval.dtype))
    child.scope = op.scope
    if xs:
        index = iter_name
        if p["reverse"]:
            index = child.op("Sub", [child.op("Sub", [trip, child.const(np.array(1, np.int64))]), iter_name])
        for var, x in zip(in_vars[n_consts + n_carry:], xs):
            sub.env[var] = Value(child.op("Gather", [x, index], axis=0), tuple(var.aval.shape),
                                 np.dtype(var.aval.dtype))

    lower_ops(sub, body.ops, patterns.find(body))
    child.scope = op.scope
    cond_out = child.op("Identity", [cond_in])
    body_outputs, out_names = [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, [])], [cond_out]
    for atom in body.outputs:
        v = sub.value(atom)
        name = child.op("Identity", [child.name(v)])  # a body output must be a fresh name
        body_outputs.append(value_info(name, v.dtype, v.shape))
        out_names.append(name)
    graph = helper.make_graph(prune(child.nodes, out_names), g.fresh(f"{op.scope}/scan_body"), body_inputs,
                              body_outputs)

    outs = g.ops("Loop", [trip, g.const(np.array(True))] + [ctx.name(v) for v in init], len(op.outputs), body=graph)
    results = []
    for k, (var, name) in enumerate(zip(op.outputs, outs)):
        if k >= n_carry and p["reverse"]:
            name = g.op("Slice", [name, g.const(np.array([-1], np.int64)), g.const(np.array([_INT64_MIN], np.int64)),
                                  g.const(np.array([0], np.int64)), g.const(np.array([-1], np.int64))])
        results.append(Value(name, tuple(var.aval.shape), np.dtype(var.aval.dtype)))
    return results

