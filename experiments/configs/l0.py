"""Prune a fine-tuned Transformer (a ``DIR/model`` written by finetune.py) with L0 gates on FFN units and heads.

Launch::

    python -m experiments.main --config=experiments/configs/l0.py:sst2 --workdir=/tmp/l0_kd \\
        --config.model_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2
    python -m experiments.main --config=experiments/configs/l0.py:sst2,nokd --workdir=/tmp/l0_nokd \\
        --config.model_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2

The argument is ``TASK[,nokd]``. Hard-concrete gates (Louizos et al. 2018) sit on every FFN unit and every
attention head of the teacher; a Lagrangian term (Wang et al. 2020; Xia et al. 2022) drives the expected
fraction of pruned FFN units to ``l0.target_ffn`` (0.5) and of heads to ``l0.target_heads`` (0.3), both
ramped linearly from 0 over the first ``l0.warmup_fraction`` of the steps. The task loss is Hinton KD from
the unpruned teacher's cached logits (T = 4, 0.9 soft / 0.1 gold), or gold labels only with ``nokd``. At
the end the closed gates are removed for real (compaction) and ``model/`` holds the smaller plain Transformer.

Measured on SST-2 from the MiniLM teacher (0.8933 dev accuracy) with ``--config.num_epochs=0.5`` (1,052 steps, 41
minutes each on 2 CPU cores): with KD 49.5% of FFN units and 30.6% of heads removed at 0.8922 (0.1 point below the
teacher); without KD 49.2% / 29.2% at 0.8853 (0.8 point below). The default is 1 epoch. Composed in one run with
TinyBERT from the live teacher, QAT and bfloat16 (``--config.distill.preset=tinybert --config.qat.enabled=True
--config.precision=bfloat16 --config.num_train_steps=300``, 8.5 minutes): 47.1% of FFN units and 29.2% of heads
removed, 0.8807 compacted and fake-quantized, 0.8773 as int8 ONNX (README, "Results on SST-2").
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

CONSTRAINTS = finetune.CONSTRAINTS


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    """``arg`` = ``TASK[,nokd]``; see the module docstring."""
    task, parts = finetune.task_and_options(arg, ("nokd",))
    if parts not in ([], ["nokd"]):
        raise ValueError(f"unexpected {','.join(parts)!r} in l0.py:{arg}; the optional second part is 'nokd'")
    c = finetune.get_config(task)
    c.job = "l0"  # the fine-tuning job with L0 gates (experiments/techniques/l0.py)
    c.model_dir = None  # model directory of the fine-tuned Transformer to prune; required
    # config.teacher_dir None: the KD teacher is model_dir itself, the model before pruning
    c.l0.enabled = True
    c.distill.preset = "none" if parts == ["nokd"] else "hinton"  # the task loss: KD from the unpruned model
    # The model that is saved must meet the sparsity targets: an early "best" checkpoint would not.
    c.export = "last"
    c.checkpoint.best_metric = None
    c.optimizer.learning_rate = 5e-5 if task != "synthetic" else c.optimizer.learning_rate  # the model's AdamW
    if task != "synthetic":
        c.num_epochs = 1.0
        c.eval_every_steps = 300
        c.checkpoint.every_steps = 300
    return c
