"""Depth options of the fine-tuning job: half-depth initialisation, and LayerDrop (``config.layerdrop``) with
every-other pruning, composed by the runner."""

import jax
import numpy as np
import pytest

import models
from compression.pruning import compaction, layerdrop
from experiments.data import load_task
from experiments.jobs import registry, runner
from experiments.runtime import evaluation
from experiments.techniques import layerdrop as layerdrop_technique
from tests.experiments.tiny import TINY, tiny_config


def _frozen_run(teacher_dir, workdir, **overrides):
    """A short run at learning rate 0 from the saved tiny teacher: the weights stay the teacher's."""
    config = tiny_config(model_dir=teacher_dir, num_train_steps=2, eval_every_steps=2, checkpoint__every_steps=2,
                         optimizer__learning_rate=0.0, **overrides)
    return registry.run(config, str(workdir))


def test_layerdrop_run_reports_the_model_pruned_to_every_other_layer(tiny_teacher_dir, tmp_path):
    results = _frozen_run(tiny_teacher_dir, tmp_path, layerdrop__rate=0.5)
    assert results["techniques"] == ["layerdrop"]
    _, cfg, params = models.load(tiny_teacher_dir)
    half_cfg, half = compaction.keep_layers(cfg, params, (0,))
    task = load_task("synthetic", None, tokenizer=tiny_teacher_dir, max_length=TINY["max_length"], seed=0,
                     synthetic_size=TINY["synthetic_size"])
    expected = evaluation.dev_metrics(models.model_class("transformer")(half_cfg).apply, {"params": half}, task,
                                      evaluation.TRANSFORMER_INPUTS)
    assert results["pruned_every_other"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert models.read_meta(tmp_path / "model")["extra"]["pruned_every_other"] == results["pruned_every_other"]


def test_every_other_init_keeps_layers_0_2_4(tiny_teacher_dir, tmp_path):
    _frozen_run(tiny_teacher_dir, tmp_path, layers__init="every_other")
    _, cfg, params = models.load(tmp_path / "model")
    _, _, teacher = models.load(tiny_teacher_dir)
    assert cfg.num_layers == 1 and list(params["encoder"]) == ["layer_0"]
    for a, b in zip(jax.tree.leaves(params["encoder"]["layer_0"]), jax.tree.leaves(teacher["encoder"]["layer_0"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def _run_without_dropout(teacher_dir, workdir, rate):
    """The runner's Run of the fine-tuning job from the tiny teacher with LayerDrop at ``rate`` (built and set up
    by the runner, nothing trained), its model swapped for the same one without dropout: LayerDrop is then the
    only randomness left in the composed training loss."""
    run = runner.prepare(registry.JOBS["finetune"], tiny_config(model_dir=teacher_dir, layerdrop__rate=rate),
                         str(workdir))
    run.model_cfg = run.model_cfg.replace(hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
    run.model = models.model_class("transformer")(run.model_cfg)
    return run


def test_layerdrop_acts_only_in_training(tiny_teacher_dir, tmp_path):
    """Through the runner's composed eval predictions and training loss: evaluation runs every layer (the plain
    model's predictions and loss); training draws a layer-drop pattern per step key (some keys drop a layer, so
    the loss changes with the key). At rate 0 the technique is off and the training loss is the plain model's."""
    run = _run_without_dropout(tiny_teacher_dir, tmp_path / "a", 0.5)
    assert run.rng_streams == [layerdrop.LAYERDROP_RNG]
    batch = next(run.model_task.dev.batches(16, drop_remainder=False))
    batch = {k: batch[k] for k in run.inputs + ("labels", "example_weight")}
    tree = run.tree

    # The plain model, computed independently: logits, per-example cross-entropy, its weighted sum.
    logits = np.asarray(run.model.apply({"params": tree["model"]}, batch["input_ids"],
                                        attention_mask=batch["attention_mask"],
                                        token_type_ids=batch["token_type_ids"]).logits, np.float64)
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    ce = -log_p[np.arange(len(logits)), batch["labels"]]
    w = batch["example_weight"]
    plain_loss = float(np.sum(ce * w) / np.sum(w))

    preds, loss_sum, weight_sum = jax.jit(runner.make_predict(run))(tree, run.extras, batch)
    np.testing.assert_array_equal(np.asarray(preds), logits.argmax(-1))
    assert float(loss_sum) / float(weight_sum) == pytest.approx(plain_loss, rel=1e-5)

    loss = jax.jit(lambda key: runner.make_loss(run)(tree, batch, key, run.extras)[0])
    losses = [float(loss(jax.random.key(i))) for i in range(8)]
    assert any(v != pytest.approx(plain_loss, rel=1e-5) for v in losses)  # some keys drop a layer

    off = _run_without_dropout(tiny_teacher_dir, tmp_path / "b", 0.0)
    assert not layerdrop_technique.TECHNIQUE.active(off.config) and off.wrappers == [] and off.rng_streams == []
    off_loss = jax.jit(lambda key: runner.make_loss(off)(tree, batch, key, off.extras)[0])
    for i in range(3):
        assert float(off_loss(jax.random.key(i))) == pytest.approx(plain_loss, rel=1e-5)
