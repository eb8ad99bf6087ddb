"""The pod rehearsal's recipe (``tests/launch/test_pod_rehearsal.py``), an ``experiments.main`` config file.

The demo recipe cut to three stages on tiny models: a Transformer teacher fine-tuned from scratch, a 1-layer
student distilled from its cached logits, and both exported to ONNX and scored in onnxruntime, then the report.
The task is SST-2's file format (``train.tsv``/``dev.tsv``, the test writes them): give ``--config.data_dir``.
"""

from experiments.configs import recipe
from tests.experiments.tiny import TINY

STEPS = {"teacher": 24, "transformer3": 40}  # the student's 40 steps leave time to kill it mid-way


def _set(config, values: dict) -> None:
    for key, value in values.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value


def get_config():
    c = recipe.get_config("demo")
    c.stages = "teacher,transformer3,onnx"
    c.task = "sst2"
    c.teacher.config.model_dir = None
    _set(c.teacher.config, {**TINY, "num_train_steps": STEPS["teacher"], "checkpoint.every_steps": 8})
    _set(c.transformer3.config, {k: TINY[k] for k in ("max_length", "batch_size", "eval_batch_size", "progress_bar",
                                                     "log_every_steps")})
    _set(c.transformer3.config, {"student.num_layers": 1, "num_train_steps": STEPS["transformer3"],
                                 "eval_every_steps": 20, "checkpoint.every_steps": 4, "checkpoint.keep": 2})
    c.onnx.source = "teacher,transformer3"
    c.onnx.config.precisions = "fp32"
    c.report.batch, c.report.seq, c.report.rounds = 2, 16, 1
    return c
