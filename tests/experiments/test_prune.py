"""Head pruning stage on the tiny teacher: the curve, the choice rule, compaction equals masking."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import models
from compression.pruning.head_importance import PruningStep
from compression.pruning.site_masks import MASKS, unflatten
from experiments import evaluation, prune
from experiments.data import load_task


def test_choose_picks_the_largest_fraction_within_budget():
    curve = [PruningStep(0.0, 0, 0.90, {}), PruningStep(0.25, 1, 0.895, {}), PruningStep(0.5, 2, 0.885, {}),
             PruningStep(0.75, 3, 0.70, {})]
    assert prune.choose(curve, max_drop=1.0).fraction_pruned == 0.25  # 0.5 drops 1.5 points
    assert prune.choose(curve, max_drop=2.0).fraction_pruned == 0.5
    assert prune.choose(curve, target_fraction=0.75).heads_pruned == 3
    with pytest.raises(ValueError, match="not on the curve"):
        prune.choose(curve, target_fraction=0.3)
    with pytest.raises(ValueError, match="exactly one"):
        prune.choose(curve, max_drop=1.0, target_fraction=0.25)


def test_curve_compaction_and_saved_model(tiny_teacher_dir, tmp_path):
    task = load_task("synthetic", None, tokenizer=tiny_teacher_dir, max_length=16, synthetic_size=256)
    results = prune.prune_and_compact(tiny_teacher_dir, task, str(tmp_path), target_fraction=0.5, step=0.25,
                                      max_fraction=0.5, importance_examples=64)
    curve = results["curve"]
    assert [p["heads_pruned"] for p in curve] == [0, 1, 2]  # 4 heads in all, one per round
    model, cfg, params = models.load(tmp_path / "model")
    assert sum(cfg.heads(i) for i in range(cfg.num_layers)) == 2
    assert json.loads((tmp_path / "results.json").read_text())["chosen"]["heads_pruned"] == 2

    # The compacted model's dev accuracy equals the masked model's accuracy at the chosen point.
    teacher, _, tparams = models.load(tiny_teacher_dir)
    first = next(task.dev.batches(8))
    apply_fn, variables = prune.masked_model(teacher, tparams, {k: jnp.asarray(first[k][:1])
                                                                 for k in evaluation.TRANSFORMER_INPUTS})
    masks = {p: np.asarray(m, np.float32) for p, m in results["chosen"]["masks"].items()}
    masked = {**variables, MASKS: unflatten({p: jnp.asarray(m) for p, m in masks.items()})}
    masked_acc = evaluation.dev_metrics(apply_fn, masked, task, evaluation.TRANSFORMER_INPUTS)["accuracy"]
    assert results["final"]["accuracy"] == pytest.approx(masked_acc, abs=1e-9)
    assert curve[-1]["accuracy"] == pytest.approx(masked_acc, abs=1e-9)
    # and the logits agree closely (masking multiplies a removed head by 0; compaction drops it)
    ids = jnp.asarray(first["input_ids"])
    kw = {name: jnp.asarray(first[name]) for name in ("attention_mask", "token_type_ids")}
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids, **kw).logits),
                               np.asarray(apply_fn(masked, ids, **kw).logits), atol=1e-5)
