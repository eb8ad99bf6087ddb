"""Quantization-aware training for the training jobs (fine-tuning, distillation), any model family.

The activation scales are calibrated once, before training, on training batches (post-training calibration
with ``config.qat.calibrator``), then held fixed while the weights train through straight-through fake
quantization (:func:`compression.quantization.fake_quant`; per-channel weight scales are recomputed from the
weights every step). The job's dev metrics are then those of the fake-quantized model, and the calibrated
``"quant"`` collection is saved beside the parameters as ``model/quant_state.npz``, which ``quant_eval
--qat_model_dir`` and the int8 export read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from absl import logging

from compression import quantization as quant
from experiments import evaluation, export
from experiments.data import Split

QUANT_STATE_FILE = "quant_state.npz"  # the calibrated "quant" collection saved beside a QAT model's params


def quantization_aware(qat_config, apply_fn: Callable, params, split: Split, inputs: Sequence[str],
                       batch_size: int, seed: int) -> tuple[Callable, dict | None]:
    """(apply function, calibrated ``quant`` collection): ``apply_fn`` fake-quantized with the scales calibrated
    on ``split`` when ``qat_config.enabled``; else ``apply_fn`` unchanged and ``None``.

    The returned function has ``apply_fn``'s signature and adds the ``quant`` collection to the variables it is
    given, so the training loop keeps differentiating ``params`` only.
    """
    if not qat_config.enabled:
        return apply_fn, None
    calib = evaluation.calibration_batches(split, tuple(inputs), qat_config.calibration_batches, batch_size, seed)
    logging.info("QAT: calibrating activation scales (%s) on %d train batches", qat_config.calibrator, len(calib))
    quant_state = quant.post_training_quantize(evaluation.batch_apply(apply_fn, tuple(inputs)), params, calib,
                                               qat_config.calibrator)[quant.QUANT]
    fake_quant_apply = quant.fake_quant(scales="fixed").wrap(apply_fn)

    def wrapped(variables, *args, **kwargs):
        return fake_quant_apply({**variables, quant.QUANT: quant_state}, *args, **kwargs)

    return wrapped, quant_state


def save_state(model_dir: str, quant_state: dict) -> str:
    """Writes ``quant_state`` as ``model_dir/quant_state.npz``; returns the path."""
    path = os.path.join(model_dir, QUANT_STATE_FILE)
    export.save_quant_state(path, quant_state)
    return path


def model_extra(qat_config) -> dict:
    """What a QAT model directory records in its ``extra``."""
    return {"qat": {"calibrator": qat_config.calibrator, "quant_state": QUANT_STATE_FILE}}
