"""ONNX export of model directories (fp32, fp16, int8 Q/DQ) with parity against the JAX model.

Launch (also a recipe stage, ``kind = "export"``, whose ``source`` lists stages)::

    python -m experiments.main --config=experiments/configs/export.py --workdir=/tmp/onnx \\
        --config.models=teacher=/tmp/sst2/model --config.quant_states=teacher=/tmp/int8/quant_state.npz

Writes ``WORKDIR/<name>/model_<precision>.onnx`` with ``parity.json`` and ``tensorrt.sh`` per model, and
``results.json`` (the largest difference to JAX and its bound, size, and with ``evaluate`` the task metrics of
the file in onnxruntime on the dev split, per file).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.job = "export"  # experiments/jobs/stages.py
    c.models = ""  # name=model_dir, comma-separated (a recipe fills it from the stage's sources)
    c.quant_states = ""  # name=quant_state.npz, comma-separated: those models also get an int8 Q/DQ file
    c.precisions = "fp32,fp16"  # fp32 | fp16 (int8 comes with a quant state)
    # score every file in onnxruntime on the dev split of each model's own task (what gets deployed)
    c.evaluate = False
    c.data_dir = config_dict.FieldReference(None, field_type=str)  # the task's data folder (None: generated)
    c.synthetic_size = 2000  # training examples of a generated task
    c.seed = 0  # generation seed of a generated task
    return c


CONSTRAINTS = {"job": dict(choices=("export",)), "synthetic_size": dict(min=2), "seed": dict(min=0)}
