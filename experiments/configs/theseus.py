"""Compress a fine-tuned Transformer (a ``DIR/model`` written by finetune.py) by progressive module replacement.

Launch::

    python -m experiments.main --config=experiments/configs/theseus.py:sst2,linear --workdir=/tmp/theseus \\
        --config.model_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2

The argument is ``TASK,SCHEDULE`` with SCHEDULE ``constant`` (p = 0.5 for the first half of the steps, then
1) or ``linear`` (p = min(1, k t + 0.3), reaching 1 at half of the steps); ``TASK,SCHEDULE,mqa`` gives the
successor layers one shared key/value head (multi-query attention, initialised by mean-pooling the
predecessor's heads). The 6-layer MiniLM teacher becomes a 3-layer successor (one predecessor module of two
layers per successor layer), initialised from the teacher's layers 0, 2, 4. Only successor layers train, on
gold labels (no distillation loss); evaluation and the exported ``model/`` are the successor alone. The teacher
may be a head-pruned, compacted model (``experiments.tools.prune``'s ``OUT/model``): each successor layer keeps the
head count of the layer it starts from, also with ``mqa``.

Measured on SST-2 from the MiniLM teacher (0.8933; 700 steps, 13-20 minutes on 2 idle CPU cores), dev accuracy for
seeds 0 / 1 / 2: linear 0.8681 / 0.8601 / 0.8761 (mean 0.8681), constant 0.8647 / 0.8509 / 0.8681 (mean 0.8612);
the same 3-layer student fine-tuned plainly: 0.8647 (seed 0; see the README).
On MRPC from the MiniLM teacher (accuracy 0.8186, F1 0.8775; 344 steps = 3 epochs, 11-17 minutes), final dev
accuracy / F1 for seeds 0 / 1 / 2: linear 0.7819 / 0.8539, 0.7598 / 0.8361, 0.7475 / 0.8341 (mean 0.7631 / 0.8414),
constant 0.7549 / 0.8366, 0.7500 / 0.8306, 0.7598 / 0.8419 (mean 0.7549 / 0.8364); the same 3-layer student, seed 0,
fine-tuned plainly 0.7574 / 0.8342, distilled (``distill.py:mrpc,transformer3``) 0.7721 / 0.8468. Linear for 5
epochs (``--config.num_train_steps=573``), seeds 0 / 1: 0.7794 / 0.8515, 0.7745 / 0.8462 (30 minutes each, two
at once).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune
from experiments.techniques.theseus import SCHEDULES

CONSTRAINTS = finetune.CONSTRAINTS


def get_config(arg: str = "synthetic,linear") -> ml_collections.ConfigDict:
    """``arg`` = ``TASK,SCHEDULE[,mqa]``; see the module docstring."""
    task, parts = finetune.task_and_options(arg, (*SCHEDULES, "mqa"))
    schedule, rest = (parts[0], parts[1:]) if parts else ("linear", [])
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} for theseus.py; allowed: {list(SCHEDULES)}")
    if rest not in ([], ["mqa"]):
        raise ValueError(f"unexpected {','.join(rest)!r} in theseus.py:{arg}; the optional third part is 'mqa'")
    c = finetune.get_config(task)
    c.job = "theseus"  # the fine-tuning job with module replacement (experiments/techniques/theseus.py)
    c.model_dir = None  # model directory of the fine-tuned predecessor (DIR/model); required
    t = c.theseus
    t.enabled = True
    t.successor_layers = 3  # one successor layer per module of two MiniLM layers
    t.num_kv_heads = 1 if rest == ["mqa"] else 0  # multi-query successor layers with "mqa"
    t.schedule = schedule
    t.replacing_rate = 0.5 if schedule == "constant" else 0.3  # constant: p; linear: p at step 0 (b)

    c.optimizer.learning_rate = 1e-4 if task != "synthetic" else c.optimizer.learning_rate
    if task == "mrpc":  # 3 epochs of 3,668 pairs at batch 32; ~2.7 s a step on 2 CPU cores (128 tokens)
        c.num_train_steps = 344
        c.eval_every_steps = c.checkpoint.every_steps = 115
    elif task != "synthetic":
        c.num_train_steps = 700
        c.eval_every_steps = 350
        c.checkpoint.every_steps = 350
    return c
