"""Per-primitive lowering rules: small JAX functions converted to ONNX and run in onnxruntime, checked
against numpy references worked out independently (and at sizes other than the traced ones)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from jax import lax

from compression.export import convert, trace

RNG = np.random.default_rng(0)


def lower(fn, inputs, axes=None):
    """ONNX model of ``fn(**inputs)``; ``axes``: input name -> dim names (None: all static)."""
    axes = axes or {n: (None,) * np.ndim(a) for n, a in inputs.items()}
    prog = trace(lambda v, **kw: fn(**kw), {}, inputs, axes)
    model = convert(prog)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


ERFC = np.vectorize(math.erfc)

ELEMENTWISE = [
    ("erfc", lax.erfc, lambda x: ERFC(x)),
    ("rsqrt", lambda x: lax.rsqrt(jnp.abs(x) + 1), lambda x: 1 / np.sqrt(np.abs(x) + 1)),
    ("cube", lambda x: x ** 3, lambda x: x * x * x),
    ("inverse_square", lambda x: lax.integer_pow(x, -2), lambda x: 1 / (x * x)),
    ("sigmoid", jax.nn.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    ("clamp", lambda x: jnp.clip(x, -0.5, 0.5), lambda x: np.minimum(np.maximum(x, -0.5), 0.5)),
    ("leaky", lambda x: jnp.where(x > 0, x, 0.1 * x), lambda x: np.where(x > 0, x, 0.1 * x)),
    ("log1p_exp", lambda x: jnp.log1p(jnp.exp(x)), lambda x: np.log(1 + np.exp(x))),
    ("round_even", lambda x: jnp.round(4 * x), lambda x: np.round(4 * x)),
    ("tanh_minus", lambda x: jnp.tanh(x) - jnp.maximum(x, 0.3), lambda x: np.tanh(x) - np.maximum(x, 0.3)),
]


@pytest.mark.parametrize("name,fn,ref", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_elementwise(name, fn, ref):
    x = randn(3, 4) + np.float32(0.05)
    (got,) = run(lower(lambda x: fn(x), {"x": x}), {"x": x})
    np.testing.assert_allclose(got, ref(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_reductions_and_argmax():
    x = randn(3, 5)
    model = lower(lambda x: (x.sum(1), x.max(0), jnp.argmax(x, -1), (x > 1).any(1), x.min()), {"x": x})
    s, m, a, any_, mn = run(model, {"x": x})
    np.testing.assert_allclose(s, x.sum(1), rtol=1e-6)
    np.testing.assert_array_equal(m, x.max(0))
    np.testing.assert_array_equal(a, x.argmax(-1))
    assert a.dtype == np.int32
    np.testing.assert_array_equal(any_, (x > 1).any(1))
    np.testing.assert_array_equal(mn, x.min())


def test_reshape_transpose_at_other_batch_sizes():
    x = randn(2, 6)
    model = lower(lambda x: x.reshape(x.shape[0], 2, 3).transpose(0, 2, 1) * 2, {"x": x}, {"x": ("batch", None)})
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    for b in (1, 5):
        y = randn(b, 6)
        np.testing.assert_allclose(run(model, {"x": y})[0], y.reshape(b, 2, 3).transpose(0, 2, 1) * 2)


def test_merged_dynamic_axes_and_iota():
    # [batch, sequence, 4] -> [batch*sequence, 4] -> per-row sums + position index
    x = randn(2, 3, 4)
    fn = lambda x: x.reshape(-1, 4).sum(1).reshape(x.shape[0], x.shape[1]) + jnp.arange(x.shape[1])
    model = lower(fn, {"x": x}, {"x": ("batch", "sequence", None)})
    for b, s in ((3, 5), (1, 1)):
        y = randn(b, s, 4)
        np.testing.assert_allclose(run(model, {"x": y})[0], y.sum(2) + np.arange(s), rtol=1e-5, atol=1e-6)


def test_slices():
    x = randn(4, 6)
    model = lower(lambda x: (x[:, 1:5:2], lax.dynamic_slice(x, (1, 4), (2, 3)), jnp.flip(x, 1),
                             jnp.pad(x, ((1, 0), (0, 2)), constant_values=7.0)), {"x": x})
    strided, dyn, flipped, padded = run(model, {"x": x})
    np.testing.assert_array_equal(strided, x[:, 1:5:2])
    np.testing.assert_array_equal(dyn, x[1:3, 3:6])  # start 4 clamped to 6 - 3, as XLA does
    np.testing.assert_array_equal(flipped, x[:, ::-1])
    np.testing.assert_array_equal(padded, np.pad(x, ((1, 0), (0, 2)), constant_values=7.0))


def test_dynamic_slice_with_runtime_start_is_clamped():
    x = randn(3, 8)
    model = lower(lambda x, i: lax.dynamic_slice_in_dim(x, i[0], 3, axis=1), {"x": x, "i": np.array([2], np.int32)})
    # jnp wraps a negative start once (-4 -> 4), then XLA clamps into [0, 8 - 3]
    for start, expect in ((2, 2), (7, 5), (-4, 4), (-20, 0)):
        (got,) = run(model, {"x": x, "i": np.array([start], np.int32)})
        np.testing.assert_array_equal(got, x[:, expect:expect + 3])


def test_concat_split_stack():
    x, y = randn(2, 3), randn(2, 5)
    model = lower(lambda x, y: (*jnp.split(jnp.concatenate([x, y], 1), [2, 6], axis=1), jnp.stack([x, x * 2], 1)),
                  {"x": x, "y": y})
    a, b, c, st = run(model, {"x": x, "y": y})
    xy = np.concatenate([x, y], 1)
    np.testing.assert_array_equal(a, xy[:, :2])
    np.testing.assert_array_equal(b, xy[:, 2:6])
    np.testing.assert_array_equal(c, xy[:, 6:])
    np.testing.assert_array_equal(st, np.stack([x, x * 2], 1))


def test_gathers():
    table = randn(7, 3)
    ids = np.array([[0, 6, -1], [2, -7, 3]], np.int32)
    cols = np.array([2, 0, 0, 1], np.int32)
    model = lower(lambda t, i, c: (t[i], jnp.take(t, c, axis=1)), {"t": table, "i": ids, "c": cols})
    rows, taken = run(model, {"t": table, "i": ids, "c": cols})
    np.testing.assert_array_equal(rows, table[ids])  # numpy wraps negative ids like jnp
    np.testing.assert_array_equal(taken, table[:, cols])


def test_batched_contractions():
    a, b = randn(2, 3, 4), randn(2, 4, 5)
    q, k = randn(2, 3, 2, 4), randn(2, 5, 2, 4)
    model = lower(lambda a, b, q, k: (a @ b, jnp.einsum("bqhd,bkhd->bhqk", q, k), jnp.einsum("bij,bij->b", a, a)),
                  {"a": a, "b": b, "q": q, "k": k})
    mm, att, sq = run(model, {"a": a, "b": b, "q": q, "k": k})
    np.testing.assert_allclose(mm, np.einsum("bij,bjk->bik", a, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att, np.einsum("bqhd,bkhd->bhqk", q, k), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sq, (a * a).sum((1, 2)), rtol=1e-5)


def test_conv_nwc_same_padding():
    x, w = randn(2, 6, 3), randn(3, 3, 4)  # NWC input, WIO kernel
    fn = lambda x, w: lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    (got,) = run(lower(fn, {"x": x, "w": w}), {"x": x, "w": w})
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    ref = np.stack([np.einsum("bkc,kco->bo", xp[:, t:t + 3], w) for t in range(6)], 1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_becomes_loop_at_any_length(reverse):
    def fn(x):  # x [sequence, batch]: running product and running max as carry, ys the products
        def step(carry, xt):
            prod, mx = carry
            prod = prod * xt
            return (prod, jnp.maximum(mx, xt)), prod
        (p, m), ys = lax.scan(step, (jnp.ones(x.shape[1]), jnp.full(x.shape[1], -jnp.inf)), x, reverse=reverse)
        return p, m, ys

    x = randn(4, 3)
    model = lower(fn, {"x": x}, {"x": ("sequence", "batch")})
    assert [n.op_type for n in model.graph.node].count("Loop") == 1
    for s, b in ((4, 3), (6, 2), (1, 1)):
        y = randn(s, b)
        order = y[::-1] if reverse else y
        ys = np.cumprod(order, 0)
        p, m, got_ys = run(model, {"x": y})
        np.testing.assert_allclose(p, ys[-1], rtol=1e-5)
        np.testing.assert_array_equal(m, y.max(0))
        np.testing.assert_allclose(got_ys, ys[::-1] if reverse else ys, rtol=1e-5)


def test_outputs_named_by_pytree_path_with_symbolic_dims():
    x = randn(2, 3)
    model = lower(lambda x: {"double": x * 2, "pair": (x.sum(1), x[:, 0])}, {"x": x}, {"x": ("batch", None)})
    names = [o.name for o in model.graph.output]
    assert names == ["double", "pair/0", "pair/1"]
    assert model.graph.output[1].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_aliased_and_constant_outputs():
    x = randn(2, 3)
    model = lower(lambda x: (jnp.tanh(x), jnp.tanh(x), x, jnp.arange(3)), {"x": x})
    a, b, same, const = run(model, {"x": x})
    np.testing.assert_allclose(a, np.tanh(x), rtol=1e-6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(const, np.arange(3))


@pytest.mark.parametrize("opset", [18, 20])
def test_newer_opsets(opset):
    x = randn(3, 4)
    prog = trace(lambda v, x: (x.max(1), jax.nn.softmax(x, -1).sum(0), x.min(0)), {}, {"x": x}, {"x": ("batch", None)})
    model = convert(prog, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    mx, sm, mn = run(model, {"x": x})
    np.testing.assert_array_equal(mx, x.max(1))
    np.testing.assert_allclose(sm, (np.exp(x) / np.exp(x).sum(1, keepdims=True)).sum(0), rtol=1e-5)
    np.testing.assert_array_equal(mn, x.min(0))


def test_custom_derivatives_and_remat_are_inlined():
    @jax.custom_jvp
    def softplus(x):
        return jnp.log1p(jnp.exp(x))

    softplus.defjvp(lambda primals, tangents: (softplus(primals[0]), tangents[0] * jax.nn.sigmoid(primals[0])))

    @jax.custom_vjp
    def clip_grad(x):
        return x * 2

    clip_grad.defvjp(lambda x: (x * 2, None), lambda _, g: (jnp.clip(g, -1, 1),))
    fn = jax.checkpoint(lambda x: jax.jit(lambda y: clip_grad(softplus(y)))(x) + jax.nn.relu(x))
    x = randn(2, 3)
    model = lower(fn, {"x": x})
    assert {n.op_type for n in model.graph.node}.isdisjoint({"Function", "Loop", "If"})
    np.testing.assert_allclose(run(model, {"x": x})[0], 2 * np.log1p(np.exp(x)) + np.maximum(x, 0), rtol=1e-6)


@pytest.mark.parametrize("fn", [lambda x: x[x > 0], lambda x: jnp.nonzero(x)[0]], ids=["bool_index", "nonzero"])
def test_data_dependent_shapes_are_a_clear_error(fn):
    from compression.export import ExportError
    with pytest.raises(ExportError, match="data-dependent shape"):
        lower(fn, {"x": randn(2, 3)})
