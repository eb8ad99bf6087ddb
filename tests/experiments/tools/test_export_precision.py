"""experiments.tools.export from the command line for every family (Transformer, BiLSTM, CNN-LSTM): int8 and FP8
Q/DQ files calibrated on the task as the model reads it, through the parity gate, with matmul FLOPs by format in
parity.json and strongly typed TensorRT commands; and a precision plan's file."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
from compression import quantization as q
from compression.quantization.plans import PrecisionPlan, find_sites
from experiments.data import load_task
from experiments.jobs.train import _word_level_tokenizer
from experiments.techniques import qat
from experiments.runtime import cli
from experiments.tools import export as export_cli
from models.bilstm import BiLSTMClassifier, BiLSTMConfig
from models.cnn_lstm import CNNLSTMConfig, CNNLSTMTagger
from models.transformer import Transformer, TransformerConfig

SIZE, MAX_LEN = 160, 16
CALIB = ["--calib_batches=2", "--calib_batch_size=8", f"--synthetic_size={SIZE}", "--flop_sequence=12"]


def _transformer(root):
    probe = types.SimpleNamespace(data_dir=None, max_length=MAX_LEN, seed=0, synthetic_size=SIZE, selection="holdout",
                                  selection_size=0)
    tok = _word_level_tokenizer("synthetic", probe, str(root / "tokenizer"))
    cfg = TransformerConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_position_embeddings=MAX_LEN, num_labels=2)
    params = jax.jit(Transformer(cfg).init)(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
    models.save(root / "model", "transformer", cfg, params, tokenizer_dir=root / "tokenizer",
                extra={"task": "synthetic", "max_length": MAX_LEN})
    return "synthetic"


def _word_level(root, family):
    chars = {"max_word_chars": 6} if family == "cnn_lstm" else {}
    task = load_task("synthetic" if family == "bilstm" else "synthetic_ner", max_length=MAX_LEN, synthetic_size=SIZE,
                     word_vocab="build", **chars)
    if family == "bilstm":
        cfg = BiLSTMConfig(vocab_size=len(task.word_vocab), embed_dim=8, hidden_size=8, mlp_hidden=8)
        params = jax.jit(BiLSTMClassifier(cfg).init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    else:
        cfg = CNNLSTMConfig(vocab_size=len(task.word_vocab), char_vocab_size=len(task.char_vocab), word_embed_dim=8,
                            char_embed_dim=4, char_filters=6, max_chars_per_token=6, hidden_size=8,
                            num_labels=task.num_labels)
        params = jax.jit(CNNLSTMTagger(cfg).init)(jax.random.key(1), jnp.ones((1, 4), jnp.int32),
                                                  jnp.ones((1, 4, 6), jnp.int32))["params"]
    vocab = root / "vocab"
    vocab.mkdir()
    task.word_vocab.save(vocab / "word_vocab.json")
    if task.char_vocab is not None:
        task.char_vocab.save(vocab / "char_vocab.json")
    models.save(root / "model", family, cfg, params, tokenizer_dir=vocab, extra={"task": task.name,
                                                                                 "max_length": MAX_LEN})
    return task.name


def _dq_types(path):
    m = onnx.load(str(path))
    inits = {t.name: t.data_type for t in m.graph.initializer}
    return {inits[n.input[2]] for g in _graphs(m.graph) for n in g.node if n.op_type == "DequantizeLinear"}


def _graphs(g):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


@pytest.mark.parametrize("family", ["transformer", "bilstm", "cnn_lstm"])
def test_every_family_exports_int8_and_fp8_from_the_command_line(family, tmp_path, capsys):
    task = _transformer(tmp_path) if family == "transformer" else _word_level(tmp_path, family)
    out = tmp_path / "onnx"
    report = export_cli.run(cli.parse(export_cli.define_flags, [
        f"--model={tmp_path / 'model'}", f"--out={out}", "--precision=fp32,int8,fp8", f"--calib_task={task}",
        *CALIB]))
    printed = capsys.readouterr().out
    files = report["files"]
    assert set(files) == {"model_fp32.onnx", "model_int8.onnx", "model_fp8.onnx"}
    assert files["model_int8.onnx"]["opset"] == 17 and files["model_fp8.onnx"]["opset"] == 19
    assert _dq_types(out / "model_int8.onnx") == {onnx.TensorProto.INT8}
    assert _dq_types(out / "model_fp8.onnx") == {onnx.TensorProto.FLOAT8E4M3FN}
    # each Q/DQ file passed the gate against its own fake-quantized JAX model
    for name in ("model_int8.onnx", "model_fp8.onnx"):
        assert all(c["relative_rms"] <= c["rms_bound"] for c in files[name]["comparisons"])
    flops = {name: f["matmul_flops"] for name, f in files.items()}
    assert len({f["total"] for f in flops.values()}) == 1  # the same work in every file
    assert flops["model_fp32.onnx"]["fractions"]["float"] == 1.0
    assert flops["model_int8.onnx"]["by_format"]["fp8"] == 0 < flops["model_int8.onnx"]["by_format"]["int8"]
    assert flops["model_fp8.onnx"]["by_format"]["int8"] == 0 < flops["model_fp8.onnx"]["by_format"]["fp8"]
    assert flops["model_int8.onnx"]["by_format"]["int8"] == flops["model_fp8.onnx"]["by_format"]["fp8"]
    if family != "transformer":  # the recurrence h @ W_hh is no module: it stays float
        assert flops["model_fp8.onnx"]["by_format"]["float"] > 0
    if family == "cnn_lstm":  # the character Conv is quantized in the graph as in the fake-quantized model
        assert flops["model_int8.onnx"]["nodes"]["int8"] == 4  # conv, two input projections, classifier
    script = (out / "tensorrt.sh").read_text()
    assert "# model_fp8.onnx (fp8): TensorRT >= 10 and compute capability >= 8.9" in script
    assert "trtexec --onnx=model_fp8.onnx --saveEngine=model_fp8.plan --stronglyTyped" in script
    assert "trtexec --onnx=model_int8.onnx --saveEngine=model_int8.plan --stronglyTyped" in script
    assert "model_fp8.onnx: max |onnxruntime - JAX|" in printed and "fp8 " in printed
    # the FP8 file computes what the FP8 fake-quantized model computes on a batch it never saw
    model, cfg, params = models.load(str(tmp_path / "model"))
    calibration = export_cli.calibration_inputs(str(tmp_path / "model"), task, None, 2, 8, synthetic_size=SIZE)
    fp8 = q.calibrate(model.apply, {"params": params}, calibration, q.FP8_RULES)
    feeds = export_cli.signature(family, cfg, batch=3, seq=9, seed=7).inputs
    want = np.asarray(q.fake_quant(q.FP8_RULES).wrap(model.apply)(fp8, **feeds).logits)
    sess = ort.InferenceSession(str(out / "model_fp8.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], feeds)[0]
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, atol=1e-4 + 1e-4 * np.abs(want).max(), rtol=0)


def test_plan_file_from_the_model_directory(tmp_path):
    """A model directory carrying a precision plan (and its QAT scales) exports the plan's mixed file: its int8,
    FP8 and float sites in the graph, the FLOP shares of the plan."""
    task = _word_level(tmp_path, "bilstm")
    model_dir = str(tmp_path / "model")
    model, cfg, params = models.load(model_dir)
    sig = export_cli.signature("bilstm", cfg)
    sites = find_sites(model.apply, {"params": params}, **sig.inputs)
    names = [s.name for s in sites]
    assert names == ["encoder/layer_0", "mlp", "classifier"]
    plan = PrecisionPlan.uniform(sites, "int8").with_formats({"mlp": "fp8", "classifier": "float"})
    calibration = export_cli.calibration_inputs(model_dir, task, None, 2, 8, synthetic_size=SIZE)
    state = q.calibrate(model.apply, {"params": params}, calibration, plan.rules())[q.QUANT]
    qat.save_quant_state(os.path.join(model_dir, qat.QUANT_STATE_FILE), state)
    qat.save_plan(qat.plan_path(model_dir), plan)
    out = tmp_path / "onnx"
    report = export_cli.run(cli.parse(export_cli.define_flags, [
        f"--model={model_dir}", f"--out={out}", "--precision=plan",
        f"--quant_state={os.path.join(model_dir, qat.QUANT_STATE_FILE)}", "--flop_sequence=10"]))
    info = report["files"]["model_plan.onnx"]
    assert info["opset"] == 19 and report["plan"]["sites"][1] == {"site": "mlp", "format": "fp8",
                                                                  "modules": ["mlp"], "flops": sites[1].flops}
    assert _dq_types(out / "model_plan.onnx") == {onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN}
    nodes = info["matmul_flops"]["nodes"]
    assert nodes == {"int8": 2, "fp8": 1, "float": 2}  # input projections; mlp; classifier and the recurrence
    assert json.loads((out / "parity.json").read_text())["files"]["model_plan.onnx"]["precision"] == "plan"
    assert "# model_plan.onnx (mixed):" in (out / "tensorrt.sh").read_text()
