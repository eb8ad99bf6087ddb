"""Quantization-aware training (``config.qat``) through the runner: continue a saved model under fake quantization
(the fine-tuning job and its qat.py preset), and a distilled student trained quantization-aware."""

import json
import os

import jax
import numpy as np
import pytest

import models
from models.io import tree_equal
from compression import quantization as q
from experiments.configs import qat as qat_configs
from experiments.data import load_task
from experiments.jobs import registry
from experiments.runtime import evaluation
from experiments.techniques import qat
from experiments.techniques.qat import QUANT_STATE_FILE
from tests.experiments.tiny import TINY, tiny_config, tiny_job

CALIB_BATCHES = 2


def _qat_run(tiny_teacher_dir, workdir, learning_rate: float, preset: bool = False):
    """4 steps of QAT from the tiny teacher: the fine-tuning job with ``qat.enabled``, or (``preset``) the qat.py
    preset of it (job "qat")."""
    if preset:
        config = tiny_job(qat_configs.get_config("synthetic"), tiny_teacher_dir, 4)
        assert config.job == "qat" and config.qat.enabled
        config.qat.calibrator, config.qat.calibration_batches = "max", CALIB_BATCHES
        config.optimizer.learning_rate = learning_rate
    else:
        config = tiny_config(model_dir=tiny_teacher_dir, qat__enabled=True, qat__calibrator="max",
                             qat__calibration_batches=CALIB_BATCHES, num_train_steps=4, eval_every_steps=4,
                             checkpoint__every_steps=4, optimizer__learning_rate=learning_rate)
    results = registry.run(config, str(workdir))
    assert results["techniques"] == ["qat"]
    assert results["qat"] == {"calibrator": "max", "quant_state": QUANT_STATE_FILE}
    return results, os.path.join(workdir, "model")


def _task(model_dir):
    """The task as the QAT job reads it (its selection rows held out of train, where it calibrates)."""
    return load_task("synthetic", None, tokenizer=model_dir, max_length=TINY["max_length"], seed=0,
                     synthetic_size=TINY["synthetic_size"], selection="auto")


def _fake_quant_metrics(model_dir, task):
    model, _, params = models.load(model_dir)
    quant = qat.load_quant_state(os.path.join(model_dir, QUANT_STATE_FILE))
    return evaluation.dev_metrics(q.fake_quant().wrap(model.apply), {"params": params, q.QUANT: quant}, task,
                                  evaluation.TRANSFORMER_INPUTS)


def test_zero_learning_rate_qat_is_post_training_quantization(tiny_teacher_dir, tmp_path):
    """Through the qat.py preset. With lr 0 the weights stay the teacher's (head kept, not re-initialised), the
    saved scales are the PTQ scales of the teacher on the same calibration batches, and the dev metrics are the
    PTQ model's."""
    results, model_dir = _qat_run(tiny_teacher_dir, tmp_path, learning_rate=0.0, preset=True)
    _, _, teacher = models.load(tiny_teacher_dir)
    _, _, trained = models.load(model_dir)
    assert tree_equal(teacher, trained)

    task = _task(tiny_teacher_dir)
    model, _, _ = models.load(tiny_teacher_dir)
    calib = evaluation.calibration_batches(task.train, evaluation.TRANSFORMER_INPUTS, CALIB_BATCHES, TINY["batch_size"])
    ptq = q.post_training_quantize(model.apply, teacher, calib, "max", inputs=evaluation.TRANSFORMER_INPUTS)
    saved = qat.load_quant_state(os.path.join(model_dir, QUANT_STATE_FILE))
    assert jax.tree.structure(saved) == jax.tree.structure(ptq[q.QUANT])
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(ptq[q.QUANT])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
        assert np.all(np.isfinite(a)) and np.all(np.asarray(a) > 0)

    ptq_metrics = evaluation.dev_metrics(q.fake_quant().wrap(model.apply), ptq, task, evaluation.TRANSFORMER_INPUTS)
    assert results["final"]["accuracy"] == pytest.approx(ptq_metrics["accuracy"])
    meta = json.load(open(os.path.join(model_dir, "config.json")))
    assert meta["extra"]["qat"] == {"calibrator": "max", "quant_state": QUANT_STATE_FILE}


def test_qat_trains_the_weights_and_reports_fake_quantized_metrics(tiny_teacher_dir, tmp_path):
    results, model_dir = _qat_run(tiny_teacher_dir, tmp_path, learning_rate=1e-3)
    _, _, teacher = models.load(tiny_teacher_dir)
    _, _, trained = models.load(model_dir)
    assert not tree_equal(teacher, trained)  # straight-through gradients reached the weights
    assert results["final"]["accuracy"] == pytest.approx(_fake_quant_metrics(model_dir, _task(model_dir))["accuracy"])


def test_saved_model_with_another_head_is_refused(tiny_teacher_dir, tmp_path):
    config = tiny_config(task="synthetic_ner", model_dir=tiny_teacher_dir, checkpoint__best_metric="span_f1")
    with pytest.raises(ValueError, match="needs a token head"):
        registry.run(config, str(tmp_path))


def test_distilled_bilstm_trains_quantization_aware(tiny_teacher_dir, tmp_path):
    """QAT through the distillation job: the student's LSTM input projection (encoder), MLP and classifier get
    calibrated scales, and the job's dev metrics are the fake-quantized student's with the saved state."""
    from experiments.configs import distill as distill_configs

    config = distill_configs.get_config("synthetic,bilstm")
    for key, value in {"synthetic_size": TINY["synthetic_size"], "batch_size": 16, "eval_batch_size": 32,
                       "num_train_steps": 8, "eval_every_steps": 8, "checkpoint.every_steps": 8,
                       "max_length": TINY["max_length"], "progress_bar": "off", "student.embed_dim": 16,
                       "student.hidden_size": 8, "student.mlp_hidden": 8, "qat.enabled": True,
                       "qat.calibration_batches": CALIB_BATCHES}.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    config.teacher_dir = tiny_teacher_dir
    results = registry.run(config, str(tmp_path))
    assert results["job"] == "distill" and results["techniques"] == ["qat", "distill"]
    model_dir = os.path.join(tmp_path, "model")
    quant = qat.load_quant_state(os.path.join(model_dir, QUANT_STATE_FILE))
    scaled = [path for path, _ in jax.tree_util.tree_leaves_with_path(quant)]
    assert any("encoder" in jax.tree_util.keystr(p) for p in scaled) and any(
        "classifier" in jax.tree_util.keystr(p) for p in scaled)
    model, _, params, task = evaluation.load_model_task(model_dir, synthetic_size=TINY["synthetic_size"])
    inputs = evaluation.model_inputs(task, "bilstm")
    metrics = evaluation.dev_metrics(q.fake_quant().wrap(model.apply), {"params": params, q.QUANT: quant}, task,
                                     inputs)
    assert results["final"]["accuracy"] == pytest.approx(metrics["accuracy"])
