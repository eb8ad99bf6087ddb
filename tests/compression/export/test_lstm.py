"""The LSTM families: lax.scan becomes an ONNX Loop (the hoisted input projection stays a MatMul
outside it), the char CNN a Conv; parity at sequence lengths other than the traced one."""

import jax
import numpy as np
import onnx

from compression.export import export
from models.bilstm import BiLSTMClassifier, BiLSTMConfig
from models.cnn_lstm import CNNLSTMConfig, CNNLSTMTagger
from tests.compression.export.conftest import ort_run


def _leaves(model, variables, feeds):
    out = jax.jit(lambda v, kw: model.apply(v, **kw))(variables, feeds)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(out)]


def _inputs(b, s, seed, vocab=40):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, s), np.int32)
    mask[0, s - 1:] = 0
    return {"word_ids": rng.integers(1, vocab, (b, s)).astype(np.int32), "mask": mask}


def test_bilstm_exports_as_loop(tmp_path):
    cfg = BiLSTMConfig(vocab_size=40, embed_dim=8, hidden_size=6, num_layers=2, mlp_hidden=10, num_labels=3,
                       pooling="mean")
    model = BiLSTMClassifier(cfg)
    variables = model.init(jax.random.key(0), **_inputs(2, 5, 0))
    path = tmp_path / "bilstm.onnx"
    report = export(model.apply, variables, _inputs(2, 5, 0), str(path))
    assert report.op_counts["Loop"] == 2  # one scan per layer (both directions in one loop)
    graph = onnx.load(str(path)).graph
    bodies = [a.g for n in graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body"]
    # only the recurrent matmul runs inside the loop; the input projections (2 per layer) stay outside
    assert [[n.op_type for n in body.node].count("MatMul") for body in bodies] == [1, 1]
    assert [n.op_type for n in graph.node].count("MatMul") == 2 * 2 + 2  # + mlp and classifier
    feeds = _inputs(3, 9, 3)
    want = _leaves(model, variables, feeds)
    for got, w in zip(ort_run(path, feeds), want):
        np.testing.assert_allclose(got, w, atol=1e-5)
    # float16 variant: the Loop (recurrence) stays float32, the projections outside it run in float16
    p16 = tmp_path / "bilstm_fp16.onnx"
    export(model.apply, variables, _inputs(2, 5, 0), str(p16), precision="fp16")
    loop = next(n for n in onnx.load(str(p16)).graph.node if n.op_type == "Loop")
    assert [a for a in loop.attribute if a.name == "body"]
    for got, w in zip(ort_run(p16, feeds), want):
        np.testing.assert_allclose(got, w, atol=1e-2 + 1e-2 * np.abs(w).max())


def test_cnn_lstm_exports_conv_and_loop(tmp_path):
    cfg = CNNLSTMConfig(vocab_size=40, char_vocab_size=20, word_embed_dim=6, char_embed_dim=4, char_filters=5,
                        max_chars_per_token=6, hidden_size=4, num_labels=3)
    model = CNNLSTMTagger(cfg)

    def inputs(b, s, seed):
        feeds = _inputs(b, s, seed)
        chars = np.random.default_rng(seed).integers(1, 20, (b, s, 6)).astype(np.int32)
        chars[:, :, 4:] = 0
        return {**feeds, "char_ids": chars}

    variables = model.init(jax.random.key(0), **inputs(2, 5, 0))
    path = tmp_path / "cnn_lstm.onnx"
    report = export(model.apply, variables, inputs(2, 5, 0), str(path),
                    dynamic_axes={"word_ids": ("batch", "sequence"), "mask": ("batch", "sequence"),
                                  "char_ids": ("batch", "sequence", None)})
    assert report.op_counts["Conv"] == 1 and report.op_counts["Loop"] == 1
    feeds = inputs(3, 8, 1)
    want = _leaves(model, variables, feeds)
    for got, w in zip(ort_run(path, feeds), want):
        np.testing.assert_allclose(got, w, atol=1e-5)
    p16 = tmp_path / "cnn_lstm_fp16.onnx"
    export(model.apply, variables, inputs(2, 5, 0), str(p16), precision="fp16",
           dynamic_axes={"word_ids": ("batch", "sequence"), "mask": ("batch", "sequence"),
                         "char_ids": ("batch", "sequence", None)})
    conv = next(n for n in onnx.load(str(p16)).graph.node if n.op_type == "Conv")
    assert any(t.name == conv.input[1] and t.data_type == onnx.TensorProto.FLOAT16
               for t in onnx.load(str(p16)).graph.initializer)
    for got, w in zip(ort_run(p16, feeds), want):
        np.testing.assert_allclose(got, w, atol=1e-2 + 1e-2 * np.abs(w).max())
