"""Module replacement: schedules, sampling, p=0/p=1 equivalences, frozen predecessor, MQA successors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import theseus
from compression.pruning import compaction
from models import theseus as tmodels
from models.transformer import Transformer, TransformerConfig

PRED = TransformerConfig(vocab_size=40, hidden_size=16, num_layers=4, num_heads=4, intermediate_size=24,
                         max_position_embeddings=10, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)


def _ids(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 40, size=(3, 6)), jnp.int32)


def _predecessor():
    ids = _ids()
    return Transformer(PRED).init(jax.random.key(0), ids)["params"], ids


def test_schedules_match_their_formulas():
    lin = theseus.LinearSchedule(k=0.01, b=0.3)
    np.testing.assert_allclose(lin(jnp.array([0, 10, 69, 70, 500])), [0.3, 0.4, 0.99, 1.0, 1.0], atol=1e-6)
    const = theseus.ConstantSchedule(0.5, replacing_steps=100)
    np.testing.assert_allclose(const(jnp.array([0, 99, 100])), [0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        theseus.ConstantSchedule(1.5)
    with pytest.raises(ValueError, match="unknown replacement schedule"):
        theseus.make_schedule("cosine")


def test_sampled_replacement_frequency_matches_p():
    keys = jax.random.split(jax.random.key(0), 4000)
    flags = jax.vmap(lambda k: theseus.sample_replacement(k, 0.3, 2))(keys)
    # 8000 Bernoulli(0.3) draws: standard error 0.005; 5 sigma bound.
    assert abs(float(flags.mean()) - 0.3) < 0.025


def test_p0_is_predecessor_and_p1_is_successor():
    params, ids = _predecessor()
    succ_cfg = tmodels.successor_from_predecessor(PRED, 2)
    model = tmodels.theseus_model(PRED, succ_cfg)
    tparams = tmodels.init_from_predecessor(PRED, params, succ_cfg)
    # Make successors different from the predecessor layers they copy, so equality is informative.
    tparams = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 1.1 if "successor" in str(p) else x, tparams)
    pred_logits = Transformer(PRED).apply({"params": params}, ids).logits
    rngs = {"theseus": jax.random.key(3)}
    p0 = model.apply({"params": tparams}, ids, train=True, mode="mixed", replace_prob=0.0, rngs=rngs).logits
    np.testing.assert_allclose(p0, pred_logits, atol=1e-5)
    succ_cfg2, succ_params = tmodels.extract_successor(PRED, succ_cfg, tparams)
    succ_logits = Transformer(succ_cfg2).apply({"params": succ_params}, ids).logits
    p1 = model.apply({"params": tparams}, ids, train=True, mode="mixed", replace_prob=1.0, rngs=rngs).logits
    np.testing.assert_allclose(p1, succ_logits, atol=1e-5)
    assert not np.allclose(pred_logits, succ_logits, atol=1e-3)
    # Evaluation runs the successor, as the reference implementation does.
    np.testing.assert_allclose(model.apply({"params": tparams}, ids).logits, succ_logits, atol=1e-5)


def test_gradients_reach_only_successor_modules():
    params, ids = _predecessor()
    succ_cfg = tmodels.successor_from_predecessor(PRED, 2)
    model = tmodels.theseus_model(PRED, succ_cfg)
    tparams = tmodels.init_from_predecessor(PRED, params, succ_cfg)

    def loss(p):
        p = theseus.freeze(p, tmodels.trainable)
        return model.apply({"params": p}, ids, train=True, mode="mixed", replace_prob=0.5,
                           rngs={"theseus": jax.random.key(1)}).logits.sum()

    grads = jax.jit(jax.grad(loss))(tparams)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if not tmodels.trainable(keys):
            assert float(jnp.abs(g).max()) == 0.0, keys
    succ_norm = sum(float(jnp.abs(g).sum()) for p, g in jax.tree_util.tree_leaves_with_path(grads)
                    if "successor" in str(p))
    assert succ_norm > 0


def test_no_retracing_per_sampled_pattern():
    params, ids = _predecessor()
    succ_cfg = tmodels.successor_from_predecessor(PRED, 2)
    model = tmodels.theseus_model(PRED, succ_cfg)
    tparams = tmodels.init_from_predecessor(PRED, params, succ_cfg)
    traces = []

    @jax.jit
    def fwd(p, key, prob):
        traces.append(1)
        return model.apply({"params": p}, ids, train=True, mode="mixed", replace_prob=prob,
                           rngs={"theseus": key}).logits

    outs = [fwd(tparams, jax.random.key(i), jnp.float32(0.5)) for i in range(6)]
    assert len(traces) == 1
    assert len({np.asarray(o).tobytes() for o in outs}) > 1  # different patterns were sampled


def _identical_kv_heads(cfg: TransformerConfig, params: dict) -> dict:
    """Every layer's key/value heads made copies of its first one, so sharing one key/value head changes nothing."""
    d = cfg.dim_per_head
    for i in range(cfg.num_layers):
        att = params["encoder"][f"layer_{i}"]["attention"]
        for name in ("key", "value"):
            att[name] = {"kernel": jnp.tile(att[name]["kernel"][:, :d], (1, cfg.heads(i))),
                         "bias": jnp.tile(att[name]["bias"][:d], cfg.heads(i))}
    return params


def test_mean_pooled_mqa_init_reproduces_model_with_identical_kv_heads():
    params, ids = _predecessor()
    d = PRED.dim_per_head
    params = _identical_kv_heads(PRED, params)
    succ_cfg = tmodels.successor_from_predecessor(PRED, 4, num_kv_heads=1)
    tparams = tmodels.init_from_predecessor(PRED, params, succ_cfg, num_modules=2)
    mqa_cfg, mqa_params = tmodels.extract_successor(PRED, succ_cfg, tparams, num_modules=2)
    assert mqa_params["encoder"]["layer_0"]["attention"]["key"]["kernel"].shape == (16, d)
    np.testing.assert_allclose(Transformer(mqa_cfg).apply({"params": mqa_params}, ids).logits,
                               Transformer(PRED).apply({"params": params}, ids).logits, atol=1e-5)


def test_mqa_successor_of_a_head_pruned_predecessor():
    """After head pruning each successor layer takes its head count from the predecessor layer that
    initialises it, and the mean-pooled multi-query successor still reproduces identical key/value heads."""
    params, ids = _predecessor()
    keep = {0: [1, 0, 1, 1], 1: [1, 1, 1, 1], 2: [0, 1, 0, 0], 3: [1, 1, 1, 1]}
    pruned_cfg, pruned = compaction.compact(PRED, params, {i: np.array(m, np.float32) for i, m in keep.items()})
    assert pruned_cfg.num_heads == (3, 4, 1, 4)
    pruned = _identical_kv_heads(pruned_cfg, pruned)
    want = Transformer(pruned_cfg).apply({"params": pruned}, ids).logits

    every_other = tmodels.successor_from_predecessor(pruned_cfg, 2, num_kv_heads=1, init_layers=(0, 2))
    assert every_other.num_heads == (3, 1) and every_other.kv_heads(0) == every_other.kv_heads(1) == 1
    tmodels.init_from_predecessor(pruned_cfg, pruned, every_other, init_layers=(0, 2))  # head counts agree

    succ_cfg = tmodels.successor_from_predecessor(pruned_cfg, 4, num_kv_heads=1)
    tparams = tmodels.init_from_predecessor(pruned_cfg, pruned, succ_cfg, num_modules=2)
    mqa_cfg, mqa_params = tmodels.extract_successor(pruned_cfg, succ_cfg, tparams, num_modules=2)
    assert mqa_params["encoder"]["layer_0"]["attention"]["key"]["kernel"].shape == (16, PRED.dim_per_head)
    np.testing.assert_allclose(Transformer(mqa_cfg).apply({"params": mqa_params}, ids).logits, want, atol=1e-5)
    with pytest.raises(ValueError, match="layer 0: num_kv_heads=2 must be >= 1 and divide num_heads=3"):
        tmodels.successor_from_predecessor(pruned_cfg, 4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"init_layers \(0, 4\) must name 2 predecessor layers in 0..3"):
        tmodels.successor_from_predecessor(pruned_cfg, 2, init_layers=(0, 4))


def test_mean_pool_kv_heads_by_hand():
    kernel = jnp.arange(2 * 8, dtype=jnp.float32).reshape(2, 8)  # 4 heads of width 2
    k, b = theseus.mean_pool_kv_heads(kernel, jnp.arange(8.0), num_kv_heads=2, head_dim=2)
    np.testing.assert_allclose(k, [[1, 2, 5, 6], [9, 10, 13, 14]])
    np.testing.assert_allclose(b, [1, 2, 5, 6])


def test_replaces_a_generic_module_pair():
    """The mechanism knows nothing of Transformers: any two modules with one interface can be swapped."""

    class TwoDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, name="b")(jnp.tanh(nn.Dense(5, name="a")(x)))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x, replace):
            return theseus.Replaceable(TwoDense(parent=None), nn.Dense(5, parent=None), name="m")(x, replace=replace)

    x = jnp.ones((2, 3))
    v = Outer().init(jax.random.key(0), x, False)
    assert set(v["params"]["m"]) == {"predecessor", "successor"}
    np.testing.assert_allclose(Outer().apply(v, x, jnp.bool_(False)), Outer().apply(v, x, False), atol=1e-6)
    np.testing.assert_allclose(Outer().apply(v, x, jnp.bool_(True)),
                               nn.Dense(5).apply({"params": v["params"]["m"]["successor"]}, x), atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="does not divide into 3 modules"):
        tmodels.theseus_model(PRED, tmodels.successor_from_predecessor(PRED, 3))
    with pytest.raises(ValueError, match="hidden_size"):
        tmodels.theseus_model(PRED, PRED.replace(num_layers=2, hidden_size=8, num_heads=2))

    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(7)(x)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return theseus.Replaceable(nn.Dense(5, parent=None), Wide(parent=None), name="m")(x, replace=False)

    with pytest.raises(ValueError, match="module m: successor output"):
        Outer().init(jax.random.key(0), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="unknown replacement mode"):
        theseus.replacement_flags(None, "sometimes", 0.5, 2)


def test_replaces_a_bilstm_layer_pair():
    """The seed's point: no Transformer-specific feature. Two BiLSTM layers are replaced by one."""
    from models.bilstm import BiLSTMEncoder

    class Stack(nn.Module):
        layers: int

        @nn.compact
        def __call__(self, x, mask):
            return BiLSTMEncoder(4, self.layers, name="lstm")(x, mask, True)[0]

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, mask, mode, p=None):
            flags = theseus.replacement_flags(self, mode, p, 1)
            return theseus.Replaceable(Stack(2, parent=None), Stack(1, parent=None), name="m")(
                x, mask, replace=flags[0])

    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    v = Model().init(jax.random.key(1), x, mask, "predecessor")
    pred = Stack(2).apply({"params": v["params"]["m"]["predecessor"]}, x, mask)
    succ = Stack(1).apply({"params": v["params"]["m"]["successor"]}, x, mask)
    np.testing.assert_allclose(Model().apply(v, x, mask, "mixed", 0.0, rngs={"theseus": jax.random.key(2)}), pred,
                               atol=1e-6)
    np.testing.assert_allclose(Model().apply(v, x, mask, "mixed", 1.0, rngs={"theseus": jax.random.key(2)}), succ,
                               atol=1e-6)
    grads = jax.grad(lambda p: Model().apply({"params": theseus.freeze(p, lambda k: "successor" in k)}, x, mask,
                                             "mixed", 0.5, rngs={"theseus": jax.random.key(5)}).sum())(v["params"])
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["m"]["predecessor"]))
