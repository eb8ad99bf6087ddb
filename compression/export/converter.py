"""jaxpr -> ONNX converter: walks a traced :class:`~compression.export.program.Program` and lowers each
primitive with the rules of ``lower_*.py``, after :mod:`~compression.export.patterns` has claimed the
subgraphs it emits as whole ONNX ops (LayerNormalization, Softmax, GELU, attention).

Why our own converter: the jax2tf -> tf2onnx route is dead (jax2tf always emits an opaque
``XlaCallModule`` op that tf2onnx cannot convert), and no existing JAX exporter emits quantized graphs
(QuantizeLinear/DequantizeLinear with our calibration scales) or the canonical subgraphs that
onnxruntime's BERT fuser and TensorRT recognise. Converting the jaxpr ourselves gives all three, and
name stacks (Flax module paths) tell us where every equation came from.

Every lowering rule has the signature ``rule(ctx, op, *inputs: Value) -> Value | str | list`` and is
registered with :func:`register`. Values are constant-folded when all inputs are small non-parameter
constants with static shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from compression.export.graph import Graph, Value, onnx_dtype, prune, subgraph_inputs, value_info
from compression.export.program import Const, ExportError, Op, Program, is_static, run_op

Rule = Callable[..., object]
LOWERINGS: dict[str, Rule] = {}
FOLD_LIMIT = 1 << 12  # largest constant (elements) produced by folding
DEFAULT_OPSET = 17
_IR_VERSION = {17: 8, 18: 8, 19: 9, 20: 9}


def register(*names: str):
    """Decorator registering a lowering rule for the named primitives."""

    def deco(fn: Rule) -> Rule:
        for n in names:
            LOWERINGS[n] = fn
        return fn

    return deco


class Context:
    """What a lowering rule sees: the graph, the program, the op being lowered, the quantization plan."""

    def __init__(self, graph: Graph, program: Program, quant: Mapping | None = None):
        self.graph = graph
        self.program = program
        self.quant = dict(quant or {})
        self.quant_used: set[str] = set()
        self.env: dict = {}
        self.op: Op | None = None

    @property
    def opset(self) -> int:
        return self.graph.opset

    def value(self, atom) -> Value:
        """The lowered value of a program atom (Var or Const)."""
        if isinstance(atom, Const):
            return Value(None, tuple(atom.shape), np.dtype(atom.dtype), const=atom.value, hint=atom.path)
        if atom not in self.env:
            raise ExportError(f"internal: value {atom} used before it is defined")
        return self.env[atom]

    def name(self, v) -> str:
        return self.graph.name(v) if isinstance(v, Value) else v

    def const(self, array, dtype=None) -> str:
        return self.graph.const(np.asarray(array, dtype=dtype))

    def module_path(self, scope: str | None = None) -> str:
        """The Flax module path of the current op (name stack minus the root module's class name)."""
        scope = self.op.scope if scope is None else scope
        parts = [p for p in scope.split("/") if p and not p.startswith("onnx_tag_")]
        return "/".join(parts[1:])


def _wrap(result, op: Op) -> list[Value]:
    results = result if isinstance(result, (list, tuple)) else [result]
    if len(results) != len(op.outputs):
        raise ExportError(f"internal: rule for {op.name} returned {len(results)} values for {len(op.outputs)}")
    out = []
    for r, var in zip(results, op.outputs):
        if isinstance(r, Value):
            out.append(r)
        else:
            out.append(Value(r, tuple(var.aval.shape), np.dtype(var.aval.dtype)))
    return out


def _foldable(op: Op, args: list[Value]) -> bool:
    if not all(a.const is not None and a.hint is None for a in args):
        return False
    if op.name in ("rng_bit_generator", "random_bits", "random_seed", "random_wrap", "random_unwrap"):
        return False
    for v in op.outputs:
        shape = getattr(v.aval, "shape", None)
        if shape is None or not all(is_static(d) for d in shape) or int(np.prod(shape, dtype=np.int64)) > FOLD_LIMIT:
            return False
    return True


def _fold(op: Op, args: list[Value]) -> list[Value] | None:
    try:
        out = run_op(op, [a.const for a in args])
    except Exception:  # noqa: BLE001  (a primitive that cannot run eagerly is lowered instead)
        return None
    return [Value(None, tuple(v.aval.shape), np.dtype(v.aval.dtype), const=o.astype(v.aval.dtype, copy=False))
            for v, o in zip(op.outputs, out)]


def lower_ops(ctx: Context, ops, matches: Mapping[int, object]) -> None:
    """Lowers ``ops`` into ``ctx.graph``, binding ``ctx.env``; ``matches`` maps op index -> pattern."""
    for i, op in enumerate(ops):
        ctx.op = op
        ctx.graph.scope = ctx.module_path(op.scope) or op.scope
        match = matches.get(i)
        if match is not None:
            ctx.env.update(match.emit(ctx))
            continue
        args = [ctx.value(a) for a in op.inputs]
        if _foldable(op, args):
            folded = _fold(op, args)
            if folded is not None:
                ctx.env.update(zip(op.outputs, folded))
                continue
        rule = LOWERINGS.get(op.name)
        if rule is None:
            raise ExportError(f"cannot lower primitive {op.name!r} from module {op.scope or '<top level>'!r}: "
                              f"no ONNX lowering rule (supported: {', '.join(sorted(LOWERINGS))})")
        try:
            values = _wrap(rule(ctx, op, *args), op)
        except ExportError as e:
            if "from module" in str(e):
                raise
            scope = op.scope or "<top level>"
            raise ExportError(f"cannot lower primitive {op.name!r} from module {scope!r}: {e}") from e
        ctx.env.update(zip(op.outputs, values))


def convert(program: Program, opset: int = DEFAULT_OPSET, quant: Mapping | None = None,
            patterns: bool = True, tags=None, graph_name: str = "nlpress") -> onnx.ModelProto:
    """Lowers ``program`` to an ONNX model (float graph; Q/DQ around MatMuls named in ``quant``).

    Args:
      program: from :func:`compression.export.program.trace`.
      opset: default-domain opset (17 to 20; LayerNormalization needs 17).
      quant: module path -> :class:`compression.export.qdq.MatMulQuant`; those Dense MatMuls get explicit
        int8 QuantizeLinear/DequantizeLinear on both inputs (Convs alike). A path that matches no MatMul
        or Conv is an error.
      patterns: emit whole ops for recognised subgraphs (off only to debug the per-primitive rules).
      tags: the :class:`compression.export.patterns.ModuleTags` used while tracing (LayerNorm recognition).
    """
    from compression.export import lower_control, lower_elementwise, lower_linalg, lower_shape  # noqa: F401  (rules)
    from compression.export import patterns as patterns_mod

    graph = Graph(opset)
    ctx = Context(graph, program, quant)
    graph_inputs = []
    for var, name, dtype, axes in zip(program.inputs, program.input_names, program.input_dtypes, program.input_axes):
        graph.reserve(name)
        shape = tuple(var.aval.shape)
        graph_inputs.append(value_info(name, dtype, shape))
        for axis, d in enumerate(axes):
            if d is not None and d not in graph.dim_sources:
                graph.dim_sources[d] = (name, axis)
        tensor = name
        if np.dtype(dtype) != np.dtype(var.aval.dtype):  # e.g. int64 ids into a jaxpr traced without x64
            tensor = graph.op("Cast", [name], to=onnx_dtype(var.aval.dtype))
        ctx.env[var] = Value(tensor, shape, np.dtype(var.aval.dtype))

    for name in program.output_names:  # keep the output names free for the outputs
        graph.reserve(name)
    matches = patterns_mod.find(program, tags) if patterns else {}
    lower_ops(ctx, program.ops, matches)
    unused = set(ctx.quant) - ctx.quant_used
    if unused:
        raise ExportError(f"quantization scales given for modules with no MatMul or Conv: {sorted(unused)}")

    # Outputs: rename the producing node's output when it is private to this output, else Identity.
    graph.scope = ""
    outputs, out_infos = [], []
    produced = {o for n in graph.nodes for o in n.output}
    renamed: dict[str, str] = {}
    for atom, name in zip(program.outputs, program.output_names):
        v = ctx.value(atom)
        src = graph.name(v)
        src = renamed.get(src, src)
        if src in produced and src not in outputs:
            _rename(graph.nodes, src, name)
            produced.discard(src)
            produced.add(name)
            renamed[src] = name
        else:
            graph.op("Identity", [src], out=name)
        outputs.append(name)
        out_infos.append(value_info(name, v.dtype, v.shape))

    nodes = prune(graph.nodes, outputs)
    used = {i for n in nodes for i in n.input}
    for n in nodes:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= subgraph_inputs(a.g)
    inits = [t for name, t in graph.initializers.items() if name in used]
    g = helper.make_graph(nodes, graph_name, graph_inputs, out_infos, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="nlpress")
    model.ir_version = _IR_VERSION.get(opset, model.ir_version)  # the oldest IR that has the opset
    return model


def _rename(nodes, old: str, new: str) -> None:
    for n in nodes:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for i, x in enumerate(n.output):
            if x == old:
                n.output[i] = new
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename(a.g.node, old, new)
