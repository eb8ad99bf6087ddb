"""Head pruning stage on the tiny teacher: the curve, the choice rule, compaction equals masking; targets
checked before any work, the curve kept on disk and reused."""

import json
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest
from absl import app, flags

import models
from compression.pruning import head_importance
from compression.pruning.head_importance import PruningStep
from compression.pruning.site_masks import MASKS, unflatten
from experiments.runtime import evaluation
from experiments.runtime import cli
from experiments.tools import prune
from experiments.data import load_task


def test_choose_picks_the_largest_fraction_within_budget():
    curve = [PruningStep(0.0, 0, 0.90, {}), PruningStep(0.25, 1, 0.895, {}), PruningStep(0.5, 2, 0.885, {}),
             PruningStep(0.75, 3, 0.70, {})]
    assert prune.choose(curve, max_drop=1.0).fraction_pruned == 0.25  # 0.5 drops 1.5 points
    assert prune.choose(curve, max_drop=2.0).fraction_pruned == 0.5
    assert prune.choose(curve, target_fraction=0.75).heads_pruned == 3
    assert prune.choose(curve, target_fraction=0.3).heads_pruned == 1  # |0.25 - 0.3| < |0.5 - 0.3|
    assert prune.choose(curve, target_heads=2).fraction_pruned == 0.5
    with pytest.raises(ValueError, match="exactly one"):
        prune.choose(curve, max_drop=1.0, target_fraction=0.25)


def _grid_curve(heads):
    return [PruningStep(h / 72, h, 0.9 - h / 1000, {}) for h in heads]


def test_a_target_between_grid_points_takes_the_nearest_and_says_so():
    # 72 heads, step 0.1: round(7.2) = 7 heads a round up to floor(0.6 * 72) = 43.
    assert prune.planned_grid(72, 0.1, 0.6) == [0, 7, 14, 21, 28, 35, 42, 43]
    curve = _grid_curve(prune.planned_grid(72, 0.1, 0.6))
    for target in (0.4, 0.3889):  # 28.8 and 28.0008 heads: 28 is nearer than 35 and 21
        chosen = prune.choose(curve, target_fraction=target)
        assert chosen.heads_pruned == 28 and chosen.fraction_pruned == pytest.approx(0.388889, abs=1e-6)
    assert prune.choose(curve, target_heads=28).heads_pruned == 28
    assert prune.choose(curve, target_heads=32).heads_pruned == 35  # 3 heads away against 4
    note = prune.describe_choice(curve[4], 72, target_fraction=0.4)["note"]
    assert "28.8 of 72 heads" in note and "28 heads (0.3889)" in note
    # max_fraction 0.41 ends the grid at floor(29.52) = 29, which is then the nearest to 28.8
    assert prune.planned_grid(72, 0.1, 0.41)[-2:] == [28, 29]
    assert prune.choose(_grid_curve(prune.planned_grid(72, 0.1, 0.41)), target_fraction=0.4).heads_pruned == 29


def test_unreachable_targets_are_refused_naming_them():
    kw = {"step": 0.1, "max_fraction": 0.6}
    for bad, match in (({"target_heads": -1}, r"target_heads=-1 must be in \[0, 72\)"),
                       ({"target_heads": 72}, r"target_heads=72 must be in \[0, 72\)"),
                       ({"target_heads": 44}, r"target_heads=44 is beyond the curve.*43 of 72"),
                       ({"target_fraction": 0.65}, r"target_fraction=0.65 must be in \[0, max_fraction=0.6\]")):
        with pytest.raises(ValueError, match=match):
            prune.check_target(72, **kw, **bad)
    prune.check_target(72, **kw, target_heads=43)  # 43 <= 0.6 * 72 = 43.2


@pytest.mark.parametrize("args, flag", [(["--target_fraction=-0.1"], "--target_fraction"),
                                        (["--target_fraction=0.7"], "--target_fraction is above --max_fraction"),
                                        (["--target_fraction=0.2", "--target_heads=3"], "target_fraction"),
                                        (["--step=1.5"], "--step"),
                                        (["--importance_examples=0"], "--importance_examples"),
                                        (["--data_dir=/nonexistent/sst2"], "--data_dir")])
def test_bad_flags_fail_when_parsed(tiny_teacher_dir, tmp_path, args, flag):
    with pytest.raises(flags.Error, match=flag):
        cli.parse(prune.define_flags, [f"--model_dir={tiny_teacher_dir}", f"--out_dir={tmp_path}", *args])


def test_a_folder_without_a_model_fails_when_parsed(tmp_path):
    with pytest.raises(flags.Error, match="flag --model_dir=.*is not a model directory"):
        cli.parse(prune.define_flags, [f"--model_dir={tmp_path}", f"--out_dir={tmp_path}"])


def test_a_target_beyond_the_model_fails_before_the_data_is_read(tiny_teacher_dir, tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the task data was loaded")

    monkeypatch.setattr(prune, "load_task", no_data)
    base = [f"--model_dir={tiny_teacher_dir}", f"--out_dir={tmp_path / 'out'}"]
    for args, match in ((["--target_heads=4"], r"target_heads=4 must be in \[0, 4\): the model has 4 heads"),
                        (["--target_heads=3"], r"beyond the curve.*2 of 4 heads"),  # floor(0.6 * 4) = 2
                        (["--target_heads=1", "--max_drop=2"], "--max_drop and a target")):
        fv = cli.parse(prune.define_flags, base + args)
        start = time.perf_counter()
        with pytest.raises(app.UsageError, match=match):
            prune.run(fv)
        assert time.perf_counter() - start < 1.0
    assert not os.path.exists(tmp_path / "out")


def test_curve_kept_after_a_failure_reused_then_compaction_and_saved_model(tiny_teacher_dir, tmp_path,
                                                                            monkeypatch):
    task = load_task("synthetic", None, tokenizer=tiny_teacher_dir, max_length=16, synthetic_size=256)
    shape = {"step": 0.25, "max_fraction": 0.5, "importance_examples": 64}
    kw = {"target_fraction": 0.4, **shape}
    calls = []
    real_importance = head_importance.head_importance
    monkeypatch.setattr(head_importance, "head_importance", lambda *a, **k: calls.append(1) or real_importance(*a, **k))

    def broken(*args):
        raise RuntimeError("compaction failed")

    monkeypatch.setattr(prune, "compact_heads", broken)
    with pytest.raises(RuntimeError, match="compaction failed"):
        prune.prune_and_compact(tiny_teacher_dir, task, str(tmp_path), **kw)
    assert len(calls) == 2  # one importance pass per round: 1 then 2 of the 4 heads pruned
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert [p["heads_pruned"] for p in saved["points"]] == [0, 1, 2]
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "results.json").exists()

    monkeypatch.undo()
    monkeypatch.setattr(head_importance, "head_importance", lambda *a, **k: calls.append(1) or real_importance(*a, **k))
    results = prune.prune_and_compact(tiny_teacher_dir, task, str(tmp_path), **kw)
    assert len(calls) == 2  # the rerun read the curve instead of estimating importance again
    curve = results["curve"]
    assert [p["heads_pruned"] for p in curve] == [0, 1, 2]  # 4 heads in all, one per round
    assert [p["accuracy"] for p in curve] == [p["metric"] for p in saved["points"]]
    # 0.4 of 4 heads is 1.6: the 2-head point (0.5) is nearer than the 1-head one (0.25)
    assert results["chosen"]["heads_pruned"] == 2
    assert "1.6 of 4 heads" in results["chosen"]["rule"]["target"]["note"]
    other = prune.curve_fingerprint(tiny_teacher_dir, task, **{**shape, "step": 0.5})
    assert saved["fingerprint"] == prune.curve_fingerprint(tiny_teacher_dir, task, **shape) != other
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


def test_model_and_outputs_in_a_bucket_match_the_same_run_on_disk(tiny_teacher_dir, gcs_bucket, tmp_path,
                                                                   monkeypatch):
    """The teacher and OUT_DIR in a bucket: flags checked there before any work, the curve, the plot, the pruned
    model and results.json written as objects, the same curve and choice as on disk, the curve reused."""
    import uuid

    from models import storage
    from tests.object_store import blob_names

    remote = f"{gcs_bucket[0]}/{uuid.uuid4().hex[:8]}"
    _, cfg, params = models.load(tiny_teacher_dir)
    models.save(f"{remote}/teacher", "transformer", cfg, params, tokenizer_dir=tiny_teacher_dir,
                extra=models.read_meta(tiny_teacher_dir)["extra"])
    base = [f"--model_dir={remote}/teacher", f"--out_dir={remote}/out"]
    with pytest.raises(flags.Error, match="--data_dir"):
        cli.parse(prune.define_flags, base + [f"--data_dir={remote}/no_data"])
    with pytest.raises(app.UsageError, match="the model has 4 heads"):  # config.json read from the bucket
        prune.run(cli.parse(prune.define_flags, base + ["--target_heads=4"]))

    task = load_task("synthetic", None, tokenizer=tiny_teacher_dir, max_length=16, synthetic_size=256)
    kw = {"target_fraction": 0.4, "step": 0.25, "max_fraction": 0.5, "importance_examples": 64}
    local = prune.prune_and_compact(tiny_teacher_dir, task, str(tmp_path), **kw)
    calls = []
    real_importance = head_importance.head_importance
    monkeypatch.setattr(head_importance, "head_importance", lambda *a, **k: calls.append(1) or real_importance(*a, **k))
    results = prune.prune_and_compact(f"{remote}/teacher", task, f"{remote}/out", **kw)
    assert len(calls) == 2 and blob_names(f"{remote}/out") == [
        "curve.json", "curve.png", "model/_COMPLETE", "model/config.json", "model/params.safetensors",
        "model/tokenizer.json", "results.json"]
    assert results["curve"] == local["curve"] and results["chosen"] == local["chosen"]
    assert results["final"] == local["final"] and results["source_model"] == f"{remote}/teacher"
    assert storage.read_bytes(f"{remote}/out/curve.png")[:4] == b"\x89PNG"
    curve = json.loads(storage.read_text(f"{remote}/out/curve.json"))
    assert curve["points"] == json.loads((tmp_path / "curve.json").read_text())["points"]
    assert prune.prune_and_compact(f"{remote}/teacher", task, f"{remote}/out", **kw)["chosen"] == local["chosen"]
    assert len(calls) == 2  # the rerun read the curve from the bucket
    _, pruned_cfg, _ = models.load(f"{remote}/out/model")
    assert sum(pruned_cfg.heads(i) for i in range(pruned_cfg.num_layers)) == 2
