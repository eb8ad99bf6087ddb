"""Whole-op emission: LayerNormalization, Softmax, exact GELU and BERT attention, checked on the graph
and against independent numpy formulas; unusual formulations fall back to per-primitive lowering."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from compression.export import convert, patterns, trace
from tests.compression.export.conftest import CONSTRAINTS, batch, jax_outputs, make_model

ERF = np.vectorize(math.erf)


def _lower(fn, variables, inputs, axes, constraints=()):
    tags = patterns.ModuleTags()
    prog = trace(fn, variables, inputs, axes, constraints, context=tags.context)
    model = convert(prog, tags=tags)
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model, feeds):
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(model):
    return [n.op_type for n in model.graph.node]


class _NormGelu(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(epsilon=1e-3, name="norm")(x)
        return jax.nn.softmax(nn.gelu(h, approximate=False), axis=1)


def test_layernorm_gelu_softmax_are_whole_ops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    net = _NormGelu()
    variables = jax.tree.map(np.asarray, net.init(jax.random.key(0), x))
    variables["params"]["norm"]["scale"] = rng.standard_normal(5).astype(np.float32)
    variables["params"]["norm"]["bias"] = rng.standard_normal(5).astype(np.float32)
    model = _lower(net.apply, variables, {"x": x}, {"x": ("batch", "sequence", None)})
    ops = _ops(model)
    assert ops == ["LayerNormalization", "Div", "Erf", "Add", "Mul", "Mul", "Softmax"]
    ln = model.graph.node[0]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in ln.attribute}["epsilon"] == pytest.approx(1e-3)
    assert list(ln.input[1:]) == ["params/norm/scale", "params/norm/bias"]
    assert onnx.helper.get_attribute_value(model.graph.node[-1].attribute[0]) == 1  # softmax axis

    y = rng.standard_normal((3, 4, 5)).astype(np.float32)  # other batch and sequence sizes
    (got,) = _run(model, {"x": y})
    p = variables["params"]["norm"]
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    h = (y - mu) / np.sqrt(var + 1e-3) * p["scale"] + p["bias"]
    g = 0.5 * h * (1 + ERF(h / math.sqrt(2)))
    e = np.exp(g - g.max(1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_gelu_erf_form_and_non_gelu_product():
    # 0.5 * x * (1 + erf(x / sqrt2)) is GELU; 0.5 * x * (1 + erf(x / 2)) is not and stays as traced.
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(2, 6)
    gelu = _lower(lambda v, x: x * 0.5 * (1 + jax.lax.erf(x / np.float32(math.sqrt(2)))), {}, {"x": x},
                  {"x": (None, None)})
    other = _lower(lambda v, x: 0.5 * x * (1 + jax.lax.erf(x / 2)), {}, {"x": x}, {"x": (None, None)})
    assert _ops(gelu) == ["Div", "Erf", "Add", "Mul", "Mul"]
    div = gelu.graph.node[0]
    assert onnx.numpy_helper.to_array(next(t for t in gelu.graph.initializer if t.name == div.input[1])) == \
        pytest.approx(math.sqrt(2))
    np.testing.assert_allclose(_run(other, {"x": x})[0], 0.5 * x * (1 + ERF(x / 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_run(gelu, {"x": x})[0], 0.5 * x * (1 + ERF(x / math.sqrt(2))), rtol=1e-6, atol=1e-6)


def _parent(model, name):
    return next((n for n in model.graph.node if name in n.output), None)


def test_attention_is_the_canonical_bert_subgraph():
    model, variables = make_model(num_layers=2)
    onnx_model = _lower(model.apply, variables, batch(2, 5), {k: ("batch", "sequence") for k in batch(2, 5)},
                        CONSTRAINTS)
    softmaxes = [n for n in onnx_model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 2
    for sm in softmaxes:
        add = _parent(onnx_model, sm.input[0])
        assert add.op_type == "Add"
        div, mask_mul = (_parent(onnx_model, i) for i in add.input)
        assert div.op_type == "Div" and _parent(onnx_model, div.input[0]).op_type == "MatMul"
        chain, node = [], mask_mul
        for _ in range(5):
            chain.append(node.op_type)
            node = _parent(onnx_model, node.input[1] if node.op_type == "Sub" else node.input[0])
        assert chain == ["Mul", "Sub", "Cast", "Unsqueeze", "Unsqueeze"]
        qk = _parent(onnx_model, div.input[0])
        q_t, k_t = (_parent(onnx_model, i) for i in qk.input)
        perms = [onnx.helper.get_attribute_value(t.attribute[0]) for t in (q_t, k_t)]
        assert perms == [[0, 2, 1, 3], [0, 2, 3, 1]]
        assert all(_parent(onnx_model, t.input[0]).op_type == "Reshape" for t in (q_t, k_t))
    # the mask subgraph is shared by both layers
    assert _ops(onnx_model).count("Sub") == 1


def test_mask_semantics_kept_for_non_binary_masks():
    model, variables = make_model()
    onnx_model = _lower(model.apply, variables, batch(2, 5), {k: ("batch", "sequence") for k in batch(2, 5)},
                        CONSTRAINTS)
    feeds = batch(3, 6, seed=3)
    feeds["attention_mask"] = np.array([[2, 1, 0, -1, 1, 0], [0, 5, 1, 1, -3, 1], [1, 1, 1, 1, 1, 1]], np.int32)
    for got, want in zip(_run(onnx_model, feeds), jax_outputs(model, variables, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_grouped_query_attention_falls_back_and_stays_exact():
    model, variables = make_model(num_heads=4, num_kv_heads=2)
    onnx_model = _lower(model.apply, variables, batch(2, 5), {k: ("batch", "sequence") for k in batch(2, 5)},
                        CONSTRAINTS)
    # no canonical Div-scaled scores: grouped heads are lowered per primitive
    assert "Div" not in [_parent(onnx_model, n.input[0]).op_type for n in onnx_model.graph.node
                         if n.op_type == "Add" and any(c.op_type == "Softmax" and c.input[0] == n.output[0]
                                                       for c in onnx_model.graph.node)]
    feeds = batch(3, 4, seed=1)
    for got, want in zip(_run(onnx_model, feeds), jax_outputs(model, variables, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_patterns_off_gives_the_same_numbers():
    model, variables = make_model(head="mlm")
    inputs = batch(2, 5)
    axes = {k: ("batch", "sequence") for k in inputs}
    prog = trace(model.apply, variables, inputs, axes, CONSTRAINTS)
    plain = convert(prog, patterns=False)
    assert "LayerNormalization" not in _ops(plain) and "Softmax" not in _ops(plain)
    feeds = batch(3, 6, seed=2)
    for got, want in zip(_run(plain, feeds), jax_outputs(model, variables, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_softmax_lookalike_is_not_fused():
    # max over axis 0 but sum over axis 1: not a softmax, lowered as traced
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    fn = lambda v, x: jnp.exp(x - x.max(0, keepdims=True)) / jnp.exp(x - x.max(0, keepdims=True)).sum(1, keepdims=True)
    model = _lower(fn, {}, {"x": x}, {"x": (None, None)})
    assert "Softmax" not in _ops(model)
    e = np.exp(x - x.max(0, keepdims=True))
    np.testing.assert_allclose(_run(model, {"x": x})[0], e / e.sum(1, keepdims=True), rtol=1e-5)
