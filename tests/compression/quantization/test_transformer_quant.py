"""Fake quantization, QAT modes and real int8 execution on a tiny Transformer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import quantization as q
from compression.quantization.rules import trace_targets
from compression.transform import chain
from models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=60, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                        max_position_embeddings=16, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)


def _ids(seed, batch=4, seq=8):
    return jnp.asarray(np.random.default_rng(seed).integers(1, CFG.vocab_size, (batch, seq)), jnp.int32)


@pytest.fixture(scope="module")
def setup():
    model = Transformer(CFG)
    variables = jax.jit(model.init)(jax.random.key(0), _ids(0))
    batches = [_ids(i) for i in range(1, 4)]
    calibrated = q.calibrate(model.apply, variables, batches, method="max")
    return model, variables, batches, calibrated


@functools.partial(jax.jit, static_argnums=0)
def _embeddings(model, variables, ids):
    """The embedding output (the input of layer 0), float model."""
    return model.apply(variables, ids, output_hidden_states=True).hidden_states[0]


def test_qkv_share_one_input_scale(setup):
    model, variables, batches, calibrated = setup
    quant = calibrated["quant"]["encoder"]["layer_0"]["attention"]
    assert "shared_input_scale" in quant and not {"query", "key", "value"} & set(quant)
    assert "input_scale" in quant["output"]  # the output projection reads another tensor
    # the shared scale is max |layer input| / 127 over the batches (the embedding output feeds layer 0)
    emb = _embeddings(model, variables, jnp.concatenate(batches))
    np.testing.assert_allclose(quant["shared_input_scale"], np.abs(emb).max() / 127, rtol=1e-5)
    for name in ("query", "key", "value"):
        s, zp = q.find_input_qparams(calibrated["quant"], f"encoder/layer_0/attention/{name}")
        assert zp is None and float(s) == float(quant["shared_input_scale"])
    s, _ = q.find_input_qparams(calibrated["quant"], "encoder/layer_0/intermediate")
    assert float(s) == float(calibrated["quant"]["encoder"]["layer_0"]["intermediate"]["input_scale"])
    assert q.find_input_qparams(calibrated["quant"], "encoder/layer_0/attention/missing") is not None
    assert q.find_input_qparams(calibrated["quant"], "nowhere") is None


def test_fused_qkv_has_one_input_scale():
    model = Transformer(CFG.replace(fused_qkv=True))
    variables = jax.eval_shape(model.init, jax.random.key(0), _ids(0))
    targets = {t.name: t for t in trace_targets(model.apply, variables, _ids(1))}
    qkv = targets["encoder/layer_0/attention/qkv"]
    assert not qkv.shared and qkv.scale_name == "input_scale"  # quant/.../qkv/input_scale: its own, one scale
    assert not {"query", "key", "value"} & {name.rsplit("/", 1)[-1] for name in targets}


def test_fake_quant_close_to_float_and_differentiable(setup):
    model, variables, batches, calibrated = setup
    apply = q.fake_quant().wrap(model.apply)

    def loss(params, quant):
        logits = apply({"params": params, "quant": quant}, batches[0]).logits
        return -jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits

    @jax.jit
    def run(v, c):
        return model.apply(v, batches[0]).logits, jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            c["params"], c["quant"])

    ref, ((_, out), (g_params, g_quant)) = run(variables, calibrated)
    assert not np.allclose(out, ref, rtol=0, atol=1e-7)  # quantization changes the numbers ...
    np.testing.assert_allclose(out, ref, atol=0.02 * float(jnp.abs(ref).max()) + 1e-4)  # ... a little
    leaves = jax.tree.leaves(g_params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    kernel_grad = g_params["encoder"]["layer_0"]["intermediate"]["kernel"]
    assert float(jnp.abs(kernel_grad).sum()) > 0  # STE lets gradients through quantized weights
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_quant))  # fixed scales


def test_learned_scales_get_gradients_composable_with_distillation(setup):
    model, variables, batches, calibrated = setup
    apply = q.fake_quant(scales="learned").wrap(model.apply)
    teacher = jax.random.normal(jax.random.key(5), (batches[0].shape[0], CFG.num_labels)) * 3.0

    def loss(trainable):  # task loss + a distillation term, both through the quantized student
        logits = apply(trainable, batches[0]).logits
        kd = jnp.sum(jax.nn.softmax(teacher) * (jax.nn.log_softmax(teacher) - jax.nn.log_softmax(logits)), -1)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, 1]) + jnp.mean(kd)

    grads = jax.jit(jax.grad(loss))(calibrated)
    shared = grads["quant"]["encoder"]["layer_0"]["attention"]["shared_input_scale"]
    assert np.isfinite(float(shared)) and float(shared) != 0.0
    assert all(bool(jnp.isfinite(g)) for g in jax.tree.leaves(grads["quant"]))
    assert float(jnp.abs(grads["params"]["encoder"]["layer_0"]["intermediate"]["kernel"]).sum()) > 0


def test_ema_updates_scales_once_per_call(setup):
    model, variables, batches, calibrated = setup
    decay = 0.9
    apply = q.fake_quant(scales="ema", ema_decay=decay).wrap(model.apply)
    x = batches[0] * 0 + 5  # a different batch than calibration
    _, state = jax.jit(lambda v: apply(v, x, mutable=["quant"]))(calibrated)
    old = calibrated["quant"]["encoder"]["layer_0"]["attention"]["shared_input_scale"]
    new = state["quant"]["encoder"]["layer_0"]["attention"]["shared_input_scale"]
    emb = _embeddings(model, variables, x)
    observed = float(jnp.abs(emb).max()) / 127
    # one update even though query, key and value all read the shared scale
    np.testing.assert_allclose(new, decay * old + (1 - decay) * observed, rtol=1e-5)
    # without a mutable collection the stored scales are used as they are
    same, fixed = jax.jit(lambda v: (apply(v, x).logits, q.fake_quant().wrap(model.apply)(v, x).logits))(calibrated)
    np.testing.assert_array_equal(same, fixed)


def test_quantizing_twice_is_an_error(setup):
    model, variables, batches, calibrated = setup
    twice = chain(q.fake_quant(), q.fake_quant()).wrap(model.apply)
    with pytest.raises(ValueError, match="quantized twice"):
        twice(calibrated, batches[0])
    with pytest.raises(ValueError, match="already"):
        q.fake_quant().init(jax.random.key(0), calibrated, model.apply, batches[0])


def test_uncalibrated_apply_names_the_module(setup):
    model, variables, batches, _ = setup
    with pytest.raises(ValueError, match="embeddings|encoder/layer_0/attention/query.*calibrate"):
        q.fake_quant().wrap(model.apply)(variables, batches[0])


def test_int8_matches_fake_quant(setup):
    model, variables, batches, calibrated = setup
    t = q.int8()
    v8 = t.init(jax.random.key(0), calibrated, model.apply, batches[0])
    kernel = v8["params"]["encoder"]["layer_0"]["intermediate"]["kernel"]
    assert kernel.dtype == jnp.int8 and kernel.shape == (16, 32)
    assert v8["quant"]["encoder"]["layer_0"]["intermediate"]["kernel_scale"].shape == (32,)
    apply8, fake = jax.jit(t.wrap(model.apply)), jax.jit(q.fake_quant().wrap(model.apply))
    for seed in range(5, 9):
        ids = _ids(seed, batch=8)
        l8, lf = apply8(v8, ids).logits, fake(calibrated, ids).logits
        np.testing.assert_array_equal(l8, lf)  # integer products on both sides: the same numbers
    # the weights the export path reads are the fake-quantized ones
    qa = q.int8_weights(v8)["encoder/layer_0/intermediate"]
    w = calibrated["params"]["encoder"]["layer_0"]["intermediate"]["kernel"]
    np.testing.assert_allclose(qa.dequantize(), q.QArray.quantize(w, axis=-1).dequantize(), rtol=1e-6)
    assert qa.axis == (1,) and qa.values.dtype == jnp.int8


def test_dense_quant_scales_for_export(setup):
    model, _, batches, calibrated = setup
    plan = q.dense_quant_scales(model.apply, calibrated, batches[0])
    assert len(plan) == CFG.num_layers * 6 + 2
    w_scale, a_scale = plan["encoder/layer_0/intermediate"]
    w = np.asarray(calibrated["params"]["encoder"]["layer_0"]["intermediate"]["kernel"])
    np.testing.assert_allclose(w_scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert a_scale == float(calibrated["quant"]["encoder"]["layer_0"]["intermediate"]["input_scale"])
    assert plan["encoder/layer_0/attention/key"][1] == float(
        calibrated["quant"]["encoder"]["layer_0"]["attention"]["shared_input_scale"])
    v8 = q.int8().init(jax.random.key(0), calibrated, model.apply, batches[0])
    plan8 = q.dense_quant_scales(model.apply, v8, batches[0])  # the same from converted variables
    np.testing.assert_allclose(plan8["encoder/layer_0/intermediate"][0], w_scale, rtol=1e-6)


def test_int8_runs_integer_matmuls(setup):
    model, variables, batches, calibrated = setup
    t = q.int8()
    v8 = t.init(jax.random.key(0), calibrated, model.apply, batches[0])
    jaxpr = str(jax.make_jaxpr(lambda v: t.wrap(model.apply)(v, batches[0]).logits)(v8))
    dense_layers = CFG.num_layers * 6 + 2  # q, k, v, output, intermediate, output per layer; pooler, classifier
    assert jaxpr.count("preferred_element_type=int32") == dense_layers


def test_int8_bad_input(setup):
    model, variables, batches, calibrated = setup
    t = q.int8()
    with pytest.raises(ValueError, match="calibrate first"):
        t.init(jax.random.key(0), variables, model.apply, batches[0])
    v8 = t.init(jax.random.key(0), calibrated, model.apply, batches[0])
    with pytest.raises(ValueError, match="already"):
        t.init(jax.random.key(0), v8, model.apply, batches[0])
    with pytest.raises(ValueError, match="int8\\(\\).wrap"):
        q.fake_quant().wrap(model.apply)(v8, batches[0])
