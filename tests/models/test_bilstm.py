"""The LSTM layer against numpy, PyTorch and onnxruntime references; the BiLSTM (pair) classifier."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.sites import Island, Site
from models.bilstm import LSTM, ONNX_GATE_ORDER, BiLSTMClassifier, BiLSTMConfig
from tests.models.lstm_reference import reference_lstm

D, H = 5, 3
# Right padding (lengths 7, 4, 1), left padding with a hole, and an empty row.
MASK = np.array([[1, 1, 1, 1, 1, 1, 1],
                 [1, 1, 1, 1, 0, 0, 0],
                 [1, 0, 0, 0, 0, 0, 0],
                 [0, 0, 1, 1, 0, 1, 1],
                 [0, 0, 0, 0, 0, 0, 0]], np.int32)


def _direction(params, name):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params[name])
    return p["input"]["kernel"], p["input"]["bias"], p["recurrent_kernel"]


@pytest.fixture(scope="module")
def lstm_setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(*MASK.shape, D)).astype(np.float32)
    layer = LSTM(H)
    params = jax.jit(layer.init)(jax.random.key(0), x, MASK)["params"]
    apply = jax.jit(lambda p, x_, m: layer.apply({"params": p}, x_, m))
    return x, params, apply


def test_lstm_matches_numpy_reference_both_directions_with_padding(lstm_setup):
    x, params, apply = lstm_setup
    y = np.asarray(apply(params, x, MASK))
    assert y.shape == (*MASK.shape, 2 * H) and y.dtype == np.float32
    fw, bw = _direction(params, "forward"), _direction(params, "backward")
    for b in range(MASK.shape[0]):
        real = np.flatnonzero(MASK[b])
        seq = x[b, real].astype(np.float64)
        if len(real):
            np.testing.assert_allclose(y[b, real, :H], reference_lstm(seq, *fw), atol=1e-5)
            # Backward direction: the reference reads the true-length sequence reversed.
            np.testing.assert_allclose(y[b, real, H:], reference_lstm(seq[::-1], *bw)[::-1], atol=1e-5)
        np.testing.assert_array_equal(y[b, MASK[b] == 0], 0.0)


def test_lstm_padded_inputs_do_not_reach_real_positions(lstm_setup):
    x, params, apply = lstm_setup
    noisy = np.where(MASK[..., None] == 1, x, 100.0 * np.random.default_rng(1).normal(size=x.shape))
    y, y_noisy = apply(params, x, MASK), apply(params, noisy.astype(np.float32), MASK)
    np.testing.assert_allclose(np.asarray(y_noisy), np.asarray(y), atol=1e-6)


def test_lstm_matches_torch_bidirectional_lstm():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch.nn.LSTM(D, H, batch_first=True, bidirectional=True).double()
    w = {k: v.detach().numpy() for k, v in ref.named_parameters()}
    params = {}
    for name, suffix in (("forward", "l0"), ("backward", "l0_reverse")):
        params[name] = {"input": {"kernel": w[f"weight_ih_{suffix}"].T.astype(np.float32),
                                  "bias": (w[f"bias_ih_{suffix}"] + w[f"bias_hh_{suffix}"]).astype(np.float32)},
                        "recurrent_kernel": w[f"weight_hh_{suffix}"].T.astype(np.float32)}
    x = np.random.default_rng(2).normal(size=(3, 6, D)).astype(np.float32)
    ours = np.asarray(LSTM(H).apply({"params": params}, x))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x.astype(np.float64)))[0].numpy()
        # Padded batch through PyTorch's packed sequences (right padding, lengths 6, 4, 2).
        lengths = np.array([6, 4, 2])
        mask = (np.arange(6)[None] < lengths[:, None]).astype(np.int32)
        packed = torch.nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x.astype(np.float64)),
                                                         torch.from_numpy(lengths), batch_first=True)
        theirs_padded = torch.nn.utils.rnn.pad_packed_sequence(ref(packed)[0], batch_first=True)[0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-5
    ours_padded = np.asarray(LSTM(H).apply({"params": params}, x, mask))
    assert np.abs(ours_padded - theirs_padded).max() <= 1e-5


def test_onnx_gate_order_and_sequence_lens_match_onnxruntime(lstm_setup):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    x, params, apply = lstm_setup
    mask = MASK[:3]  # right-padded rows: ONNX's sequence_lens covers these
    x = x[:3]

    def onnx_blocks(a):  # [4H, ...] in our gate order -> ONNX's [i, o, f, c]
        blocks = np.split(a, 4, axis=0)
        return np.concatenate([blocks[j] for j in ONNX_GATE_ORDER], axis=0)

    ws, rs, bs = [], [], []
    for name in ("forward", "backward"):
        w_ih, b, w_hh = (np.asarray(a, np.float32) for a in _direction(params, name))
        ws.append(onnx_blocks(w_ih.T))
        rs.append(onnx_blocks(w_hh.T))
        bs.append(np.concatenate([onnx_blocks(b), np.zeros(4 * H, np.float32)]))
    inits = [numpy_helper.from_array(np.stack(a), n) for a, n in ((ws, "W"), (rs, "R"), (bs, "B"))]
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "L"], ["Y"], direction="bidirectional", hidden_size=H)
    graph = helper.make_graph(
        [node], "lstm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [7, 3, D]),
                         helper.make_tensor_value_info("L", TensorProto.INT32, [3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [7, 2, 3, H])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y_onnx = sess.run(None, {"X": np.ascontiguousarray(x.transpose(1, 0, 2)), "L": mask.sum(1).astype(np.int32)})[0]
    # ONNX Y: [S, directions, B, H] -> [B, S, 2H]
    y_onnx = y_onnx.transpose(2, 0, 1, 3).reshape(3, 7, 2 * H)
    y = np.asarray(apply(params, x, mask))
    np.testing.assert_allclose(y[mask == 1], y_onnx[mask == 1], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Classifier

V = 30
TINY = dict(vocab_size=V, embed_dim=6, hidden_size=4, num_layers=2, mlp_hidden=5, num_labels=3, dropout_rate=0.0)


def _ids(shape, seed, lengths):
    ids = np.random.default_rng(seed).integers(1, V, size=shape).astype(np.int32)
    ids[np.arange(shape[1])[None] >= np.asarray(lengths)[:, None]] = 0
    return ids


@pytest.mark.parametrize("pooling", ["max", "mean", "attention"])
def test_pooling_over_real_tokens_and_padding_invariance(pooling):
    cfg = BiLSTMConfig(**TINY, pooling=pooling)
    model = BiLSTMClassifier(cfg)
    ids = _ids((3, 5), 0, [5, 3, 1])
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    apply = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))
    mask = (ids != 0).astype(np.int32)
    out = apply(params, ids, mask)
    y = np.asarray(out.hidden_states[-1], np.float64)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (3, 5, 6) and y.shape == (3, 5, 8)
    assert out.logits.shape == (3, 3) and out.logits.dtype == jnp.float32
    valid = mask[..., None] == 1
    if pooling == "max":
        expected = np.where(valid, y, -np.inf).max(1)
    elif pooling == "mean":
        expected = np.where(valid, y, 0).sum(1) / mask.sum(1, keepdims=True)
    else:
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["attention_pool"])
        scores = (np.tanh(y @ p["proj"]["kernel"] + p["proj"]["bias"]) @ p["score"]["kernel"])[..., 0]
        scores = np.where(mask == 1, scores, -np.inf)
        weights = np.exp(scores - scores.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
        expected = np.einsum("bs,bsf->bf", weights, y)
    np.testing.assert_allclose(np.asarray(out.pooled), expected, atol=1e-6)

    # Padding positions holding arbitrary ids change nothing.
    noisy = np.where(mask == 1, ids, np.random.default_rng(5).integers(1, V, size=ids.shape)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(apply(params, noisy, mask).logits), np.asarray(out.logits), atol=1e-6)


def test_mask_defaults_to_non_pad_ids():
    model = BiLSTMClassifier(BiLSTMConfig(**TINY, pad_id=2))
    ids = np.array([[5, 6, 2, 2], [7, 2, 8, 2]], np.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    apply = jax.jit(lambda p, *args: model.apply({"params": p}, *args).logits)
    explicit = apply(params, ids, (ids != 2).astype(np.int32))
    np.testing.assert_array_equal(np.asarray(apply(params, ids)), np.asarray(explicit))


def test_pair_features_and_symmetries():
    cfg = BiLSTMConfig(**TINY, pair=True, pooling="max")
    model = BiLSTMClassifier(cfg)
    a, b, c = _ids((2, 5), 0, [5, 2]), _ids((2, 4), 1, [3, 4]), _ids((2, 6), 2, [6, 1])
    params = jax.jit(model.init)(jax.random.key(0), a, word_ids_b=b)["params"]
    assert params["mlp"]["kernel"].shape == (cfg.feature_size, 5) and cfg.feature_size == 32
    apply = jax.jit(lambda p, x, y: model.apply({"params": p}, x, word_ids_b=y, output_hidden_states=True))
    ab, ba, ac = apply(params, a, b), apply(params, b, a), apply(params, a, c)
    f = 8
    assert ab.logits.shape == (2, 3) and ab.pooled.shape == (2, 4 * f)
    assert len(ab.hidden_states_b) == 3 and ab.hidden_states_b[-1].shape == (2, 4, f)
    u, v = np.asarray(ab.pooled[:, :f]), np.asarray(ab.pooled[:, f:2 * f])
    # u is the max over a's real tokens of a's last layer; v likewise for b.
    np.testing.assert_allclose(u, np.where((a != 0)[..., None], ab.hidden_states[-1], -np.inf).max(1), atol=1e-6)
    np.testing.assert_allclose(v, np.where((b != 0)[..., None], ab.hidden_states_b[-1], -np.inf).max(1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ab.pooled[:, 2 * f:3 * f]), np.abs(u - v), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ab.pooled[:, 3 * f:]), u * v, atol=1e-6)
    # Swapping the sentences swaps u and v and leaves the symmetric features as they were.
    np.testing.assert_allclose(np.asarray(ba.pooled[:, :f]), v, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ba.pooled[:, f:2 * f]), u, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ba.pooled[:, 2 * f:]), np.asarray(ab.pooled[:, 2 * f:]), atol=1e-6)
    # The shared encoder reads each sentence on its own.
    np.testing.assert_allclose(np.asarray(ac.pooled[:, :f]), u, atol=1e-6)
    assert not np.allclose(np.asarray(ac.logits), np.asarray(ab.logits))


def test_hidden_sites_gate_what_pooling_sees_and_logits_island():
    model = BiLSTMClassifier(BiLSTMConfig(**TINY, pooling="max"))
    ids = _ids((2, 4), 3, [4, 2])
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    seen_sites, seen_islands = [], []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, Site) and context.method_name == "__call__":
            path = "/".join(module.path)
            seen_sites.append((path, module.kind, args[0].shape))
            if path == "encoder/layer_1/hidden_site":  # gate off the last layer's forward units
                return args[0] * jnp.concatenate([jnp.zeros(4), jnp.ones(4)]).astype(args[0].dtype)
        if isinstance(module, Island) and context.method_name == "__call__":
            seen_islands.append(module.kind)
        return next_fun(*args, **kwargs)

    plain = model.apply({"params": params}, ids)
    with nn.intercept_methods(interceptor):
        gated = model.apply({"params": params}, ids)
    assert seen_sites == [("encoder/layer_0/hidden_site", "hidden", (2, 4, 8)),
                          ("encoder/layer_1/hidden_site", "hidden", (2, 4, 8))]
    assert seen_islands == ["logits"]
    np.testing.assert_array_equal(np.asarray(gated.pooled[:, :4]), 0.0)
    np.testing.assert_array_equal(np.asarray(gated.pooled[:, 4:]), np.asarray(plain.pooled[:, 4:]))


def test_dropout_only_in_training():
    model = BiLSTMClassifier(BiLSTMConfig(**{**TINY, "dropout_rate": 0.5}))
    ids = _ids((2, 4), 4, [4, 3])
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    eval_out = model.apply({"params": params}, ids).logits
    train_apply = jax.jit(lambda p, key: model.apply({"params": p}, ids, train=True, rngs={"dropout": key}).logits)
    train = [train_apply(params, jax.random.key(k)) for k in (1, 1, 2)]
    np.testing.assert_array_equal(np.asarray(train[0]), np.asarray(train[1]))
    assert not np.allclose(np.asarray(train[0]), np.asarray(eval_out))
    assert not np.allclose(np.asarray(train[0]), np.asarray(train[2]))


@pytest.fixture(scope="module")
def pair_model():
    model = BiLSTMClassifier(BiLSTMConfig(**TINY, pair=True))
    ids = _ids((2, 4), 0, [4, 2])
    return model, jax.jit(model.init)(jax.random.key(0), ids, word_ids_b=ids)["params"], ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "pass the second sentence as word_ids_b"),
    (dict(word_ids_b="ids", mask_b=np.ones((2, 3))), r"mask_b has shape \(2, 3\); expected \(2, 4\)"),
    (dict(word_ids_b="ids", mask=np.ones((2, 5))), r"mask has shape \(2, 5\); expected \(2, 4\)"),
    (dict(word_ids_b=np.array([[1, 30, 2]], np.int32)), r"word_ids_b contain ids outside the vocabulary \[0, 30\)"),
    (dict(word_ids_b=np.ones((3, 4), np.int32)), "different batch sizes: 2 and 3"),
    (dict(word_ids_b=np.ones((2, 4), np.float32)), "word_ids_b must be integer ids"),
])
def test_pair_bad_inputs(pair_model, kwargs, message):
    model, params, ids = pair_model
    kwargs = {k: (ids if isinstance(v, str) else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        model.apply({"params": params}, ids, **kwargs)


def test_single_bad_inputs():
    model = BiLSTMClassifier(BiLSTMConfig(**TINY))
    ids = _ids((2, 4), 0, [4, 2])
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    with pytest.raises(ValueError, match="set BiLSTMConfig.pair=True"):
        model.apply({"params": params}, ids, word_ids_b=ids)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 30\): min -1"):
        model.apply({"params": params}, np.array([[-1, 3]], np.int32))
    with pytest.raises(ValueError, match=r"word_ids must have 2 axes, got shape \(4,\)"):
        model.apply({"params": params}, ids[0])
    with pytest.raises(ValueError, match="LSTM input must be"):
        LSTM(2).init(jax.random.key(0), np.zeros((3, 4)))


@pytest.mark.parametrize("changes, error, message", [
    (dict(hidden_size=0), ValueError, "hidden_size must be >= 1"),
    (dict(num_layers=0), ValueError, "num_layers must be >= 1"),
    (dict(pooling="last"), ValueError, "pooling: 'last' is not allowed"),
    (dict(dropout_rate=1.0), ValueError, r"dropout_rate must be in \[0, 1\)"),
    (dict(pad_id=30), ValueError, r"pad_id=30 is outside the vocabulary \[0, 30\)"),
    (dict(dtype="float64"), ValueError, "unknown dtype 'float64'"),
    (dict(pair=1), TypeError, "BiLSTMConfig.pair: expected bool"),
    (dict(hidden_size=4.0), TypeError, "hidden_size: expected an int"),
])
def test_config_validation(changes, error, message):
    with pytest.raises(error, match=message):
        BiLSTMConfig(**{**TINY, **changes})


def test_config_round_trip_and_unknown_field():
    cfg = BiLSTMConfig(**TINY, pooling="attention", pair=True, dtype="bfloat16")
    assert BiLSTMConfig.from_dict(cfg.to_dict()) == cfg and cfg.family == "bilstm"
    with pytest.raises(ValueError, match=r"unknown BiLSTMConfig field\(s\) \['hidden'\]"):
        BiLSTMConfig.from_dict({**cfg.to_dict(), "hidden": 3})
