"""ONNX graph builder used by the lowering rules: nodes, deduplicated initializers, symbolic dimensions.

A :class:`Value` is what a jaxpr variable lowers to: an ONNX tensor name with the variable's (possibly
symbolic) shape and dtype, or a constant not yet written as an initializer. Dimension expressions
(``batch``, ``batch*sequence``, ...) become small int64 subgraphs computed from the input shapes
(``Shape`` with start/end, ``Mul``/``Add``), cached per expression, so reshapes and broadcasts stay valid
at every batch and sequence size.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.export.program import ExportError, evaluate_dim, is_static

_ONNX_DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int16): TensorProto.INT16,
    np.dtype(np.int32): TensorProto.INT32, np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.uint32): TensorProto.UINT32, np.dtype(np.uint64): TensorProto.UINT64,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def onnx_dtype(dtype) -> int:
    """The TensorProto data type of a numpy/JAX dtype; bfloat16 maps to BFLOAT16."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return TensorProto.BFLOAT16
    if dtype not in _ONNX_DTYPES:
        raise ExportError(f"dtype {dtype} has no ONNX equivalent")
    return _ONNX_DTYPES[dtype]


def dim_param(d) -> int | str:
    """An ONNX shape entry: an int, or the dimension expression's text (``batch``, ``batch*sequence``)."""
    return int(d) if is_static(d) else str(d).replace(" ", "")


@dataclasses.dataclass(eq=False)
class Value:
    """A lowered jaxpr value.

    Attributes:
      name: ONNX tensor name; ``None`` for a constant not yet materialized.
      shape: the jaxpr shape (ints and symbolic dims).
      dtype: numpy dtype.
      const: the value when known at export time.
      hint: initializer name to use when the constant is materialized (a parameter path).
      unit_expanded_from: set when this value is ``unit_expanded_from`` with leading size-1 axes added
        (a bias reshaped to [1, 1, F]); broadcasting ops read the source instead, keeping a plain 1-D
        bias on ``Add`` as ONNX fusers expect.
    """

    name: str | None
    shape: tuple
    dtype: np.dtype
    const: np.ndarray | None = None
    hint: str | None = None
    unit_expanded_from: Value | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)


class _DimTensor:
    """An int64 [1] tensor in dimension arithmetic; ``evaluate_dim`` combines these with + and *."""

    __array_ufunc__ = None  # make numpy scalars defer to our reflected operators

    def __init__(self, graph: Graph, name: str):
        self.graph, self.name = graph, name

    def _bin(self, op_type, other, reverse=False):
        other_name = other.name if isinstance(other, _DimTensor) else self.graph.const(np.array([int(other)], np.int64))
        a, b = (other_name, self.name) if reverse else (self.name, other_name)
        return _DimTensor(self.graph, self.graph.op(op_type, [a, b]))

    def __add__(self, o):
        return self._bin("Add", o)

    def __radd__(self, o):
        return self._bin("Add", o, True)

    def __mul__(self, o):
        return self._bin("Mul", o)

    def __rmul__(self, o):
        return self._bin("Mul", o, True)

    def __sub__(self, o):
        return self._bin("Sub", o)

    def __rsub__(self, o):
        return self._bin("Sub", o, True)

    def __floordiv__(self, o):
        return self._bin("Div", o)  # dimensions are non-negative: truncation is floor

    def __mod__(self, o):
        return self._bin("Mod", o)


class Graph:
    """Accumulates nodes and initializers. A child graph (a Loop body) shares names, initializers and
    dimension sources with its parent and reads parent tensors by name (ONNX outer scope)."""

    def __init__(self, opset: int, parent: Graph | None = None):
        self.opset = opset
        self.parent = parent
        self.nodes: list[onnx.NodeProto] = []
        self.scope = ""
        self._dim_cache: dict[str, str] = {}
        if parent is None:
            self.initializers: dict[str, onnx.TensorProto] = {}
            self._used_names: set[str] = set()
            self._const_cache: dict[tuple, str] = {}
            self.dim_sources: dict[str, tuple[str, int]] = {}
        else:
            self.initializers = parent.initializers
            self._used_names = parent._used_names
            self._const_cache = parent._const_cache
            self.dim_sources = parent.dim_sources

    # -- names and constants -------------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        """A tensor/node name not used before, derived from ``base``."""
        base = base or "t"
        name, k = base, 0
        while name in self._used_names:
            k += 1
            name = f"{base}_{k}"
        self._used_names.add(name)
        return name

    def reserve(self, name: str) -> None:
        if name in self._used_names:
            raise ExportError(f"duplicate ONNX name {name!r}")
        self._used_names.add(name)

    def const(self, array, hint: str | None = None) -> str:
        """Name of an initializer holding ``array``. A parameter (``hint`` = its path) gets its own
        initializer under that name; other identical arrays share one."""
        a = np.asarray(array)
        if not a.flags.c_contiguous:
            a = a.copy()
        key = ("param", hint) if hint else (a.dtype.str, a.shape, hashlib.sha1(a.tobytes()).hexdigest())
        name = self._const_cache.get(key)
        if name is None:
            name = self.fresh(hint or f"const_{a.dtype.name}_{'x'.join(map(str, a.shape)) or 'scalar'}")
            self.initializers[name] = numpy_helper.from_array(a, name)
            self._const_cache[key] = name
        return name

    def name(self, v: Value) -> str:
        """The ONNX tensor of ``v``, writing its initializer if it is an unmaterialized constant."""
        if v.name is None:
            v.name = self.const(v.const, v.hint)
        return v.name

    # -- nodes ---------------------------------------------------------------------------------------------

    def op(self, op_type: str, inputs: Sequence, domain: str = "", out: str | None = None, **attrs) -> str:
        """Adds a one-output node; returns the output name. Inputs are names or :class:`Value`."""
        return self.ops(op_type, inputs, 1, domain=domain, outs=[out] if out else None, **attrs)[0]

    def ops(self, op_type: str, inputs: Sequence, n_out: int, domain: str = "", outs=None, **attrs) -> list[str]:
        """Adds a node with ``n_out`` outputs; returns their names."""
        in_names = [self.name(x) if isinstance(x, Value) else (x or "") for x in inputs]
        base = f"{self.scope}/{op_type}" if self.scope else op_type
        if outs is None:
            outs = [self.fresh(base + (f":{i}" if n_out > 1 else "")) for i in range(n_out)]
        else:  # explicit names (graph outputs) are reserved by the caller
            self._used_names.update(outs)
        node = helper.make_node(op_type, in_names, outs, name=self.fresh("node:" + base), domain=domain or None,
                                **{k: v for k, v in attrs.items() if v is not None})
        self.nodes.append(node)
        return outs

    # -- dimensions ----------------------------------------------------------------------------------------

    def _cached_dim(self, key: str) -> str | None:
        g = self
        while g is not None:
            if key in g._dim_cache:
                return g._dim_cache[key]
            g = g.parent
        return None

    def dim(self, d) -> str:
        """An int64 [1] tensor holding dimension ``d`` (an int or a symbolic expression)."""
        if is_static(d):
            return self.const(np.array([int(d)], np.int64))
        key = str(d)
        cached = self._cached_dim(key)
        if cached is not None:
            return cached
        env = {}
        for sym, (tensor, axis) in self.dim_sources.items():
            cached_sym = self._cached_dim(sym)
            if cached_sym is None:
                cached_sym = self.op("Shape", [tensor], start=axis, end=axis + 1)
                self._dim_cache[sym] = cached_sym
            env[sym] = _DimTensor(self, cached_sym)
        result = evaluate_dim(d, env)
        name = result.name if isinstance(result, _DimTensor) else self.const(np.array([int(result)], np.int64))
        self._dim_cache[key] = name
        return name

    def shape_tensor(self, dims: Sequence) -> str:
        """An int64 [len(dims)] tensor with the given (possibly symbolic) dimensions."""
        if all(is_static(d) for d in dims):
            return self.const(np.array([int(d) for d in dims], np.int64))
        return self.op("Concat", [self.dim(d) for d in dims], axis=0)

    def scalar_dim(self, d) -> str:
        """An int64 scalar tensor holding dimension ``d``."""
        if is_static(d):
            return self.const(np.array(int(d), np.int64))
        return self.op("Squeeze", [self.dim(d), self.const(np.array([0], np.int64))])


def value_info(name: str, dtype, shape: Sequence) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(dtype), [dim_param(d) for d in shape])


def subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names a graph reads from its outer scope (inputs of its nodes not defined inside it)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        defined.update(n.output)
    used = set()
    for n in graph.node:
        used.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= subgraph_inputs(a.g)
    return used - defined


def prune(nodes: list[onnx.NodeProto], outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """Removes nodes whose outputs nothing needs (dead code left by pattern emission)."""
    needed = set(outputs)
    kept = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    needed |= subgraph_inputs(a.g)
    return kept[::-1]
