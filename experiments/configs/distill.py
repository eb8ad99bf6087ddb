"""Distil a fine-tuned teacher (a ``DIR/model`` written by finetune.py) into a smaller student.

Launch::

    python -m experiments.main --config=experiments/configs/distill.py:sst2,transformer3 --workdir=/tmp/d3 \\
        --config.teacher_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2

The argument is ``TASK,STUDENT`` with STUDENT one of

* ``transformer3``: a 3-layer Transformer initialised from the teacher's layers 0, 2, 4 (every other layer;
  DistilBERT's initialisation), Hinton KD (T = 4, 0.9 soft / 0.1 hard);
* ``bilstm``: a 1-layer BiLSTM over words (Tang et al. 2019), logit-MSE distillation on the training set plus
  an augmented transfer set (masking, same-tag replacement, n-gram sampling), labelled by the teacher;
* ``transformer3_nokd`` / ``bilstm_nokd``: the same students trained on the gold labels only (the baseline
  every distillation figure is compared with).

The teacher's logits over the transfer set are computed once and cached in the workdir. Expected on SST-2
(2 CPU cores): transformer3 about 97-99% of the teacher's accuracy in about 25 minutes (1 epoch);
bilstm about 85-87% accuracy in about 10 minutes. These are estimates; measured figures are in the README.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

STUDENTS = ("transformer3", "transformer3_nokd", "bilstm", "bilstm_nokd")


def get_config(arg: str = "synthetic,transformer3") -> ml_collections.ConfigDict:
    """``arg`` = ``TASK,STUDENT``; see the module docstring."""
    task, _, student = arg.partition(",")
    student = student or "transformer3"
    if student not in STUDENTS:
        raise ValueError(f"unknown student {student!r} for distill.py; allowed: {list(STUDENTS)}")
    c = finetune.get_config(task)
    for name in finetune.FINETUNE_ONLY:  # fine-tuning fields this job does not read
        del c[name]
    c.job = "distill"  # experiments.main runs experiments.distill.distill_and_evaluate
    c.teacher_dir = finetune._optional_str(None)  # model directory of the fine-tuned teacher (DIR/model); required

    c.student = ml_collections.ConfigDict()
    c.student.family = "transformer" if student.startswith("transformer") else "bilstm"  # transformer | bilstm
    c.student.num_layers = 3  # layers of a Transformer student / stacked BiLSTM layers
    c.student.init = "every_other"  # Transformer student: "every_other" | "first" teacher layers, or "random"
    c.student.embed_dim = 300  # BiLSTM: word embedding width
    c.student.hidden_size = 150  # BiLSTM: hidden units per direction
    c.student.mlp_hidden = 200  # BiLSTM: ReLU layer before the logits
    c.student.pooling = "max"  # BiLSTM: "max" | "mean" | "attention" over time
    c.student.dropout_rate = 0.1  # student dropout
    c.student.max_vocab = 50000  # BiLSTM: word vocabulary cap (specials included), from the training text

    c.distill = ml_collections.ConfigDict()
    c.distill.preset = "hinton"  # compression.distillation preset, or "none" (gold labels only: the baseline)
    c.distill.temperature = -1.0  # softening temperature; -1: the preset's
    c.distill.kd_weight = -1.0  # weight of the soft-target term; -1: the preset's
    c.distill.ce_weight = -1.0  # weight of the gold-label term (augmented rows never have gold labels); -1: preset's

    c.augment = ml_collections.ConfigDict()
    c.augment.n_per_example = 0  # synthetic transfer examples per training example (Tang et al.: 20 for SST-2)
    c.augment.max_examples = 0  # cap on the augmented rows (0: no cap), to bound the teacher's labelling time
    c.augment.p_mask = 0.1  # masking probability
    c.augment.p_pos = 0.1  # same-tag word replacement probability
    c.augment.p_ng = 0.25  # n-gram sampling probability

    c.checkpoint.best_metric = "span_f1" if task in ("wikiann", "wnut17") else "accuracy"
    if student.startswith("transformer"):
        c.optimizer.learning_rate = 1e-4
        c.num_epochs = 1.0 if task != "synthetic" else c.num_epochs
    else:
        c.optimizer.learning_rate = 1e-3
        c.optimizer.weight_decay = 0.0
        c.optimizer.warmup_fraction = 0.0
        c.optimizer.schedule = "constant"
        c.batch_size = 50
        c.eval_batch_size = 100
        c.num_epochs = 3.0 if task != "synthetic" else c.num_epochs
        c.distill.preset = "tang"
        if task != "synthetic":
            c.augment.n_per_example = 4
            c.augment.max_examples = 200000
    if student.endswith("_nokd"):
        c.distill.preset = "none"
        c.augment.n_per_example = 0
    return c
