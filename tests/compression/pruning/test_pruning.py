"""Pruning: head importance vs finite differences, hard-concrete statistics, LayerDrop, magnitude, compaction."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compression.pruning import compaction, l0, layerdrop, magnitude
from compression.pruning.head_importance import head_importance, iterative_head_pruning, prune_least_important
from compression.pruning.site_masks import MASKS, masks_by_path, site_masks, unflatten
from models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=12,
                        max_position_embeddings=10, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)


def _setup(transform, cfg=CFG):
    model = Transformer(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 40, size=(4, 6)), jnp.int32)
    variables = model.init(jax.random.key(0), ids)
    variables = transform.init(jax.random.key(1), variables, model.apply, ids)
    return model, transform.wrap(model.apply), variables, ids


def _loss(apply, ids, labels):
    def loss(variables, batch=None):
        logits = apply(variables, ids).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
    return loss


def test_head_importance_equals_finite_differences():
    """|dL/d mask_h| against central differences, in float64 so that differences resolve small gradients."""
    with jax.enable_x64(True):
        cfg = CFG.replace(param_dtype="float32")
        model, apply, variables, ids = _setup(site_masks("heads"), cfg)
        variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)
        labels = jnp.array([0, 1, 1, 0])
        loss = _loss(apply, ids, labels)
        scores = head_importance(loss, variables, [None], normalize_per_layer=False, jit=False)
        eps = 1e-4
        flat = masks_by_path(variables[MASKS])
        for path, mask in flat.items():
            for h in range(4):
                def at(v):
                    changed = dict(flat)
                    changed[path] = mask.at[h].set(v)
                    return float(loss({**variables, MASKS: unflatten(changed)}))
                fd = abs(at(1 + eps) - at(1 - eps)) / (2 * eps)
                np.testing.assert_allclose(scores[path][h], fd, rtol=1e-4, atol=1e-10)


def test_masking_a_head_equals_zeroing_its_output_projection_rows():
    model, apply, variables, ids = _setup(site_masks("heads"))
    flat = masks_by_path(variables[MASKS])
    path = "encoder/layer_1/attention/heads_site"
    flat = {**flat, path: flat[path].at[2].set(0.0)}
    masked = apply({**variables, MASKS: unflatten(flat)}, ids).logits
    params = jax.tree.map(np.array, variables["params"])
    d = CFG.dim_per_head
    params["encoder"]["layer_1"]["attention"]["output"]["kernel"][2 * d:3 * d] = 0
    np.testing.assert_allclose(masked, model.apply({"params": params}, ids).logits, atol=1e-6)


def test_prune_least_important_keeps_one_head_per_layer():
    masks = {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}
    scores = {"a": np.array([0.1, 0.2]), "b": np.array([0.9, 0.8])}
    out = prune_least_important(masks, scores, 2)
    np.testing.assert_array_equal(out["a"], [0, 1])  # a's last head is protected, so b's weakest goes
    np.testing.assert_array_equal(out["b"], [1, 0])
    with pytest.raises(ValueError, match="every head of a"):
        prune_least_important(masks, scores, 2, keep_one_per_layer=False)


def test_iterative_pruning_curve():
    model, apply, variables, ids = _setup(site_masks("heads"))
    labels = jnp.array([0, 1, 1, 0])
    loss = _loss(apply, ids, labels)
    curve = iterative_head_pruning(loss, lambda v: float(loss(v)), variables, lambda: [None],
                                   fraction_per_round=0.25, max_fraction=0.5)
    assert [c.heads_pruned for c in curve] == [0, 2, 4]
    assert all(sum(m.sum() for m in c.masks.values()) == 8 - c.heads_pruned for c in curve)


def test_hard_concrete_statistics_and_expected_l0():
    log_alpha = jnp.array([-2.0, 0.0, 1.5])
    keys = jax.random.split(jax.random.key(0), 20000)
    z = jax.vmap(lambda k: l0.sample_gates(k, log_alpha))(keys)
    assert float(z.min()) >= 0 and float(z.max()) <= 1
    # P(z > 0) = sigmoid(log_alpha - beta log(-gamma/zeta)), computed independently here.
    expected = 1 / (1 + np.exp(-(np.array([-2.0, 0.0, 1.5]) - (2 / 3) * math.log(0.1 / 1.1))))
    np.testing.assert_allclose((z > 0).mean(0), expected, atol=0.015)
    np.testing.assert_allclose(l0.prob_nonzero(log_alpha), expected, rtol=1e-5)
    gates = {"x": {"ffn_site": {"log_alpha": log_alpha}}}
    l0_value, total = l0.expected_l0(gates)
    np.testing.assert_allclose(l0_value, expected.sum(), rtol=1e-5)
    assert total == 3
    np.testing.assert_allclose(l0.deterministic_gates(jnp.array([-10.0, 10.0])), [0.0, 1.0])


def test_l0_gates_sample_in_training_and_are_deterministic_at_eval():
    model, apply, variables, ids = _setup(l0.l0_gates("heads|ffn"))
    assert "gates" in variables
    a = apply(variables, ids, rngs={"gates": jax.random.key(1)}).logits
    b = apply(variables, ids, rngs={"gates": jax.random.key(2)}).logits
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(apply(variables, ids).logits, apply(variables, ids).logits)
    grads = jax.grad(lambda g: apply({**variables, "gates": g}, ids, rngs={"gates": jax.random.key(1)}
                                     ).logits.sum())(variables["gates"])
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(grads))


def test_lagrangian_penalty_by_hand():
    np.testing.assert_allclose(l0.lagrangian_penalty(jnp.float32(0.3), 0.5, 2.0, 3.0), 2 * -0.2 + 3 * 0.04)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        l0.lagrangian_penalty(0.3, 1.0, 1.0, 1.0)


def test_layerdrop_expected_output_and_no_drop_without_rng():
    model, apply, variables, ids = _setup(layerdrop.layerdrop(0.5))
    full = apply(variables, ids, output_hidden_states=True)
    np.testing.assert_allclose(full.logits, model.apply(variables, ids).logits)
    fwd = jax.jit(lambda k: apply(variables, ids, output_hidden_states=True, rngs={"layerdrop": k}).hidden_states[1])
    samples = np.stack([fwd(jax.random.key(i)) for i in range(400)])
    emb, layer0 = full.hidden_states[0], full.hidden_states[1]
    drop_rate = float(np.mean([np.allclose(s, emb, atol=1e-5) for s in samples]))
    assert abs(drop_rate - 0.5) < 0.1
    np.testing.assert_allclose(samples.mean(0), 0.5 * (layer0 + emb), atol=0.25 * float(jnp.abs(layer0 - emb).max()))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layerdrop.layerdrop(1.0)


def test_polynomial_schedule_values():
    s = magnitude.polynomial_sparsity(jnp.array([0, 50, 100, 200]), final=0.8, begin_step=0, end_step=100)
    np.testing.assert_allclose(s, [0.0, 0.8 - 0.8 * 0.125, 0.8, 0.8], atol=1e-6)


def test_magnitude_masks_unstructured_and_block():
    params = {"layer_0": {"intermediate": {"kernel": jnp.arange(16.0).reshape(4, 4) - 7.5,
                                           "bias": jnp.ones(4)}}}
    masks = magnitude.magnitude_masks(params, 0.5)
    m = masks["layer_0"]["intermediate"]["kernel"]
    assert masks["layer_0"]["intermediate"]["bias"] is None
    np.testing.assert_array_equal(m, (np.abs(np.arange(16.0) - 7.5) > 3.5).reshape(4, 4))
    block = magnitude.magnitude_masks(params, 0.5, block=(2, 2))["layer_0"]["intermediate"]["kernel"]
    assert block.sum() == 8 and np.all(block.reshape(2, 2, 2, 2).std(axis=(1, 3)) == 0)
    pruned = magnitude.apply_masks(params, masks)
    assert float((pruned["layer_0"]["intermediate"]["kernel"] == 0).mean()) == 0.5
    with pytest.raises(ValueError, match="matches no parameter"):
        magnitude.magnitude_masks(params, 0.5, pattern="nothing")


def test_compaction_equals_masked_model_and_shrinks():
    model, apply, variables, ids = _setup(site_masks("heads|ffn"))
    flat = masks_by_path(variables[MASKS])
    flat["encoder/layer_0/attention/heads_site"] = jnp.array([1.0, 0.0, 0.5, 0.0])
    flat["encoder/layer_1/ffn_site"] = jnp.array([0.0] * 6 + [1.0] * 5 + [0.7])
    masks = unflatten(flat)
    masked = apply({**variables, MASKS: masks}, ids).logits
    heads, ffn = compaction.layer_masks(masks)
    cfg2, params2 = compaction.compact(CFG, variables["params"], heads, ffn)
    assert cfg2.num_heads == (2, 4) and cfg2.intermediate_size == (12, 6)
    np.testing.assert_allclose(Transformer(cfg2).apply({"params": params2}, ids).logits, masked, atol=1e-5)


def test_compaction_errors_and_layer_removal():
    model, apply, variables, ids = _setup(site_masks("heads"))
    with pytest.raises(ValueError, match="layer 1: every head is pruned"):
        compaction.compact(CFG, variables["params"], {1: np.zeros(4)})
    with pytest.raises(ValueError, match="do not match"):
        compaction.compact(CFG, variables["params"], {0: np.ones(3)})
    cfg2, params2 = compaction.compact(CFG, variables["params"], {1: np.zeros(4)}, remove_layers=(1,))
    assert cfg2.num_layers == 1 and set(params2["encoder"]) == {"layer_0"}
    gated = _setup(l0.l0_gates("heads"))[2]
    with pytest.raises(ValueError, match="still stochastic"):
        compaction.layer_masks(gated["gates"])
    heads, _ = compaction.layer_masks(l0.deterministic_masks(gated["gates"]))
    assert set(heads) == {0, 1}


def test_magnitude_masks_take_a_traced_sparsity():
    params = {"layer_0": {"intermediate": {"kernel": jax.random.normal(jax.random.key(0), (8, 16))}}}
    eager = magnitude.magnitude_masks(params, 0.3)
    traced = jax.jit(lambda p, s: magnitude.magnitude_masks(p, s))(params, jnp.float32(0.3))
    np.testing.assert_array_equal(traced["layer_0"]["intermediate"]["kernel"],
                                  eager["layer_0"]["intermediate"]["kernel"])
    assert float(eager["layer_0"]["intermediate"]["kernel"].mean()) == 1 - np.floor(0.3 * 128) / 128


def test_gradual_magnitude_pruning_follows_zhu_gupta_written_in_numpy():
    """SGD then the pruning transformation, against the schedule and the global threshold computed in numpy:
    masks are recomputed at updates 2, 6 and 10 (begin, every 4, end) and held in between."""
    keys = jax.random.split(jax.random.key(3), 4)
    params = {"layer_0": {"intermediate": {"kernel": jax.random.normal(keys[0], (8, 16)), "bias": jnp.ones(16)},
                          "output": {"kernel": jax.random.normal(keys[1], (16, 8))}}}
    matched = ("intermediate/kernel", "output/kernel")
    final, begin, end, every, lr = 0.75, 2, 10, 4, 0.1
    tx = optax.chain(optax.sgd(lr), magnitude.gradual_magnitude_pruning(final, begin, end, every))
    state, step = tx.init(params), jax.jit(tx.update)


    def flat(tree):  # "intermediate/kernel" -> array
        return {"/".join(str(getattr(x, "key", x)) for x in k)[len("layer_0/"):]: np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    ref, masks = flat(params), {k: np.ones_like(v) for k, v in flat(params).items() if k in matched}
    for t in range(14):
        grads = jax.tree.map(lambda p, k=jax.random.fold_in(keys[2], t): jax.random.normal(k, p.shape), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        new = {k: ref[k] - lr * v for k, v in flat(grads).items()}
        if begin <= t <= end and ((t - begin) % every == 0 or t == end):
            s = final * (1 - (1 - (t - begin) / (end - begin)) ** 3)
            scores = np.concatenate([np.abs(new[k]).ravel() for k in matched])
            k = int(np.floor(s * scores.size))
            threshold = -np.inf if k == 0 else np.sort(scores)[k - 1]
            masks = {m: (np.abs(new[m]) > threshold).astype(np.float32) for m in matched}
        ref = {k: v * masks[k] if k in masks else v for k, v in new.items()}
        for k, v in flat(params).items():
            np.testing.assert_allclose(v, ref[k], rtol=1e-6, atol=1e-6, err_msg=f"update {t}, {k}")
    zeros = sum(int((flat(params)[k] == 0).sum()) for k in matched)
    assert zeros == int(0.75 * 256)  # the final sparsity exactly
    assert np.all(flat(params)["intermediate/bias"] != 0)  # unmatched weights are never pruned
