"""The fine-tuning job through the one runner (``registry.run``) in-process on the tiny synthetic config: outputs,
independent re-evaluation, bad input."""

import glob
import json
import os

import jax
import numpy as np
import pytest

import models
from experiments.data import load_task
from experiments.jobs import registry
from experiments.runtime import config_validation, metrics
from experiments.runtime.checkpointing import Checkpointer
from experiments.runtime.loop import NonFiniteLossError
from tests.experiments.tiny import dev_argmax, tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_run")
    results = registry.run(tiny_config(), str(workdir))
    return workdir, results


def test_run_writes_results_metrics_events_and_model(tiny_run):
    workdir, returned = tiny_run
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 24 and results["wall_time_s"] > 0
    assert set(results["final"]) >= {"accuracy", "f1", "mcc", "loss", "step"}
    assert results["final"]["step"] == 24
    assert results["best"]["step"] in (12, 24)
    assert returned["final"] == results["final"]
    assert (results["job"], results["task"], results["family"], results["techniques"]) == (
        "finetune", "synthetic", "transformer", [])
    assert results["exported_step"] == 24  # the synthetic config exports the last step

    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    assert [l["step"] for l in train] == [4, 8, 12, 16, 20, 24]
    assert all({"loss", "learning_rate", "examples_per_s", "tokens_per_s", "grad_norm"} <= set(l) for l in train)
    assert [l["step"] for l in lines if l["split"] == "eval"] == [12, 24]
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))


def test_saved_model_reproduces_the_final_eval(tiny_run):
    """Re-evaluate DIR/model independently: its params are the last checkpoint's and give the final metrics."""
    workdir, _ = tiny_run
    model, config, params = models.load(workdir / "model")
    assert os.path.isfile(workdir / "model" / "tokenizer.json")
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    assert max(ckpt.steps()) == 24
    meta = ckpt.read_meta(24)
    ckpt.close()
    # Compare with the checkpointed params leaf by leaf (paths from the checkpoint's own metadata): the trainable
    # tree is {"model": params} when no technique adds a part of its own.
    assert {p.split("/")[1] for p in meta["paths"] if p.startswith("params/")} == {"model"}
    flat = {path.removeprefix("params/model/"): shape for path, shape in zip(meta["paths"], meta["shapes"])
            if path.startswith("params/model/")}
    assert {"/".join(p.key for p in path): list(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(params)} == flat

    cfg = tiny_config()
    task = load_task("synthetic", tokenizer=str(workdir / "model"), max_length=cfg.max_length,
                     synthetic_size=cfg.synthetic_size, seed=cfg.seed)
    preds, labels = dev_argmax(model, params, task)
    results = json.loads((workdir / "results.json").read_text())
    assert len(labels) == len(task.dev)
    assert results["final"]["accuracy"] == pytest.approx(float(np.mean(preds == labels)))
    assert results["final"]["mcc"] == pytest.approx(metrics.classification_metrics(preds, labels, 2)["mcc"])
    extra = models.read_meta(workdir / "model")["extra"]
    assert (extra["task"], extra["kind"], extra["step"]) == ("synthetic", "sequence", 24)
    assert extra["eval"]["accuracy"] == results["final"]["accuracy"]


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    # An absurd learning rate: step 1 is finite, its update overflows the model, step 2's loss is not finite.
    config = tiny_config(optimizer__learning_rate=1e30, optimizer__warmup_fraction=0.0,
                         optimizer__grad_clip_norm=0.0, checkpoint__every_steps=1, eval_every_steps=0)
    with pytest.raises(NonFiniteLossError, match=r"at step 2: stopping.*checkpoint \(step 1 in"):
        registry.run(config, str(tmp_path))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.steps() == [1]
    meta = ckpt.read_meta(1)
    ckpt.close()
    assert meta["step"] == 1
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("change, message", [
    ({"batch_size": "32"}, "config.batch_size must be a int, got str"),
    ({"parallelism": "pjit"}, "config.parallelism='pjit' is not allowed; allowed: ['pmap', 'shard_map']"),
    ({"optimizer.warmup_fraction": 1.5}, "config.optimizer.warmup_fraction=1.5 is above the maximum 1.0"),
])
def test_bad_config_fails_before_any_work(tmp_path, change, message):
    config = tiny_config()
    for key, value in change.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        with node.ignore_type():
            node[leaf] = value
    workdir = tmp_path / "never_created"
    with pytest.raises(config_validation.ConfigError) as e:
        registry.run(config, str(workdir))
    assert message in str(e.value)
    assert not workdir.exists()


def test_best_metric_must_belong_to_the_task(tmp_path):
    with pytest.raises(config_validation.ConfigError, match="best_metric='span_f1' is not a metric"):
        registry.run(tiny_config(checkpoint__best_metric="span_f1"), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
