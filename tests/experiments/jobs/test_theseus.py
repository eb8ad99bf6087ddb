"""Module replacement (BERT-of-Theseus, ``config.theseus``): the schedule helpers, and the theseus.py preset of
the fine-tuning job on the tiny synthetic teacher."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

import models
from compression.pruning import compaction
from experiments.configs import theseus as theseus_configs
from experiments.data import load_task
from experiments.jobs import registry, runner
from experiments.runtime import evaluation
from experiments.techniques import theseus
from tests.experiments.tiny import TINY, tiny_job

STEPS = 6


def _config(teacher_dir, arg="synthetic,linear", **theseus_fields):
    c = tiny_job(theseus_configs.get_config(arg), teacher_dir, STEPS)
    c.export = "last"
    c.theseus.successor_layers = 1
    for k, v in theseus_fields.items():
        c.theseus[k] = v
    return c


@pytest.mark.parametrize("kind,expected", [
    # constant: p = 0.5 while t < 0.5 * 10, then 1
    ("constant", [0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    # linear: p = min(1, 0.3 + t * 0.7 / 5)
    ("linear", [0.3, 0.44, 0.58, 0.72, 0.86, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_replacement_schedule_reaches_one_after_the_configured_fraction(kind, expected):
    t = ml_collections.ConfigDict({"schedule": kind, "replacing_rate": 0.5 if kind == "constant" else 0.3,
                                   "replacing_fraction": 0.5})
    p = theseus.replacement_schedule(t, total_steps=10)
    np.testing.assert_allclose([float(p(s)) for s in range(10)], expected, rtol=1e-6)


def test_init_layers():
    assert theseus.init_layers(6, 3, "every_other") == (0, 2, 4)
    assert theseus.init_layers(6, 3, "first") == (0, 1, 2)


@pytest.fixture(scope="module")
def mqa_run(tiny_teacher_dir, tmp_path_factory):
    """(results, workdir) of the theseus.py preset with a multi-query successor of one layer."""
    workdir = tmp_path_factory.mktemp("theseus_mqa")
    return registry.run(_config(tiny_teacher_dir, "synthetic,linear,mqa"), str(workdir)), workdir


def test_job_trains_only_the_successor_and_exports_it_alone(tiny_teacher_dir, mqa_run):
    """MQA successor (1 key/value head) of the 2-layer teacher: the exported model is a plain 1-layer
    Transformer; embeddings, pooler and classifier are the teacher's untouched (frozen), the successor layer
    trained; its dev accuracy reproduces the job's final evaluation."""
    results, tmp_path = mqa_run
    model, cfg, params = models.load(tmp_path / "model")
    _, teacher_cfg, teacher = models.load(tiny_teacher_dir)
    assert cfg.num_layers == 1 and cfg.num_kv_heads == 1
    assert params["encoder"]["layer_0"]["attention"]["key"]["kernel"].shape == (
        teacher_cfg.hidden_size, teacher_cfg.dim_per_head)
    for name in params:
        if name != "encoder":
            for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(teacher[name]), strict=True):
                np.testing.assert_array_equal(a, b)
    ffn_now = params["encoder"]["layer_0"]["output"]["kernel"]
    ffn_init = teacher["encoder"]["layer_0"]["output"]["kernel"]
    assert ffn_now.shape == ffn_init.shape and not np.array_equal(ffn_now, ffn_init)

    task = load_task("synthetic", None, tokenizer=tiny_teacher_dir, max_length=TINY["max_length"], seed=0,
                     synthetic_size=TINY["synthetic_size"])
    metrics = evaluation.dev_metrics(model.apply, {"params": params}, task, evaluation.TRANSFORMER_INPUTS)
    assert metrics["accuracy"] == pytest.approx(results["final"]["accuracy"])
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["steps"] == STEPS and saved["job"] == "theseus" and saved["techniques"] == ["theseus"]
    assert saved["theseus"] == {"schedule": "linear", "replacing_rate": 0.3, "replacing_fraction": 0.5,
                                "successor_layers": 1, "num_kv_heads": 1, "init_layers": [0]}
    assert models.read_meta(tmp_path / "model")["extra"]["theseus"] == saved["theseus"]


def test_each_training_batch_carries_the_schedule_at_its_global_step(tiny_teacher_dir, tmp_path):
    """The technique as the runner sets it up: every training batch carries ``replace_prob`` = p(step) for its
    global step (float32 [B]), also when the batches resume mid-epoch, so a resumed run continues the schedule."""
    config = _config(tiny_teacher_dir)
    config.num_train_steps = 40
    run = runner.prepare(registry.JOBS["theseus"], config, str(tmp_path))
    assert run.total_steps == 40 and run.steps_per_epoch < 40
    p = theseus.replacement_schedule(config.theseus, run.total_steps)  # 0.3 + t * 0.7 / 20, then 1
    batches = runner.train_batches(run)
    for epoch, start in ((0, 0), (0, 3), (1, 2)):
        for i, batch in enumerate(batches(epoch, start)):
            step = epoch * run.steps_per_epoch + start + i
            assert batch[theseus.PROB].dtype == np.float32 and batch[theseus.PROB].shape == (TINY["batch_size"],)
            np.testing.assert_allclose(batch[theseus.PROB], min(1.0, 0.3 + step * 0.7 / 20), rtol=1e-6)
            np.testing.assert_allclose(batch[theseus.PROB], float(p(step)), rtol=1e-6)


def test_the_replacement_probability_is_logged(mqa_run):
    """The train metrics (metrics.jsonl) record the p(t) the steps ran with, as the theseus job logged it."""
    _, workdir = mqa_run
    log = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    probs = [r["replace_prob"] for r in log if "replace_prob" in r]
    assert probs and all(0.3 <= p <= 1.0 for p in probs)




def test_multi_query_successor_of_a_head_pruned_teacher(tiny_teacher_dir, tmp_path):
    """The job takes a compacted predecessor (layer 1 pruned to one head): each successor layer keeps its source
    layer's head count, with one shared key/value head (mean-pooled in layer 0, already one in layer 1)."""
    _, teacher_cfg, teacher = models.load(tiny_teacher_dir)
    pruned_cfg, pruned = compaction.compact(teacher_cfg, teacher, {1: np.array([0.0, 1.0], np.float32)})
    pruned_dir = tmp_path / "pruned"
    models.save(pruned_dir, "transformer", pruned_cfg, pruned, tokenizer_dir=tiny_teacher_dir,
                extra=models.read_meta(tiny_teacher_dir)["extra"])
    registry.run(_config(str(pruned_dir), "synthetic,linear,mqa", successor_layers=2),
                                 str(tmp_path / "w"))
    _, cfg, params = models.load(tmp_path / "w" / "model")
    assert cfg.num_heads == (2, 1) and cfg.num_kv_heads == 1
    d = teacher_cfg.dim_per_head
    assert [params["encoder"][f"layer_{i}"]["attention"]["key"]["kernel"].shape for i in (0, 1)] == [
        (teacher_cfg.hidden_size, d)] * 2


def test_depth_that_does_not_divide_fails_before_work(tiny_teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="does not divide into 3 modules"):
        registry.run(_config(tiny_teacher_dir, successor_layers=3), str(tmp_path / "w"))
    # The predecessor's depth is known once its model is read: the workdir exists by then (with the run's lock
    # file), but nothing was written into it.
    assert not os.path.exists(tmp_path / "w")


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        theseus_configs.get_config("sst2,cosine")
