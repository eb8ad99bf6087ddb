"""experiments/tools/quant_eval.py on tiny saved model directories of the three families and the synthetic tasks."""

import itertools
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

import models
from compression import quantization as q
from experiments.runtime import evaluation, metrics
from experiments.techniques import qat
from experiments.runtime import cli
from experiments.tools import quant_eval
from experiments.data import load_task
from experiments.jobs.train import _word_level_tokenizer
from models.bilstm import BiLSTMClassifier, BiLSTMConfig
from models.cnn_lstm import CNNLSTMConfig, CNNLSTMTagger
from models.transformer import Transformer, TransformerConfig

SIZE, MAX_LEN = 160, 16  # synthetic train examples (dev: a quarter), longest sequence (one length bucket)
ARGS = ["--calib_examples=30", "--batch_size=16", f"--synthetic_size={SIZE}"]
LSTM_ARGS = [*ARGS, "--calibrators=max"]  # one calibrator (no histogram pass): the rows' code is the same
LSTM_INPUTS = ["encoder/layer_0/forward/input", "encoder/layer_0/backward/input"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_eval")
    probe = types.SimpleNamespace(data_dir=None, max_length=MAX_LEN, seed=0, synthetic_size=SIZE, selection="holdout",
                                  selection_size=0)
    tok = _word_level_tokenizer("synthetic", probe, str(root / "tokenizer"))
    cfg = TransformerConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_position_embeddings=MAX_LEN, hidden_dropout_rate=0.0,
                            attention_dropout_rate=0.0, num_labels=2,
                            initializer_range=1.0)  # large weights: random predictions that vary with the input
    params = jax.jit(Transformer(cfg).init)(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
    path = root / "model"
    models.save(path, "transformer", cfg, params, tokenizer_dir=root / "tokenizer",
                extra={"task": "synthetic", "max_length": MAX_LEN})
    return str(path)


def _save_word_level(root, family, cfg, params, task):
    """A model directory with the task's vocabularies, as the word-level jobs write it."""
    vocab = root / "vocab"
    vocab.mkdir()
    task.word_vocab.save(vocab / "word_vocab.json")
    if task.char_vocab is not None:
        task.char_vocab.save(vocab / "char_vocab.json")
    models.save(root / "model", family, cfg, params, tokenizer_dir=vocab,
                extra={"task": task.name, "max_length": MAX_LEN})
    return str(root / "model")


@pytest.fixture(scope="module")
def bilstm_dir(tmp_path_factory):
    """An initialised BiLSTM on the sentiment task, its bias centred on the dev margin (both classes)."""
    task = load_task("synthetic", max_length=MAX_LEN, synthetic_size=SIZE, word_vocab="build")
    cfg = BiLSTMConfig(vocab_size=len(task.word_vocab), embed_dim=8, hidden_size=8, mlp_hidden=8, dropout_rate=0.0)
    model = BiLSTMClassifier(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    batch = next(task.dev.batches(len(task.dev)))
    logits = model.apply({"params": params}, batch["word_ids"], batch["word_mask"]).logits
    params["classifier"]["bias"] = params["classifier"]["bias"].at[1].add(
        -float(np.median(logits[:, 1] - logits[:, 0])) - 1e-3)
    return _save_word_level(tmp_path_factory.mktemp("quant_eval_bilstm"), "bilstm", cfg, params, task)


@pytest.fixture(scope="module")
def cnn_lstm_dir(tmp_path_factory):
    """An initialised CNN-LSTM tagger on the NER task (a large classifier: tags vary from token to token)."""
    chars = 8
    task = load_task("synthetic_ner", max_length=MAX_LEN, synthetic_size=SIZE, word_vocab="build",
                     max_word_chars=chars)
    cfg = CNNLSTMConfig(vocab_size=len(task.word_vocab), char_vocab_size=len(task.char_vocab), word_embed_dim=8,
                        char_embed_dim=4, char_filters=6, max_chars_per_token=chars, hidden_size=8,
                        num_labels=task.num_labels, dropout_rate=0.0)
    params = jax.jit(CNNLSTMTagger(cfg).init)(jax.random.key(1), jnp.ones((1, 4), jnp.int32),
                                              jnp.ones((1, 4, cfg.max_chars_per_token), jnp.int32))["params"]
    params["classifier"]["kernel"] = params["classifier"]["kernel"] * 10.0
    return _save_word_level(tmp_path_factory.mktemp("quant_eval_cnn_lstm"), "cnn_lstm", cfg, params, task)


def _qat_dir(model_dir, out, scale=1.02):
    """A stand-in for a quantization-aware training run from ``model_dir``: its weights moved a little, the
    "quant" collection calibrated (max) on two train batches and saved beside them as quant_state.npz."""
    model, cfg, params, task = evaluation.load_model_task(model_dir, synthetic_size=SIZE)
    params = jax.tree.map(lambda p: p * scale, params)
    inputs = evaluation.model_inputs(task, cfg.family)
    calib = [{k: b[k] for k in inputs} for b in itertools.islice(task.train.batches(16, shuffle=True), 2)]
    quant = q.post_training_quantize(evaluation.batch_apply(model.apply, inputs), params, calib, "max")[q.QUANT]
    models.save(out, cfg.family, cfg, params, tokenizer_dir=model_dir,
                extra={"task": task.name, "max_length": MAX_LEN, "qat": {"calibrator": "max",
                                                                           "quant_state": "quant_state.npz"}})
    qat.save_quant_state(str(out / "quant_state.npz"), quant)
    return model, {"params": params, q.QUANT: quant}, task, inputs


def _dev_logits(apply_fn, variables, task, inputs):
    """Logits of one call over the whole dev split (no batching, no evaluation module), and that batch."""
    batch = next(task.dev.batches(len(task.dev), shuffle=False))
    return np.asarray(jax.jit(apply_fn)(variables, *(batch[k] for k in inputs)).logits), batch


def _direct_metrics(task, logits, batch):
    """The task's metrics of ``_dev_logits``."""
    preds, w = logits.argmax(-1), batch["example_weight"]
    if task.kind == "token":
        return metrics.token_metrics(preds, batch["labels"], task.label_names, w)
    return {"accuracy": float(np.sum((preds == batch["labels"]) * w) / np.sum(w))}


def _check_rows(rows, key, int8_modules, quantized, calibrators=("max",)):
    """Row names, module counts, deltas, and the int8 row against its PTQ row."""
    ptq = [f"ptq:{c}" for c in calibrators]
    names = [r["variant"] for r in rows]
    k = len(ptq) + 1
    assert names[:k] == ["float32", *ptq] and names[k] in [f"int8:{c}" for c in calibrators]
    assert [r["quantized_modules"] for r in rows] == [0] + [quantized] * (len(rows) - 1)
    assert [r["int8_modules"] for r in rows[:k + 1]] == [0] * k + [int8_modules]
    for r in rows:
        assert r["delta_vs_float32"] == pytest.approx(100 * (r[key] - rows[0][key]))
    # real int8 reproduces the simulation it was converted from, in every family
    assert rows[k]["agreement_with_ptq"] == 1.0 and rows[k]["delta_vs_ptq"] == 0.0


def _run(*args):
    return quant_eval.run(cli.parse(quant_eval.define_flags, list(args)))


def test_rows_against_a_direct_evaluation(model_dir, tmp_path):
    out = tmp_path / "quant.json"
    payload = _run(f"--model_dir={model_dir}", *ARGS, "--calibrators=max,entropy", f"--out={out}")
    rows = payload["rows"]
    assert len(rows) == 4 and json.loads(out.read_text())["rows"][0]["accuracy"] == rows[0]["accuracy"]
    assert payload["family"] == "transformer" and all(m["int8"] for m in payload["modules"])
    n = len(payload["modules"])  # q, k, v, attention output, FFN in/out, pooler, classifier
    assert n == 8
    _check_rows(rows, "accuracy", n, n, ("max", "entropy"))

    # float32 accuracy computed here, on the whole dev split at once
    model, _, params = models.load(model_dir)
    task = load_task("synthetic", None, tokenizer=model_dir, max_length=MAX_LEN, synthetic_size=SIZE)
    logits, batch = _dev_logits(model.apply, {"params": params}, task, evaluation.TRANSFORMER_INPUTS)
    assert len(set(logits.argmax(-1)[batch["example_weight"] > 0].tolist())) == 2  # not one class for all
    direct = _direct_metrics(task, logits, batch)
    assert rows[0]["accuracy"] == pytest.approx(direct["accuracy"]) and rows[0]["agreement_with_float32"] == 1.0
    assert all(r["calib_examples"] == 32 for r in rows[1:3])  # two batches of 16


def test_bilstm_with_a_qat_directory(bilstm_dir, tmp_path):
    model, qat_variables, task, inputs = _qat_dir(bilstm_dir, tmp_path / "qat")
    payload = _run(f"--model_dir={bilstm_dir}", *LSTM_ARGS, f"--qat_model_dir={tmp_path / 'qat'}")
    rows = payload["rows"]
    # the LSTM input projections (both directions), the MLP and the classifier; embeddings stay float
    assert [m["module"] for m in payload["modules"]] == [*LSTM_INPUTS, "mlp", "classifier"]
    assert all(m["int8"] for m in payload["modules"])
    _check_rows(rows, "accuracy", 4, 4)
    assert [r["variant"] for r in rows[3:]] == ["qat", "qat:int8"] and rows[4]["int8_modules"] == 4

    _, _, params = models.load(bilstm_dir)
    fp32 = _direct_metrics(task, *_dev_logits(model.apply, {"params": params}, task, inputs))
    fake, batch = _dev_logits(q.fake_quant().wrap(model.apply), qat_variables, task, inputs)
    qat = _direct_metrics(task, fake, batch)
    assert rows[0]["accuracy"] == pytest.approx(fp32["accuracy"])
    assert rows[3]["accuracy"] == pytest.approx(qat["accuracy"])
    assert rows[3]["delta_vs_float32"] == pytest.approx(100 * (qat["accuracy"] - fp32["accuracy"]))
    assert rows[4]["agreement_with_qat"] == 1.0 and rows[4]["delta_vs_qat"] == 0.0

    # the int8 path computes the fake-quantized BiLSTM's logits to the bit, compiled separately
    v8 = q.int8_variables(evaluation.batch_apply(model.apply, inputs), qat_variables, {k: batch[k] for k in inputs})
    np.testing.assert_array_equal(_dev_logits(q.int8().wrap(model.apply), v8, task, inputs)[0], fake)


def test_cnn_lstm_tagger(cnn_lstm_dir):
    payload = _run(f"--model_dir={cnn_lstm_dir}", *LSTM_ARGS)
    rows = payload["rows"]
    # the character CNN's Conv is quantized but stays fake-quantized in the int8 row
    modules = {m["module"]: m for m in payload["modules"]}
    assert list(modules) == ["char_cnn/conv", *LSTM_INPUTS, "classifier"]
    assert modules["char_cnn/conv"] == {"module": "char_cnn/conv", "kind": "Conv", "int8": False}
    _check_rows(rows, "span_f1", 3, 4)
    assert all("token_accuracy" in r for r in rows)

    model, _, params, task = evaluation.load_model_task(cnn_lstm_dir, synthetic_size=SIZE)
    inputs = evaluation.model_inputs(task, "cnn_lstm")
    direct = _direct_metrics(task, *_dev_logits(model.apply, {"params": params}, task, inputs))
    assert rows[0]["span_f1"] == pytest.approx(direct["span_f1"])
    assert rows[0]["token_accuracy"] == pytest.approx(direct["token_accuracy"])
    assert 0.0 < direct["token_accuracy"] < 1.0 and rows[1]["agreement_with_float32"] < 1.0  # quantization acts


def test_rules_that_select_nothing_fail_before_calibration(cnn_lstm_dir):
    model, _, params, task = evaluation.load_model_task(cnn_lstm_dir, synthetic_size=SIZE)
    with pytest.raises(ValueError,
                       match=r"quant_eval \(cnn_lstm\): QuantRule #0 \(module_path='\^lstm/'.*matched no module"):
        quant_eval.evaluate_quantized(model, params, task, ("max",), rules=(q.QuantRule("^lstm/"),))
    with pytest.raises(ValueError, match="select no module to quantize"):
        quant_eval.evaluate_quantized(model, params, task, ("max",),
                                      rules=(q.QuantRule(".*", weights=False, inputs=False),))


def test_bad_input(model_dir, bilstm_dir, cnn_lstm_dir, tmp_path):
    for args, match in ((["--calibrators=max,kl"], "flag --calibrators=.*must name calibrators"),
                        (["--int8_calibrator=mse", "--calibrators=max"], "--int8_calibrator must be one of"),
                        (["--qat_model_dir=/nonexistent"], "flag --qat_model_dir=/nonexistent: is not a model"),
                        (["--task=sst3"], "flag --task=sst3: is not a task name"),
                        (["--calib_examples=0"], "--calib_examples"),
                        (["--data_dir=/nonexistent"], "flag --data_dir=/nonexistent: is not a directory")):
        with pytest.raises(flags.Error, match=match):  # when parsed: nothing loaded yet
            cli.parse(quant_eval.define_flags, [f"--model_dir={model_dir}", *args])
    model, _, params, task = evaluation.load_model_task(model_dir, synthetic_size=SIZE)
    with pytest.raises(ValueError, match="not among the calibrators"):
        quant_eval.evaluate_quantized(model, params, task, ("max",), int8_calibrator="mse")
    _, cfg, params = models.load(model_dir)
    models.save(tmp_path / "bare", "transformer", cfg, params)  # no extra.task
    with pytest.raises(ValueError, match="names no task"):
        evaluation.load_model_task(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="sequence head; task 'synthetic_ner' is a token task"):
        evaluation.load_model_task(model_dir, task="synthetic_ner", synthetic_size=SIZE)
    with pytest.raises(ValueError, match="cnn_lstm model with a token head; task 'synthetic' is a sequence"):
        evaluation.load_model_task(cnn_lstm_dir, task="synthetic", synthetic_size=SIZE)
    shutil.copytree(bilstm_dir, tmp_path / "novocab")
    os.remove(tmp_path / "novocab" / "word_vocab.json")
    with pytest.raises(FileNotFoundError, match="holds no word_vocab.json"):
        evaluation.load_model_task(str(tmp_path / "novocab"))

    _, _, params = models.load(bilstm_dir)
    shutil.copytree(bilstm_dir, tmp_path / "no_state")  # a plain model directory: no quant_state.npz
    with pytest.raises(FileNotFoundError, match="holds no quant_state.npz"):
        quant_eval.load_qat(str(tmp_path / "no_state"), bilstm_dir, params)
    with pytest.raises(ValueError, match="parameters differ"):
        quant_eval.load_qat(str(tmp_path / "no_state"), cnn_lstm_dir, models.load(cnn_lstm_dir)[2])
    (tmp_path / "no_state" / "word_vocab.json").write_text('{"kind": "word", "lower": true, "units": []}')
    with pytest.raises(ValueError, match="word_vocab.json is missing or differs"):
        quant_eval.load_qat(str(tmp_path / "no_state"), bilstm_dir, params)
