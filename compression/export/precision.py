"""The float16 variant of an exported float32 graph.

Weights and activations become float16 (MatMul, Gather tables, elementwise ops), while the ops where
float16 loses accuracy stay float32 with Casts around them (:data:`FLOAT32_OPS`: LayerNormalization,
Softmax, every reduction, and Loop/Scan/LSTM bodies, which are left as written). Graph inputs keep
their types (int ids stay int); float outputs are cast back to float32 under their original names.
Float constants beyond the float16 range are clipped to +-65504 (an additive mask of -1e9 becomes
-65504, still exp() == 0 after the float32 softmax's max subtraction).

A ``Transpose`` feeding a ``MatMul`` with a constant weight is moved below it (``MatMul`` then
``Transpose``, the same values when the last axis stays last): onnxruntime 1.24-1.32 on x86 crashes
(SIGSEGV at session creation, ``ORT_ENABLE_ALL``) on ``Transpose -> MatMul(fp16 initializer)``, the
BiLSTM's time-major input projection (onnxruntime issue 28392).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.export.graph import prune, subgraph_inputs
from compression.export.program import ExportError

FLOAT32_OPS = frozenset({
    "LayerNormalization", "Softmax", "LogSoftmax", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
    "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "CumSum",
    "Loop", "Scan", "If", "LSTM", "GRU", "RNN",
})
# Inputs that are not data (shapes, axes, indices) are never cast; Cast/Shape read any type.
_TYPE_AGNOSTIC_INPUTS = {"Cast", "Shape", "Size"}
# Ops that only move data: they run in the type of whatever consumes them (float32 when every consumer is
# a float32 op), so constants feeding a float32 op through them (a recurrent kernel stacked for a Loop, a
# zero initial state) stay float32 instead of taking a float16 round trip.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Concat", "Expand", "Slice", "Gather",
                         "Identity", "Split", "Flatten", "Tile"})
_F16_MAX = float(np.finfo(np.float16).max)
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


def _to_f16(a: np.ndarray) -> np.ndarray:
    return np.clip(a, -_F16_MAX, _F16_MAX).astype(np.float16)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Returns a float16 copy of a float32 ``model`` (see the module docstring)."""
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise ExportError("the float16 variant is made from the float32 graph, not from a Q/DQ graph")
    model = _transposes_below_weight_matmuls(model)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    elem: dict[str, int] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for name, t in inits.items():
        elem[name] = t.data_type
    missing = [o for n in g.node for o in n.output if o and o not in elem]
    if missing:
        raise ExportError(f"float16 conversion: no inferred type for {missing[:3]}")

    current: dict[str, int] = {}  # tensor -> its type in the new graph
    for vi in g.input:
        current[vi.name] = vi.type.tensor_type.elem_type
    new_inits: dict[str, onnx.TensorProto] = {}
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []
    used_names = {o for n in g.node for o in n.output} | set(inits) | {i.name for i in g.input}

    def fresh(base: str) -> str:
        k, name = 0, base
        while name in used_names:
            k += 1
            name = f"{base}_{k}"
        used_names.add(name)
        return name

    consumers_kind: dict[str, set] = {}
    keep32_ids = _float32_nodes(g)
    for k, n in enumerate(g.node):
        kind = "f32" if k in keep32_ids else "f16"
        refs = set(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                refs |= subgraph_inputs(a.g)
        for i in refs:
            consumers_kind.setdefault(i, set()).add(kind)

    def needed_in_both(name: str) -> bool:  # read by float32 ops (or Loop bodies) and float16 ops
        return len(consumers_kind.get(name, ())) > 1

    def initializer_as(name: str, dtype: int) -> str:
        t = inits[name]
        if t.data_type not in _FLOATS or t.data_type == dtype:
            new_inits.setdefault(name, t)
            current[name] = t.data_type
            return name
        key = (name, dtype)
        if key not in casts:
            a = numpy_helper.to_array(t)
            a = _to_f16(a) if dtype == TensorProto.FLOAT16 else a.astype(np.float32)
            suffix = "fp16" if dtype == TensorProto.FLOAT16 else "fp32"
            out = name if not needed_in_both(name) else fresh(f"{name}_{suffix}")
            new_inits[out] = numpy_helper.from_array(a, out)
            current[out] = dtype
            casts[key] = out
        return casts[key]

    def as_type(name: str, dtype: int) -> str:
        if not name:
            return name
        if name in inits:
            return initializer_as(name, dtype)
        t = current.get(name, elem.get(name))
        if t not in _FLOATS or t == dtype:
            return name
        key = (name, dtype)
        if key not in casts:
            out = fresh(f"{name}_as_{'fp16' if dtype == TensorProto.FLOAT16 else 'fp32'}")
            nodes.append(helper.make_node("Cast", [name], [out], name=fresh(f"node:{out}"), to=dtype))
            current[out] = dtype
            casts[key] = out
        return casts[key]

    for k_node, n in enumerate(g.node):
        new = onnx.NodeProto()
        new.CopyFrom(n)
        keep32 = k_node in keep32_ids
        want = TensorProto.FLOAT if keep32 else TensorProto.FLOAT16
        if n.op_type not in _TYPE_AGNOSTIC_INPUTS:
            for k, i in enumerate(n.input):
                new.input[k] = as_type(i, want)
        else:
            for k, i in enumerate(n.input):
                if i in inits:
                    new.input[k] = initializer_as(i, inits[i].data_type)
        for a in new.attribute:
            if a.type == onnx.AttributeProto.GRAPH:  # bodies stay float32: feed them float32 outer values
                for ref in sorted(subgraph_inputs(a.g)):
                    src = as_type(ref, TensorProto.FLOAT) if ref in elem or ref in inits else ref
                    if src != ref:
                        _rename_inputs(a.g, ref, src)
        if n.op_type == "Cast":
            to = next(a for a in new.attribute if a.name == "to")
            if to.i == TensorProto.FLOAT:
                to.i = TensorProto.FLOAT16
        for a in new.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(_to_f16(numpy_helper.to_array(a.t)), a.t.name))
        for o in n.output:
            t = elem[o]
            current[o] = (TensorProto.FLOAT if keep32 else TensorProto.FLOAT16) if t in _FLOATS else t
        nodes.append(new)

    outputs = []
    for vi in g.output:
        t = vi.type.tensor_type.elem_type
        if t == TensorProto.FLOAT and current.get(vi.name) == TensorProto.FLOAT16:
            inner = fresh(f"{vi.name}_fp16")
            for node in nodes:
                for k, o in enumerate(node.output):
                    if o == vi.name:
                        node.output[k] = inner
                for k, i in enumerate(node.input):
                    if i == vi.name:
                        node.input[k] = inner
            nodes.append(helper.make_node("Cast", [inner], [vi.name], name=fresh(f"node:{vi.name}_fp32"),
                                          to=TensorProto.FLOAT))
        out = onnx.ValueInfoProto()
        out.CopyFrom(vi)
        outputs.append(out)

    referenced = {i for node in nodes for i in node.input}
    for node in nodes:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                referenced |= subgraph_inputs(a.g)
    for name, t in inits.items():
        if name in referenced and name not in new_inits:
            new_inits[name] = t
    kept = [t for name, t in new_inits.items() if name in referenced]
    graph = helper.make_graph(nodes, g.name, list(model.graph.input), outputs, kept)
    result = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    result.ir_version = model.ir_version
    return result


def _transposes_below_weight_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where ``MatMul(Transpose(x, perm), W)`` with an initializer ``W`` [K, N] and
    ``perm`` keeping the last axis reads ``x`` directly and is followed by ``Transpose(perm)`` (chains of
    such transposes are composed into one)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    used = {o for n in g.node for o in n.output} | set(inits) | {i.name for i in g.input}

    def last_axis_perm(node) -> list[int] | None:
        if node is None or node.op_type != "Transpose":
            return None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return perm if perm and perm[-1] == len(perm) - 1 else None

    nodes = []
    for n in g.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" else None
        src, perm = n.input[0], None
        while w is not None and len(w.dims) == 2 and last_axis_perm(producer.get(src)) is not None:
            t = producer[src]
            p = last_axis_perm(t)
            perm = p if perm is None else [p[i] for i in perm]  # Transpose(perm) after Transpose(p)
            src = t.input[0]
        if perm is None:
            nodes.append(n)
            continue
        inner = f"{n.output[0]}_before_transpose"
        while inner in used:
            inner += "_"
        used.add(inner)
        nodes.append(helper.make_node("MatMul", [src, n.input[1]], [inner], name=f"{n.name}_untransposed"))
        if perm == list(range(len(perm))):
            nodes.append(helper.make_node("Identity", [inner], [n.output[0]], name=f"{n.name}_identity"))
        else:
            nodes.append(helper.make_node("Transpose", [inner], [n.output[0]], name=f"{n.name}_transpose", perm=perm))
    if len(nodes) == len(g.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(prune(nodes, [o.name for o in g.output]))
    return out


def _float32_nodes(g: onnx.GraphProto) -> set[int]:
    """Indices of the nodes that run in float32: :data:`FLOAT32_OPS`, and layout ops whose every consumer
    runs in float32 (or is a subgraph or a graph output, which are float32 anyway)."""
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(g.node):
        refs = set(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                refs |= subgraph_inputs(a.g)
        for i in refs:
            consumers.setdefault(i, []).append(k)
    out = {k for k, n in enumerate(g.node) if n.op_type in FLOAT32_OPS}
    for k in reversed(range(len(g.node))):  # nodes are in topological order: consumers come later
        n = g.node[k]
        if n.op_type in _LAYOUT_OPS and all(c in out for o in n.output for c in consumers.get(o, ())):
            out.add(k)
    return out


def _rename_inputs(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for k, i in enumerate(node.input):
            if i == old:
                node.input[k] = new
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(a.g, old, new)
