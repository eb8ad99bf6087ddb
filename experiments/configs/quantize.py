"""Post-training int8 quantization of a Transformer: calibrated fake-quant accuracy and real int8 execution.

Launch (also a recipe stage, ``kind = "quantize"``)::

    python -m experiments.main --config=experiments/configs/quantize.py:sst2 --workdir=/tmp/int8 \\
        --config.model_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2

Writes ``results.json`` (float32, fake-quantized and real int8 dev metrics) and ``quant_state.npz`` (the
calibrated scales, which the int8 ONNX export reads).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune


def get_config(task: str = "synthetic") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "quantize"  # experiments/jobs/stages.py
    c.task = task  # the task the model was fine-tuned on
    c.data_dir = finetune._optional_str(finetune.default_data_dir(task))  # its data folder; None when generated
    c.synthetic_size = 2000  # training examples of a generated task
    c.seed = 0  # the calibration batches' sample
    c.model_dir = finetune._optional_str(None)  # the fine-tuned Transformer (DIR/model); required
    c.calibrator = "percentile:99.99"  # max | percentile:P | mse | entropy
    c.calibration_batches = 16  # shuffled training batches of 32 for calibration (never dev)
    return c


CONSTRAINTS = {"job": dict(choices=("quantize",)), "synthetic_size": dict(min=2), "seed": dict(min=0),
               "calibration_batches": dict(min=1)}
