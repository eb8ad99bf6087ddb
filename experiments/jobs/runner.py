"""One runner for every training job: validation, techniques, data parallelism, the loop, results, the model.

A training job (:class:`experiments.jobs.registry.Job`) declares only what differs: its config (and so its
schema), the family it trains and its ``build(config, workdir, key) -> Run`` (task, training rows, model,
initial parameters). :func:`train_and_evaluate` owns the rest, the same for every job:

1. the config is validated against the job's schema (unknown fields with "did you mean", types, ranges,
   non-finite numbers) and every active technique checks the combination (:data:`experiments.techniques.
   TECHNIQUES`), all before any data or model is loaded; problems are reported together;
2. ``build``, then each active technique's ``setup`` (in the registry's order) extends the run;
3. one jitted step composes them: the model's apply wrapped by every technique, the task loss (or the
   distillation loss) plus every technique's terms, one optimizer per part of the trainable tree;
4. :func:`experiments.runtime.loop.fit` trains, evaluates, checkpoints, resumes and survives preemption;
5. the best step is chosen on the selection split (:mod:`experiments.runtime.selection`; dev metrics are
   recorded beside it and are what ``results.json`` and the saved model report);
6. the finalizers turn the exported tree into the saved model (successor extraction, compaction, scales),
   ``results.json`` and ``model/`` are written by process 0, and all processes meet at a barrier.

Writes into ``workdir``: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``results.json`` and ``model/``
(a self-describing model directory with its tokenizer or vocabularies, and its techniques' files).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import ml_collections
import optax
from absl import logging
from jax.experimental import multihost_utils

import models
from experiments.runtime import config_validation, fingerprint, loop, observe, selection, trainer
from experiments.runtime.parallel import DataParallel
from experiments.techniques import TECHNIQUES
from experiments.techniques.base import Exported, Run
from models import storage


def active_techniques(config: ml_collections.ConfigDict) -> list:
    """The techniques ``config`` switches on, in set-up order; a job whose config has no section for a technique
    (general distillation has no ``distill`` or ``qat`` section) does not offer it."""
    return [t for t in TECHNIQUES if t.name in config and t.active(config)]


def check_techniques(config: ml_collections.ConfigDict, family: str) -> None:
    """Raises one ConfigError listing every technique combination that cannot work (before any work)."""
    problems = [p for t in active_techniques(config) for p in t.check(config, family)]
    if problems:
        raise config_validation.ConfigError("this combination cannot run:\n  " + "\n  ".join(problems))


def _check_sizes(config, par: DataParallel) -> None:
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % par.num_devices:
            raise config_validation.ConfigError(
                f"config.{name}={config[name]} must be a multiple of the {par.num_devices} devices "
                f"({jax.process_count()} process(es))")


def _check_best_metric(config, run: Run) -> None:
    best = config.checkpoint.best_metric
    allowed = list(run.feed.metric_names if run.feed else run.model_task.metric_names) + ["loss"]
    name = run.feed.name if run.feed else run.task.name
    if best and best not in allowed:
        raise config_validation.ConfigError(f"config.checkpoint.best_metric={best!r} is not a metric of "
                                            f"{name!r}; allowed: {allowed}")


def optimizer(run: Run):
    """``(tx, schedule)``: ``config.optimizer``'s AdamW on ``tree["model"]`` (the techniques' frozen paths
    added to ``freeze_regex``) followed by the techniques' ``model_updates``, and each technique's optimizer on
    its own part of the tree."""
    opt = run.config.optimizer.to_dict()
    opt["freeze_regex"] = "|".join(r for r in (*run.freeze_regex, opt["freeze_regex"]) if r)
    model_tx, schedule = trainer.optimizer_from_config(ml_collections.ConfigDict(opt), run.tree["model"],
                                                       run.total_steps)
    if run.model_updates:
        model_tx = optax.chain(model_tx, *run.model_updates)
    missing = sorted(set(run.tree) - {"model"} - set(run.optimizers))
    if missing:
        raise ValueError(f"no optimizer for the trainable part(s) {missing}")
    return trainer.by_key({"model": model_tx, **run.optimizers}), schedule


def _call_kwargs(run: Run, batch: dict, train: bool) -> dict:
    kwargs = dict(run.output_kwargs) if train else {}
    for fn in run.apply_kwargs:
        kwargs.update(fn(batch, train))
    return kwargs


def make_loss(run: Run) -> trainer.LossFn:
    """The composed ``loss_fn(tree, batch, rng, extras)``: the wrapped model's forward (dropout and every
    technique's RNG stream from the step's key), the task loss (cross-entropy, or the technique's, e.g.
    distillation) and every technique's extra terms. The weight is the task loss's normaliser."""
    apply_fn = run.apply_fn()
    streams = tuple(run.rng_streams)

    def loss_fn(tree, batch, rng, extras):
        keys = jax.random.split(rng, 1 + len(streams)) if streams else [rng]
        stream_rngs = {"dropout": keys[0], **dict(zip(streams, keys[1:]))}

        def with_streams(variables, *args, rngs=None, **kwargs):  # model_outputs passes dropout only
            del rngs
            return apply_fn(variables, *args, rngs=stream_rngs, **kwargs)

        out = trainer.model_outputs(with_streams, tree["model"], run.variables(tree, extras), batch, train=True,
                                    rng=keys[0], **_call_kwargs(run, batch, True))
        if run.task_loss is not None:
            loss, weight, metrics = run.task_loss(out, tree, batch, extras)
        else:
            loss, weight, metrics = trainer.cross_entropy_terms(out.logits, batch)
        if run.loss_terms:
            metrics = {**metrics, "task_loss": loss}
        for term in run.loss_terms:
            extra_loss, extra_metrics = term(tree, batch)
            loss = loss + extra_loss
            metrics = {**metrics, **extra_metrics}
        return loss, trainer.LossAux(weight=weight, metrics=metrics)

    return loss_fn


def make_predict(run: Run):
    """``predict(tree, extras, batch)`` of the wrapped model in eval mode (deterministic gates, no LayerDrop,
    the Theseus successor alone)."""
    apply_fn = run.apply_fn()

    def predict(tree, extras, batch):
        kwargs = _call_kwargs(run, batch, False)
        return trainer.classification_predict(functools.partial(apply_fn, **kwargs) if kwargs else apply_fn)(
            tree["model"], run.variables(tree, extras), batch)

    return predict


def train_batches(run: Run):
    """``(epoch, start_batch) -> iterator`` of this host's training batches: the model's inputs, labels and
    weights, plus every technique's batch fields for the global step of each batch."""
    config, feed = run.config, run.inputs + ("labels", "example_weight")

    def batches(epoch: int, start_batch: int):
        step = epoch * run.steps_per_epoch + start_batch
        for batch in run.train.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                       start_batch=start_batch, drop_remainder=True,
                                       process_index=jax.process_index(), process_count=jax.process_count()):
            out = {k: batch[k] for k in feed}
            for fn in run.batch_fields:
                out.update(fn(batch, step))
            step += 1
            yield out

    return batches


# fingerprinted by content, not by path (a corpus and its cache: by the shard set's fingerprint)
PATH_FIELDS = ("data_dir", "model_dir", "teacher_dir", "transfer_file", "corpus", "cache_dir")


def run_fingerprint(run: Run) -> dict:
    """What makes this run this run (checked on resume, recorded in ``results.json``): the config's fields that
    change the trajectory, and by content what the config names by path -- the initial trainable tree (after
    every technique's setup: it covers ``model_dir`` and a student built from its teacher), the data files and
    the techniques' inputs (a live or cached teacher's weights). A moved workdir or data folder still resumes."""
    fp = fingerprint.config_fingerprint(run.config, exclude=fingerprint.TRAJECTORY_NEUTRAL + PATH_FIELDS)
    fp["inputs.initial_params"] = fingerprint.params_fingerprint(run.tree)
    for field in ("data_dir", "transfer_file"):
        path = run.config.get(field)
        if path:
            fp[f"inputs.{field}"] = fingerprint.content_digest(path)
    fp.update({f"inputs.{k}": v for k, v in run.fingerprints.items()})
    return fp


def _save_model(run: Run, exported: Exported, step: int) -> None:
    """``workdir/model``: params, config, tokenizer and the techniques' files, published in one rename."""
    if run.feed is not None:
        data = {"max_length": run.config.max_length, **run.feed.model_extra}
    else:
        task = run.task
        data = {"task": task.name, "kind": task.kind, "label_names": list(task.label_names),
                "max_length": run.config.max_length}
    extra = {**data, "step": step, "eval": exported.eval, **run.metadata, **run.results}
    models.save(os.path.join(run.workdir, "model"), exported.model_cfg.family, exported.model_cfg, exported.params,
                tokenizer_dir=run.tokenizer_dir, extra=extra, overwrite=True,
                extra_files={name: (lambda path, write=write: write(str(path)))
                             for name, write in run.model_files.items()})


def prepare(job, config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Steps 1 and 2: the validated config's :class:`Run`, built by the job and extended by every active
    technique (nothing trained yet). Tests and notebooks use it to inspect or call the composed step."""
    job.validate(config)
    check_techniques(config, job.family(config))
    observe.quiet_library_logs()
    workdir = storage.absolute(workdir)
    _check_sizes(config, DataParallel(config.parallelism))
    storage.makedirs(workdir)
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    run = job.build(config, workdir, init_key)
    _check_best_metric(config, run)
    if run.feed is None:
        run.metadata["selection"] = selection.record(run.model_task)
    for technique in active_techniques(config):
        technique.setup(run)
    return run


def train_and_evaluate(job, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the training ``job`` (:class:`experiments.jobs.registry.Job`) as ``config`` says, in ``workdir``;
    returns the results dict (see ``results.json``), or ``{"preempted_at_step": N}``."""
    start = time.time()
    run = prepare(job, config, workdir)
    workdir = run.workdir
    par = DataParallel(config.parallelism)
    _, train_key = jax.random.split(jax.random.key(config.seed))
    active = [t.name for t in active_techniques(config)]
    tx, schedule = optimizer(run)
    state = jax.jit(lambda tree, extras, key, scale: trainer.TrainState.create(tree, tx, key, extras=extras,
                                                                               dynamic_scale=scale))(
        run.tree, run.extras, train_key, run.dynamic_scale)
    state = loop.host_state(state)
    fp = run_fingerprint(run)
    if run.feed is None:
        eval_step = par.compile(trainer.make_eval_step(make_predict(run)))
        eval_feed = run.inputs + ("labels", "example_weight")
        held_out = run.model_task.selection

        def evaluate(dstate) -> dict:  # dev, and the selection split where the best step is chosen
            def on(split):
                return loop.evaluate(par, eval_step, dstate, run.model_task, config.eval_batch_size, eval_feed, split)
            return selection.merge(on(None), None if held_out is None else on(held_out))

        data_name, metric_names, batches = run.task.name, run.model_task.metric_names, train_batches(run)
        choice_prefix = selection.choice_key(run.model_task, "")
        describe = f"{run.task.name} ({len(run.train)} training rows, {len(run.model_task.dev)} dev examples)"
    else:  # not a labelled task: the feed's batches and held-out evaluation
        evaluate = run.feed.make_evaluate(run, par)
        data_name, metric_names, batches = run.feed.name, list(run.feed.metric_names), run.feed.batches
        choice_prefix, describe = "", run.feed.describe

    settings = loop.LoopSettings.from_config(config, total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch,
                                             headline_metric=metric_names[0],
                                             minimum_loss_scale=config.loss_scale.minimum_scale,
                                             choice_prefix=choice_prefix)
    result = loop.fit(
        workdir, par=par, state=state, settings=settings,
        train_step=trainer.make_train_step(make_loss(run), tx, run.steps_per_epoch, schedule),
        train_batches=batches,
        evaluate=evaluate,
        extra_overview=f"{job.name}: {run.family} on {describe}; techniques: {', '.join(active) or 'none'}",
        fingerprint=fp, allow_changed=config.allow_changed_config)
    if result.preempted_at_step is not None:
        return {"preempted_at_step": result.preempted_at_step}

    chosen = result.best if result.exported_step == result.best.get("step") else result.final
    exported = Exported(run, result.params, run.model_cfg, result.params["model"], dict(chosen))
    for finalize in run.finalizers:
        finalize(exported)
    extra = {"job": job.name, "task": data_name, "metric_names": metric_names,
             "exported_step": result.exported_step, "family": exported.model_cfg.family, "techniques": active,
             "num_devices": par.num_devices, "num_processes": jax.process_count(), "parallelism": par.mode,
             **run.metadata, **run.results, "fingerprint": fp}
    results_path = observe.write_results(workdir, final=result.final, best=result.best, steps=result.steps,
                                         wall_time_s=result.wall_time_s, extra=extra)
    if observe.is_writer():
        _save_model(run, exported, result.exported_step)
        logging.info("done: %d steps in %.1f s (%.1f s this piece); final %s; best %s; results in %s",
                     result.steps, result.wall_time_s, time.time() - start, result.final, result.best, results_path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"{job.name}_done")
    return {"final": result.final, "best": result.best, "steps": result.steps, "wall_time_s": result.wall_time_s,
            **extra}

