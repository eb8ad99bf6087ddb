"""experiments/quant_eval.py on a tiny saved model directory and the synthetic task."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from experiments import quant_eval
from experiments.data import load_task
from experiments.train import _word_level_tokenizer
from models.transformer import Transformer, TransformerConfig

SIZE, MAX_LEN = 160, 16  # synthetic train examples (dev: a quarter), longest sequence


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_eval")
    probe = types.SimpleNamespace(data_dir=None, max_length=MAX_LEN, seed=0, synthetic_size=SIZE)
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


def test_rows_against_a_direct_evaluation(model_dir, tmp_path):
    out = tmp_path / "quant.json"
    rows = quant_eval.main(["--model_dir", model_dir, "--calibrators", "max,entropy", "--calib_examples", "30",
                            "--batch_size", "16", "--synthetic_size", str(SIZE), "--out", str(out)])
    assert [r["variant"] for r in rows][:3] == ["float32", "ptq:max", "ptq:entropy"]
    assert rows[3]["variant"] in ("int8:max", "int8:entropy") and len(rows) == 4
    assert json.loads(out.read_text())["rows"][0]["accuracy"] == rows[0]["accuracy"]

    # float32 accuracy computed here, on the whole dev split at once
    model, _, params = models.load(model_dir)
    task = load_task("synthetic", None, tokenizer=model_dir, max_length=MAX_LEN, synthetic_size=SIZE)
    batch = next(task.dev.batches(len(task.dev), shuffle=False))
    logits = jax.jit(model.apply)({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                                  token_type_ids=batch["token_type_ids"]).logits
    w = batch["example_weight"]
    preds = np.argmax(logits, -1)
    assert len(set(preds[w > 0].tolist())) == 2  # the model does not predict one class for everything
    expected = float(np.sum((preds == batch["labels"]) * w) / np.sum(w))
    assert rows[0]["accuracy"] == pytest.approx(expected) and rows[0]["agreement_with_float32"] == 1.0
    for r in rows[1:3]:
        assert r["calib_examples"] == 32  # two batches of 16 and 0.0 <= r["accuracy"] <= 1.0
        assert r["delta_vs_float32"] == pytest.approx(100 * (r["accuracy"] - rows[0]["accuracy"]))
    # real int8 reproduces the simulation it was converted from
    assert rows[3]["agreement_with_ptq"] == 1.0 and rows[3]["delta_vs_ptq"] == 0.0


def test_bad_input(model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown calibrator"):
        quant_eval.main(["--model_dir", model_dir, "--calibrators", "max,kl"])
    model, params, task = quant_eval.load_model_and_task(model_dir, synthetic_size=SIZE)
    with pytest.raises(ValueError, match="not among the calibrators"):
        quant_eval.evaluate_quantized(model, params, task, ("max",), int8_calibrator="mse")
    _, cfg, params = models.load(model_dir)
    models.save(tmp_path / "bare", "transformer", cfg, params)  # no extra.task
    with pytest.raises(ValueError, match="names no task"):
        quant_eval.load_model_and_task(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="sequence classification"):
        quant_eval.load_model_and_task(model_dir, task="synthetic_ner", synthetic_size=SIZE)
