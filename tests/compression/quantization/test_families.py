"""The same quantization code on the LSTM families: BiLSTM (attention pooling) and CNN-LSTM (Conv)."""

import jax
import jax.numpy as jnp
import numpy as np

from compression import quantization as q
from models.bilstm import BiLSTMClassifier, BiLSTMConfig
from models.cnn_lstm import CNNLSTMConfig, CNNLSTMTagger


def _check_pipeline(model, variables, calls, method):
    """Calibrate, fake-quantize, convert to int8; returns (calibrated variables, int8 variables)."""
    calibrated = q.calibrate(model.apply, variables, calls, method=method)
    assert all(np.isfinite(float(s)) and float(s) > 0 for s in jax.tree.leaves(calibrated["quant"]))
    first = calls[0]
    t = q.int8()
    v8 = t.init(jax.random.key(0), calibrated, model.apply, *first.args, **first.kwargs)
    fake_apply, int8_apply = q.fake_quant().wrap(model.apply), t.wrap(model.apply)

    @jax.jit
    def run(v, c, c8, a, kw):  # float, fake-quantized and int8 logits in one compilation
        return model.apply(v, *a, **kw).logits, fake_apply(c, *a, **kw).logits, int8_apply(c8, *a, **kw).logits

    ref, fake, int8 = run(variables, calibrated, v8, first.args, first.kwargs)
    np.testing.assert_allclose(fake, ref, atol=0.05 * float(jnp.abs(ref).max()) + 1e-4)
    assert not np.allclose(fake, ref, rtol=0, atol=1e-7)  # quantization did act
    np.testing.assert_array_equal(int8, fake)  # the int8 kernels compute what the simulation computes
    return calibrated, v8


def test_bilstm_classifier():
    cfg = BiLSTMConfig(vocab_size=40, embed_dim=8, hidden_size=6, mlp_hidden=5, pooling="attention", dropout_rate=0.0)
    model = BiLSTMClassifier(cfg)
    rng = np.random.default_rng(0)
    calls = [q.Call((jnp.asarray(rng.integers(1, 40, (4, 7))),)) for _ in range(2)]
    variables = jax.jit(model.init)(jax.random.key(0), *calls[0].args, **calls[0].kwargs)
    calibrated, v8 = _check_pipeline(model, variables, calls, "max")
    layer = calibrated["quant"]["encoder"]["layer_0"]
    # both directions read the same input: one shared scale at the LSTM layer
    assert set(layer) == {"shared_input_scale"}
    assert v8["params"]["encoder"]["layer_0"]["forward"]["input"]["kernel"].dtype == jnp.int8
    assert v8["params"]["attention_pool"]["proj"]["kernel"].dtype == jnp.int8
    assert v8["params"]["embedding"]["embedding"].dtype == jnp.float32  # embeddings stay float by default


def test_cnn_lstm_tagger_quantizes_the_conv():
    cfg = CNNLSTMConfig(vocab_size=30, char_vocab_size=20, word_embed_dim=6, char_embed_dim=4, char_filters=5,
                        max_chars_per_token=6, hidden_size=4, num_labels=3, dropout_rate=0.0)
    model = CNNLSTMTagger(cfg)
    rng = np.random.default_rng(1)
    calls = [q.Call((jnp.asarray(rng.integers(1, 30, (2, 5))),
                                 jnp.asarray(rng.integers(0, 20, (2, 5, 6))))) for _ in range(2)]
    variables = jax.jit(model.init)(jax.random.key(0), *calls[0].args)
    calibrated, v8 = _check_pipeline(model, variables, calls, "mse")
    assert "input_scale" in calibrated["quant"]["char_cnn"]["conv"]
    # the Conv keeps a float kernel and runs fake-quantized, per output channel
    conv_kernel = v8["params"]["char_cnn"]["conv"]["kernel"]
    assert conv_kernel.dtype == jnp.float32 and conv_kernel.shape == (3, 4, 5)
    assert v8["params"]["classifier"]["kernel"].dtype == jnp.int8
