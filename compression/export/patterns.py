"""Whole-op emission: subgraphs of the program recognised and emitted as the canonical ONNX ops that
onnxruntime's fusers and TensorRT recognise.

* ``nn.LayerNorm`` -> ``LayerNormalization``. Flax module classes are not in the name stack, so while
  tracing, :class:`ModuleTags` wraps every ``nn.LayerNorm`` call in a named scope ``onnx_tag_ln<k>``
  (``flax.linen.intercept_methods``); the ops under that scope are one LayerNorm.
* softmax (``exp(x - max) / sum``, as ``jax.nn.softmax`` computes it) -> ``Softmax``.
* exact GELU (``0.5 x erfc(-x/sqrt2)`` or ``0.5 x (1 + erf(x/sqrt2))``) -> ``x/sqrt2 -> Erf -> +1 -> *x -> *0.5``,
  the subgraph onnxruntime fuses into Gelu/BiasGelu.
* multi-head attention -> BERT's canonical subgraph: per projection Reshape [0, 0, N, D] + Transpose;
  MatMul(Q, K^T); Div(1/scale); Add(mask); Softmax; MatMul(P, V); Transpose; Reshape [0, 0, N*D]. The mask
  ``where(m > 0, 0, c)`` becomes ``(1 - Cast(Unsqueeze(Unsqueeze(m > 0)))) * c``. Matching is structural
  (which ops connect the projections to the softmax and the context) and then *verified numerically*:
  the matched ops are run on random inputs and compared with the canonical formula, so an unusual
  formulation (grouped-query heads, a different scale) falls back to per-primitive lowering instead of
  producing a wrong graph.

A match claims the op that produces its last value; the ops it replaces are still lowered and then
removed as dead code, so values used elsewhere stay correct.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np

from compression.export.graph import Value, onnx_dtype
from compression.export.program import Const, Program, dims_equal, evaluate_dim, is_static

TAG_PREFIX = "onnx_tag_"
_LAYOUT = {"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "copy", "convert_element_type"}
_SQRT_HALF = 1.0 / math.sqrt(2.0)


@dataclasses.dataclass
class Match:
    """A recognised subgraph: ``emit(ctx)`` returns {var: Value} for the values it replaces."""

    kind: str
    root: int
    emit: Callable
    info: object = None  # what later matches build on (the softmax's input, output and axis)


class ModuleTags:
    """Tags Flax module calls while tracing so that whole modules can be recognised in the program."""

    def __init__(self):
        self.layernorms: dict[str, dict] = {}
        self._counter = itertools.count()

    def _interceptor(self, next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, nn.LayerNorm) and _last_axis_only(mod):
            tag = f"{TAG_PREFIX}ln{next(self._counter)}"
            self.layernorms[tag] = {"epsilon": float(mod.epsilon), "use_scale": bool(mod.use_scale),
                                    "use_bias": bool(mod.use_bias)}
            with jax.named_scope(tag):
                return next_fun(*args, **kwargs)
        return next_fun(*args, **kwargs)

    @contextlib.contextmanager
    def context(self):
        with nn.intercept_methods(self._interceptor):
            yield


def _last_axis_only(mod: nn.LayerNorm) -> bool:
    axes = lambda a: tuple(a) if isinstance(a, (tuple, list)) else (a,)
    return axes(mod.reduction_axes) == (-1,) and axes(mod.feature_axes) == (-1,)


def find(program: Program, tags: ModuleTags | None = None) -> dict[int, Match]:
    """All pattern matches in ``program``, keyed by the op index where each is emitted."""
    matches: dict[int, Match] = {}
    if tags is not None:
        for tag, info in tags.layernorms.items():
            m = _layernorm(program, tag, info)
            if m is not None:
                matches[m.root] = m
    softmaxes = []
    for i, op in enumerate(program.ops):
        if op.name == "div":
            m = _softmax(program, i)
            if m is not None:
                matches[i] = m
                softmaxes.append(m)
        elif op.name == "mul":
            m = _gelu(program, i)
            if m is not None:
                matches[i] = m
    mask_cache: dict = {}
    for sm in softmaxes:
        m = _attention(program, sm, mask_cache)
        if m is not None and m.root not in matches:
            matches[m.root] = m
    return matches


# -- helpers ---------------------------------------------------------------------------------------------


def _scalar_const(atom) -> float | None:
    if isinstance(atom, Const) and atom.value.size == 1:
        return float(np.asarray(atom.value, np.float64).reshape(()))
    return None


def _producer(prog: Program, atom, *names):
    op = prog.producer_op(atom)
    if op is None or (names and op.name not in names):
        return None
    return op


def _skip_aliases(prog: Program, atom, allow_max_inf: bool):
    """Back through ``stop_gradient``/``copy`` (and jax.nn.softmax's ``max(-inf, .)`` if allowed)."""
    while True:
        op = prog.producer_op(atom)
        if op is None:
            return atom
        if op.name in ("stop_gradient", "copy"):
            atom = op.inputs[0]
        elif op.name == "max" and allow_max_inf:
            c = [a for a in op.inputs if _scalar_const(a) == -np.inf]
            if len(c) != 1:
                return atom
            atom = next(a for a in op.inputs if a is not c[0])
        else:
            return atom


def _keepdims_reduction(prog: Program, atom, reduce: str, allow_max_inf: bool = False):
    """(reduction op, axis) when ``atom`` = ``reduce(x, axis)`` re-expanded with keepdims (a reshape or
    broadcast_in_dim inserting exactly the reduced axis as size 1); None otherwise."""
    op = prog.producer_op(_skip_aliases(prog, atom, allow_max_inf))
    if op is None or op.name not in ("broadcast_in_dim", "reshape"):
        return None
    src = op.inputs[0]
    if isinstance(src, Const):
        return None
    shape_in, shape_out = tuple(src.aval.shape), tuple(op.outputs[0].aval.shape)
    if len(shape_out) != len(shape_in) + 1:
        return None
    if op.name == "broadcast_in_dim":
        bd = tuple(op.params["broadcast_dimensions"])
        axes = [i for i in range(len(shape_out)) if i not in bd]
        if bd != tuple(i for i in range(len(shape_out)) if i not in axes):
            return None
    else:
        axes = [i for i in range(len(shape_out))
                if _shape_eq(shape_out[:i] + shape_out[i + 1:], shape_in)]
    axes = [a for a in axes if dims_equal(shape_out[a], 1)]
    red = prog.producer_op(_skip_aliases(prog, src, allow_max_inf))
    if red is None or red.name != reduce or len(red.params["axes"]) != 1:
        return None
    axis = int(red.params["axes"][0])
    return (red, axis) if axis in axes else None


def _close(a: float, b: float, tol: float = 1e-6) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


def _shape_eq(a, b) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


# -- LayerNorm -------------------------------------------------------------------------------------------


def _layernorm(prog: Program, tag: str, info: dict) -> Match | None:
    ids = [i for i, op in enumerate(prog.ops) if tag in op.scope.split("/")]
    if not ids:
        return None
    inside = set(ids)
    produced = {v for i in ids for v in prog.ops[i].outputs}
    ext, seen = [], set()
    for i in ids:
        for a in prog.ops[i].inputs:
            if a not in produced and id(a) not in seen and not (isinstance(a, Const) and a.value.ndim == 0):
                seen.add(id(a))
                ext.append(a)
    outs = [v for v in produced if prog.uses(v) and (any(c not in inside for c in prog.consumers.get(v, ()))
                                                     or any(o is v for o in prog.outputs))]
    if len(outs) != 1:
        return None
    out = outs[0]
    shape = tuple(out.aval.shape)
    xs = [a for a in ext if _shape_eq(tuple(a.shape if isinstance(a, Const) else a.aval.shape), shape)]
    params = [a for a in ext if a not in xs]
    feat = shape[-1]
    want = int(info["use_scale"]) + int(info["use_bias"])
    if len(xs) != 1 or len(params) != want:
        return None
    for p in params:
        pshape = p.shape if isinstance(p, Const) else p.aval.shape
        if len(pshape) != 1 or not dims_equal(pshape[0], feat):
            return None
    x = xs[0]
    scale = params[0] if info["use_scale"] else None
    bias = params[-1] if info["use_bias"] else None
    root = max(ids)
    if prog.producer[out] != root:
        return None

    def emit(ctx):
        g = ctx.graph
        xv = ctx.value(x)
        dt = xv.dtype

        def param(atom, fill):
            if atom is None:
                return ctx.const(np.full((int(feat),), fill, dt))
            v = ctx.value(atom)
            return g.op("Cast", [v], to=onnx_dtype(dt)) if v.dtype != dt else ctx.name(v)

        y = g.op("LayerNormalization", [xv, param(scale, 1), param(bias, 0)], axis=-1,
                 epsilon=info["epsilon"], stash_type=1)
        out_dt = np.dtype(out.aval.dtype)
        if out_dt != dt:
            y = g.op("Cast", [y], to=onnx_dtype(out_dt))
        return {out: Value(y, shape, out_dt)}

    return Match("LayerNormalization", root, emit)


# -- softmax ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _SoftmaxInfo:
    x: object
    out: object
    axis: int


def _softmax(prog: Program, i: int) -> Match | None:
    div = prog.ops[i]
    e_var, s_b = div.inputs
    exp = _producer(prog, e_var, "exp")
    if exp is None:
        return None
    sub = _producer(prog, exp.inputs[0], "sub")
    if sub is None:
        return None
    x = sub.inputs[0]
    found_max = _keepdims_reduction(prog, sub.inputs[1], "reduce_max", allow_max_inf=True)
    found_sum = _keepdims_reduction(prog, s_b, "reduce_sum")
    if found_max is None or found_sum is None:
        return None
    (red_max, axis), (red_sum, axis_sum) = found_max, found_sum
    if red_max.inputs[0] is not x or red_sum.inputs[0] is not e_var or axis != axis_sum:
        return None
    out = div.outputs[0]
    info = _SoftmaxInfo(x, out, axis)

    def emit(ctx):
        y = ctx.graph.op("Softmax", [ctx.value(x)], axis=axis)
        return {out: Value(y, tuple(out.aval.shape), np.dtype(out.aval.dtype))}

    return Match("Softmax", i, emit, info)


# -- GELU ------------------------------------------------------------------------------------------------


def _factors(prog: Program, atom, top: bool = True):
    """Multiplicative factors of ``atom``: (constant coefficient, list of non-constant atoms). Descends
    through mul/neg/div-by-constant ops whose result is used once (the pattern's own intermediates)."""
    c = _scalar_const(atom)
    if c is not None:
        return c, []
    op = prog.producer_op(atom)
    if op is None or (not top and prog.uses(atom) != 1):
        return 1.0, [atom]
    if op.name == "mul":
        c1, f1 = _factors(prog, op.inputs[0], False)
        c2, f2 = _factors(prog, op.inputs[1], False)
        return c1 * c2, f1 + f2
    if op.name == "neg":
        c1, f1 = _factors(prog, op.inputs[0], False)
        return -c1, f1
    if op.name == "div" and _scalar_const(op.inputs[1]) is not None:
        c1, f1 = _factors(prog, op.inputs[0], False)
        return c1 / _scalar_const(op.inputs[1]), f1
    return 1.0, [atom]


def _linear_in(prog: Program, atom, x) -> float | None:
    """k when ``atom`` = k * x through scalar mul/neg/div ops, else None."""
    c, f = _factors(prog, atom, False) if prog.uses(atom) == 1 else (None, None)
    if c is None or len(f) != 1 or f[0] is not x:
        return None
    return c


def _gelu(prog: Program, i: int) -> Match | None:
    root = prog.ops[i]
    c, fs = _factors(prog, root.outputs[0])
    if len(fs) != 2:
        return None
    for x, e in (fs, fs[::-1]):
        op = prog.producer_op(e)
        if op is None or prog.uses(e) != 1:
            continue
        if op.name == "erfc":
            k = _linear_in(prog, op.inputs[0], x)
            ok = k is not None and _close(k, -_SQRT_HALF) and _close(c, 0.5)
        elif op.name == "add":
            one = [a for a in op.inputs if _scalar_const(a) is not None]
            rest = [a for a in op.inputs if _scalar_const(a) is None]
            erf = _producer(prog, rest[0], "erf") if len(one) == 1 and len(rest) == 1 else None
            k = _linear_in(prog, erf.inputs[0], x) if erf is not None and prog.uses(rest[0]) == 1 else None
            ok = (k is not None and _close(_scalar_const(one[0]), 1.0) and _close(k, _SQRT_HALF)
                  and _close(c, 0.5))
        else:
            ok = False
        if ok:
            out = root.outputs[0]

            def emit(ctx, x=x, out=out):
                g = ctx.graph
                xv = ctx.value(x)
                dt = xv.dtype
                erf = g.op("Erf", [g.op("Div", [xv, ctx.const(np.sqrt(2.0), dt)])])
                y = g.op("Mul", [g.op("Mul", [xv, g.op("Add", [erf, ctx.const(1.0, dt)])]), ctx.const(0.5, dt)])
                return {out: Value(y, tuple(out.aval.shape), np.dtype(out.aval.dtype))}

            return Match("Gelu", i, emit)
    return None


# -- attention -------------------------------------------------------------------------------------------


def _cone(prog: Program, var, allowed: set, is_leaf) -> tuple[set, list] | None:
    """Ops computing ``var`` back to leaves (``is_leaf`` atoms, inputs); None if an op outside
    ``allowed`` is on the way. Returns (op indices, non-constant leaves in discovery order)."""
    ops, leaves, stack, seen = set(), [], [var], set()
    while stack:
        a = stack.pop()
        if isinstance(a, Const) or id(a) in seen:
            continue
        seen.add(id(a))
        if a is not var and is_leaf(a):
            leaves.append(a)
            continue
        i = prog.producer.get(a)
        if i is None:
            leaves.append(a)
            continue
        op = prog.ops[i]
        if op.name not in allowed:
            return None
        ops.add(i)
        stack.extend(op.inputs)
    return ops, leaves


def _dims_env(prog: Program) -> dict:
    return {d: 2 + k for k, d in enumerate(prog.dim_names)}


def _concrete(shape, dims) -> tuple:
    return tuple(int(evaluate_dim(d, dims)) for d in shape)


def _attention(prog: Program, sm: Match, mask_cache: dict) -> Match | None:
    info: _SoftmaxInfo = sm.info
    a_var, p_var = info.x, info.out
    a_shape = tuple(a_var.aval.shape)
    if len(a_shape) != 4 or info.axis != 3 or not is_static(a_shape[1]):
        return None
    add = _producer(prog, a_var, "add")
    if add is None:
        return None
    b, n, sq, sk = a_shape
    n = int(n)
    f32 = np.dtype(np.float32)

    def proj_leaf(a):
        s = a.aval.shape
        return len(s) == 3 and dims_equal(s[0], b) and (dims_equal(s[1], sq) or dims_equal(s[1], sk))

    for s_var, m_var in (add.inputs, add.inputs[::-1]):
        if isinstance(s_var, Const):
            continue
        cone = _cone(prog, s_var, _LAYOUT | {"dot_general", "mul", "div"}, proj_leaf)
        if cone is None:
            continue
        s_ops, leaves = cone
        if len(leaves) != 2 or sum(prog.ops[i].name == "dot_general" for i in s_ops) != 1:
            continue
        verified = _verify_scores(prog, s_ops, leaves, s_var, n)
        if verified is None:
            continue
        q_var, k_var, scale, d = verified
        ctx_found = _find_context(prog, p_var, n, d, b, sq, sk)
        if ctx_found is None:
            return None
        v_var, c_var, c_root = ctx_found
        if any(np.dtype(v.aval.dtype) != f32 for v in (q_var, k_var, v_var, s_var, p_var, c_var)):
            return None
        mask = _mask(prog, m_var, b, sk, mask_cache)
        root = c_root

        def emit(ctx, q_var=q_var, k_var=k_var, v_var=v_var, s_var=s_var, m_var=m_var, c_var=c_var,
                 scale=scale, d=d, mask=mask):
            g = ctx.graph
            heads = ctx.const(np.array([0, 0, n, d], np.int64))

            def split_heads(var, perm):
                return g.op("Transpose", [g.op("Reshape", [ctx.value(var), heads])], perm=perm)

            qt = split_heads(q_var, [0, 2, 1, 3])
            kt = split_heads(k_var, [0, 2, 3, 1])
            # Div (not Mul): onnxruntime's fuser takes the first Mul parent of the mask Add as the mask.
            scores = g.op("Div", [g.op("MatMul", [qt, kt]), ctx.const(np.float32(1.0 / scale))])
            mask_v = mask(ctx) if mask is not None else ctx.value(m_var)
            logits = g.op("Add", [scores, mask_v])
            probs = g.op("Softmax", [logits], axis=-1)
            vt = split_heads(v_var, [0, 2, 1, 3])
            c = g.op("Transpose", [g.op("MatMul", [probs, vt])], perm=[0, 2, 1, 3])
            c = g.op("Reshape", [c, ctx.const(np.array([0, 0, n * d], np.int64))])
            return {
                s_var: Value(scores, tuple(s_var.aval.shape), f32),
                a_var: Value(logits, a_shape, f32),
                p_var: Value(probs, a_shape, f32),
                c_var: Value(c, tuple(c_var.aval.shape), f32),
            }

        return Match("Attention", root, emit)
    return None


def _verify_scores(prog, s_ops, leaves, s_var, n):
    """(q, k, scale, head_dim) when the ops compute scale * einsum('bihd,bjhd->bhij') of the two leaves."""
    dims = _dims_env(prog)
    rng = np.random.default_rng(0)
    for q, k in (leaves, leaves[::-1]):
        hq, hk = q.aval.shape[2], k.aval.shape[2]
        if not (is_static(hq) and is_static(hk)) or int(hq) != int(hk) or int(hq) % n:
            return None
        d = int(hq) // n
        qa = rng.standard_normal(_concrete(q.aval.shape, dims)).astype(np.float32)
        ka = rng.standard_normal(_concrete(k.aval.shape, dims)).astype(np.float32)
        try:
            got = prog.evaluate(s_ops, {q: qa, k: ka}, dims)[s_var].astype(np.float64)
        except Exception:  # noqa: BLE001  (ops that cannot run on these inputs are not the pattern)
            return None
        bq, sq = qa.shape[:2]
        ref = np.einsum("bihd,bjhd->bhij", qa.reshape(bq, sq, n, d), ka.reshape(ka.shape[0], ka.shape[1], n, d))
        if got.shape != ref.shape:
            continue
        scale = float(np.sum(got * ref) / np.sum(ref * ref))
        if scale > 0 and np.max(np.abs(got - scale * ref)) <= 1e-5 * np.max(np.abs(got)) + 1e-6:
            return q, k, scale, d
    return None


def _find_context(prog, p_var, n, d, b, sq, sk):
    """(v, context, root op index) when P flows through one dot_general with a projection V into a
    context [B, Sq, N*D] = einsum('bhij,bjhd->bihd', P, V) reshaped."""
    frontier, reached = [p_var], None
    seen = set()
    while frontier and reached is None:
        var = frontier.pop()
        for i in prog.consumers.get(var, ()):
            op = prog.ops[i]
            if op.name == "dot_general":
                reached = i
                break
            if op.name in _LAYOUT and i not in seen:
                seen.add(i)
                frontier.extend(op.outputs)
    if reached is None:
        return None
    dg = prog.ops[reached]
    # forward along a single-consumer layout chain to the first [B, Sq, N*D] value
    var = dg.outputs[0]
    while not (len(var.aval.shape) == 3 and dims_equal(var.aval.shape[0], b) and dims_equal(var.aval.shape[1], sq)):
        cons = prog.consumers.get(var, [])
        if len(cons) != 1 or prog.ops[cons[0]].name not in _LAYOUT or any(o is var for o in prog.outputs):
            return None
        var = prog.ops[cons[0]].outputs[0]
    c_var = var
    if not (is_static(c_var.aval.shape[2]) and int(c_var.aval.shape[2]) == n * d):
        return None

    def v_leaf(a):
        s = a.aval.shape
        return a is p_var or (len(s) == 3 and dims_equal(s[0], b) and dims_equal(s[1], sk))

    cone = _cone(prog, c_var, _LAYOUT | {"dot_general"}, v_leaf)
    if cone is None:
        return None
    ops, leaves = cone
    vs = [a for a in leaves if a is not p_var]
    if len(vs) != 1 or not any(a is p_var for a in leaves) or sum(prog.ops[i].name == "dot_general" for i in ops) != 1:
        return None
    v = vs[0]
    if not (is_static(v.aval.shape[2]) and int(v.aval.shape[2]) == n * d):
        return None
    dims = _dims_env(prog)
    rng = np.random.default_rng(1)
    pa = rng.random(_concrete(p_var.aval.shape, dims)).astype(np.float32)
    va = rng.standard_normal(_concrete(v.aval.shape, dims)).astype(np.float32)
    try:
        got = prog.evaluate(ops, {p_var: pa, v: va}, dims)[c_var]
    except Exception:  # noqa: BLE001  (ops that cannot run on these inputs are not the pattern)
        return None
    bb, ss = va.shape[:2]
    ref = np.einsum("bhij,bjhd->bihd", pa, va.reshape(bb, ss, n, d)).reshape(bb, pa.shape[2], n * d)
    if got.shape != ref.shape or np.max(np.abs(got - ref)) > 1e-5 * np.max(np.abs(ref)) + 1e-6:
        return None
    return v, c_var, max(ops)


def _mask(prog: Program, m_var, b, sk, cache: dict):
    """An emitter of the BERT mask subgraph when ``m_var`` [B, 1, 1, Sk] = where(x > 0, 0, c), c < 0, for a
    2-D [B, Sk] value x; None otherwise (the mask is then lowered as traced)."""
    if isinstance(m_var, Const):
        return None
    if id(m_var) in cache:
        return cache[id(m_var)]
    cache[id(m_var)] = None
    s = m_var.aval.shape
    if len(s) != 4 or not all(dims_equal(got, want) for got, want in zip(s, (b, 1, 1, sk))):
        return None
    allowed = _LAYOUT | {"gt", "ge", "lt", "le", "eq", "ne", "select_n", "sub", "mul", "add", "neg", "not"}

    def leaf(a):
        sh = a.aval.shape
        return len(sh) == 2 and dims_equal(sh[0], b) and dims_equal(sh[1], sk)

    cone = _cone(prog, m_var, allowed, leaf)
    if cone is None or len(cone[1]) != 1 or not leaf(cone[1][0]):
        return None
    ops, (x_var,) = cone
    dims = _dims_env(prog)
    shape = _concrete(x_var.aval.shape, dims)
    dt = np.dtype(x_var.aval.dtype)
    vals = np.array([0, 1, 2, -1, 3, 0], dtype=np.float64) if dt != np.bool_ else np.array([0, 1, 1, 0])
    xa = np.resize(vals, shape).astype(dt)
    if not np.any(xa == 0) or not np.any(xa > 0):
        return None
    try:
        got = prog.evaluate(ops, {x_var: xa}, dims)[m_var].reshape(shape)
    except Exception:  # noqa: BLE001  (ops that cannot run on these inputs are not the pattern)
        return None
    fill = got[xa == 0].ravel()
    c = float(fill[0])
    if not np.isfinite(c) or c >= 0 or np.any(fill != c) or np.any(got[xa > 0] != 0) or np.any(got[xa < 0] != c):
        return None

    emitted = {}

    def emit(ctx):
        if "value" not in emitted:
            g = ctx.graph
            xv = ctx.value(x_var)
            zero = ctx.const(np.zeros((), xv.dtype)) if xv.dtype != np.bool_ else None
            keep = g.op("Greater", [xv, zero]) if zero is not None else ctx.name(xv)
            keep = g.op("Cast", [keep], to=onnx_dtype(np.int64))
            u = g.op("Unsqueeze", [g.op("Unsqueeze", [keep, ctx.const(np.array([1], np.int64))]),
                                   ctx.const(np.array([2], np.int64))])
            f = g.op("Cast", [u], to=onnx_dtype(np.float32))
            neg = g.op("Sub", [ctx.const(np.float32(1.0)), f])
            emitted["value"] = Value(g.op("Mul", [neg, ctx.const(np.float32(c))]), tuple(s), np.dtype(np.float32))
        return emitted["value"]

    if np.dtype(m_var.aval.dtype) != np.float32:
        return None
    cache[id(m_var)] = emit
    return emit
