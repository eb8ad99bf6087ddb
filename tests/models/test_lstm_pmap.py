"""jit, grad and pmap (8 forced CPU devices, in a subprocess) for both LSTM families, float32 and bfloat16."""

import json

import pytest

from tests.multidevice import run_with_devices

SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from models.bilstm import BiLSTMClassifier, BiLSTMConfig
from models.cnn_lstm import CNNLSTMConfig, CNNLSTMTagger

assert jax.local_device_count() == 8
N, PER, S, C, V = 8, 2, 6, 5, 40
rng = np.random.default_rng(0)

def padded(seed_lengths):
    mask = (np.arange(S)[None] < seed_lengths[:, None]).astype(np.int32)
    return np.where(mask == 1, rng.integers(1, V, size=mask.shape), 0).astype(np.int32), mask

words, mask = padded(rng.integers(1, S + 1, size=N * PER))
words_b, mask_b = padded(rng.integers(1, S + 1, size=N * PER))
chars = np.where(mask[..., None] == 1, rng.integers(0, 20, size=(N * PER, S, C)), 0).astype(np.int32)

def setups(dtype):
    bilstm = BiLSTMClassifier(BiLSTMConfig(vocab_size=V, embed_dim=8, hidden_size=6, num_layers=1, mlp_hidden=8,
                                           num_labels=3, pooling="attention", pair=True, dtype=dtype))
    yield "bilstm", bilstm, (words, mask, words_b, mask_b), rng.integers(0, 3, size=N * PER), np.ones(N * PER)
    tagger = CNNLSTMTagger(CNNLSTMConfig(vocab_size=V, char_vocab_size=20, word_embed_dim=8, char_embed_dim=4,
                                         char_filters=5, max_chars_per_token=C, hidden_size=6, num_layers=1,
                                         num_labels=3, dtype=dtype))
    yield "cnn_lstm", tagger, (words, chars, mask), rng.integers(0, 3, size=(N * PER, S)), mask.astype(np.float32)

results, f32_logits, initial = {}, {}, {}
for dtype in (None, "bfloat16"):
    for family, model, inputs, labels, weights in setups(dtype):
        if family not in initial:  # float32 parameters, shared by the float32 and bfloat16 models
            initial[family] = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]
        params = initial[family]

        def loss(p, *args):
            *xs, y, w = args
            logits = model.apply({"params": p}, *xs).logits
            ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1)[..., 0]
            return (ce * w).sum() / w.size, logits

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        (value, logits), grads = jax.jit(grad_fn)(params, *inputs, labels, weights)

        def per_device(p, *args):
            (v, lo), g = grad_fn(p, *args)
            return jax.lax.pmean(v, "d"), lo, jax.lax.pmean(g, "d")

        shard = lambda a: np.asarray(a).reshape(N, PER, *np.shape(a)[1:])
        p_value, p_logits, p_grads = jax.pmap(per_device, axis_name="d", in_axes=(None,) + (0,) * (len(inputs) + 2))(
            params, *[shard(a) for a in (*inputs, labels, weights)])
        f32_logits.setdefault(family, np.asarray(logits))  # same parameters: bfloat16 vs float32 compute
        leaves, p_leaves = jax.tree.leaves(grads), [g[0] for g in jax.tree.leaves(p_grads)]
        results[f"{family}/{dtype or 'float32'}"] = dict(
            logits_dtype=str(logits.dtype), logits_shape=list(logits.shape),
            finite=bool(np.isfinite(np.asarray(logits)).all() and np.isfinite(float(value))),
            grads_finite=all(bool(np.isfinite(np.asarray(g)).all()) for g in leaves),
            grads_nonzero=all(bool(np.abs(np.asarray(g)).max() > 0) for g in leaves),
            logits_diff=float(np.abs(np.asarray(p_logits).reshape(logits.shape) - np.asarray(logits)).max()),
            logits_scale=float(np.abs(np.asarray(logits)).max()),
            vs_float32=float(np.abs(np.asarray(logits) - f32_logits[family]).max()),
            loss_diff=float(abs(float(p_value[0]) - float(value))),
            # Max-norm of the difference relative to the max-norm of the whole gradient.
            grad_diff=max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(p_leaves, leaves))
            / max(float(np.abs(np.asarray(b)).max()) for b in leaves))
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def results():
    out = run_with_devices(SCRIPT, n=8)
    line = next(row for row in out.splitlines() if row.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("family, shape", [("bilstm", [16, 3]), ("cnn_lstm", [16, 6, 3])])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jit_grad_pmap(results, family, shape, dtype):
    r = results[f"{family}/{dtype}"]
    assert r["logits_dtype"] == "float32" and r["logits_shape"] == shape
    assert r["finite"] and r["grads_finite"] and r["grads_nonzero"]
    # The pmapped step (one shard per device, gradients averaged with pmean) matches the full-batch jit step.
    # bfloat16: a few units of its precision (2^-7 relative), from summing over 2 vs 16 examples.
    tol = 1e-5 if dtype == "float32" else 3e-2
    assert r["logits_diff"] <= tol * max(1.0, r["logits_scale"]), r
    assert r["loss_diff"] <= tol, r
    assert r["grad_diff"] <= tol, r
    # bfloat16 compute with float32 islands and cell state stays close to the float32 model (same parameters).
    assert r["vs_float32"] <= (0.0 if dtype == "float32" else 5e-3), r
