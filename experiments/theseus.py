"""``theseus_and_evaluate(config, workdir)``: compress a fine-tuned Transformer by progressive module replacement.

BERT-of-Theseus (Xu et al. 2020): the fine-tuned predecessor's layers are grouped into as many modules as the
successor has layers; each module gets a successor layer (a copy of a predecessor layer, optionally with fewer
key/value heads: multi-query / grouped-query attention). While training, each module independently runs its
successor with probability ``p(t)`` (:mod:`compression.theseus`), and only successor layers train, on the task's
gold labels alone (no distillation loss). Phase one ends when ``p`` reaches 1; the successor then trains alone.

The replacement schedule (``config.theseus``): ``constant`` keeps ``p = replacing_rate`` for the first
``replacing_fraction`` of the steps, then 1; ``linear`` is the curriculum ``p = min(1, k t + replacing_rate)``
with ``k`` chosen so that ``p`` reaches 1 after ``replacing_fraction`` of the steps. (The reference scripts
give ``k`` and the step count directly; a fraction keeps short and long runs comparable.) ``p(t)`` is computed
on the host from the global step and travels with each batch as ``replace_prob`` float32 [B], so a resumed
run continues the same schedule and the compiled step never changes.

Evaluation and the exported ``model/`` are the successor alone (:func:`models.theseus.extract_successor`): a
plain Transformer that every later stage (quantization, export) loads with ``models.load``. Writes, like
fine-tuning, ``checkpoints/``, ``metrics.jsonl``, ``results.json`` and ``model/`` into ``workdir``.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import models
from compression import theseus
from experiments import config_validation, evaluation, loop, observe, trainer
from experiments.config_validation import Field
from experiments.configs.finetune import FINETUNE_ONLY
from experiments.data import load_task
from experiments.parallel import DataParallel
from models import theseus as theseus_models

SCHEDULES = ("constant", "linear")
INITS = ("first", "every_other")
# Phase one trains successor layers only (the reference implementation freezes the rest): every other
# parameter is frozen in the optimizer (no update, no weight decay) as well as cut from the gradient.
FROZEN_REGEX = r"^(?!.*(^|/)successor(/|$))"

THESEUS_SCHEMA = {
    **{k: v for k, v in config_validation.FINETUNE_SCHEMA.items() if k not in FINETUNE_ONLY + ("qat",)},
    "job": Field(str, choices=("theseus",)),
    "teacher_dir": Field(str),
    "theseus": {
        "successor_layers": Field(int, min=1),
        "num_kv_heads": Field(int, min=0),
        "init": Field(str, choices=INITS),
        "schedule": Field(str, choices=SCHEDULES),
        "replacing_rate": Field(float, min=0.0, max=1.0),
        "replacing_fraction": Field(float, min=0.0, max=1.0),
    },
}


def replacement_schedule(t, total_steps: int):
    """The configured ``p(step)`` (``t``: ``config.theseus``) over a run of ``total_steps`` steps."""
    phase_one = max(1, round(t.replacing_fraction * total_steps))
    if t.schedule == "constant":
        return theseus.make_schedule("constant", rate=t.replacing_rate, replacing_steps=phase_one)
    return theseus.make_schedule("linear", k=(1.0 - t.replacing_rate) / phase_one, b=t.replacing_rate)


def init_layers(predecessor_layers: int, successor_layers: int, init: str) -> tuple[int, ...]:
    """Predecessor layers that initialise successor layers 0..n-1: the first ones (the reference
    implementation) or every k-th (0, k, 2k, ...; k = predecessor/successor depth)."""
    stride = predecessor_layers // successor_layers if init == "every_other" else 1
    return tuple(range(0, stride * successor_layers, stride))


def theseus_loss(model, frozen_fn=theseus.freeze):
    """``loss_fn(params, batch, rng, extras)``: cross-entropy of the mixed model, module choices sampled with
    probability ``batch["replace_prob"][0]`` from their own RNG stream; gradients reach successor layers only."""

    def loss_fn(params, batch, rng, extras):
        rng, swap_rng = jax.random.split(rng)
        p = batch["replace_prob"][0]

        def mixed_apply(variables, *args, rngs, **kwargs):
            variables = {**variables, "params": frozen_fn(variables["params"], theseus_models.trainable)}
            return model.apply(variables, *args, rngs={**rngs, theseus.THESEUS_RNG: swap_rng}, mode="mixed",
                               replace_prob=p, **kwargs)

        inputs = {k: v for k, v in batch.items() if k != "replace_prob"}
        loss, aux = trainer.classification_loss(mixed_apply)(params, inputs, rng, extras)
        return loss, aux.replace(metrics={**aux.metrics, "replace_prob": jnp.asarray(p, jnp.float32)})

    return loss_fn


def theseus_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs module replacement as ``config`` says, in ``workdir``; returns the results dict."""
    config_validation.validate(config, THESEUS_SCHEMA)
    t = config.theseus
    observe.quiet_library_logs()
    start = time.time()
    workdir = os.path.abspath(workdir)
    _, pred_cfg, pred_params = models.load(config.teacher_dir)
    evaluation.require_transformer(config.teacher_dir, pred_cfg, "predecessor", "module replacement")
    teacher_meta = models.read_meta(config.teacher_dir).get("extra", {})
    task = load_task(config.task, config.data_dir, tokenizer=config.teacher_dir, max_length=config.max_length,
                     seed=config.seed, synthetic_size=config.synthetic_size)
    evaluation.check_fine_tuned_for(config.teacher_dir, pred_cfg, teacher_meta, task, "predecessor")
    if config.checkpoint.best_metric and config.checkpoint.best_metric not in task.metric_names + ["loss"]:
        raise config_validation.ConfigError(f"config.checkpoint.best_metric={config.checkpoint.best_metric!r} is "
                                            f"not a metric of task {task.name}; allowed: {task.metric_names}")
    theseus.check_grouping(pred_cfg.num_layers, t.successor_layers)  # depth must divide: before work
    source_layers = init_layers(pred_cfg.num_layers, t.successor_layers, t.init)
    succ_cfg = theseus_models.successor_from_predecessor(
        pred_cfg, t.successor_layers, num_kv_heads=t.num_kv_heads or None, init_layers=source_layers)
    params = theseus_models.init_from_predecessor(pred_cfg, pred_params, succ_cfg, init_layers=source_layers)
    model = theseus_models.theseus_model(pred_cfg, succ_cfg)
    os.makedirs(workdir, exist_ok=True)

    par = DataParallel(config.parallelism)
    steps_per_epoch, total_steps = loop.run_length(config, task.train)
    schedule_p = replacement_schedule(t, total_steps)
    opt = config.optimizer.to_dict()
    opt["freeze_regex"] = "|".join(r for r in (FROZEN_REGEX, opt["freeze_regex"]) if r)
    tx, lr_schedule = trainer.optimizer_from_config(ml_collections.ConfigDict(opt), params, total_steps)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    del init_key  # every parameter comes from the predecessor
    state = loop.host_state(jax.jit(lambda p, k: trainer.TrainState.create(p, tx, k))(params, train_key))
    inputs = evaluation.TRANSFORMER_INPUTS
    feed = inputs + ("labels", "example_weight")

    def train_batches(epoch: int, start_batch: int):
        step = epoch * steps_per_epoch + start_batch
        for batch in task.train.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                        start_batch=start_batch, drop_remainder=True,
                                        process_index=jax.process_index(), process_count=jax.process_count()):
            out = {k: batch[k] for k in feed}
            out["replace_prob"] = np.full(len(batch["labels"]), float(schedule_p(step)), np.float32)
            step += 1
            yield out

    eval_step = par.compile(trainer.make_eval_step(trainer.classification_predict(model.apply)))  # successor
    settings = loop.LoopSettings.from_config(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                             headline_metric=task.metric_names[0])
    result = loop.fit(
        workdir, par=par, state=state, settings=settings,
        train_step=trainer.make_train_step(theseus_loss(model), tx, steps_per_epoch, lr_schedule),
        train_batches=train_batches,
        evaluate=lambda d: loop.evaluate(par, eval_step, d, task, config.eval_batch_size, feed),
        extra_overview=f"theseus {config.teacher_dir} ({pred_cfg.num_layers} layers) -> {t.successor_layers}-layer "
                       f"successor, {t.schedule} schedule, on {task.name}: {len(task.train)} train / "
                       f"{len(task.dev)} dev examples")
    if result.preempted_at_step is not None:
        return {"preempted_at_step": result.preempted_at_step}
    extra = {"task": task.name, "metric_names": task.metric_names, "exported_step": result.exported_step,
             "teacher_dir": config.teacher_dir, "schedule": t.schedule, "replacing_rate": t.replacing_rate,
             "replacing_fraction": t.replacing_fraction, "successor_layers": t.successor_layers,
             "num_kv_heads": t.num_kv_heads or None, "num_devices": par.num_devices, "parallelism": par.mode,
             "teacher_eval": teacher_meta.get("eval", {})}
    results_path = observe.write_results(workdir, final=result.final, best=result.best, steps=result.steps,
                                         wall_time_s=result.wall_time_s, extra=extra)
    if observe.is_writer():
        cfg, succ_params = theseus_models.extract_successor(pred_cfg, succ_cfg, result.params)
        chosen = result.best if result.exported_step == result.best.get("step") else result.final
        models.save(os.path.join(workdir, "model"), "transformer", cfg, succ_params, tokenizer_dir=config.teacher_dir,
                    extra={"task": task.name, "kind": task.kind, "label_names": list(task.label_names),
                           "max_length": config.max_length, "step": result.exported_step, "eval": chosen,
                           "theseus": {k: extra[k] for k in ("teacher_dir", "schedule", "replacing_rate",
                                                             "replacing_fraction")}},
                    overwrite=True)
        logging.info("done in %.0f s: final %s; best %s; results in %s", time.time() - start, result.final,
                     result.best, results_path)
    return {"final": result.final, "best": result.best, "steps": result.steps, "wall_time_s": result.wall_time_s,
            **extra}
