"""``multitask_and_evaluate(config, workdir)``: fine-tune one Transformer on several sequence tasks at once.

MT-DNN style (Liu et al. 2019): one shared encoder (embeddings, layers, pooler), one classifier head per task.
Each training step takes one batch of ONE task; an epoch is every task's batches in an order shuffled by
(seed, epoch), so tasks are sampled in proportion to their size. The model is the codebase's
:class:`~models.transformer.Transformer` with one wide classifier of ``sum(num_labels)`` columns, task ``t``
owning the block ``[offset_t, offset_t + num_labels_t)``: a batch's loss is the cross entropy over its task's
block only (the other logits are masked out, so their gradient is exactly zero), which is a separate head per
task computed in one apply and one compiled step (per bucket length) for all tasks. A step also leaves the
other tasks' head columns and their Adam moments exactly as they were (no momentum or weight-decay drift),
as in MT-DNN, where an absent head gets no gradient and the optimizer skips it. Adam's step count is shared.

Outputs in ``workdir`` (the run resumes from ``checkpoints/`` like every other job)::

    checkpoints/, metrics.jsonl, tensorboard/   as fine-tuning writes them; eval metrics are named TASK/METRIC
    results.json   {"final": {TASK: {metric: value, "loss": ...}, ..., "headline": h, "loss": l, "step": N},
                    "best": {...same...}, "steps": N, "wall_time_s": T, "tasks": [...], ...}
    model_TASK/    for every task: the shared encoder with that task's head, exactly the directory
                   finetune.py writes to DIR/model (``models.load``-able; distill with ``--config.teacher_dir``)

``headline`` is the mean over tasks of each task's first metric (accuracy for binary tasks); the best
checkpoint is chosen by ``config.checkpoint.best_metric`` (default ``headline``; also ``loss``, ``TASK/METRIC``).
``model_dir`` is a Hugging Face BERT checkpoint or a Transformer directory written by ``models.save`` (its
encoder is used, its head replaced); there is no from-scratch mode. Config fields are documented in
``experiments/configs/multitask.py``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax import lax
from jax.experimental import multihost_utils

import models
from compression import loss_scale, precision
from experiments.data import TaskData, load_task
from experiments.data.tasks import LOCAL_TASKS, SYNTHETIC_TASKS
from experiments.jobs.train import is_saved_model
from experiments.runtime import config_validation, loop, observe, selection, trainer
from experiments.runtime.config_validation import ConfigError
from experiments.runtime.parallel import AXIS, DataParallel
from models import hf
from models.transformer import TASK_HEADS, Transformer, TransformerConfig, with_task_head

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "example_weight")  # per batch
TASK_ID = "task_id"  # batch key: int32 [B], the task index of each row (one task per global batch)
HEADLINE = "headline"  # eval key: mean over tasks of each task's first metric
_HEAD_LEAF = ("classifier/kernel", "classifier/bias")  # path suffixes of the wide head (params, Adam moments)
_ORDER_TAG = 0x6D74  # decorrelates the task order from the per-task example shuffles of the same (seed, epoch)
_NEG = -1e9  # logit given to other tasks' columns (float32; softmax weight exactly 0)

# -- tasks and config ------------------------------------------------------------------------------------

def parse_tasks(text: str) -> list[str]:
    """``"mrpc,rte"`` -> ``["mrpc", "rte"]``; ConfigError for fewer than 2, duplicate, unknown or token tasks."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    known = [n for n in (*SYNTHETIC_TASKS, *LOCAL_TASKS) if n not in ("synthetic_ner", "wikiann", "wnut17")]
    problems = []
    if len(names) < 2:
        problems.append(f"config.tasks={text!r} names {len(names)} task(s); a multi-task teacher needs at least 2")
    if len(set(names)) != len(names):
        problems.append(f"config.tasks={text!r} repeats a task")
    for n in names:
        if n in ("synthetic_ner", "wikiann", "wnut17"):
            problems.append(f"task {n!r} is a token (tagging) task; the multi-task teacher takes sequence tasks "
                            f"only: {known}")
        elif n not in known:
            problems.append(f"unknown task {n!r}; allowed: {known}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return names


def _schema(tasks: Sequence[str]) -> dict:
    """The schema of this job's config for ``tasks`` (``data_dirs`` has one field per task)."""
    from experiments.configs import multitask as multitask_config
    reference = multitask_config.get_config(",".join(tasks))
    return config_validation.derive_schema(reference, multitask_config.CONSTRAINTS)


def _check_config(config) -> list[str]:
    """Validates ``config`` (schema, task list, data and model directories) before any work; returns the tasks."""
    tasks = parse_tasks(config.get("tasks", ""))
    config_validation.validate(config, _schema(tasks))
    problems = []
    for t in tasks:
        d = config.data_dirs[t]
        if t in LOCAL_TASKS and not d:
            problems.append(f"config.data_dirs.{t} is not set: task {t!r} reads its files from a data folder")
        elif t in LOCAL_TASKS and not os.path.isdir(d):
            problems.append(f"config.data_dirs.{t}={d!r} is not a directory")
    if not os.path.isdir(config.model_dir):
        problems.append(f"config.model_dir={config.model_dir!r} is not a directory (a Hugging Face BERT "
                        "checkpoint or a Transformer directory written by models.save)")
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % jax.device_count():
            problems.append(f"config.{name}={config[name]} must be a multiple of the {jax.device_count()} devices")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return tasks


def _check_best_metric(config, tasks: Sequence[TaskData]) -> None:
    allowed = [HEADLINE, "loss"] + [f"{t.name}/{m}" for t in tasks for m in t.metric_names + ["loss"]]
    if config.checkpoint.best_metric and config.checkpoint.best_metric not in allowed:
        raise ConfigError(f"config.checkpoint.best_metric={config.checkpoint.best_metric!r} is not an eval metric "
                          f"of this run; allowed: {allowed}")


def label_offsets(num_labels: Sequence[int]) -> np.ndarray:
    """int32 [T]: the first classifier column of each task (cumulative label counts)."""
    return np.concatenate([[0], np.cumsum(num_labels)[:-1]]).astype(np.int32)


def column_tasks(num_labels: Sequence[int]) -> np.ndarray:
    """int32 [sum(num_labels)]: the task owning each column of the wide classifier."""
    return np.repeat(np.arange(len(num_labels)), num_labels).astype(np.int32)


# -- model ----------------------------------------------------------------------------------------------

def build_model(model_dir: str, total_labels: int, key: jax.Array) -> tuple[TransformerConfig, Any]:
    """A sequence-head Transformer from ``model_dir`` with a fresh classifier of ``total_labels`` columns.

    ``model_dir``: a Hugging Face BERT checkpoint, or a Transformer directory (``models.save``) with a
    sequence head (its pooler is kept, its classifier replaced) or without a task head (a general-distillation
    student: a fresh pooler and classifier).
    """
    if not is_saved_model(model_dir):
        return hf.load_bert(model_dir, head="sequence", num_labels=total_labels, init_key=key)
    meta = models.read_meta(model_dir)
    _, cfg, params = models.load(model_dir)
    if meta["family"] == "transformer" and cfg.head not in TASK_HEADS:
        return with_task_head(cfg, params, "sequence", total_labels, key)
    if meta["family"] != "transformer" or cfg.head != "sequence":
        raise ConfigError(f"config.model_dir {model_dir} holds a {meta['family']} model with a "
                          f"{getattr(cfg, 'head', '?')} head; a sequence-head Transformer is needed")
    cfg = cfg.replace(num_labels=total_labels)
    fresh = jax.jit(Transformer(cfg).init)(key, np.zeros((1, 8), np.int32))["params"]["classifier"]
    return cfg, {**params, "classifier": fresh}


def task_view(cfg: TransformerConfig, params, offset: int, num_labels: int) -> tuple[TransformerConfig, Any]:
    """The plain single-task model: shared parameters plus classifier columns [offset, offset + num_labels)."""
    head = {"kernel": params["classifier"]["kernel"][:, offset:offset + num_labels],
            "bias": params["classifier"]["bias"][offset:offset + num_labels]}
    if set(params["classifier"]) != set(head):
        raise ValueError(f"unexpected classifier parameters {sorted(params['classifier'])}")
    return cfg.replace(num_labels=num_labels), {**params, "classifier": head}


def sliced_apply(apply_fn: Callable, offset: int, num_labels: int) -> Callable:
    """``apply_fn`` whose logits are one task's columns: [B, sum C] -> [B, num_labels] (for evaluation)."""

    def apply(*args, **kwargs):
        out = apply_fn(*args, **kwargs)
        return out.replace(logits=out.logits[:, offset:offset + num_labels])

    return apply


# -- loss and step --------------------------------------------------------------------------------------

def multitask_loss(apply_fn: Callable, num_labels: Sequence[int]) -> trainer.LossFn:
    """Cross entropy of each row over its own task's columns (mean over real examples), under dropout.

    The batch carries ``task_id`` int32 [B] and task-local ``labels`` int32 [B]; other tasks' logits are
    set to -1e9 (so they get no gradient) and labels are shifted to the task's block.
    """
    cols, offsets = jnp.asarray(column_tasks(num_labels)), jnp.asarray(label_offsets(num_labels))

    def loss_fn(params, batch, rng, extras):
        task_id = batch[TASK_ID]
        own = cols[None, :] == task_id[:, None]  # bool [B, sum C]

        def masked_apply(*args, **kwargs):
            out = apply_fn(*args, **kwargs)
            return out.replace(logits=jnp.where(own, out.logits.astype(jnp.float32), _NEG))

        labels = batch["labels"]
        inner = {k: v for k, v in batch.items() if k != TASK_ID}
        inner["labels"] = jnp.where(labels >= 0, labels + offsets[task_id], labels)
        return trainer.classification_loss(masked_apply)(params, inner, rng, extras)

    return loss_fn


def _is_head_leaf(path) -> bool:
    return trainer.path_str(path).endswith(_HEAD_LEAF)


def make_multitask_step(apply_fn: Callable, num_labels: Sequence[int], tx, steps_per_epoch: int,
                        schedule=None) -> Callable:
    """Per-device ``train_step(state, batch) -> (state, metrics)``: :func:`trainer.make_train_step` over
    :func:`multitask_loss`, after which the head columns (and their optimizer moments) of tasks absent from
    the global batch are put back as they were: an absent head is not trained, not even by momentum or
    weight decay. Leaves outside the classifier are untouched by this."""
    base = trainer.make_train_step(multitask_loss(apply_fn, num_labels), tx, steps_per_epoch, schedule)
    cols = jnp.asarray(column_tasks(num_labels))

    def train_step(state, batch):
        new, metrics = base(state, batch)
        here = jnp.any(cols[None, :] == batch[TASK_ID][:, None], axis=0).astype(jnp.int32)
        active = lax.pmax(here, AXIS) > 0  # bool [sum C], the same on every device

        def keep(path, n, o):
            if not _is_head_leaf(path):
                return n
            if n.shape[-1] != cols.shape[0]:
                raise ValueError(f"{trainer.path_str(path)} has shape {n.shape}; expected {cols.shape[0]} columns")
            return jnp.where(active, n, o)

        params = jax.tree_util.tree_map_with_path(keep, new.params, state.params)
        opt_state = jax.tree_util.tree_map_with_path(keep, new.opt_state, state.opt_state)
        return new.replace(params=params, opt_state=opt_state), metrics

    return train_step


# -- data -----------------------------------------------------------------------------------------------

def task_order(batches_per_task: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """int32 [sum(batches_per_task)]: the task of each step of ``epoch``, a shuffle of every task's batches
    (task t appears batches_per_task[t] times; its k-th appearance is its k-th batch of the epoch)."""
    tasks = np.repeat(np.arange(len(batches_per_task)), batches_per_task)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, _ORDER_TAG]))
    return rng.permutation(tasks).astype(np.int32)


def make_train_batches(tasks: Sequence[TaskData], batch_size: int, seed: int,
                       inputs: Sequence[str] = MODEL_INPUTS) -> Callable[[int, int], Iterator[dict]]:
    """``train_batches(epoch, start_batch)`` for :func:`loop.fit`: this host's rows of the steps of ``epoch``
    from ``start_batch`` on, each one full batch of one task (its epoch-``epoch`` shuffle, as fine-tuning on
    that task alone draws it) with ``task_id`` int32 [B] added. Reproducible from (epoch, start_batch)."""
    sizes = [t.train.num_batches(batch_size, drop_remainder=True) for t in tasks]

    def train_batches(epoch: int, start_batch: int) -> Iterator[dict]:
        order = task_order(sizes, seed, epoch)
        done = np.bincount(order[:start_batch], minlength=len(tasks))  # batches of each task already taken
        streams = [t.train.batches(batch_size, shuffle=True, seed=seed, epoch=epoch, start_batch=int(done[i]),
                                   drop_remainder=True, process_index=jax.process_index(),
                                   process_count=jax.process_count()) for i, t in enumerate(tasks)]
        for i in order[start_batch:]:
            batch = next(streams[i])
            out = {k: batch[k] for k in inputs}
            out[TASK_ID] = np.full(len(batch["labels"]), i, np.int32)
            yield out

    return train_batches


class _AllTrain:
    """The union of the tasks' train splits as :func:`loop.run_length` sees it (batches per epoch, size)."""

    def __init__(self, tasks: Sequence[TaskData]):
        self.tasks = tasks
        self.name = "+".join(t.name for t in tasks)

    def __len__(self) -> int:
        return sum(len(t.train) for t in self.tasks)

    def num_batches(self, batch_size: int, *, drop_remainder: bool) -> int:
        return sum(t.train.num_batches(batch_size, drop_remainder=drop_remainder) for t in self.tasks)


# -- evaluation -----------------------------------------------------------------------------------------

def combine_evals(per_task: dict[str, dict[str, float]], tasks: Sequence[TaskData]) -> dict[str, float]:
    """Flat eval metrics: ``TASK/METRIC`` for every task, ``headline`` (mean of each task's first metric)
    and ``loss`` (mean of the tasks' dev losses)."""
    flat = {f"{t}/{k}": v for t, m in per_task.items() for k, v in m.items()}
    flat[HEADLINE] = float(np.mean([per_task[t.name][t.metric_names[0]] for t in tasks]))
    flat["loss"] = float(np.mean([per_task[t.name]["loss"] for t in tasks]))
    return flat


def nest(flat: dict[str, float], task_names: Sequence[str]) -> dict:
    """``{"mrpc/f1": x, "headline": h, "step": s}`` -> ``{"mrpc": {"f1": x}, "headline": h, "step": s}``."""
    out = {t: {} for t in task_names}
    for k, v in flat.items():
        t, sep, m = k.partition("/")
        if sep and t in out:
            out[t][m] = v
        else:
            out[k] = v
    return out


# -- the run --------------------------------------------------------------------------------------------

def multitask_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes one encoder on ``config.tasks`` in ``workdir``; returns the results dict (see results.json)."""
    names = _check_config(config)
    policy = precision.policy(config.precision)
    precision.check_loss_scaling(config.precision, config.loss_scale.dynamic)
    ls = config.loss_scale
    try:
        dynamic_scale = (loss_scale.dynamic_scale(init_scale=ls.init_scale, growth_interval=ls.growth_interval,
                                                  minimum_scale=ls.minimum_scale) if ls.dynamic else None)
    except ValueError as e:
        raise ConfigError(f"invalid config.loss_scale: {e}") from e
    observe.quiet_library_logs()
    workdir = os.path.abspath(workdir)
    tasks = [load_task(t, config.data_dirs[t], tokenizer=config.model_dir, max_length=config.max_length,
                       seed=config.seed, synthetic_size=config.synthetic_size, selection=selection.task_arg(config))
             for t in names]
    _check_best_metric(config, tasks)
    num_labels = [t.num_labels for t in tasks]
    offsets = label_offsets(num_labels)
    for t in tasks:
        loop.run_length(config, t.train)  # ConfigError now if a task has no full training batch
    steps_per_epoch, total_steps = loop.run_length(config, _AllTrain(tasks))

    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model_cfg, params = build_model(config.model_dir, sum(num_labels), init_key)
    if model_cfg.max_position_embeddings < config.max_length:
        raise ConfigError(f"max_length={config.max_length} exceeds the model's position table "
                          f"({model_cfg.max_position_embeddings})")
    os.makedirs(workdir, exist_ok=True)
    par = DataParallel(config.parallelism)
    apply_fn = policy.wrap(Transformer(model_cfg).apply)
    tx, schedule = trainer.optimizer_from_config(config.optimizer, params, total_steps)
    state = jax.jit(lambda p, k, d: trainer.TrainState.create(p, tx, k, dynamic_scale=d))(
        params, train_key, dynamic_scale)
    state = loop.host_state(state)

    eval_steps = [par.compile(trainer.make_eval_step(trainer.classification_predict(
        sliced_apply(apply_fn, int(o), t.num_labels)))) for t, o in zip(tasks, offsets)]

    held_out = all(t.selection is not None for t in tasks)

    def evaluate(dstate) -> dict[str, float]:  # dev, and the selection splits where the best step is chosen
        def on(split_of):
            return combine_evals({t.name: loop.evaluate(par, step, dstate, t, config.eval_batch_size, MODEL_INPUTS,
                                                        split_of(t)) for t, step in zip(tasks, eval_steps)}, tasks)
        return selection.merge(on(lambda t: None), on(lambda t: t.selection) if held_out else None)

    settings = loop.LoopSettings.from_config(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                             headline_metric=HEADLINE, minimum_loss_scale=ls.minimum_scale,
                                             choice_prefix=selection.PREFIX if held_out else "")
    result = loop.fit(
        workdir, par=par, state=state, settings=settings,
        train_step=make_multitask_step(apply_fn, num_labels, tx, steps_per_epoch, schedule),
        train_batches=make_train_batches(tasks, config.batch_size, config.seed), evaluate=evaluate,
        extra_overview="multi-task: " + ", ".join(
            f"{t.name} {len(t.train)} train / {len(t.dev)} dev, {t.num_labels} labels" for t in tasks))
    if result.preempted_at_step is not None:
        return {"preempted_at_step": result.preempted_at_step}
    final, best = nest(result.final, names), nest(result.best, names)
    chosen = best if result.exported_step == result.best.get("step") else final
    extra = {"tasks": names, "metric_names": {t.name: t.metric_names for t in tasks},
             "exported_step": result.exported_step, "model_dirs": {t: os.path.join(workdir, f"model_{t}")
                                                                    for t in names},
             "num_devices": par.num_devices, "parallelism": par.mode,
             "selection": {t.name: selection.record(t) for t in tasks}}
    results_path = observe.write_results(workdir, final=final, best=best, steps=result.steps,
                                         wall_time_s=result.wall_time_s, extra=extra)
    if observe.is_writer():
        for t, o in zip(tasks, offsets):
            cfg_t, params_t = task_view(model_cfg, result.params, int(o), t.num_labels)
            models.save(extra["model_dirs"][t.name], "transformer", cfg_t, params_t, tokenizer_dir=config.model_dir,
                        extra={"task": t.name, "kind": t.kind, "label_names": list(t.label_names),
                               "max_length": config.max_length, "step": result.exported_step,
                               "eval": dict(chosen[t.name], step=chosen.get("step")),
                               "multitask": {"tasks": names, "workdir": workdir},
                               "selection": selection.record(t)},
                        overwrite=True)
        logging.info("done: %d steps in %.1f s; final %s; best %s; results in %s", result.steps,
                     result.wall_time_s, final, best, results_path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("multitask_and_evaluate_done")
    return {"final": final, "best": best, "steps": result.steps, "wall_time_s": result.wall_time_s, **extra}
