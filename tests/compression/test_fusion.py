"""Fused QKV as a parameter transform; the single-pass residual add + LayerNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import fusion
from models.transformer import Transformer, TransformerConfig

BASE = dict(vocab_size=50, hidden_size=16, num_layers=2, intermediate_size=24, max_position_embeddings=10)


def _setup(**overrides):
    cfg = TransformerConfig(**{**BASE, "num_heads": 4, **overrides})
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, size=(3, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], jnp.int32)
    params = jax.jit(Transformer(cfg).init)(jax.random.key(0), ids)["params"]
    return cfg, params, ids, mask


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("overrides", [{}, {"num_heads": (4, 2), "num_kv_heads": (1, 2)}],
                         ids=["mha", "per_layer_mqa"])
def test_fuse_layout_round_trip_and_outputs(overrides):
    cfg, params, ids, mask = _setup(**overrides)
    before = {k: np.array(v) for k, v in _flat(params).items()}
    fcfg, fparams = fusion.fuse_qkv(cfg, params)

    assert fcfg.fused_qkv and not cfg.fused_qkv
    d = cfg.dim_per_head
    for i in range(cfg.num_layers):
        attn, fattn = params["encoder"][f"layer_{i}"]["attention"], fparams["encoder"][f"layer_{i}"]["attention"]
        assert set(fattn) == {"qkv", "output"}
        n, k = cfg.heads(i), cfg.kv_heads(i)
        kernel = np.asarray(fattn["qkv"]["kernel"])
        assert kernel.shape == (cfg.hidden_size, (n + 2 * k) * d)
        # Layout [query | key | value]: N*D, K*D, K*D columns.
        np.testing.assert_array_equal(kernel[:, :n * d], attn["query"]["kernel"])
        np.testing.assert_array_equal(kernel[:, n * d:(n + k) * d], attn["key"]["kernel"])
        np.testing.assert_array_equal(kernel[:, (n + k) * d:], attn["value"]["kernel"])
        np.testing.assert_array_equal(fattn["qkv"]["bias"][(n + k) * d:], attn["value"]["bias"])
        assert fattn["output"]["kernel"] is attn["output"]["kernel"]  # everything else shared, untouched

    # Input untouched; round trip bit-identical (values, dtypes, tree structure).
    assert {k: np.array(v) for k, v in _flat(params).items()}.keys() == before.keys()
    for k, v in _flat(params).items():
        np.testing.assert_array_equal(v, before[k])
    ucfg, uparams = fusion.unfuse_qkv(fcfg, fparams)
    assert ucfg == cfg
    assert jax.tree.structure(uparams) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(uparams), jax.tree.leaves(params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

    # Same function: fused model == unfused model.
    ref = jax.jit(Transformer(cfg).apply)({"params": params}, ids, attention_mask=mask)
    out = jax.jit(Transformer(fcfg).apply)({"params": fparams}, ids, attention_mask=mask)
    np.testing.assert_allclose(out.logits, ref.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)


def test_already_fused_is_an_error():
    cfg, params, _, _ = _setup()
    fcfg, fparams = fusion.fuse_qkv(cfg, params)
    with pytest.raises(ValueError, match="already has fused_qkv=True"):
        fusion.fuse_qkv(fcfg, fparams)
    with pytest.raises(ValueError, match=r"encoder/layer_0/attention already has a fused 'qkv'"):
        fusion.fuse_qkv(cfg, fparams)  # fused checkpoint with a stale config
    with pytest.raises(ValueError, match="fused_qkv=False: the parameters are not fused"):
        fusion.unfuse_qkv(cfg, params)
    with pytest.raises(ValueError, match=r"encoder/layer_0/attention has no fused 'qkv'"):
        fusion.unfuse_qkv(fcfg, params)


def test_incompatible_shapes_name_the_layer_and_leave_params_untouched():
    cfg, params, _, _ = _setup()
    bad = jax.tree.map(lambda x: x, params)
    bad["encoder"]["layer_1"]["attention"]["key"]["kernel"] = jnp.zeros((cfg.hidden_size, 8))
    snapshot = jax.tree.map(np.array, bad)
    with pytest.raises(ValueError, match=r"layer_1/attention/key/kernel has shape \(16, 8\), expected \(16, 16\)"):
        fusion.fuse_qkv(cfg, bad)
    for a, b in zip(jax.tree.leaves(bad), jax.tree.leaves(snapshot)):
        np.testing.assert_array_equal(a, b)
    assert set(bad["encoder"]["layer_0"]["attention"]) == {"query", "key", "value", "output"}  # layer 0 too

    # A checkpoint whose heads do not match the config (e.g. pruned params, unpruned config).
    small = TransformerConfig(**{**BASE, "num_heads": 2, "head_dim": 4})
    with pytest.raises(ValueError, match=r"layer_0/attention/query/kernel has shape \(16, 16\), expected \(16, 8\)"):
        fusion.fuse_qkv(small, params)

    missing = jax.tree.map(lambda x: x, params)
    del missing["encoder"]["layer_0"]["attention"]["value"]["bias"]
    with pytest.raises(ValueError, match=r"encoder/layer_0/attention: biases present on \['query', 'key'\] only"):
        fusion.fuse_qkv(cfg, missing)
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        fusion.fuse_qkv(cfg, {"params": params})
    fcfg, fparams = fusion.fuse_qkv(cfg, params)
    with pytest.raises(ValueError, match=r"layer_0/attention/qkv/kernel has shape \(16, 48\), expected \(16, 32\)"):
        fusion.unfuse_qkv(fcfg.replace(num_kv_heads=2), fparams)


def test_skip_layer_norm_matches_numpy_and_flax():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    r = rng.normal(size=(2, 3, 8)).astype(np.float32)
    scale = rng.normal(size=8).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    h = x + r
    ref = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-12) * scale + bias
    out = fusion.skip_layer_norm(jnp.asarray(x), jnp.asarray(r), jnp.asarray(scale), jnp.asarray(bias))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    ln = nn.LayerNorm(epsilon=1e-12)
    flax_out = ln.apply({"params": {"scale": scale, "bias": bias}}, jnp.asarray(h))
    np.testing.assert_allclose(out, flax_out, atol=1e-6)
    # 16-bit inputs: statistics in float32, result in the input dtype.
    out16 = fusion.skip_layer_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(r, jnp.bfloat16),
                                   jnp.asarray(scale), jnp.asarray(bias))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=0.05 * np.abs(ref).max())
    with pytest.raises(ValueError, match="do not match"):
        fusion.skip_layer_norm(jnp.asarray(x), jnp.asarray(r[:, :2]), jnp.asarray(scale), jnp.asarray(bias))
