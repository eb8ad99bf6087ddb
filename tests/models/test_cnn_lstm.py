"""The CNN-LSTM tagger: character CNN against numpy, encoder and classifier wiring, padding, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.sites import Island, Site
from models.cnn_lstm import CNNLSTMConfig, CNNLSTMTagger
from tests.models.lstm_reference import reference_lstm

V, CV, W, F, H, C = 25, 12, 5, 4, 3, 6
TINY = dict(vocab_size=V, char_vocab_size=CV, word_embed_dim=W, char_embed_dim=3, char_filters=F, char_kernel_size=3,
            max_chars_per_token=C, hidden_size=H, num_layers=1, num_labels=4, dropout_rate=0.0)


def _batch(seed=0):
    """Two sentences (lengths 4 and 2) of tokens with 1..C characters; padding is id 0 everywhere."""
    rng = np.random.default_rng(seed)
    lengths = np.array([4, 2])
    word_ids = rng.integers(1, V, size=(2, 4)).astype(np.int32)
    mask = (np.arange(4)[None] < lengths[:, None]).astype(np.int32)
    word_ids[mask == 0] = 0
    chars = rng.integers(1, CV, size=(2, 4, C)).astype(np.int32)
    n_chars = rng.integers(1, C + 1, size=(2, 4))
    n_chars[0, 0] = C  # one token fills the character window
    chars[np.arange(C)[None, None] >= n_chars[..., None]] = 0
    chars[mask == 0] = 0
    return word_ids, chars, mask


@pytest.fixture(scope="module")
def tagger():
    model = CNNLSTMTagger(CNNLSTMConfig(**TINY))
    word_ids, chars, mask = _batch()
    params = model.init(jax.random.key(0), word_ids, chars, mask)["params"]
    apply = jax.jit(lambda p, w, c, m: model.apply({"params": p}, w, c, m, output_hidden_states=True))
    return model, params, apply


def _numpy_char_features(params, chars):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["char_cnn"])
    real = chars != 0
    e = np.where(real[..., None], p["char_embedding"]["embedding"][chars], 0.0)  # [B, S, L, E]
    padded = np.pad(e, ((0, 0), (0, 0), (1, 1), (0, 0)))  # kernel 3, "SAME": one zero each side
    kernel = p["conv"]["kernel"]  # [K, E, F]
    conv = sum(padded[:, :, k:k + chars.shape[2]] @ kernel[k] for k in range(3)) + p["conv"]["bias"]
    return np.where(real[..., None], np.maximum(conv, 0), 0).max(2)


def test_token_features_match_numpy_char_cnn_and_word_embeddings(tagger):
    _, params, apply = tagger
    word_ids, chars, mask = _batch()
    out = apply(params, word_ids, chars, mask)
    x = np.asarray(out.hidden_states[0])
    assert x.shape == (2, 4, W + F)
    np.testing.assert_allclose(x[..., :W], np.asarray(params["word_embedding"]["embedding"])[word_ids], atol=1e-7)
    np.testing.assert_allclose(x[..., W:], _numpy_char_features(params, chars), atol=1e-5)
    np.testing.assert_array_equal(x[mask == 0][:, W:], 0.0)  # tokens without characters


def test_encoder_and_per_token_classifier(tagger):
    _, params, apply = tagger
    word_ids, chars, mask = _batch()
    out = apply(params, word_ids, chars, mask)
    assert out.logits.shape == (2, 4, 4) and out.logits.dtype == jnp.float32 and out.pooled is None
    x, y = np.asarray(out.hidden_states[0], np.float64), np.asarray(out.hidden_states[1])
    enc = jax.tree.map(lambda a: np.asarray(a, np.float64), params["encoder"]["layer_0"])
    for b, length in enumerate(mask.sum(1)):
        seq = x[b, :length]
        for name, cols, reverse in (("forward", slice(0, H), False), ("backward", slice(H, 2 * H), True)):
            p = enc[name]
            ref = reference_lstm(seq[::-1] if reverse else seq, p["input"]["kernel"], p["input"]["bias"],
                                 p["recurrent_kernel"])
            np.testing.assert_allclose(y[b, :length, cols], ref[::-1] if reverse else ref, atol=1e-5)
    cls = params["classifier"]
    np.testing.assert_allclose(np.asarray(out.logits), y @ np.asarray(cls["kernel"]) + np.asarray(cls["bias"]),
                               atol=1e-5)


def test_padding_does_not_change_real_tokens(tagger):
    _, params, apply = tagger
    word_ids, chars, mask = _batch()
    base = np.asarray(apply(params, word_ids, chars, mask).logits)
    # Arbitrary ids at padded tokens.
    noisy_words = np.where(mask == 1, word_ids, 9).astype(np.int32)
    noisy_chars = np.where(mask[..., None] == 1, chars, 5).astype(np.int32)
    np.testing.assert_allclose(np.asarray(apply(params, noisy_words, noisy_chars, mask).logits)[mask == 1],
                               base[mask == 1], atol=1e-6)
    # More padding characters per token (a longer character window) give the same features.
    wide = CNNLSTMTagger(CNNLSTMConfig(**{**TINY, "max_chars_per_token": C + 3}))
    wide_chars = np.concatenate([chars, np.zeros((2, 4, 3), np.int32)], axis=2)
    np.testing.assert_allclose(np.asarray(wide.apply({"params": params}, word_ids, wide_chars, mask).logits), base,
                               atol=1e-6)


def test_hidden_sites_and_logits_island(tagger):
    model, params, _ = tagger
    word_ids, chars, mask = _batch()
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, (Site, Island)) and context.method_name == "__call__":
            seen.append(("/".join(context.module.path), context.module.kind))
            if isinstance(context.module, Site):
                return jnp.zeros_like(args[0])  # gate off every hidden unit
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = model.apply({"params": params}, word_ids, chars, mask)
    assert seen == [("encoder/layer_0/hidden_site", "hidden"), ("logits_island", "logits")]
    # With all hidden units gated the logits are the classifier bias at every token.
    np.testing.assert_allclose(np.asarray(out.logits),
                               np.broadcast_to(np.asarray(params["classifier"]["bias"]), (2, 4, 4)), atol=1e-7)


def test_bad_inputs(tagger):
    model, params, _ = tagger
    word_ids, chars, mask = _batch()
    bad_chars = np.where(chars > 0, CV, 0).astype(np.int32)
    bad_words = np.where(mask > 0, V + 1, 0).astype(np.int32)
    cases = [
        ((word_ids, chars[:, :3], mask),
         r"char_ids has shape \(2, 3, 6\); its first two axes must match word_ids \(2, 4\)"),
        ((word_ids, chars[..., :4], mask),
         "char_ids has 4 characters per token; the model expects max_chars_per_token=6"),
        ((word_ids, chars[..., 0], mask), r"char_ids must have 3 axes, got shape \(2, 4\)"),
        ((word_ids, bad_chars, mask), r"char_ids contain ids outside the vocabulary \[0, 12\)"),
        ((bad_words, chars, mask), r"word_ids contain ids outside the vocabulary \[0, 25\)"),
        ((word_ids, chars, mask[:, :3]), r"mask has shape \(2, 3\); expected \(2, 4\)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model.apply({"params": params}, *args)


@pytest.mark.parametrize("changes, message", [
    (dict(char_kernel_size=0), "char_kernel_size must be >= 1"),
    (dict(max_chars_per_token=0), "max_chars_per_token must be >= 1"),
    (dict(pad_id=12), r"pad_id=12 is outside the char_vocab_size \[0, 12\)"),
    (dict(dropout_rate=-0.1), r"dropout_rate must be in \[0, 1\)"),
    (dict(param_dtype="int8"), "unknown dtype 'int8'"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        CNNLSTMConfig(**{**TINY, **changes})
    cfg = CNNLSTMConfig(**TINY)
    assert CNNLSTMConfig.from_dict(cfg.to_dict()) == cfg and cfg.family == "cnn_lstm"
