"""Precision policies: casts, float32 islands and their ablation, output dtype, all three model families."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from compression import precision
from compression.sites import Island
from compression.transform import chain, identity
from models.transformer import Transformer, TransformerConfig

TINY = TransformerConfig(vocab_size=60, hidden_size=16, num_layers=1, num_heads=4, intermediate_size=32,
                         max_position_embeddings=12)


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(TINY)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 60, size=(2, 6)), jnp.int32)
    return model, jax.jit(model.init)(jax.random.key(0), ids), ids


def _eqns(jaxpr, acc):
    """(primitive, input dtypes) of every equation, nested jaxprs (pjit, custom_jvp, ...) included."""
    for e in jaxpr.eqns:
        acc.append((e.primitive.name, tuple(str(v.aval.dtype) for v in e.invars)))
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    _eqns(sub.jaxpr, acc)
                elif isinstance(sub, jcore.Jaxpr):
                    _eqns(sub, acc)
    return acc


def _dtypes_of(apply, variables, ids, prim):
    return {d for name, dts in _eqns(jax.make_jaxpr(apply)(variables, ids).jaxpr, []) if name == prim for d in dts}


# --- construction and bad input -------------------------------------------------------------------------


def test_names_and_aliases():
    for name, dtype in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("bf16", jnp.bfloat16),
                        ("float16", jnp.float16), ("fp16", jnp.float16)]:
        assert precision.make_policy(name).compute_dtype == dtype
    assert precision.policy("bf16").name == "precision[bfloat16]"
    assert precision.policy("fp16", islands={"softmax": False}).name == "precision[float16,islands_off=softmax]"


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown precision 'half'.*float32.*bf16.*fp16"):
        precision.policy("half")


def test_bad_islands():
    with pytest.raises(ValueError, match=r"unknown island kind.*'softmx'.*softmax, attention_scores"):
        precision.policy("bf16", islands={"softmx": False})
    with pytest.raises(TypeError, match=r"islands\['softmax'\] must be True or False"):
        precision.policy("bf16", islands={"softmax": 0})
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        precision.policy("bf16", output_dtype="int8")


# --- casts ----------------------------------------------------------------------------------------------


SEEN = []  # dtypes the probe's island function computed in, appended at trace time


class _Probe(nn.Module):
    """Dense + an island whose function reports the dtype it computes in (at trace time)."""

    @nn.compact
    def __call__(self, x, ids):
        h = nn.Dense(3)(x)

        def fn(t):
            SEEN.append(t.dtype)
            return t * 2

        return {"h": Island("softmax")(fn, h), "ids": ids}


def test_casts_params_inputs_and_outputs():
    seen = SEEN
    probe = _Probe()
    x = jnp.ones((2, 4), jnp.float32)
    ids = jnp.arange(2, dtype=jnp.int32)
    variables = probe.init(jax.random.key(0), x, ids)
    kernel = variables["params"]["Dense_0"]["kernel"]

    out = precision.policy("bf16", output_dtype=None).wrap(probe.apply)(variables, x, ids)
    assert out["h"].dtype == jnp.bfloat16  # the Dense computed in bfloat16, the island cast back
    assert out["ids"].dtype == jnp.int32  # integer inputs untouched
    assert seen[-1] == jnp.float32  # island on: float32 inside
    assert variables["params"]["Dense_0"]["kernel"] is kernel  # master weights not replaced

    out = precision.policy("bf16", islands={"softmax": False}, output_dtype=None).wrap(probe.apply)(
        variables, x, ids)
    assert seen[-1] == jnp.bfloat16 and out["h"].dtype == jnp.bfloat16  # island off: compute dtype inside

    out = precision.policy("fp16").wrap(probe.apply)(variables, x, ids)
    assert out["h"].dtype == jnp.float32 and out["ids"].dtype == jnp.int32  # default output_dtype float32
    # Value: Dense in float16 then doubled, against a numpy float32 reference.
    p = variables["params"]["Dense_0"]
    ref = 2 * (np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"]))
    np.testing.assert_allclose(out["h"], ref, rtol=2e-3, atol=2e-3)


def test_mutable_apply_returns_cast_output_and_state():
    class Counter(nn.Module):
        @nn.compact
        def __call__(self, x):
            c = self.variable("stats", "calls", lambda: jnp.zeros((), jnp.int32))
            c.value += 1
            return nn.Dense(2)(x)

    m = Counter()
    x = jnp.ones((1, 3))
    v = m.init(jax.random.key(0), x)
    y, state = precision.policy("bf16").wrap(m.apply)(v, x, mutable=["stats"])
    assert y.dtype == jnp.float32 and int(state["stats"]["calls"]) == 2
    dense = nn.Dense(2)
    y, state = precision.policy("bf16").wrap(dense.apply)(dense.init(jax.random.key(0), x), x, mutable=[])
    assert y.dtype == jnp.float32 and not state  # Flax returns a pair for mutable=[] too


def test_float32_policy_is_exact(tiny):
    model, variables, ids = tiny
    ref = model.apply(variables, ids)
    out = precision.policy("float32").wrap(model.apply)(variables, ids)
    np.testing.assert_array_equal(out.logits, ref.logits)
    np.testing.assert_array_equal(out.last_hidden_state, ref.last_hidden_state)


@pytest.mark.parametrize("name,tol", [("bf16", 3e-2), ("fp16", 4e-3)])
def test_low_precision_close_to_float32(tiny, name, tol):
    model, variables, ids = tiny
    ref = model.apply(variables, ids)
    out = jax.jit(precision.policy(name).wrap(model.apply))(variables, ids)
    assert out.logits.dtype == jnp.float32 and out.last_hidden_state.dtype == jnp.float32
    assert not np.array_equal(out.last_hidden_state, ref.last_hidden_state)  # it really ran in 16 bits
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state, atol=tol * 8, rtol=tol)
    np.testing.assert_allclose(out.logits, ref.logits, atol=tol)


def test_gradients_reach_float32_master_weights(tiny):
    model, variables, ids = tiny

    def loss(params, apply):
        return jnp.sum(apply({"params": params}, ids).logits ** 2)

    g32 = jax.jit(jax.grad(lambda p: loss(p, model.apply)))(variables["params"])
    g16 = jax.jit(jax.grad(lambda p: loss(p, precision.policy("bf16").wrap(model.apply))))(variables["params"])
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(b, a, atol=0.05 * float(jnp.max(jnp.abs(a))) + 1e-7)


# --- islands in the Transformer -------------------------------------------------------------------------

# Primitive that betrays each island's precision: softmax -> exp; layernorm -> rsqrt; attention scores ->
# the dot_general whose two inputs are float32 (the only one once everything else runs in bfloat16).


def test_islands_on_keep_float32_inside(tiny):
    model, variables, ids = tiny
    apply = precision.policy("bf16").wrap(model.apply)
    assert _dtypes_of(apply, variables, ids, "exp") == {"float32"}
    assert _dtypes_of(apply, variables, ids, "rsqrt") == {"float32"}
    assert _dtypes_of(apply, variables, ids, "dot_general") == {"float32", "bfloat16"}


@pytest.mark.parametrize("kind,prim", [("softmax", "exp"), ("layernorm", "rsqrt"),
                                       ("attention_scores", "dot_general")])
def test_each_island_off_runs_in_compute_dtype(tiny, kind, prim):
    model, variables, ids = tiny
    apply = precision.policy("bf16", islands={kind: False}).wrap(model.apply)
    assert _dtypes_of(apply, variables, ids, prim) == {"bfloat16"}
    others = {"softmax": "exp", "layernorm": "rsqrt"}
    for other, other_prim in others.items():
        if other != kind:
            assert _dtypes_of(apply, variables, ids, other_prim) == {"float32"}


def test_logits_island_controls_logit_dtype(tiny):
    model, variables, ids = tiny
    on = precision.policy("bf16", output_dtype=None).wrap(model.apply)(variables, ids)
    off = precision.policy("bf16", islands={"logits": False}, output_dtype=None).wrap(model.apply)(variables, ids)
    assert on.logits.dtype == jnp.float32 and on.last_hidden_state.dtype == jnp.bfloat16
    assert off.logits.dtype == jnp.bfloat16


def test_layernorm_island_matters_in_float16(tiny):
    """Embeddings up to 1000 square to 1e6 > float16's max (65504): LayerNorm statistics overflow in float16,
    not in the float32 island."""
    model, variables, ids = tiny
    params = jax.tree.map(lambda x: x, variables["params"])
    emb = params["embeddings"]["word_embeddings"]["embedding"]
    params["embeddings"]["word_embeddings"]["embedding"] = 1000.0 * emb / jnp.abs(emb).max()
    v = {"params": params}
    ref = model.apply(v, ids).last_hidden_state
    on = precision.policy("fp16").wrap(model.apply)(v, ids).last_hidden_state
    off = precision.policy("fp16", islands={"layernorm": False}).wrap(model.apply)(v, ids).last_hidden_state
    assert bool(jnp.all(jnp.isfinite(ref)))
    np.testing.assert_allclose(on, ref, atol=0.05)
    assert not bool(jnp.all(jnp.isfinite(off)))


def test_chain_and_init(tiny):
    model, variables, ids = tiny
    t = chain(identity(), precision.policy("bf16"))
    assert t.init(jax.random.key(1), variables, model.apply, ids) is variables
    out = t.wrap(model.apply)(variables, ids)
    np.testing.assert_array_equal(out.logits, precision.policy("bf16").wrap(model.apply)(variables, ids).logits)


# --- float16 training warnings --------------------------------------------------------------------------


def test_float16_training_without_loss_scaling_warns(tiny):
    model, variables, ids = tiny
    rngs = {"dropout": jax.random.key(2)}
    with pytest.warns(precision.PrecisionWarning, match="float16 training without loss scaling"):
        precision.policy("fp16").wrap(model.apply)(variables, ids, train=True, rngs=rngs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", precision.PrecisionWarning)
        precision.policy("bf16").wrap(model.apply)(variables, ids, train=True, rngs=rngs)
        precision.policy("fp16").wrap(model.apply)(variables, ids)  # inference
        with precision.loss_scaling_active():
            precision.policy("fp16").wrap(model.apply)(variables, ids, train=True, rngs=rngs)


def test_check_loss_scaling():
    with pytest.warns(precision.PrecisionWarning, match="without loss scaling"):
        precision.check_loss_scaling("fp16", loss_scaling=False)
    with pytest.warns(precision.PrecisionWarning):
        precision.check_loss_scaling(precision.make_policy("float16"), loss_scaling=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", precision.PrecisionWarning)
        precision.check_loss_scaling("fp16", loss_scaling=True)
        precision.check_loss_scaling("bf16", loss_scaling=False)


# --- the LSTM families ----------------------------------------------------------------------------------


def _lstm_models():
    from models.bilstm import BiLSTMClassifier, BiLSTMConfig
    from models.cnn_lstm import CNNLSTMConfig, CNNLSTMTagger

    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(1, 40, size=(2, 5)), jnp.int32)
    chars = jnp.asarray(rng.integers(0, 20, size=(2, 5, 4)), jnp.int32)
    bilstm = BiLSTMClassifier(BiLSTMConfig(vocab_size=40, embed_dim=8, hidden_size=6, mlp_hidden=8,
                                           pooling="attention"))
    tagger = CNNLSTMTagger(CNNLSTMConfig(vocab_size=40, char_vocab_size=20, word_embed_dim=8, char_embed_dim=4,
                                         char_filters=5, max_chars_per_token=4, hidden_size=6, num_labels=3))
    return [(bilstm, (ids,)), (tagger, (ids, chars))]


@pytest.mark.parametrize("index", [0, 1], ids=["bilstm_attention", "cnn_lstm"])
def test_lstm_families(index):
    model, args = _lstm_models()[index]
    variables = jax.jit(model.init)(jax.random.key(0), *args)
    ref = jax.jit(model.apply)(variables, *args).logits
    for name in ("bf16", "fp16"):
        apply = jax.jit(precision.policy(name, output_dtype=None).wrap(model.apply))
        out = apply(variables, *args)
        assert out.logits.dtype == jnp.float32  # logits island
        np.testing.assert_allclose(out.logits, ref, atol=2e-2)
    off = precision.policy("fp16", islands={"logits": False}, output_dtype=None).wrap(model.apply)
    assert jax.eval_shape(off, variables, *args).logits.dtype == jnp.float16

    def grads(p):  # float32 and bfloat16 gradients of the same loss, in one compiled program
        def loss(p, apply):
            return jnp.sum(apply({"params": p}, *args).logits ** 2)

        return (jax.grad(loss)(p, model.apply), jax.grad(loss)(p, precision.policy("bf16").wrap(model.apply)))

    g32, g16 = jax.jit(grads)(variables["params"])
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g32))
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(b, a, atol=0.02 * scale)


def test_bilstm_softmax_island_off():
    model, args = _lstm_models()[0]
    variables = jax.jit(model.init)(jax.random.key(0), *args)
    on = precision.policy("bf16").wrap(model.apply)
    off = precision.policy("bf16", islands={"softmax": False}).wrap(model.apply)
    assert "bfloat16" not in _dtypes_of(on, variables, args[0], "exp")
    assert "bfloat16" in _dtypes_of(off, variables, args[0], "exp")
