"""Fine-tune ONE Transformer teacher on several sequence tasks at once (MT-DNN: shared encoder, a head per task).

Launch (from the checkout; MiniLM is the default ``model_dir``)::

    python -m experiments.main --config=experiments/configs/multitask.py:mrpc,rte --workdir=/tmp/mt \\
        --config.data_dirs.mrpc=../shared/data/mrpc --config.data_dirs.rte=../shared/data/rte

The argument is a comma-separated list of at least two sequence tasks (``synthetic``, ``synthetic_pair``, ``sst2``,
``mrpc``, ``rte``, ``agnews``); each has its own ``data_dirs.TASK`` (defaults to ../shared/data/<folder> beside the
checkout when it exists; generated tasks need none). Each step trains on one batch of one task; an epoch visits
every task's batches once in a shuffled order, so tasks are sampled in proportion to their size. The run writes
``model_TASK/`` for every task (the shared encoder with that task's head, the same directory finetune.py writes
to ``DIR/model``), so distillation takes the multi-task teacher unchanged, e.g.::

    python -m experiments.main --config=experiments/configs/distill.py:mrpc,bilstm --workdir=/tmp/mt_bilstm \\
        --config.student.pooling=attention --config.teacher_dir=/tmp/mt/model_mrpc \\
        --config.data_dir=../shared/data/mrpc

Measured (2 CPU cores, shared with other jobs: 91 minutes): MRPC + RTE for 3 epochs (``--config.num_epochs=3``,
573 steps of 32; the default 5 epochs take about 1.5-2 hours) -> dev MRPC accuracy 0.8064 / F1 0.8645 (single-task
teacher, 5 epochs: 0.8186 / 0.8775), RTE accuracy 0.5487 (single-task, best of 10 epochs: 0.5487; 0.5668 at step
200). Distilled into the attentive BiLSTM: see distill.py.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune
from experiments.techniques import TECHNIQUES

SEQUENCE_TASKS = ("synthetic", "synthetic_pair", "sst2", "mrpc", "rte", "agnews")
_GENERATED = ("synthetic", "synthetic_pair")


def get_config(arg: str = "mrpc,rte") -> ml_collections.ConfigDict:
    """``arg`` = ``TASK,TASK[,...]``; see the module docstring."""
    tasks = [t.strip() for t in arg.split(",") if t.strip()]
    if len(tasks) < 2 or len(set(tasks)) != len(tasks) or not set(tasks) <= set(SEQUENCE_TASKS):
        raise ValueError(f"multitask.py:{arg}: give at least two different sequence tasks from "
                         f"{list(SEQUENCE_TASKS)}, comma-separated")
    generated = all(t in _GENERATED for t in tasks)
    real = [t for t in tasks if t in finetune.TASKS and t not in _GENERATED]  # finetune.py knows their defaults
    c = finetune.get_config(real[0] if real else "synthetic")
    # single-task, from-scratch and technique fields are not read here (the job trains every head in full)
    for name in ("task", "data_dir", "teacher_dir", "model", "layers", "allow_changed_config",
                 *(t.name for t in TECHNIQUES if t.name != "loss_scale")):
        del c[name]
    c.job = "multitask"  # experiments.main runs experiments.jobs.multitask.multitask_and_evaluate
    c.tasks = ",".join(tasks)  # the tasks, comma-separated (the heads' order in the wide classifier)
    c.data_dirs = ml_collections.ConfigDict()  # data folder of each task; None for generated tasks
    for t in tasks:
        c.data_dirs[t] = finetune._optional_str(finetune.default_data_dir(t))
    # HF BERT checkpoint (fresh heads) or a Transformer directory saved by models.save (encoder kept, heads new)
    c.model_dir = finetune._optional_str(finetune.minilm_dir())
    # max_length (one for all tasks), optimizer, batch sizes, precision, loss_scale, checkpoint, export and
    # progress_bar fields are those of finetune.py (see there); the values below differ from its defaults.
    c.max_length = 32 if generated else 128  # longest input in sub-tokens for every task
    c.num_epochs = 3.0 if generated else 5.0  # epochs over ALL tasks' batches (when num_train_steps is -1)
    c.eval_every_steps = 100 if generated else 200  # dev evaluation of every task every N steps (and at the end)
    c.checkpoint.every_steps = c.eval_every_steps  # periodic checkpoints (evals also checkpoint)
    # metric (on each task's selection split, config.selection) whose best checkpoint is kept and exported:
    # "headline" (mean of the tasks' first metrics),
    # "loss" (mean dev loss; set best_mode "min") or "TASK/METRIC" (e.g. "mrpc/f1")
    c.checkpoint.best_metric = "headline"
    c.checkpoint.best_mode = "max"  # headline and task metrics: higher is better
    return c


# The shared constraints of the fields this job keeps, and its own.
CONSTRAINTS = {**{k: v for k, v in finetune.TRAINING_CONSTRAINTS.items()
                  if k.split(".")[0] in ("max_length", "seed", "synthetic_size", "parallelism", "precision",
                                         "loss_scale", "optimizer", "batch_size", "eval_batch_size", "num_epochs",
                                         "num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint",
                                         "export", "progress_bar", "selection", "selection_size")},
               "job": dict(choices=("multitask",))}
