"""Prune a fine-tuned Transformer (a ``DIR/model`` written by finetune.py) with L0 gates on FFN units and heads.

Launch::

    python -m experiments.main --config=experiments/configs/l0.py:sst2 --workdir=/tmp/l0_kd \\
        --config.teacher_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2
    python -m experiments.main --config=experiments/configs/l0.py:sst2,nokd --workdir=/tmp/l0_nokd \\
        --config.teacher_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2

The argument is ``TASK[,nokd]``. Hard-concrete gates (Louizos et al. 2018) sit on every FFN unit and every
attention head of the teacher; a Lagrangian term (Wang et al. 2020; Xia et al. 2022) drives the expected
fraction of pruned FFN units to ``l0.target_ffn`` (0.5) and of heads to ``l0.target_heads`` (0.3), both
ramped linearly from 0 over the first ``l0.warmup_fraction`` of the steps. The task loss is Hinton KD from
the unpruned teacher's cached logits (T = 4, 0.9 soft / 0.1 gold), or gold labels only with ``nokd``. At
the end the closed gates are removed for real (compaction) and ``model/`` holds the smaller plain Transformer.

Measured on SST-2 from the MiniLM teacher (0.8933 dev accuracy) with ``--config.num_epochs=0.5`` (1,052
steps, 41 minutes each on 2 CPU cores): with KD 49.5% of FFN units and 30.6% of heads removed at 0.8922 (0.1
point below the teacher); without KD 49.2% / 29.2% at 0.8853 (0.8 point below). The default is 1 epoch.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

# Fine-tuning fields this job does not read: how the model is built, and its precision / QAT options (L0 pruning
# trains in float32; quantize the pruned model afterwards).
UNREAD_FIELDS = tuple(dict.fromkeys(finetune.FINETUNE_ONLY + ("precision", "loss_scale", "qat")))


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    """``arg`` = ``TASK[,nokd]``; see the module docstring."""
    task, *parts = arg.split(",")
    if parts not in ([], ["nokd"]):
        raise ValueError(f"unexpected {','.join(parts)!r} in l0.py:{arg}; the optional second part is 'nokd'")
    c = finetune.get_config(task)
    for name in UNREAD_FIELDS:
        if name in c:
            del c[name]
    c.job = "l0"  # experiments.main runs experiments.l0.l0_and_evaluate
    c.teacher_dir = finetune._optional_str(None)  # model directory of the fine-tuned Transformer; required

    c.l0 = ml_collections.ConfigDict()
    c.l0.target_ffn = 0.5  # fraction of FFN units to prune, in [0, 1)
    c.l0.target_heads = 0.3  # fraction of attention heads to prune, in [0, 1)
    c.l0.warmup_fraction = 0.3  # share of the steps over which the targets ramp linearly from 0 (CoFi's warmup)
    c.l0.drop_init = 0.1  # initial P(gate closed) per unit; sets the starting log_alpha = log((1 - p) / p)
    # CoFi uses 0.01 for both over 20 epochs; a run here is 1 epoch, so the gates and multipliers move faster
    c.l0.gate_learning_rate = 0.1  # Adam learning rate of the gates' log_alpha (constant)
    c.l0.lambda_learning_rate = 0.1  # Adam learning rate of the Lagrange multipliers (gradient ascent)
    c.l0.max_abs_log_alpha = 4.6  # log_alpha is kept in [-x, x] after each step (CoFi: log 100); 0: no bound

    c.distill = ml_collections.ConfigDict()  # the task loss: as in distill.py, against the unpruned teacher
    c.distill.preset = "none" if parts == ["nokd"] else "hinton"  # compression.distillation preset, or "none"
    c.distill.temperature = -1.0  # softening temperature; -1: the preset's
    c.distill.kd_weight = -1.0  # weight of the soft-target term; -1: the preset's
    c.distill.ce_weight = -1.0  # weight of the gold-label term; -1: the preset's

    # The model that is saved must meet the sparsity targets: an early "best" checkpoint would not.
    c.export = "last"
    c.checkpoint.best_metric = None
    c.optimizer.learning_rate = 5e-5 if task != "synthetic" else c.optimizer.learning_rate  # the model's AdamW
    if task != "synthetic":
        c.num_epochs = 1.0
        c.eval_every_steps = 300
        c.checkpoint.every_steps = 300
    return c
