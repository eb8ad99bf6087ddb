"""Quantization-aware training of a fine-tuned model (a ``DIR/model`` written by a training job).

Launch::

    python -m experiments.main --config=experiments/configs/qat.py:sst2 --workdir=/tmp/qat \\
        --config.model_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2

The fine-tuning job continuing a saved model (its head kept) with ``qat.enabled``: activation scales are
calibrated once on training batches (``qat.calibrator``), then the weights train through int8 fake quantization
at a small learning rate; ``model/`` holds the weights and ``quant_state.npz`` (the scales the int8 export
uses). Measured on SST-2 from the MiniLM teacher (0.8933): 200 steps at lr 2e-6, max calibration: 0.8922.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

CONSTRAINTS = finetune.CONSTRAINTS


def get_config(task: str = "synthetic") -> ml_collections.ConfigDict:
    c = finetune.get_config(task)
    c.job = "qat"  # the fine-tuning job with quantization-aware training (experiments/techniques/qat.py)
    c.model_dir = None  # model directory of the fine-tuned model to quantize; required
    c.qat.enabled = True
    c.optimizer.learning_rate = 2e-6 if task != "synthetic" else 1e-4  # a small step: the model is trained already
    c.num_train_steps = 200 if task != "synthetic" else 40
    c.eval_every_steps = c.checkpoint.every_steps = 100 if task != "synthetic" else 20
    return c
