"""Depth options of the fine-tuning job: half-depth initialisation and LayerDrop with every-other pruning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from compression.pruning import compaction
from experiments import evaluation
from experiments.data import load_task
from experiments.train import _with_layerdrop, train_and_evaluate
from tests.experiments.tiny import TINY, tiny_config


def _frozen_run(teacher_dir, workdir, **overrides):
    """A short run at learning rate 0 from the saved tiny teacher: the weights stay the teacher's."""
    config = tiny_config(model_dir=teacher_dir, num_train_steps=2, eval_every_steps=2, checkpoint__every_steps=2,
                         optimizer__learning_rate=0.0, **overrides)
    return train_and_evaluate(config, str(workdir))


def test_layerdrop_run_reports_the_model_pruned_to_every_other_layer(tiny_teacher_dir, tmp_path):
    results = _frozen_run(tiny_teacher_dir, tmp_path, layers__layerdrop=0.5)
    _, cfg, params = models.load(tiny_teacher_dir)
    half_cfg, half = compaction.keep_layers(cfg, params, (0,))
    task = load_task("synthetic", None, tokenizer=tiny_teacher_dir, max_length=TINY["max_length"], seed=0,
                     synthetic_size=TINY["synthetic_size"])
    expected = evaluation.dev_metrics(models.model_class("transformer")(half_cfg).apply, {"params": half}, task,
                                      evaluation.TRANSFORMER_INPUTS)
    assert results["pruned_every_other"]["accuracy"] == pytest.approx(expected["accuracy"])


def test_every_other_init_keeps_layers_0_2_4(tiny_teacher_dir, tmp_path):
    _frozen_run(tiny_teacher_dir, tmp_path, layers__init="every_other")
    _, cfg, params = models.load(tmp_path / "model")
    _, _, teacher = models.load(tiny_teacher_dir)
    assert cfg.num_layers == 1 and list(params["encoder"]) == ["layer_0"]
    for a, b in zip(jax.tree.leaves(params["encoder"]["layer_0"]), jax.tree.leaves(teacher["encoder"]["layer_0"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_layerdrop_acts_only_in_training(tiny_teacher_dir):
    model, _, params = models.load(tiny_teacher_dir)
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 50, (4, 12)), jnp.int32)
    apply = _with_layerdrop(model.apply, 0.5)
    plain = model.apply({"params": params}, ids, train=False).logits
    np.testing.assert_array_equal(apply({"params": params}, ids, train=False).logits, plain)
    # training without dropout noise (rate 0 everywhere but LayerDrop): some keys drop a layer
    outs = [apply({"params": params}, ids, train=False, rngs={"dropout": jax.random.key(i)}).logits
            for i in range(8)]
    assert any(not np.allclose(o, plain) for o in outs)
    base = model.apply
    assert _with_layerdrop(base, 0.0) is base
