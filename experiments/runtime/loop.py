"""The training loop every stage shares: resume, train, log, evaluate, checkpoint, survive preemption.

:func:`fit` owns what is the same for fine-tuning, distillation, pruning with gates, QAT and module
replacement; the caller owns what differs (the model, the loss inside the per-device ``train_step``, the
batches and the evaluation). The run is restartable by design: it resumes from the newest verified
checkpoint in ``workdir/checkpoints`` (step, optimizer state, RNG, data position, transform state), so a
killed or preempted run restarted with the same command continues the same trajectory. A restart with a
different command does not: the caller's config fingerprint is stored with every checkpoint, and a resume
whose fingerprint differs stops before training (:mod:`experiments.runtime.fingerprint`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from experiments.data import TaskData
from experiments.runtime import checkpointing, evaluation, observe
from experiments.runtime import fingerprint as fingerprints
from experiments.runtime.config_validation import ConfigError
from experiments.runtime.parallel import DataParallel, is_key
from experiments.runtime.trainer import TrainState

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the message names the step and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Cadence and checkpoint policy of :func:`fit` (the config fields of the same names).

    ``best_metric``: the eval metric whose best checkpoint is kept (None: none is kept); the best evaluation
    reported is by ``best_metric``, else ``headline_metric``, else the evaluation's first metric.
    ``choice_prefix``: the prefix of the evaluation's keys measured on the split choices are made on
    (``"selection/"``, :mod:`experiments.runtime.selection`; ``""``: choose on dev): the best checkpoint is the
    best of ``choice_prefix + best_metric``.
    ``minimum_loss_scale``: with dynamic loss scaling, a skipped step at this scale stops the run.
    """

    total_steps: int
    steps_per_epoch: int
    log_every_steps: int = 50
    eval_every_steps: int = 500
    checkpoint_every_steps: int = 500
    keep: int = 2
    best_metric: str | None = None
    headline_metric: str | None = None
    best_mode: str = "max"
    async_save: bool = True
    export: str = "best"
    progress_bar: str = "auto"
    minimum_loss_scale: float = 1.0
    choice_prefix: str = ""

    @classmethod
    def from_config(cls, config, *, total_steps: int, steps_per_epoch: int, headline_metric: str | None,
                    **overrides) -> "LoopSettings":
        """The settings a job config's common fields give (``log_every_steps``, ``eval_every_steps``,
        ``checkpoint.*``, ``export``, ``progress_bar``); ``overrides`` set the remaining fields."""
        cc = config.checkpoint
        return cls(total_steps=total_steps, steps_per_epoch=steps_per_epoch, log_every_steps=config.log_every_steps,
                   eval_every_steps=config.eval_every_steps, checkpoint_every_steps=cc.every_steps, keep=cc.keep,
                   best_metric=cc.best_metric, headline_metric=headline_metric, best_mode=cc.best_mode,
                   async_save=cc.async_save, export=config.export, progress_bar=config.progress_bar, **overrides)


def run_length(config, train) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` of a job over the ``train`` split: ``config.num_train_steps`` when
    positive, else ``ceil(config.num_epochs * steps_per_epoch)``; full batches of ``config.batch_size`` only.
    Raises ConfigError, before any work, when the run would have no step."""
    steps_per_epoch = train.num_batches(config.batch_size, drop_remainder=True)
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else math.ceil(config.num_epochs * steps_per_epoch))
    if steps_per_epoch == 0 or total_steps < 1:
        raise ConfigError(f"no training steps: {train.name} has {len(train)} examples for batches of "
                          f"{config.batch_size}, num_epochs={config.num_epochs}, "
                          f"num_train_steps={config.num_train_steps}")
    return steps_per_epoch, total_steps


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` ends with: the state and parameters to export (best or last, as settings say), the
    step they come from, the final and best evaluations, steps run, wall time over all resumed pieces, or
    ``preempted_at_step`` (then ``state``/``params`` are None)."""

    state: TrainState | None
    params: PyTree
    exported_step: int
    final: dict
    best: dict
    steps: int
    wall_time_s: float
    preempted_at_step: int | None = None


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


def _check_window(window, ckpt: checkpointing.Checkpointer, ckpt_dir: str, minimum_scale: float = 1.0) -> None:
    """Stops on a non-finite loss or gradient, unless dynamic loss scaling skipped that step and can still
    lower its scale (a skipped step at the minimum scale means scaling cannot help: stop too)."""
    for step, m in window:
        for key in ("loss", "grad_norm"):
            if not math.isfinite(m[key]):
                if m.get("skipped") and m["loss_scale"] > minimum_scale:
                    continue
                ckpt.wait()
                steps = ckpt.steps()
                last = f"step {steps[-1]} in {ckpt_dir}" if steps else "none was saved"
                at_min = f" with the loss scale at its minimum {minimum_scale}" if m.get("skipped") else ""
                raise NonFiniteLossError(f"{key} is {m[key]} at step {step}{at_min}: stopping. The last good "
                                         f"checkpoint ({last}) is intact.")


def _summarize(fetched: list[tuple[int, dict]]) -> dict[str, float]:
    """Means of a log window's step metrics; with loss scaling, over the steps taken (not skipped), plus the
    number of skipped steps and the last loss scale."""
    taken = [m for _, m in fetched if not m.get("skipped")]
    per_step = [k for k in fetched[-1][1] if k not in ("examples", "tokens", "learning_rate", "skipped",
                                                       "loss_scale")]
    summary = {k: float(np.mean([m[k] for m in taken])) if taken else float("nan") for k in per_step}
    if "learning_rate" in fetched[-1][1]:
        summary["learning_rate"] = fetched[-1][1]["learning_rate"]  # of the window's last step
    if "loss_scale" in fetched[-1][1]:
        summary["skipped_steps"] = float(sum(m["skipped"] for _, m in fetched))
        summary["loss_scale"] = fetched[-1][1]["loss_scale"]
    return summary


def evaluate(par: DataParallel, eval_step, dstate, task: TaskData, batch_size: int,
             inputs: tuple[str, ...], split=None) -> dict[str, float]:
    """Runs the compiled ``eval_step`` over the dev split (or ``split``, e.g. ``task.selection``), feeding the
    batch keys ``inputs``; returns the task's metrics and ``loss`` (global over all hosts)."""
    preds, labels, weights, loss_sum, weight_sum = [], [], [], 0.0, 0.0
    for batch in (task.dev if split is None else split).batches(batch_size, shuffle=False, drop_remainder=False,
                                  process_index=jax.process_index(), process_count=jax.process_count()):
        out = par.unreplicate(eval_step(dstate, par.shard_batch({k: batch[k] for k in inputs})))
        preds.append(out["predictions"])
        labels.append(out["labels"])
        weights.append(out["example_weight"])
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
    result = evaluation.task_metrics(task, preds, labels, np.concatenate(weights))
    result["loss"] = loss_sum / max(weight_sum, 1e-12)
    return result


def host_state(state: TrainState) -> TrainState:
    """A host (numpy) copy of ``state``; typed keys stay JAX arrays (numpy cannot hold them)."""
    return jax.tree.map(lambda x: x if is_key(x) else np.asarray(x), state)


def _check_resume(ckpt_dir: str, step: int, user: dict, fingerprint: dict | None, allow_changed: bool,
                  total_steps: int) -> None:
    """Refuses to resume a checkpoint of another run: a changed fingerprint (unless ``allow_changed``), or a
    checkpoint past this run's end, whose model would otherwise be handed on as this run's result."""
    fingerprints.check(user.get("fingerprint"), fingerprint, where=f"checkpoint step {step} in {ckpt_dir}",
                       allow_changed=allow_changed)
    if step > total_steps:
        raise ConfigError(f"checkpoint step {step} in {ckpt_dir} is past this run's {total_steps} steps: it "
                          "belongs to a longer run. Use a new workdir, or train for at least that many steps")


def fit(workdir: str, *, par: DataParallel, state: TrainState, train_step: Callable, settings: LoopSettings,
        train_batches: Callable[[int, int], Iterator[dict]], evaluate: Callable[[Any], dict[str, float]],
        extra_overview: str = "", fingerprint: dict | None = None, allow_changed: bool = False) -> FitResult:
    """Trains ``state`` with the per-device ``train_step`` until ``settings.total_steps``.

    Args:
      workdir: run directory; ``checkpoints/``, ``metrics.jsonl`` and TensorBoard events go here.
      par: the data-parallel runner (pmap or shard_map).
      state: the fresh host-side :class:`TrainState`; replaced by the newest checkpoint when one exists.
      train_step: per-device ``(state, batch) -> (state, metrics)``
        (:func:`experiments.runtime.trainer.make_train_step`).
      settings: cadence and checkpoint policy.
      train_batches: ``(epoch, start_batch) -> iterator`` of this host's global-batch rows, as fed to the step.
      evaluate: ``device_state -> metrics`` on the dev set, and on the selection split under
        ``settings.choice_prefix`` (called on every host; metrics are global).
      extra_overview: text logged at start besides the parameter overview.
      fingerprint: JSON-able dict of what determines the trajectory (e.g.
        :func:`experiments.runtime.fingerprint.config_fingerprint` of the job config), stored with every
        checkpoint; a resume from a checkpoint with a different one raises
        :class:`~experiments.runtime.fingerprint.FingerprintMismatchError` before training. None: no check.
      allow_changed: resume despite a changed fingerprint, with a warning listing the changes (the job
        config's switch for continuing a run with new values on purpose).

    Raises:
      FingerprintMismatchError, or ConfigError when the newest checkpoint is past ``settings.total_steps``.
    """
    s = settings
    start_time = time.time()
    ckpt_dir = os.path.join(workdir, "checkpoints")
    best_key = s.best_metric and s.choice_prefix + s.best_metric
    ckpt = checkpointing.Checkpointer(ckpt_dir, keep=s.keep, best_metric=best_key, best_mode=s.best_mode,
                                      async_save=s.async_save)
    restored = ckpt.restore_latest(state)
    run_fingerprint = None if fingerprint is None else fingerprints.normalize(fingerprint)
    best, final, history_wall = {}, {}, 0.0
    if restored is not None:
        step0, state, user = restored
        try:
            _check_resume(ckpt_dir, step0, user, run_fingerprint, allow_changed, s.total_steps)
        except Exception:
            ckpt.close()
            raise
        best, final, history_wall = user.get("best", {}), user.get("final", {}), user.get("wall_time_s", 0.0)
        logging.info("resumed from checkpoint step %d (epoch %d, batch %d)", step0, int(state.epoch),
                     int(state.batch_in_epoch))
    writer = observe.MetricWriter(workdir, resume_step=None if restored is None else restored[0])
    overview = observe.parameter_overview(state.params)
    if observe.is_writer():
        logging.info("%s%d steps (%d per epoch) on %d devices (%s)\n%s", extra_overview and extra_overview + "; ",
                     s.total_steps, s.steps_per_epoch, par.num_devices, par.mode, overview)
    writer.write_text("parameters", overview)

    compiled_step = par.compile(train_step, donate_state=True)
    dstate = par.replicate(state)
    step, epoch, start_batch = int(state.step), int(state.epoch), int(state.batch_in_epoch)
    progress = observe.Progress(s.total_steps, step, s.progress_bar)
    preempt = _PreemptionWatch()

    def run_meta() -> dict:
        return {"best": best, "final": final, "wall_time_s": history_wall + time.time() - start_time,
                "fingerprint": run_fingerprint}

    window, window_start, stopped_early = [], time.time(), False
    try:
        while step < s.total_steps and not stopped_early:
            for batch in train_batches(epoch, start_batch):
                dstate, step_metrics = compiled_step(dstate, par.shard_batch(batch))
                step += 1
                window.append((step, step_metrics))
                progress.update(1)
                last = step == s.total_steps
                do_eval = last or (s.eval_every_steps > 0 and step % s.eval_every_steps == 0)
                do_save = do_eval or (s.checkpoint_every_steps > 0 and step % s.checkpoint_every_steps == 0)
                stop_now = preempt(step)
                if last or do_save or stop_now or step % s.log_every_steps == 0:
                    fetched = [(t, {k: float(v) for k, v in par.unreplicate(m).items()}) for t, m in window]
                    _check_window(fetched, ckpt, ckpt_dir, s.minimum_loss_scale)
                    elapsed = max(time.time() - window_start, 1e-9)
                    summary = _summarize(fetched)
                    summary["examples_per_s"] = sum(m["examples"] for _, m in fetched) / elapsed
                    summary["tokens_per_s"] = sum(m["tokens"] for _, m in fetched) / elapsed
                    summary["epoch"] = step / s.steps_per_epoch
                    writer.write(step, "train", summary)
                    observe.log_line(step, s.total_steps, summary)
                    progress.update(0, loss=summary["loss"])
                    window = []
                    eval_metrics = None
                    if do_eval:
                        eval_metrics = evaluate(dstate)
                        writer.write(step, "eval", eval_metrics)
                        if observe.is_writer():
                            logging.info("eval at step %d: %s", step,
                                         "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                        final = dict(eval_metrics, step=step)
                        key = s.choice_prefix + (s.best_metric or s.headline_metric or next(iter(eval_metrics)))
                        # a tie goes to the later step, as Checkpointer.best_step (and Orbax's best-n policy) do
                        better = (not best or (eval_metrics[key] >= best[key] if s.best_mode == "max"
                                               else eval_metrics[key] <= best[key]))
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
        return FitResult(None, None, step, final, best, step, history_wall + time.time() - start_time,
                         preempted_at_step=step)

    exported, exported_step = par.unreplicate(dstate), step
    best_step = ckpt.best_step()
    if s.export == "best" and best_step is not None and best_step != step:
        exported, exported_step = ckpt.restore(best_step, exported)[0], best_step
    ckpt.close()
    return FitResult(exported, exported.params, exported_step, final, best, step,
                     history_wall + time.time() - start_time)
