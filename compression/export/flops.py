"""Matmul FLOPs of an exported graph by precision: how much of the work runs in int8, FP8 or float.

Counted from the ONNX file itself: every ``MatMul``, ``Gemm`` and ``Conv`` node (inside ``Loop`` bodies too),
its format read from the graph, its shapes from one onnxruntime run of the graph as written
(``ORT_DISABLE_ALL``, profiling on) at the given input sizes, so a ``Loop`` body's matmul counts once per
iteration it ran. A node's format is ``int8`` (``fp8``) when both of its inputs come from a
``DequantizeLinear`` of int8 or uint8 (of float8e4m3fn), possibly through layout ops (Reshape, Transpose,
Squeeze, Unsqueeze, Flatten, Identity); anything else, including a matmul with one quantized input, is
``float``: TensorRT runs a matmul in a low precision only when both operands are. FLOPs are
``2 x outputs x K`` (a multiply-add is two): ``K`` the contracted size of a MatMul or Gemm, input channels per
group times kernel size for a Conv.

    counts = matmul_flops("model_int8.onnx", feeds)     # feeds: one input set, e.g. batch 1 x sequence 128
    counts["fractions"]                                 # {"int8": 0.93, "fp8": 0.0, "float": 0.07}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx

from compression.export.program import ExportError

COUNTED_OPS = ("MatMul", "Gemm", "Conv")
FORMATS = ("int8", "fp8", "float")
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
_QUANTIZED = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8", onnx.TensorProto.FLOAT8E4M3FN: "fp8"}


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph (Loop/If/Scan bodies), depth first."""
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


def node_formats(model: onnx.ModelProto) -> dict[str, str]:
    """``{node name: "int8" | "fp8" | "float"}`` of every counted node (see the module docstring)."""
    producer, elem = {}, {}
    for g in _graphs(model.graph):
        for t in g.initializer:
            elem[t.name] = t.data_type
        for n in g.node:
            for o in n.output:
                producer[o] = n
            if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
                elem[n.output[0]] = n.attribute[0].t.data_type

    def quantized_type(name: str) -> int | None:  # the element type a DequantizeLinear reads
        if name in elem:
            return elem[name]
        n = producer.get(name)
        if n is None or n.op_type != "QuantizeLinear":
            return None
        if len(n.input) > 2 and n.input[2]:
            return elem.get(n.input[2])
        return onnx.TensorProto.UINT8  # QuantizeLinear without a zero point outputs uint8

    def source(name: str) -> str:
        n = producer.get(name)
        while n is not None and n.op_type in _LAYOUT_OPS:
            n = producer.get(n.input[0])
        if n is None or n.op_type != "DequantizeLinear":
            return "float"
        zero = n.input[2] if len(n.input) > 2 and n.input[2] else None
        t = elem.get(zero) if zero else quantized_type(n.input[0])
        return _QUANTIZED.get(t, "float")

    out = {}
    for g in _graphs(model.graph):
        for n in g.node:
            if n.op_type in COUNTED_OPS:
                if not n.name or n.name in out:
                    raise ExportError(f"every {'/'.join(COUNTED_OPS)} node needs a unique name to be counted; "
                                      f"got {n.name!r}")
                a, b = source(n.input[0]), source(n.input[1])
                out[n.name] = a if a == b and a != "float" else "float"
    return out


def _node_flops(node: onnx.NodeProto, shapes: list, out_shape: list) -> int:
    if node.op_type == "Conv":
        return 2 * math.prod(out_shape) * math.prod(shapes[1][1:])
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return 2 * math.prod(out_shape) * shapes[0][0 if trans_a else 1]
    return 2 * math.prod(out_shape) * shapes[0][-1]  # MatMul: [..., M, K] x [..., K, N]


def matmul_flops(path: str, feeds: Mapping[str, np.ndarray]) -> dict:
    """The matmul FLOPs of the ONNX file at ``path`` on one run with ``feeds`` (see the module docstring).

    Returns ``{"total", "by_format": {format: FLOPs}, "fractions": {format: share}, "nodes": {format: count of
    nodes}, "sizes": {input: shape}}``.
    """
    import onnxruntime as ort

    model = onnx.load(path)
    formats = node_formats(model)
    nodes = {n.name: n for g in _graphs(model.graph) for n in g.node if n.name in formats}
    constants = {t.name: list(t.dims) for g in _graphs(model.graph) for t in g.initializer}
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        opts.log_severity_level = 3
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        sess.run(None, dict(feeds))
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    by_format = dict.fromkeys(FORMATS, 0)
    seen = set()
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = nodes.get(name[: -len("_kernel_time")])
        if node is None:
            continue
        listed = [next(iter(x.values())) for x in e["args"].get("input_type_shape", [])]
        inputs = [i for i in node.input if i]
        variable = [i for i in inputs if i not in constants]  # onnxruntime lists the non-constant inputs
        if len(listed) == len(inputs):
            shapes = listed
        elif len(listed) == len(variable):
            it = iter(listed)
            shapes = [constants[i] if i in constants else next(it) for i in inputs]
        else:
            raise ExportError(f"node {node.name}: cannot match onnxruntime's input shapes {listed} to {inputs}")
        out_shape = next(iter(e["args"]["output_type_shape"][0].values()))
        by_format[formats[node.name]] += _node_flops(node, shapes, out_shape)
        seen.add(node.name)
    total = sum(by_format.values())
    counts = dict.fromkeys(FORMATS, 0)
    for name in seen:
        counts[formats[name]] += 1
    return {"total": total, "by_format": by_format,
            "fractions": {k: (v / total if total else 0.0) for k, v in by_format.items()}, "nodes": counts,
            "sizes": {k: list(np.shape(v)) for k, v in feeds.items()}}
