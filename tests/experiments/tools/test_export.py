"""experiments.tools.export (model directory -> ONNX files, parity.json, TensorRT commands) and
experiments.tools.export_eval (dev accuracy of the exports beside JAX), on tiny models and generated data."""

import json
import os

import jax
import numpy as np
import onnxruntime as ort
import pytest
import tokenizers
from absl import flags
from tokenizers import models as tok_models, pre_tokenizers

import models
from compression.export import ExportError
from experiments.techniques import qat
from experiments.tools import export as export_cli
from experiments.runtime import cli
from experiments.tools import export_eval
from models.bilstm import BiLSTMClassifier, BiLSTMConfig
from models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                        max_position_embeddings=32, num_labels=2)


def _save_transformer(path, tokenizer_dir=None, poison=False):
    ids = np.ones((2, 4), np.int32)
    params = jax.tree.map(np.array, Transformer(CFG).init(jax.random.key(0), ids)["params"])
    if poison:
        params["encoder"]["layer_0"]["output"]["bias"][3] = np.nan
    models.save(path, "transformer", CFG, params, tokenizer_dir=tokenizer_dir)
    return params


def _ort(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_export_model_dir_writes_all_precisions(tmp_path):
    params = _save_transformer(tmp_path / "model")
    sig = export_cli.signature("transformer", CFG, batch=4, seq=8, seed=3)
    calibration = [export_cli.signature("transformer", CFG, batch=4, seq=8, seed=s).inputs for s in range(2)]
    out = tmp_path / "onnx"
    report = export_cli.export_model_dir(str(tmp_path / "model"), str(out), ["fp32", "fp16", "int8"],
                                         calibration=calibration)
    assert sorted(os.listdir(out)) == ["_COMPLETE", "model_fp16.onnx", "model_fp32.onnx", "model_int8.onnx", "parity.json",
                                       "tensorrt.sh"]
    assert json.loads((out / "parity.json").read_text())["files"].keys() == {
        "model_fp32.onnx", "model_fp16.onnx", "model_int8.onnx"}
    assert report["files"]["model_int8.onnx"]["op_counts"]["QuantizeLinear"] == 8
    script = (out / "tensorrt.sh").read_text()
    assert "trtexec --onnx=model_int8.onnx --saveEngine=model_int8.plan --stronglyTyped" in script
    # the sequence range stops at the position table (32)
    assert "--optShapes=input_ids:32x32,attention_mask:32x32,token_type_ids:32x32" in script
    assert "--maxShapes=input_ids:64x32,attention_mask:64x32,token_type_ids:64x32" in script
    # the fp32 file against JAX at sizes the export never saw
    want = Transformer(CFG).apply({"params": params}, **sig.inputs)
    got = _ort(out / "model_fp32.onnx", sig.inputs)
    assert set(got) == {"logits", "last_hidden_state", "pooled"}
    np.testing.assert_allclose(got["logits"], want.logits, atol=1e-4)


def test_export_errors_leave_nothing(tmp_path):
    _save_transformer(tmp_path / "model")
    _save_transformer(tmp_path / "poisoned", poison=True)
    with pytest.raises(ExportError, match="int8 export needs calibration state"):
        export_cli.export_model_dir(str(tmp_path / "model"), str(tmp_path / "a"), ["int8"])
    with pytest.raises(ExportError, match=r"encoder/layer_0/output/bias \(1 NaN"):
        export_cli.export_model_dir(str(tmp_path / "poisoned"), str(tmp_path / "b"), ["fp32"])
    with pytest.raises(ExportError, match="precisions must be"):
        export_cli.export_model_dir(str(tmp_path / "model"), str(tmp_path / "c"), ["fp64"])
    assert sorted(os.listdir(tmp_path)) == ["model", "poisoned"]  # no output dir, no temporary left


def test_quant_state_round_trip(tmp_path):
    quant = {"encoder": {"layer_0": {"attention": {"shared_input_scale": np.float32(0.25)},
                                     "output": {"input_scale": np.float32(0.5)}}}}
    qat.save_quant_state(str(tmp_path / "q.npz"), quant)
    back = qat.load_quant_state(str(tmp_path / "q.npz"))
    assert float(back["encoder"]["layer_0"]["attention"]["shared_input_scale"]) == 0.25
    assert float(back["encoder"]["layer_0"]["output"]["input_scale"]) == 0.5
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="holds no quantization state"):
        qat.load_quant_state(str(tmp_path / "empty.npz"))


def test_cli_bilstm_pair(tmp_path, capsys):
    cfg = BiLSTMConfig(vocab_size=30, embed_dim=8, hidden_size=4, mlp_hidden=6, pair=True)
    sig = export_cli.signature("bilstm", cfg, batch=3, seq=5)
    params = BiLSTMClassifier(cfg).init(jax.random.key(0), **sig.inputs)["params"]
    models.save(tmp_path / "model", "bilstm", cfg, params)
    export_cli.run(cli.parse(export_cli.define_flags, [f"--model={tmp_path / 'model'}", f"--out={tmp_path / 'out'}",
                                                       "--precision=fp32"]))
    printed = capsys.readouterr().out
    assert "model_fp32.onnx: max |onnxruntime - JAX|" in printed and "trtexec --onnx=model_fp32.onnx" in printed
    feeds = export_cli.signature("bilstm", cfg, batch=2, seq=7, seed=1).inputs
    want = BiLSTMClassifier(cfg).apply({"params": params}, **feeds).logits
    np.testing.assert_allclose(_ort(tmp_path / "out" / "model_fp32.onnx", feeds)["logits"], want, atol=1e-5)


def test_bad_flags_fail_when_parsed(tmp_path):
    _save_transformer(tmp_path / "model")
    (tmp_path / "taken").mkdir()
    ok = [f"--model={tmp_path / 'model'}", f"--out={tmp_path / 'out'}", "--precision=fp32"]
    for tool, extra in ((export_cli, []), (export_eval, ["--task=synthetic"])):
        for args, match in (([f"--model={tmp_path}"], "flag --model=.*is not a model directory"),
                            (["--precision=fp32,fp64"], r"flag --precision=\['fp32', 'fp64'\]: must be"),
                            (["--calib_method=kl"], "flag --calib_method=kl: must name calibrators"),
                            ([f"--out={tmp_path / 'taken'}"], "--out exists; pass --overwrite")):
            with pytest.raises(flags.Error, match=match):  # when parsed: nothing loaded yet
                cli.parse(tool.define_flags, [*ok, *extra, *args])  # the last of a repeated flag wins
    with pytest.raises(flags.Error, match="int8 export needs calibration state"):
        cli.parse(export_cli.define_flags, [*ok, "--precision=int8"])
    with pytest.raises(flags.Error, match="flag --calib_task=sst3: is not a task name"):
        cli.parse(export_cli.define_flags, [*ok, "--precision=int8", "--calib_task=sst3"])
    with pytest.raises(flags.Error, match="flag --task=sst3: is not a task name"):
        cli.parse(export_eval.define_flags, [*ok, "--task=sst3"])


def _word_tokenizer(directory, words):
    vocab = {w: i for i, w in enumerate(("[PAD]", "[UNK]", "[CLS]", "[SEP]", *words))}
    tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))


def test_export_eval_on_a_synthetic_task(tmp_path):
    from experiments.data import load_task
    from experiments.data.synthetic import COPULAS, INTENSIFIERS, NEGATIONS, NEGATIVE, POSITIVE, SUBJECTS
    words = sorted({w for phrase in SUBJECTS + POSITIVE + NEGATIVE + NEGATIONS + COPULAS + INTENSIFIERS
                    for w in phrase.split()} | {",", ".", "overall"})
    _word_tokenizer(tmp_path / "tok", words)
    params = _save_transformer(tmp_path / "model", tokenizer_dir=tmp_path / "tok")
    result = export_eval.evaluate_exports(str(tmp_path / "model"), "synthetic", None, str(tmp_path / "out"),
                                          calib_batches=2, batch_size=16, max_length=16, max_examples=40,
                                          synthetic_size=(64, 40))
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["jax_fp32", "jax_int8_fake_quant", "onnx_fp32", "onnx_fp16", "onnx_int8"]
    # the reported JAX accuracy, recomputed independently from the same dev split
    dev = load_task("synthetic", None, tokenizer=str(tmp_path / "model"), max_length=16,
                    synthetic_size=(64, 40)).dev
    correct = total = 0
    for b in dev.batches(16):
        keep = b["example_weight"] > 0
        logits = Transformer(CFG).apply({"params": params}, b["input_ids"], b["attention_mask"],
                                        b["token_type_ids"]).logits
        correct += int((np.asarray(logits).argmax(-1) == b["labels"])[keep].sum())
        total += int(keep.sum())
    assert result["dev_examples"] == total == 40
    assert rows["jax_fp32"]["accuracy"] == pytest.approx(correct / total)
    assert rows["onnx_fp32"]["agreement"] >= 39 / 40 and abs(rows["onnx_fp32"]["delta_points"]) <= 2.5
    assert rows["jax_fp32"]["delta_points"] == 0.0
    assert os.path.exists(tmp_path / "out" / "eval.json")


def test_export_eval_uses_the_scales_a_qat_model_carries(tmp_path, monkeypatch):
    """A model directory with quant_state.npz (a QAT run's) is exported and scored with those scales, not
    recalibrated: the int8 rows follow the carried state (here deliberately coarse scales)."""
    from compression import quantization as q
    from experiments.data import load_task
    from experiments.data.synthetic import COPULAS, INTENSIFIERS, NEGATIONS, NEGATIVE, POSITIVE, SUBJECTS
    words = sorted({w for phrase in SUBJECTS + POSITIVE + NEGATIVE + NEGATIONS + COPULAS + INTENSIFIERS
                    for w in phrase.split()} | {",", ".", "overall"})
    _word_tokenizer(tmp_path / "tok", words)
    params = _save_transformer(tmp_path / "model", tokenizer_dir=tmp_path / "tok")
    dev = load_task("synthetic", None, tokenizer=str(tmp_path / "model"), max_length=16, synthetic_size=(64, 40)).dev
    sample = next(dev.batches(16))
    calibrated = q.calibrate(Transformer(CFG).apply, {"params": params}, [{k: sample[k] for k in
                                                                           ("input_ids", "attention_mask")}])
    carried = jax.tree.map(lambda s: np.asarray(s) * 8.0, calibrated[q.QUANT])  # coarse on purpose
    qat.save_quant_state(str(tmp_path / "model" / "quant_state.npz"), carried)
    monkeypatch.setattr(q, "calibrate", lambda *a, **k: pytest.fail("recalibrated a QAT model"))
    result = export_eval.evaluate_exports(str(tmp_path / "model"), "synthetic", None, str(tmp_path / "out"),
                                          precisions=("fp32", "int8"), batch_size=16, max_length=16,
                                          max_examples=40, synthetic_size=(64, 40))
    rows = {r["name"]: r for r in result["rows"]}
    fake = q.fake_quant().wrap(Transformer(CFG).apply)
    correct = total = 0
    for b in dev.batches(16):
        keep = b["example_weight"] > 0
        logits = fake({"params": params, q.QUANT: carried}, b["input_ids"], b["attention_mask"],
                      b["token_type_ids"]).logits
        correct += int((np.asarray(logits).argmax(-1) == b["labels"])[keep].sum())
        total += int(keep.sum())
    assert rows["jax_int8_fake_quant"]["accuracy"] == pytest.approx(correct / total)
    # the int8 graph computes the fake-quantized model with the carried scales (one near-tie may flip)
    assert abs(rows["onnx_int8"]["accuracy"] - rows["jax_int8_fake_quant"]["accuracy"]) <= 1 / 40 + 1e-9
