"""Quantization-aware training (``config.qat``) for every training job and model family.

The activation scales are calibrated once, before training, on training batches (post-training calibration
with ``config.qat.calibrator``) through the model as the techniques before it left it (gates, LayerDrop off:
evaluation mode), then held fixed while the weights train through straight-through fake quantization
(:func:`compression.quantization.fake_quant`; per-channel weight scales are recomputed from the weights every
step). The job's dev metrics are those of the fake-quantized model, and the calibrated ``"quant"`` collection
is published inside ``model/`` as ``quant_state.npz`` (read by ``quant_eval --qat_model_dir`` and the int8
export).

Modules under a ``predecessor`` scope (BERT-of-Theseus's frozen layers, discarded at the end) stay in float:
only what is exported is quantized. With Theseus the saved scales are renamed to the plain successor's paths.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Mapping

import ml_collections
import numpy as np
from absl import logging

from compression import quantization as quant
from compression.quantization.rules import DEFAULT_RULES
from experiments.runtime import evaluation
from experiments.techniques.base import Exported, Run, Technique
from models import storage
from models.io import flatten_params, unflatten_params

QUANT_STATE_FILE = "quant_state.npz"  # the calibrated "quant" collection saved beside a QAT model's params
# DEFAULT_RULES, minus Theseus's predecessor modules (they never reach the exported model).
RULES = tuple(dataclasses.replace(r, module_path=r"^(?!(?:.*/)?predecessor/)" + r.module_path.removeprefix("^"))
              for r in DEFAULT_RULES)
_THESEUS_SUCCESSOR = re.compile(r"^encoder/module_\d+/successor/")


def section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.enabled = False  # on: calibrate activation scales once, then train through int8 fake quantization
    s.calibrator = "max"  # activation calibrator: "max" | "percentile:P" | "mse" | "entropy"
    s.calibration_batches = 8  # training batches (of batch_size) used for calibration
    return s


CONSTRAINTS = {"calibration_batches": dict(min=1)}


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
    logging.info("QAT: calibrating activation scales (%s) on %d training batches", qc.calibrator, len(calib))
    inner = run.apply_fn()  # the model as the techniques before QAT left it
    fixed = run.variables(run.tree, run.extras)

    def calibration_apply(variables, *args, **kwargs):
        return inner({**variables, **fixed}, *args, **kwargs)

    quant_state = quant.post_training_quantize(evaluation.batch_apply(calibration_apply, run.inputs),
                                               run.tree["model"], calib, qc.calibrator, rules=RULES)[quant.QUANT]
    run.wrappers.append(quant.fake_quant(RULES, scales="fixed").wrap)
    run.collections.append(lambda tree, extras: {quant.QUANT: quant_state})

    def publish(exported: Exported) -> None:
        state = successor_paths(quant_state) if "theseus" in exported.run.results else quant_state
        exported.run.model_files[QUANT_STATE_FILE] = lambda path: save_quant_state(path, state)
        exported.run.results["qat"] = {"calibrator": qc.calibrator, "quant_state": QUANT_STATE_FILE}

    run.finalizers.append(publish)


TECHNIQUE = Technique("qat", section=section, constraints=CONSTRAINTS, active=lambda c: c.qat.enabled,
                      check=lambda c, family: [], setup=_setup)


def quant_state_path(model_dir: str) -> str:
    """Where a QAT model directory keeps its calibrated scales."""
    return os.path.join(model_dir, QUANT_STATE_FILE)
