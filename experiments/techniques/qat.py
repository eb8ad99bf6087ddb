"""Quantization-aware training (``config.qat``) for every training job and model family.

The activation scales are calibrated once, before training, on training batches (post-training calibration
with ``config.qat.calibrator``) through the model as the techniques before it left it (gates, LayerDrop off:
evaluation mode), then held fixed while the weights train through straight-through fake quantization
(:func:`compression.quantization.fake_quant`; per-channel weight scales are recomputed from the weights every
step). The job's dev metrics are those of the fake-quantized model, and the calibrated ``"quant"`` collection
is published inside ``model/`` as ``quant_state.npz`` (read by ``quant_eval --qat_model_dir`` and the Q/DQ
export).

Formats: ``config.qat.format`` quantizes every module in int8 (the default) or FP8 (E4M3); ``config.qat.plan``
names a precision plan (``precision_plan.json`` of ``experiments.tools.precision_plan``) that gives each site
its own format, or float, with the plan's calibrators. The saved model records its format in ``extra.qat``
and carries the plan beside its scales (:data:`PLAN_FILE`), so export and evaluation quantize it as it trained
(:func:`carried_rules`).

Modules under a ``predecessor`` scope (BERT-of-Theseus's frozen layers, discarded at the end) stay in float:
only what is exported is quantized. With Theseus the saved scales are renamed to the plain successor's paths.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Mapping

import ml_collections
import numpy as np
from absl import logging

import models
from compression import quantization as quant
from compression.quantization.plans import PrecisionPlan
from compression.quantization.rules import DEFAULT_RULES
from experiments.runtime import evaluation
from experiments.techniques.base import Exported, Run, Technique
from models import storage
from models.io import flatten_params, unflatten_params

QUANT_STATE_FILE = "quant_state.npz"  # the calibrated "quant" collection saved beside a QAT model's params
PLAN_FILE = "precision_plan.json"  # the precision plan a model carries (per-site int8 / FP8 / float)
FORMATS = ("int8", "fp8")
# DEFAULT_RULES, minus Theseus's predecessor modules (they never reach the exported model).
RULES = tuple(dataclasses.replace(r, module_path=r"^(?!(?:.*/)?predecessor/)" + r.module_path.removeprefix("^"))
              for r in DEFAULT_RULES)
_THESEUS_SUCCESSOR = re.compile(r"^encoder/module_\d+/successor/")


def section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.enabled = False  # on: calibrate activation scales once, then train through int8 fake quantization
    s.calibrator = "max"  # activation calibrator: "max" | "percentile:P" | "mse" | "entropy"
    s.calibration_batches = 8  # training batches (of batch_size) used for calibration
    s.format = "int8"  # "int8" | "fp8" (E4M3; calibrator max, percentile or mse): every quantized module's format
    s.plan = ""  # a precision plan (JSON, experiments.tools.precision_plan): per-site formats and calibrators
    return s


CONSTRAINTS = {"calibration_batches": dict(min=1), "format": dict(choices=FORMATS)}


def _check(c, family) -> list[str]:
    qc = c.qat
    if qc.plan:
        if not storage.is_file(qc.plan):
            return [f"config.qat.plan={qc.plan!r} is not a file (a precision_plan.json)"]
        try:
            load_plan(qc.plan)
        except ValueError as e:
            return [f"config.qat.plan={qc.plan!r}: {e}"]
    elif qc.format == "fp8" and "fp8" not in quant.get_calibrator(qc.calibrator).formats:
        return [f"config.qat.calibrator={qc.calibrator!r} cannot calibrate FP8 (use max, percentile or mse)"]
    return []


def save_plan(path: str, plan: PrecisionPlan) -> None:
    """Writes a precision plan as JSON, atomically; ``path`` may be a gs:// URL."""
    storage.write_text(path, json.dumps(plan.to_dict(), indent=1))


def load_plan(path: str) -> PrecisionPlan:
    """The precision plan in the JSON file ``path`` (:func:`save_plan`)."""
    try:
        return PrecisionPlan.from_dict(json.loads(storage.read_text(path)))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a precision plan: {e}") from None


def qat_rules(config) -> tuple[tuple[quant.QuantRule, ...], PrecisionPlan | None]:
    """The rules QAT quantizes with under ``config.qat`` (and the plan, when one drives it)."""
    qc = config.qat
    if qc.plan:
        plan = load_plan(qc.plan)
        return plan.rules(), plan
    return (RULES if qc.format == "int8" else quant.with_format(RULES, "fp8")), None


def save_quant_state(path: str, quant_state: Mapping) -> None:
    """Writes a ``"quant"`` collection as an .npz of flattened ``a/b/c`` keys (see :func:`load_quant_state`),
    atomically; ``path`` may be a gs:// URL."""
    with storage.atomic_file(path) as tmp:
        np.savez(tmp, **flatten_params(quant_state))


def load_quant_state(path: str) -> dict:
    """The nested ``"quant"`` collection from an .npz written by :func:`save_quant_state`."""
    with np.load(io.BytesIO(storage.read_bytes(path))) as data:
        flat = {k: data[k] for k in data.files}
    if not flat:
        raise ValueError(f"{path} holds no quantization state")
    return unflatten_params(flat)


def successor_paths(quant_state: Mapping) -> dict:
    """A Theseus model's ``quant`` collection renamed to the extracted successor's module paths
    (``encoder/module_m/successor/layer_i/...`` -> ``encoder/layer_i/...``)."""
    return unflatten_params({_THESEUS_SUCCESSOR.sub("encoder/", k): v
                             for k, v in flatten_params(quant_state).items()})


def _setup(run: Run) -> None:
    qc = run.config.qat
    calib = evaluation.calibration_batches(run.train, run.inputs, qc.calibration_batches, run.config.batch_size,
                                           run.config.seed)
    rules, plan = qat_rules(run.config)
    logging.info("QAT: calibrating activation scales (%s, %s) on %d training batches",
                 "plan " + qc.plan if plan else qc.calibrator, "plan" if plan else qc.format, len(calib))
    inner = run.apply_fn()  # the model as the techniques before QAT left it
    fixed = run.variables(run.tree, run.extras)

    def calibration_apply(variables, *args, **kwargs):
        return inner({**variables, **fixed}, *args, **kwargs)

    quant_state = quant.calibrate(evaluation.batch_apply(calibration_apply, run.inputs), {"params": run.tree["model"]},
                                  calib, rules, method=None if plan else qc.calibrator)[quant.QUANT]
    quant.check_scales(quant_state, "QAT calibration")
    run.wrappers.append(quant.fake_quant(rules, scales="fixed").wrap)
    run.collections.append(lambda tree, extras: {quant.QUANT: quant_state})

    def publish(exported: Exported) -> None:
        state = successor_paths(quant_state) if "theseus" in exported.run.results else quant_state
        exported.run.model_files[QUANT_STATE_FILE] = lambda path: save_quant_state(path, state)
        record = {"calibrator": qc.calibrator, "quant_state": QUANT_STATE_FILE}
        if qc.format != "int8":
            record["format"] = qc.format
        if plan is not None:
            exported.run.model_files[PLAN_FILE] = lambda path: save_plan(path, plan)
            record.update(format="plan", calibrator=plan.calibrators, plan=PLAN_FILE)
        exported.run.results["qat"] = record

    run.finalizers.append(publish)


TECHNIQUE = Technique("qat", section=section, constraints=CONSTRAINTS, active=lambda c: c.qat.enabled,
                      check=_check, setup=_setup)


def quant_state_path(model_dir: str) -> str:
    """Where a QAT model directory keeps its calibrated scales."""
    return os.path.join(model_dir, QUANT_STATE_FILE)


def plan_path(model_dir: str) -> str:
    """Where a model directory keeps its precision plan."""
    return os.path.join(model_dir, PLAN_FILE)


def carried_rules(model_dir: str) -> tuple[str, tuple[quant.QuantRule, ...], PrecisionPlan | None]:
    """``(precision, rules, plan)`` a model directory's carried scales (``quant_state.npz``) were calibrated
    with: ``("plan", plan rules, plan)`` when it carries a precision plan, ``("fp8", FP8 rules, None)`` for an
    FP8 QAT run, else ``("int8", DEFAULT_RULES, None)``."""
    if storage.is_file(plan_path(model_dir)):
        plan = load_plan(plan_path(model_dir))
        return "plan", plan.rules(), plan
    if models.read_meta(model_dir).get("extra", {}).get("qat", {}).get("format") == "fp8":
        return "fp8", quant.FP8_RULES, None
    return "int8", DEFAULT_RULES, None
