"""experiments.tools.precision_eval on a tiny saved Transformer and the generated task."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

import models
from compression.sites import ISLAND_KINDS
from experiments.runtime import cli
from experiments.tools import precision_eval
from experiments.jobs import train
from experiments.data import load_task
from models.transformer import Transformer, TransformerConfig
from tests.experiments.tiny import tiny_config

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision_eval")
    tok = train._word_level_tokenizer("synthetic", tiny_config(synthetic_size=64), str(root / "tok"))
    cfg = TransformerConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_layers=2, num_heads=2,
                            intermediate_size=32, max_position_embeddings=MAX_LENGTH)
    params = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    # A random head predicts one class for every input: spread it, and centre the logit margin on its dev
    # median so that both classes are predicted (then precision can flip predictions).
    params["classifier"]["kernel"] = params["classifier"]["kernel"] * 300.0
    task = load_task("synthetic", tokenizer=tok, max_length=MAX_LENGTH, synthetic_size=64)
    batch = next(task.dev.batches(len(task.dev)))
    logits = Transformer(cfg).apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                                    token_type_ids=batch["token_type_ids"]).logits
    margin = float(np.median(logits[:, 1] - logits[:, 0]))
    params["classifier"]["bias"] = params["classifier"]["bias"].at[1].add(-margin - 1e-3)
    path = root / "model"
    models.save(path, "transformer", cfg, params, tokenizer_dir=root / "tok",
                extra={"task": "synthetic", "max_length": MAX_LENGTH})
    return path


def test_variants_cover_each_island_for_both_dtypes():
    v = precision_eval.variants()
    assert len(v) == 1 + 2 * (1 + len(ISLAND_KINDS) + 1)
    assert v["float16-softmax"] == ("float16", {"softmax": False})
    assert v["bfloat16"] == ("bfloat16", {}) and v["float32"] == ("float32", {})
    assert v["bfloat16-all"][1] == {k: False for k in ISLAND_KINDS}


def test_eval_against_an_independent_float32_evaluation(model_dir, tmp_path):
    out = tmp_path / "precision.json"
    payload = precision_eval.run(cli.parse(precision_eval.define_flags, [
        f"--model_dir={model_dir}", "--synthetic_size=64", "--batch_size=8", "--variants=bfloat16,float16-logits",
        f"--out={out}"]))
    results = payload["results"]
    assert list(results) == ["float32", "bfloat16", "float16-logits"]
    assert json.loads(out.read_text())["results"]["bfloat16"]["policy"] == "bfloat16"

    # float32 accuracy from a plain model.apply over the dev split, unpadded batches.
    model, _, params = models.load(model_dir)
    task = load_task("synthetic", tokenizer=str(model_dir), max_length=MAX_LENGTH, synthetic_size=64)
    preds, labels = [], []
    for batch in task.dev.batches(16, drop_remainder=False):
        logits = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"]).logits
        keep = batch["example_weight"] > 0
        preds.append(np.argmax(logits, -1)[keep])
        labels.append(batch["labels"][keep])
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    assert 0 < preds.sum() < len(preds)  # both classes predicted: accuracy differences can show
    n = len(labels)
    assert payload["dev_examples"] == n == 16
    assert results["float32"]["accuracy"] == pytest.approx(float(np.mean(preds == labels)))
    assert results["float32"]["max_abs_logit_diff"] == 0.0 and results["float32"]["prediction_changes"] == 0

    for name in ("bfloat16", "float16-logits"):
        r = results[name]
        assert 0.0 < r["max_abs_logit_diff"] < 0.05 * float(np.abs(logits).max()) + 0.05
        # Accuracy can only move by the predictions that changed.
        assert abs(r["delta_points"]) <= 100.0 * r["prediction_changes"] / n + 1e-9
        assert r["delta_points"] == pytest.approx(100 * (r["accuracy"] - results["float32"]["accuracy"]))
    assert results["float16-logits"]["islands_off"] == ["logits"]


def test_bad_input(model_dir, tmp_path):
    for args, match in (([f"--model_dir={tmp_path}"], "flag --model_dir=.*is not a model directory"),
                        ([f"--model_dir={model_dir}", "--variants=float8"], "flag --variants=.*subset of float32,"),
                        ([f"--model_dir={model_dir}", "--batch_size=0"], "--batch_size"),
                        ([f"--model_dir={model_dir}", "--data_dir=/nonexistent"], "--data_dir")):
        with pytest.raises(flags.Error, match=match):  # when parsed: nothing loaded yet
            cli.parse(precision_eval.define_flags, args)
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['fp8'\]"):
        precision_eval.evaluate(None, None, None, names=["fp8"])
