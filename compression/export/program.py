"""The program the converter lowers: a traced function as one flat, inlined list of primitive operations.

:func:`trace` runs ``jax.make_jaxpr`` on ``fn(variables, *inputs)`` with the variables as explicit
arguments (so every parameter keeps its pytree path) and the dynamic input axes as JAX symbolic
dimensions (``jax.export.symbolic_shape``): every shape in the jaxpr is then an exact expression in
``batch``/``sequence``, and a reshape or broadcast never has to guess which size was the batch.
:func:`flatten` inlines nested ``jit``/``closed_call``/``custom_jvp_call``/``custom_vjp_call``/``remat``
bodies into one list of :class:`Op`, replacing parameters, closed-over constants and literals by
:class:`Const`. Each op keeps its full name stack (``scope``), which for Flax modules is the module path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend as jex
import numpy as np

# Call-like primitives whose body is inlined; the value is the params key holding the body.
_INLINE = {
    "pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr", "checkpoint": "jaxpr", "remat2": "jaxpr",
}


class ExportError(ValueError):
    """An export failed: unsupported primitive, bad input, or a failed parity gate."""


@dataclasses.dataclass(eq=False)
class Const:
    """A value known at export time: a parameter (``path`` set), a closed-over constant or a literal."""

    value: np.ndarray
    path: str | None = None

    @property
    def shape(self) -> tuple:
        return self.value.shape

    @property
    def dtype(self) -> np.dtype:
        return self.value.dtype


class Var:
    """A value computed by the program. Fresh per inlined call, so a jaxpr reused by several calls (a
    cached ``jit`` body) gives distinct values."""

    __slots__ = ("aval", "index")
    _counter = 0

    def __init__(self, aval):
        self.aval = aval
        Var._counter += 1
        self.index = Var._counter

    def __repr__(self):
        return f"v{self.index}:{self.aval.str_short() if hasattr(self.aval, 'str_short') else self.aval}"


Atom = Any  # Var or Const


@dataclasses.dataclass(eq=False)
class Op:
    """One primitive application: ``outputs = prim.bind(*inputs, **params)``, from module ``scope``."""

    prim: Any
    params: dict
    inputs: list
    outputs: list
    scope: str

    @property
    def name(self) -> str:
        return self.prim.name


@dataclasses.dataclass
class Program:
    """A flat program. ``inputs`` are the graph inputs (Vars); ``outputs`` Vars or Consts."""

    ops: list[Op]
    inputs: list
    input_names: list[str]
    input_dtypes: list[np.dtype]  # dtypes of the user's example inputs (may differ from the jaxpr's)
    input_axes: list[tuple]  # per input: a dim name or None per axis
    outputs: list
    output_names: list[str]
    dim_names: tuple[str, ...]
    producer: dict = dataclasses.field(default_factory=dict)
    consumers: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for i, op in enumerate(self.ops):
            for v in op.outputs:
                self.producer[v] = i
            for a in op.inputs:
                if not isinstance(a, Const):
                    self.consumers.setdefault(a, []).append(i)

    def producer_op(self, atom) -> Op | None:
        """The op that computes ``atom``; None for inputs and constants."""
        if isinstance(atom, Const):
            return None
        i = self.producer.get(atom)
        return None if i is None else self.ops[i]

    def uses(self, var) -> int:
        """How many op inputs and program outputs read ``var``."""
        return len(self.consumers.get(var, ())) + sum(o is var for o in self.outputs)

    def evaluate(self, op_ids: Sequence[int], feeds: Mapping[Any, np.ndarray], dims: Mapping[str, int]) -> dict:
        """Runs ops ``op_ids`` (in program order) eagerly on concrete ``feeds`` with symbolic dims set to
        ``dims``; returns every computed Var's value. Used to verify pattern matches numerically."""
        env = dict(feeds)
        for i in sorted(op_ids):
            op = self.ops[i]
            args = [a.value if isinstance(a, Const) else env[a] for a in op.inputs]
            env.update(zip(op.outputs, run_op(op, args, dims)))
        return env


def run_op(op: Op, args: Sequence[np.ndarray], dims: Mapping[str, int] | None = None) -> list[np.ndarray]:
    """The outputs of ``op`` on concrete ``args`` (symbolic dims set to ``dims``): numpy for the primitives
    of :data:`_NUMPY`, else an eager ``bind`` (which compiles one XLA computation: slow)."""
    params = concrete_params(op.params, dims or {})
    impl = _NUMPY.get(op.name)
    if impl is not None:
        out = [impl(*args, **params)]
    else:
        out = op.prim.bind(*args, **params)
        out = out if op.prim.multiple_results else [out]
    return [np.asarray(o) for o in out]


def _dot_general(x, y, dimension_numbers, **_):
    """numpy dot_general via einsum: output axes are batch, lhs free, rhs free (as in lax)."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    xs, ys = [None] * x.ndim, [None] * y.ndim
    for i, j in zip(lb, rb):
        xs[i] = ys[j] = next(letters)
    for i, j in zip(lc, rc):
        xs[i] = ys[j] = next(letters)
    for k in range(x.ndim):
        xs[k] = xs[k] or next(letters)
    for k in range(y.ndim):
        ys[k] = ys[k] or next(letters)
    out = ([xs[i] for i in lb] + [xs[k] for k in range(x.ndim) if k not in lb and k not in lc]
           + [ys[k] for k in range(y.ndim) if k not in rb and k not in rc])
    return np.einsum(f"{''.join(xs)},{''.join(ys)}->{''.join(out)}", x, y)


def _broadcast_in_dim(x, shape, broadcast_dimensions, **_):
    expanded = np.reshape(x, [x.shape[broadcast_dimensions.index(i)] if i in broadcast_dimensions else 1
                              for i in range(len(shape))])
    return np.broadcast_to(expanded, shape)


def _select_n(pred, *cases):
    if pred.dtype == np.bool_:
        return np.where(pred, cases[1], cases[0])
    return np.choose(pred, cases)


# numpy versions of the primitives pattern verification runs (eager JAX compiles every op: slow).
_NUMPY = {
    "reshape": lambda x, new_sizes, **_: np.reshape(x, new_sizes),
    "transpose": lambda x, permutation, **_: np.transpose(x, permutation),
    "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": lambda x, dimensions, **_: np.squeeze(x, tuple(dimensions)),
    "expand_dims": lambda x, dimensions, **_: np.expand_dims(x, tuple(dimensions)),
    "dot_general": _dot_general,
    "convert_element_type": lambda x, new_dtype, **_: np.asarray(x).astype(new_dtype),
    "copy": lambda x, **_: x, "copy_p": lambda x, **_: x, "stop_gradient": lambda x, **_: x,
    "mul": lambda x, y, **_: np.multiply(x, y), "add": lambda x, y, **_: np.add(x, y),
    "sub": lambda x, y, **_: np.subtract(x, y), "neg": lambda x, **_: np.negative(x),
    "max": lambda x, y, **_: np.maximum(x, y), "min": lambda x, y, **_: np.minimum(x, y),
    "gt": lambda x, y, **_: np.greater(x, y), "ge": lambda x, y, **_: np.greater_equal(x, y),
    "lt": lambda x, y, **_: np.less(x, y), "le": lambda x, y, **_: np.less_equal(x, y),
    "eq": lambda x, y, **_: np.equal(x, y), "ne": lambda x, y, **_: np.not_equal(x, y),
    "not": lambda x, **_: np.logical_not(x) if x.dtype == np.bool_ else np.invert(x),
    "select_n": _select_n,
}


def is_static(d) -> bool:
    return not jax.export.is_symbolic_dim(d)


def dims_equal(a, b) -> bool:
    """Whether two (possibly symbolic) dimensions are provably equal."""
    try:
        return bool(a == b)
    except jex.core.InconclusiveDimensionOperation:
        return False


def evaluate_dim(d, dims: Mapping[str, Any]):
    """Value of a (possibly symbolic) dimension with the symbols bound to ``dims`` (ints or any objects
    supporting ``+`` and ``*``). JAX has no public evaluator for dimension expressions; this is the one
    private call of the package (jax pinned < 0.11)."""
    if is_static(d):
        return int(d)
    return d._evaluate(dict(dims))


def concrete_params(params: Mapping, dims: Mapping[str, int]) -> dict:
    """``params`` with every symbolic dimension replaced by its value under ``dims``."""

    def sub(x):
        if isinstance(x, tuple):
            return tuple(sub(y) for y in x)
        if isinstance(x, list):
            return [sub(y) for y in x]
        if jax.export.is_symbolic_dim(x):
            return int(evaluate_dim(x, dims))
        return x

    return {k: sub(v) for k, v in params.items()}


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k).strip(".[]'\""))
    return "/".join(parts)


def check_finite(variables) -> None:
    """Raises :class:`ExportError` naming every parameter holding NaN or inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) or a.dtype == jax.numpy.bfloat16:
            a32 = a.astype(np.float32)
            if not np.all(np.isfinite(a32)):
                bad.append(f"{_path_str(path)} ({int(np.sum(np.isnan(a32)))} NaN, "
                           f"{int(np.sum(np.isinf(a32)))} inf of {a.size})")
    if bad:
        raise ExportError("parameters with non-finite values cannot be exported: " + "; ".join(bad))


def default_axes(shape: tuple, dtype) -> tuple:
    """Default dynamic axes of an input: axis 0 ``batch``; for integer/bool inputs (ids, masks) axis 1
    ``sequence``; every other axis static (float inputs are usually [batch, features])."""
    ids_like = np.issubdtype(np.dtype(dtype), np.integer) or np.dtype(dtype) == np.bool_
    names = {0: "batch", 1: "sequence"} if ids_like else {0: "batch"}
    return tuple(names.get(i) for i in range(len(shape)))


def trace(
    fn: Callable,
    variables,
    inputs: Mapping[str, np.ndarray],
    input_axes: Mapping[str, tuple],
    dim_constraints: Sequence[str] = (),
    context: Callable[[], Any] | None = None,
) -> Program:
    """Traces ``fn(variables, **inputs)`` into a flat :class:`Program`.

    Args:
      fn: the function to export; its output is any pytree of arrays (``None`` leaves are dropped).
      variables: the variables pytree; every leaf becomes a :class:`Const` named by its path.
      inputs: name -> example array; only shapes and dtypes are used here.
      input_axes: name -> one dim name (``str``) or ``None`` per axis; named axes become symbolic.
      dim_constraints: JAX symbolic-shape constraints such as ``"sequence <= 512"``, needed when the
        function compares a dynamic size with a constant (e.g. a position-table bound check).
      context: optional context manager factory entered while tracing (module tagging for patterns).
    """
    names = list(inputs)
    dim_names = []
    for n in names:
        for d in input_axes[n]:
            if d is not None and d not in dim_names:
                dim_names.append(d)
    syms = {}
    if dim_names:
        try:
            sym_dims = jax.export.symbolic_shape(", ".join(dim_names), constraints=tuple(dim_constraints))
        except Exception as e:  # malformed constraint strings
            raise ExportError(f"bad dim_constraints {list(dim_constraints)}: {e}") from e
        syms = dict(zip(dim_names, sym_dims))
    specs = []
    for n in names:
        a = np.asarray(inputs[n])
        axes = input_axes[n]
        if len(axes) != a.ndim:
            raise ExportError(f"input {n!r}: {len(axes)} axis names {axes} for an array of shape {a.shape}")
        shape = tuple(syms[d] if d is not None else s for d, s in zip(axes, a.shape))
        specs.append(jax.ShapeDtypeStruct(shape, a.dtype))

    out_paths: list[str] = []

    def flat_fn(variables, *args):
        out = fn(variables, **dict(zip(names, args)))
        leaves = jax.tree_util.tree_flatten_with_path(out)[0]
        out_paths[:] = [_path_str(p) or "output" for p, _ in leaves]
        return [leaf for _, leaf in leaves]

    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(variables)
    param_paths = [_path_str(p) for p, _ in leaves_with_paths]
    param_values = [np.asarray(leaf) for _, leaf in leaves_with_paths]
    try:
        if context is None:
            closed = jax.make_jaxpr(flat_fn)(jax.tree_util.tree_unflatten(treedef, param_values), *specs)
        else:
            with context():
                closed = jax.make_jaxpr(flat_fn)(jax.tree_util.tree_unflatten(treedef, param_values), *specs)
    except jex.core.InconclusiveDimensionOperation as e:
        raise ExportError(
            f"the function compares or branches on a dynamic size ({', '.join(dim_names)}); declare its "
            f"range with dim_constraints, e.g. dim_constraints=('sequence <= 512',), or make that axis "
            f"static. JAX said: {str(e).splitlines()[0]}") from e
    except (jax.errors.ConcretizationTypeError, jax.errors.NonConcreteBooleanIndexError) as e:
        raise ExportError(f"the function has a data-dependent shape or Python control flow on traced "
                          f"values, which a static graph cannot express: {str(e).splitlines()[0]}") from e
    return flatten(closed, param_paths, param_values, names, [np.asarray(inputs[n]).dtype for n in names],
                   [tuple(input_axes[n]) for n in names], out_paths, tuple(dim_names))


def flatten(closed, param_paths, param_values, input_names, input_dtypes, input_axes, output_names,
            dim_names) -> Program:
    """Inlines every call-like sub-jaxpr of ``closed`` (params first, then inputs) into one op list."""
    jaxpr = closed.jaxpr
    n_params = len(param_paths)
    env: dict = {}
    for v, c in zip(jaxpr.constvars, closed.consts):
        env[v] = Const(np.asarray(c))
    for v, p, val in zip(jaxpr.invars[:n_params], param_paths, param_values):
        env[v] = Const(val, path=p)
    inputs = []
    for v in jaxpr.invars[n_params:]:
        env[v] = Var(v.aval)
        inputs.append(env[v])
    ops: list[Op] = []
    _inline(jaxpr, env, "", ops)
    outputs = [_read(env, a) for a in jaxpr.outvars]
    return Program(ops, inputs, list(input_names), list(input_dtypes), list(input_axes), outputs,
                   _unique(output_names), dim_names)


def flatten_body(closed, scope: str, dim_names: tuple[str, ...]) -> Program:
    """A loop body (``scan``'s ClosedJaxpr) as its own flat program; its inputs are fresh Vars."""
    jaxpr = closed.jaxpr
    env: dict = {v: Const(np.asarray(c)) for v, c in zip(jaxpr.constvars, closed.consts)}
    inputs = [Var(v.aval) for v in jaxpr.invars]
    env.update(zip(jaxpr.invars, inputs))
    ops: list[Op] = []
    _inline(jaxpr, env, scope, ops)
    outputs = [_read(env, a) for a in jaxpr.outvars]
    n_in, n_out = len(inputs), len(outputs)
    return Program(ops, inputs, [f"in_{i}" for i in range(n_in)], [np.dtype(v.aval.dtype) for v in inputs],
                   [(None,) * len(v.aval.shape) for v in inputs], outputs, [f"out_{i}" for i in range(n_out)],
                   dim_names)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        else:
            seen[n] = 0
        out.append(n)
    return out


def _read(env, atom):
    if isinstance(atom, jex.core.Literal):
        return Const(np.asarray(atom.val, dtype=atom.aval.dtype))
    return env[atom]


def _join(outer: str, inner: str) -> str:
    return "/".join(s for s in (outer, inner) if s)


def _inline(jaxpr, env: dict, scope: str, ops: list[Op]) -> None:
    for eqn in jaxpr.eqns:
        inner_scope = _join(scope, str(eqn.source_info.name_stack))
        args = [_read(env, a) for a in eqn.invars]
        key = _INLINE.get(eqn.primitive.name)
        if key is not None and key in eqn.params:
            sub = eqn.params[key]
            sub_jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
            sub_env = {v: Const(np.asarray(c)) for v, c in zip(sub_jaxpr.constvars, consts)}
            sub_env.update(zip(sub_jaxpr.invars, args))
            _inline(sub_jaxpr, sub_env, inner_scope, ops)
            for v, o in zip(eqn.outvars, sub_jaxpr.outvars):
                env[v] = _read(sub_env, o)
            continue
        outs = [Var(v.aval) for v in eqn.outvars]
        ops.append(Op(eqn.primitive, dict(eqn.params), args, outs, inner_scope))
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
