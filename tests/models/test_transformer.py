"""Transformer: output structure, masking invariants, GQA/MQA and fused QKV, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.transformer import Transformer, TransformerConfig

TINY = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
            max_position_embeddings=12, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)


def _ids(b=2, s=7, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 50, size=(b, s)), jnp.int32)


def _init(cfg, ids):
    return Transformer(cfg).init(jax.random.key(0), ids)


def test_output_structure_and_attention_rows_sum_to_one():
    cfg = TransformerConfig(**TINY)
    ids = _ids()
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    out = Transformer(cfg).apply(_init(cfg, ids), ids, attention_mask=mask, output_hidden_states=True,
                                 output_attentions=True)
    assert out.logits.shape == (2, 2) and out.logits.dtype == jnp.float32
    assert len(out.hidden_states) == cfg.num_layers + 1
    assert all(h.shape == (2, 7, 16) for h in out.hidden_states)
    np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
    assert len(out.attentions) == len(out.attention_scores) == 2
    probs = out.attentions[0]
    assert probs.shape == (2, 4, 7, 7)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert float(probs[1, :, :, 4:].max()) < 1e-6  # padded keys get no attention


def test_padding_does_not_change_real_positions():
    cfg = TransformerConfig(**TINY)
    ids = _ids(1, 5)
    variables = _init(cfg, ids)
    model = Transformer(cfg)
    short = model.apply(variables, ids, output_hidden_states=True)
    padded_ids = jnp.concatenate([ids, jnp.zeros((1, 3), jnp.int32)], axis=1)
    padded = model.apply(variables, padded_ids, attention_mask=jnp.array([[1] * 5 + [0] * 3]),
                         output_hidden_states=True)
    for a, b in zip(short.hidden_states, padded.hidden_states):
        np.testing.assert_allclose(a, b[:, :5], atol=1e-5)
    np.testing.assert_allclose(short.logits, padded.logits, atol=1e-5)


def test_grouped_query_attention_equals_full_attention_with_repeated_kv_heads():
    """A GQA model equals the MHA model whose key/value heads repeat the GQA heads within each group."""
    gqa_cfg = TransformerConfig(**TINY, num_kv_heads=2)
    mha_cfg = TransformerConfig(**TINY)
    ids = _ids()
    gqa = _init(gqa_cfg, ids)
    d, group = mha_cfg.dim_per_head, 2
    params = jax.tree.map(lambda x: x, gqa["params"])
    for i in range(2):
        att = dict(params["encoder"][f"layer_{i}"]["attention"])
        for name in ("key", "value"):
            k = att[name]["kernel"].reshape(16, 2, d)
            b = att[name]["bias"].reshape(2, d)
            att[name] = {"kernel": jnp.repeat(k, group, axis=1).reshape(16, 4 * d),
                         "bias": jnp.repeat(b, group, axis=0).reshape(4 * d)}
        params["encoder"][f"layer_{i}"] = {**params["encoder"][f"layer_{i}"], "attention": att}
    out_gqa = Transformer(gqa_cfg).apply(gqa, ids).logits
    out_mha = Transformer(mha_cfg).apply({"params": params}, ids).logits
    np.testing.assert_allclose(out_gqa, out_mha, atol=1e-5)


def test_fused_qkv_equals_separate_projections():
    cfg = TransformerConfig(**TINY, num_kv_heads=2)
    fused_cfg = cfg.replace(fused_qkv=True)
    ids = _ids()
    params = _init(cfg, ids)["params"]
    fused = jax.tree.map(lambda x: x, params)
    for i in range(2):
        att = dict(params["encoder"][f"layer_{i}"]["attention"])
        qkv = {"kernel": jnp.concatenate([att[n]["kernel"] for n in ("query", "key", "value")], axis=1),
               "bias": jnp.concatenate([att[n]["bias"] for n in ("query", "key", "value")])}
        fused["encoder"][f"layer_{i}"] = {**params["encoder"][f"layer_{i}"],
                                          "attention": {"qkv": qkv, "output": att["output"]}}
    np.testing.assert_allclose(Transformer(fused_cfg).apply({"params": fused}, ids).logits,
                               Transformer(cfg).apply({"params": params}, ids).logits, atol=1e-5)


def test_per_layer_heads_and_ffn_sizes():
    cfg = TransformerConfig(**{**TINY, "num_heads": (4, 2), "intermediate_size": (32, 8)}, head_dim=4)
    params = _init(cfg, _ids())["params"]["encoder"]
    assert params["layer_0"]["attention"]["query"]["kernel"].shape == (16, 16)
    assert params["layer_1"]["attention"]["query"]["kernel"].shape == (16, 8)
    assert params["layer_1"]["attention"]["output"]["kernel"].shape == (8, 16)
    assert params["layer_1"]["intermediate"]["kernel"].shape == (16, 8)


@pytest.mark.parametrize("head,shape", [("token", (2, 7, 3)), ("mlm", (2, 7, 50))])
def test_token_and_mlm_heads(head, shape):
    cfg = TransformerConfig(**TINY, head=head, num_labels=3)
    ids = _ids()
    variables = _init(cfg, ids)
    assert Transformer(cfg).apply(variables, ids).logits.shape == shape
    if head == "mlm":  # decoder tied to the word embeddings: no separate decoder kernel
        assert set(variables["params"]["mlm"]) == {"transform", "transform_norm", "bias"}


def test_dropout_only_in_training():
    cfg = TransformerConfig(**{**TINY, "hidden_dropout_rate": 0.3})
    ids = _ids()
    variables = _init(cfg, ids)
    model = Transformer(cfg)
    a = model.apply(variables, ids, train=True, rngs={"dropout": jax.random.key(1)}).logits
    b = model.apply(variables, ids, train=True, rngs={"dropout": jax.random.key(2)}).logits
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(variables, ids).logits, model.apply(variables, ids).logits)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_jit_and_grad_are_finite(dtype):
    cfg = TransformerConfig(**TINY, dtype=dtype)
    ids = _ids()
    variables = _init(cfg, ids)
    model = Transformer(cfg)

    def loss(p):
        return model.apply({"params": p}, ids).logits.sum()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert jax.tree.leaves(grads)[0].dtype == jnp.float32  # float32 master weights


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        TransformerConfig.from_dict({"hidden": 3})
    with pytest.raises(TypeError, match="hidden_size"):
        TransformerConfig(hidden_size="384")
    with pytest.raises(ValueError, match="head"):
        TransformerConfig(head="regression")
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        TransformerConfig(**{**TINY, "num_heads": (4, 0)}, head_dim=4)
    with pytest.raises(ValueError, match="divide"):
        TransformerConfig(**TINY, num_kv_heads=3)
    cfg = TransformerConfig(**TINY)
    variables = _init(cfg, _ids())
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=12"):
        Transformer(cfg).apply(variables, jnp.ones((1, 13), jnp.int32))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Transformer(cfg).apply(variables, jnp.full((1, 4), 50, jnp.int32))
