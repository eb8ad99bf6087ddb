"""QAT in FP8 (``config.qat.format``) and from a precision plan (``config.qat.plan``): the saved scales are the
PTQ scales of those rules (learning rate 0), the model records its format and carries the plan, and export reads
them back (``carried_rules``)."""

import json
import os

import jax
import numpy as np
import pytest

import models
from compression import quantization as q
from compression.quantization.plans import PrecisionPlan, find_sites
from experiments.data import load_task
from experiments.jobs import registry
from experiments.runtime import evaluation
from experiments.techniques import qat
from tests.experiments.tiny import TINY, tiny_config

CALIB_BATCHES = 2
INPUTS = evaluation.TRANSFORMER_INPUTS


def _calibration(model_dir):
    task = load_task("synthetic", None, tokenizer=model_dir, max_length=TINY["max_length"], seed=0,
                     synthetic_size=TINY["synthetic_size"], selection="auto")
    return task, evaluation.calibration_batches(task.train, INPUTS, CALIB_BATCHES, TINY["batch_size"])


def _qat(teacher_dir, workdir, **overrides):
    settings = {"qat__calibrator": "max", **overrides}
    config = tiny_config(model_dir=teacher_dir, qat__enabled=True, qat__calibration_batches=CALIB_BATCHES,
                         num_train_steps=2, eval_every_steps=2, checkpoint__every_steps=2,
                         optimizer__learning_rate=0.0, **settings)
    results = registry.run(config, str(workdir))
    return results, os.path.join(workdir, "model")


def _assert_same_scales(saved, want):
    assert jax.tree.structure(saved) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_fp8_qat(tiny_teacher_dir, tmp_path):
    results, model_dir = _qat(tiny_teacher_dir, tmp_path, qat__format="fp8")
    assert results["qat"] == {"calibrator": "max", "quant_state": qat.QUANT_STATE_FILE, "format": "fp8"}
    model, _, teacher = models.load(tiny_teacher_dir)
    task, calib = _calibration(tiny_teacher_dir)
    ptq = q.post_training_quantize(model.apply, teacher, calib, "max", rules=q.FP8_RULES, inputs=INPUTS)
    saved = qat.load_quant_state(qat.quant_state_path(model_dir))
    _assert_same_scales(saved, ptq[q.QUANT])  # amax / 448
    fake = evaluation.dev_metrics(q.fake_quant(q.FP8_RULES).wrap(model.apply), ptq, task, INPUTS)
    assert results["final"]["accuracy"] == pytest.approx(fake["accuracy"])
    precision, rules, plan = qat.carried_rules(model_dir)
    assert (precision, rules, plan) == ("fp8", q.FP8_RULES, None)
    assert not os.path.exists(qat.plan_path(model_dir))


def test_qat_from_a_plan(tiny_teacher_dir, tmp_path):
    model, _, teacher = models.load(tiny_teacher_dir)
    task, calib = _calibration(tiny_teacher_dir)
    sites = find_sites(evaluation.batch_apply(model.apply, INPUTS), {"params": teacher}, **calib[0])
    plan = PrecisionPlan.uniform(sites, "int8", calibrators={"int8": "max", "fp8": "mse"}).with_formats(
        {"encoder/layer_1/intermediate": "fp8", "classifier": "float"})
    path = str(tmp_path / qat.PLAN_FILE)
    qat.save_plan(path, plan)
    results, model_dir = _qat(tiny_teacher_dir, tmp_path / "run", qat__plan=path)
    assert results["qat"]["format"] == "plan" and results["qat"]["plan"] == qat.PLAN_FILE
    meta = json.load(open(os.path.join(model_dir, "config.json")))
    assert meta["extra"]["qat"]["calibrator"] == {"int8": "max", "fp8": "mse"}
    precision, rules, carried = qat.carried_rules(model_dir)
    assert precision == "plan" and carried == plan and rules == plan.rules()
    want = q.calibrate(evaluation.batch_apply(model.apply, INPUTS), {"params": teacher}, calib, plan.rules())
    saved = qat.load_quant_state(qat.quant_state_path(model_dir))
    _assert_same_scales(saved, want[q.QUANT])
    assert "classifier" not in saved  # a float site has no scale
    fp8_scale = float(saved["encoder"]["layer_1"]["intermediate"]["input_scale"])
    int8_scale = float(saved["encoder"]["layer_1"]["output"]["input_scale"])
    assert fp8_scale > 0 and int8_scale > 0
    fake = evaluation.dev_metrics(q.fake_quant(plan.rules()).wrap(model.apply), want, task, INPUTS)
    assert results["final"]["accuracy"] == pytest.approx(fake["accuracy"])


def test_bad_precision_configs_are_refused(tiny_teacher_dir, tmp_path):
    with pytest.raises(Exception, match="cannot calibrate FP8"):
        _qat(tiny_teacher_dir, tmp_path / "a", qat__format="fp8", qat__calibrator="entropy")
    with pytest.raises(Exception, match="config.qat.plan=.*is not a file"):
        _qat(tiny_teacher_dir, tmp_path / "b", qat__plan=str(tmp_path / "missing.json"))
    with pytest.raises(Exception, match="qat.format"):
        _qat(tiny_teacher_dir, tmp_path / "c", qat__format="int4")
