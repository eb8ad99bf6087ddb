"""``train_and_evaluate(config, workdir)``: fine-tune (or train from scratch) a Transformer on a task.

The run is restartable by design: it resumes from the newest verified checkpoint in ``workdir`` (step,
optimizer state, RNG and data position), so a preempted or killed run restarted with the same command
continues the same trajectory. It writes into ``workdir``::

    checkpoints/     Orbax checkpoints: the newest ``checkpoint.keep`` plus the best by ``checkpoint.best_metric``
    metrics.jsonl    one JSON line per train log step and per evaluation
    tensorboard/     TensorBoard event files
    results.json     {"final": {...}, "best": {...}, "steps": N, "wall_time_s": T, ...}
    model/           the trained model as a self-describing directory (models.save), with its tokenizer

Config fields are documented in ``experiments/configs/finetune.py`` and checked against
:data:`experiments.config_validation.FINETUNE_SCHEMA` before anything else happens.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import models
from models import hf
from experiments import checkpointing, config_validation, metrics, observe, trainer
from experiments.data import TaskData, load_task
from experiments.parallel import DataParallel, is_key
from models.transformer import Transformer, TransformerConfig

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "example_weight")
WORD_LEVEL_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the message names the step and the last good checkpoint."""


# -- inputs and model ------------------------------------------------------------------------------------

def _word_level_tokenizer(task_name: str, config, out_dir: str):
    """A word-level ``tokenizers.Tokenizer`` over the task's train words, saved as ``out_dir/tokenizer.json``.

    Used when training from scratch (no ``model_dir``), so that ``DIR/model`` still carries its tokenizer.
    Words are split as :func:`experiments.data.split_words` splits them (pre-split NER words pass through).
    """
    import tokenizers
    from tokenizers import models as tok_models, normalizers, pre_tokenizers

    probe = load_task(task_name, config.data_dir, word_vocab="build", max_length=config.max_length,
                      seed=config.seed, synthetic_size=config.synthetic_size)
    words = [u for u in probe.word_vocab.units[2:]]
    vocab = {tok: i for i, tok in enumerate(WORD_LEVEL_SPECIALS + tuple(words))}
    tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(tokenizers.Regex(r"\w+(?:'\w+)*|'\w+|[^\w\s]"), behavior="isolated")])
    if observe.is_writer():
        os.makedirs(out_dir, exist_ok=True)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
    return tok


def _load_inputs(config, workdir: str) -> tuple[TaskData, str, int | None]:
    """(task encoded for the Transformer, directory holding its tokenizer files, vocabulary size of a
    from-scratch word-level tokenizer or ``None`` with a pretrained ``model_dir``)."""
    vocab_size = None
    if config.model_dir:
        if not os.path.isdir(config.model_dir):
            raise FileNotFoundError(f"config.model_dir {config.model_dir} is not a directory")
        tokenizer, tokenizer_dir = config.model_dir, config.model_dir
    else:
        tokenizer_dir = os.path.join(workdir, "tokenizer")
        tokenizer = _word_level_tokenizer(config.task, config, tokenizer_dir)
        vocab_size = tokenizer.get_vocab_size()
    task = load_task(config.task, config.data_dir, tokenizer=tokenizer, max_length=config.max_length,
                     seed=config.seed, synthetic_size=config.synthetic_size)
    return task, tokenizer_dir, vocab_size


def _build_model(config, task: TaskData, vocab_size: int | None, key) -> tuple[TransformerConfig, Any]:
    """Pretrained body from ``config.model_dir`` with a fresh head, or a from-scratch ``config.model``."""
    head = "token" if task.kind == "token" else "sequence"
    if config.model_dir:
        model_cfg, params = hf.load_bert(config.model_dir, head=head, num_labels=task.num_labels,
                                                init_key=key)
        if model_cfg.max_position_embeddings < config.max_length:
            raise ValueError(f"max_length={config.max_length} exceeds the model's position table "
                             f"({model_cfg.max_position_embeddings})")
        return model_cfg, params
    m = config.model
    model_cfg = TransformerConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
        intermediate_size=m.intermediate_size, max_position_embeddings=config.max_length,
        hidden_dropout_rate=m.dropout_rate, attention_dropout_rate=m.dropout_rate, head=head,
        num_labels=task.num_labels)
    ids = np.zeros((1, 8), np.int32)
    params = jax.jit(Transformer(model_cfg).init)(key, ids)["params"]  # jit: one compile, not one per op
    return model_cfg, params


def _check_sizes(config, par: DataParallel) -> None:
    for name in ("batch_size", "eval_batch_size"):
        value = config[name]
        if value % par.num_devices:
            raise ValueError(f"config.{name}={value} must be a multiple of the {par.num_devices} devices "
                             f"({jax.process_count()} process(es))")


# -- evaluation ------------------------------------------------------------------------------------------

def evaluate(par: DataParallel, eval_step, dstate, task: TaskData, batch_size: int) -> dict[str, float]:
    """Runs the compiled ``eval_step`` over the dev split; returns the task's metrics and ``loss``."""
    preds, labels, weights, loss_sum, weight_sum = [], [], [], 0.0, 0.0
    for batch in task.dev.batches(batch_size, shuffle=False, drop_remainder=False,
                                  process_index=jax.process_index(), process_count=jax.process_count()):
        out = par.unreplicate(eval_step(dstate, par.shard_batch({k: batch[k] for k in MODEL_INPUTS})))
        preds.append(out["predictions"])
        labels.append(out["labels"])
        weights.append(out["example_weight"])
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
    w = np.concatenate(weights)
    if task.kind == "token":
        width = max(p.shape[1] for p in preds)
        pad = lambda a, v: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=v)  # noqa: E731
        result = metrics.token_metrics(np.concatenate([pad(p, 0) for p in preds]),
                                       np.concatenate([pad(y, metrics.IGNORE_INDEX) for y in labels]),
                                       task.label_names, w)
    else:
        result = metrics.classification_metrics(np.concatenate(preds), np.concatenate(labels),
                                                task.num_labels, w)
    result = {k: v for k, v in result.items() if k in task.metric_names or k.startswith(("span_", "token_"))}
    result["loss"] = loss_sum / max(weight_sum, 1e-12)
    return result


# -- preemption ------------------------------------------------------------------------------------------

class _PreemptionWatch:
    """SIGTERM (single process) or JAX's preemption sync point (multi-host) -> save and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            except ValueError:  # not the main thread (e.g. a notebook worker): no signal handling
                self._previous = None

    def _on_signal(self, signum, frame):
        del signum, frame
        self.requested = True

    def __call__(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# -- the run ---------------------------------------------------------------------------------------------

def _check_window(window, ckpt: checkpointing.Checkpointer, ckpt_dir: str) -> None:
    for step, m in window:
        for key in ("loss", "grad_norm"):
            if not math.isfinite(m[key]):
                ckpt.wait()
                steps = ckpt.steps()
                last = f"step {steps[-1]} in {ckpt_dir}" if steps else "none was saved"
                raise NonFiniteLossError(f"{key} is {m[key]} at step {step}: stopping. The last good "
                                         f"checkpoint ({last}) is intact.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains and evaluates as ``config`` says, in ``workdir``; returns the results dict (see results.json)."""
    config_validation.validate(config, config_validation.FINETUNE_SCHEMA)
    observe.quiet_library_logs()
    start_time = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    par = DataParallel(config.parallelism)
    _check_sizes(config, par)
    task, tokenizer_dir, vocab_size = _load_inputs(config, workdir)
    if config.checkpoint.best_metric and config.checkpoint.best_metric not in task.metric_names + ["loss"]:
        raise config_validation.ConfigError(
            f"config.checkpoint.best_metric={config.checkpoint.best_metric!r} is not a metric of task "
            f"{task.name!r}; allowed: {task.metric_names + ['loss']}")

    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model_cfg, params = _build_model(config, task, vocab_size, init_key)
    model = Transformer(model_cfg)
    steps_per_epoch = task.train.num_batches(config.batch_size, drop_remainder=True)
    if steps_per_epoch == 0:
        raise ValueError(f"{task.train!r} has fewer examples than one batch of {config.batch_size}")
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else math.ceil(config.num_epochs * steps_per_epoch))
    if total_steps < 1:
        raise config_validation.ConfigError("the run has no steps: set num_epochs > 0 or num_train_steps >= 1")
    opt = config.optimizer
    schedule = trainer.make_schedule(opt.learning_rate, total_steps, round(opt.warmup_fraction * total_steps),
                                     opt.schedule)
    tx = trainer.make_optimizer(params, schedule=schedule, weight_decay=opt.weight_decay,
                                no_decay_regex=opt.no_decay_regex, freeze_regex=opt.freeze_regex,
                                grad_clip_norm=opt.grad_clip_norm, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    state = jax.jit(lambda p, k: trainer.TrainState.create(p, tx, k))(params, train_key)
    state = jax.tree.map(lambda x: x if is_key(x) else np.asarray(x), state)  # host copy

    ckpt_dir = os.path.join(workdir, "checkpoints")
    cc = config.checkpoint
    ckpt = checkpointing.Checkpointer(ckpt_dir, keep=cc.keep, best_metric=cc.best_metric, best_mode=cc.best_mode,
                                      async_save=cc.async_save)
    restored = ckpt.restore_latest(state)
    best, final, history_wall = {}, {}, 0.0
    if restored is not None:
        step0, state, user = restored
        best, final, history_wall = user.get("best", {}), user.get("final", {}), user.get("wall_time_s", 0.0)
        logging.info("resumed from checkpoint step %d (epoch %d, batch %d)", step0, int(state.epoch),
                     int(state.batch_in_epoch))
    writer = observe.MetricWriter(workdir, resume_step=None if restored is None else restored[0])
    overview = observe.parameter_overview(state.params)
    if observe.is_writer():
        logging.info("task %s: %d train / %d dev examples, %d labels, metrics %s; %d steps (%d per epoch) on "
                     "%d devices (%s)\n%s", task.name, len(task.train), len(task.dev), task.num_labels,
                     task.metric_names, total_steps, steps_per_epoch, par.num_devices, par.mode, overview)
    writer.write_text("parameters", overview)

    loss_fn = trainer.classification_loss(model.apply)
    train_step = par.compile(trainer.make_train_step(loss_fn, tx, steps_per_epoch, schedule), donate_state=True)
    eval_step = par.compile(trainer.make_eval_step(trainer.classification_predict(model.apply)))
    dstate = par.replicate(state)
    step, epoch, start_batch = int(state.step), int(state.epoch), int(state.batch_in_epoch)
    progress = observe.Progress(total_steps, step, config.progress_bar)
    preempt = _PreemptionWatch()

    def run_meta() -> dict:
        return {"best": best, "final": final, "wall_time_s": history_wall + time.time() - start_time}

    window, window_start, stopped_early = [], time.time(), False
    try:
        while step < total_steps and not stopped_early:
            batches = task.train.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                         start_batch=start_batch, drop_remainder=True,
                                         process_index=jax.process_index(), process_count=jax.process_count())
            for batch in batches:
                dstate, step_metrics = train_step(dstate, par.shard_batch({k: batch[k] for k in MODEL_INPUTS}))
                step += 1
                window.append((step, step_metrics))
                progress.update(1)
                last = step == total_steps
                do_eval = last or (config.eval_every_steps > 0 and step % config.eval_every_steps == 0)
                do_save = do_eval or (cc.every_steps > 0 and step % cc.every_steps == 0)
                stop_now = preempt(step)
                if last or do_save or stop_now or step % config.log_every_steps == 0:
                    fetched = [(s, {k: float(v) for k, v in par.unreplicate(m).items()}) for s, m in window]
                    _check_window(fetched, ckpt, ckpt_dir)
                    elapsed = max(time.time() - window_start, 1e-9)
                    summary = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]
                               if k not in ("examples", "tokens", "learning_rate")}
                    summary["learning_rate"] = fetched[-1][1]["learning_rate"]  # of the window's last step
                    summary["examples_per_s"] = sum(m["examples"] for _, m in fetched) / elapsed
                    summary["tokens_per_s"] = sum(m["tokens"] for _, m in fetched) / elapsed
                    summary["epoch"] = step / steps_per_epoch
                    writer.write(step, "train", summary)
                    observe.log_line(step, total_steps, summary)
                    progress.update(0, loss=summary["loss"])
                    window = []
                    eval_metrics = None
                    if do_eval:
                        eval_metrics = evaluate(par, eval_step, dstate, task, config.eval_batch_size)
                        writer.write(step, "eval", eval_metrics)
                        if observe.is_writer():
                            logging.info("eval at step %d: %s", step,
                                         "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                        final = dict(eval_metrics, step=step)
                        key = cc.best_metric or task.metric_names[0]
                        better = (not best or (eval_metrics[key] > best[key] if cc.best_mode == "max"
                                               else eval_metrics[key] < best[key]))
                        if better:
                            best = dict(final)
                    if do_save or stop_now:
                        ckpt.save(step, par.unreplicate(dstate), metrics=eval_metrics, meta=run_meta())
                    window_start = time.time()
                if stop_now and not last:
                    logging.warning("preemption requested: checkpoint saved at step %d; restart the same "
                                    "command to resume", step)
                    stopped_early = True
                    break
                if last:
                    break
            epoch, start_batch = epoch + 1, 0
        ckpt.wait()
    finally:
        progress.close()
        preempt.close()
        writer.close()
    if stopped_early:
        ckpt.close()
        return {"preempted_at_step": step}

    final_state = par.unreplicate(dstate)
    params, exported_step = final_state.params, step
    best_step = ckpt.best_step()
    if config.export == "best" and best_step is not None and best_step != step:
        params = ckpt.restore(best_step, final_state)[0].params
        exported_step = best_step
    ckpt.close()
    wall = history_wall + time.time() - start_time
    extra = {"task": task.name, "metric_names": task.metric_names, "exported_step": exported_step,
             "num_devices": par.num_devices, "num_processes": jax.process_count(), "parallelism": par.mode}
    results_path = observe.write_results(workdir, final=final, best=best, steps=step, wall_time_s=wall,
                                         extra=extra)
    if observe.is_writer():
        models.save(os.path.join(workdir, "model"), "transformer", model_cfg, params, tokenizer_dir=tokenizer_dir,
                    extra={"task": task.name, "kind": task.kind, "label_names": list(task.label_names),
                           "max_length": config.max_length, "step": exported_step, "eval": best
                           if exported_step == best.get("step") else final},
                    overwrite=True)
        logging.info("done: %d steps in %.1f s; final %s; best %s; results in %s", step, wall, final, best,
                     results_path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train_and_evaluate_done")
    return {"final": final, "best": best, "steps": step, "wall_time_s": wall, **extra}
