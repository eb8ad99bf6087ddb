"""Choose on one split, report on another: the held-out selection split is never trained on, and every choice
(best checkpoint, pruning point, int8 calibrator) depends on it alone -- flipping every dev label changes no
choice, only the reported dev figures."""

import json

import numpy as np
import pytest

import models
from experiments.data import Split, load_task
from experiments.data.holdout import SELECTION_CAP
from experiments.jobs import registry, runner
from experiments.jobs import train as train_job
from experiments.runtime import selection
from experiments.tools import prune, quant_eval
from tests.experiments.tiny import tiny_config

TSV_TASK = "tsv:text=sentence,label=label"
GOOD, BAD = ("fine", "great", "lovely", "superb"), ("awful", "dull", "poor", "bad")


def _write_task(folder, n_train: int = 320, n_dev: int = 64, flip_dev: bool = False) -> str:
    """A sentiment TSV task whose every sentence is unique ("row 17 was great"), so a text names its row."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            label = int(rng.integers(2))
            word = (GOOD if label else BAD)[int(rng.integers(4))]
            shown = 1 - label if (flip_dev and name == "dev") else label
            lines.append(f"{name} row {i} was {word}\t{shown}")
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_the_carve_out_is_fixed_disjoint_and_complete(tmp_path):
    data = _write_task(tmp_path / "data")
    whole = load_task(TSV_TASK, data, word_vocab="build", max_length=16)
    carved = load_task(TSV_TASK, data, word_vocab="build", max_length=16, selection="auto")
    again = load_task(TSV_TASK, data, word_vocab="build", max_length=16, selection="auto", seed=5)
    train, held = set(carved.train.texts), set(carved.selection.texts)
    assert len(held) == min(SELECTION_CAP, 320 // 10) == 32
    assert not train & held and train | held == set(whole.train.texts)
    assert carved.selection.texts == again.selection.texts  # independent of the run seed
    assert carved.choice_split is carved.selection and whole.choice_split is whole.dev
    # a vocabulary built from train never sees a word that only the held-out rows have ("row 17" numbers)
    only_held = {t.split()[2] for t in held} - {t.split()[2] for t in train}
    assert only_held and not only_held & set(carved.word_vocab.units)
    with pytest.raises(ValueError, match="does not fit a train split with 320 whole texts"):
        load_task(TSV_TASK, data, max_length=16, selection=200)


def _config(data: str, **overrides):
    return tiny_config(task=TSV_TASK, data_dir=data, **overrides)


def test_no_selection_row_is_in_any_training_batch(tmp_path):
    data = _write_task(tmp_path / "data")
    run = runner.prepare(registry.JOBS["finetune"], _config(data), str(tmp_path / "run"))
    held = set(run.task.selection.texts)
    run.inputs += ("example_index",)  # the runner's own batches, with the row each example came from
    seen = set()
    for epoch in range(3):
        for batch in runner.train_batches(run)(epoch, 0):
            seen |= {run.train.texts[i] for i in batch["example_index"]}
    assert len(seen) > 200 and not seen & held
    assert run.metadata["selection"] == {"split": "holdout", "examples": 32, "seed": selection.SELECTION_SEED,
                                         "method": "whole_texts", "candidates": 320, "left_out": 0}


def _flip_dev(task):
    dev = task.dev
    return type(task)(**{**task.__dict__, "dev": Split(dev.name, labels=1 - dev.labels, features=dev.features,
                                                       buckets=dev.buckets, texts=dev.texts)})


def test_the_best_checkpoint_is_chosen_on_the_selection_split(tmp_path, monkeypatch):
    """The same run with every dev label flipped: the same step is chosen and exported (the dev figures mirror)."""
    results = {}
    for flip in (False, True):
        if flip:
            real = train_job.load_task
            monkeypatch.setattr(train_job, "load_task", lambda *a, **k: _flip_dev(real(*a, **k)))
        config = tiny_config(eval_every_steps=8, checkpoint__keep=8, num_train_steps=48, export="best")
        results[flip] = registry.run(config, str(tmp_path / f"run_{flip}"))
    normal, flipped = results[False], results[True]
    assert {k: normal["selection"][k] for k in ("split", "examples", "seed", "method")} == {
        "split": "holdout", "examples": 25, "seed": selection.SELECTION_SEED, "method": "whole_texts"}
    assert normal["exported_step"] == flipped["exported_step"] == normal["best"]["step"]
    assert normal["best"]["selection/accuracy"] == flipped["best"]["selection/accuracy"]
    assert normal["best"]["accuracy"] == pytest.approx(1 - flipped["best"]["accuracy"])  # dev is reported
    evals = [json.loads(line) for line in (tmp_path / "run_False" / "metrics.jsonl").read_text().splitlines()]
    chosen_on = [e["selection/accuracy"] for e in evals if "selection/accuracy" in e]
    assert len(chosen_on) == 6 and len(set(chosen_on)) > 1 and normal["best"]["selection/accuracy"] == max(chosen_on)
    saved = models.read_meta(str(tmp_path / "run_False" / "model"))["extra"]
    assert saved["selection"]["split"] == "holdout" and saved["eval"]["accuracy"] == normal["best"]["accuracy"]


def test_pruning_point_and_calibrator_are_chosen_on_the_selection_split(tiny_teacher_dir, tmp_path):
    task = load_task("synthetic", None, tokenizer=tiny_teacher_dir, max_length=16, synthetic_size=256,
                     selection=64)
    chosen = {}
    for name, t in (("normal", task), ("flipped", _flip_dev(task))):
        res = prune.prune_and_compact(tiny_teacher_dir, t, str(tmp_path / name), max_drop=5.0, step=0.25,
                                      max_fraction=0.75, importance_examples=64)
        model, _, params = models.load(tiny_teacher_dir)
        quant = quant_eval.evaluate_quantized(model, params, t, ("max", "percentile:99.0", "mse"),
                                              calib_examples=32)
        chosen[name] = (res, quant["choice"])
    (prune_n, calib_n), (prune_f, calib_f) = chosen["normal"], chosen["flipped"]
    assert prune_n["selection"]["split"] == "holdout" and calib_n["split"] == "holdout"
    assert prune_n["chosen"]["heads_pruned"] == prune_f["chosen"]["heads_pruned"]
    assert [p["selection/accuracy"] for p in prune_n["curve"]] == [p["selection/accuracy"] for p in prune_f["curve"]]
    assert prune_n["final"]["accuracy"] == pytest.approx(1 - prune_f["final"]["accuracy"])  # dev is reported
    assert calib_n["chosen"] == calib_f["chosen"] and calib_n["scores"] == calib_f["scores"]
