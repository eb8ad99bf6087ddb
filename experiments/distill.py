"""``distill_and_evaluate(config, workdir)``: train a student from a fine-tuned teacher's soft targets.

The teacher is a model directory written by fine-tuning (``models.load``). Its logits over the transfer set
(the training split, plus an augmented set when ``config.augment.n_per_example > 0``, Tang et al. 2019) are
computed once, in eval mode, and cached in ``workdir/teacher_logits.npz``; each training batch then carries
``teacher_logits`` for its rows, so a step costs only the student's forward and backward. The loss is a
:mod:`compression.distillation` preset (``none``: gold labels only, the baseline every figure is compared
with). Students: a Transformer initialised from a subset of the teacher's layers, or a BiLSTM over words.

Writes, like fine-tuning, ``checkpoints/``, ``metrics.jsonl``, ``results.json`` and ``model/`` (a
self-describing model directory with its tokenizer or word vocabulary) into ``workdir``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import models
from compression.distillation import augment, losses, presets
from compression.pruning.compaction import keep_layers
from experiments import config_validation, evaluation, loop, observe, trainer
from experiments.config_validation import Field
from experiments.configs.finetune import FINETUNE_ONLY
from experiments.data import Split, TaskData, load_task
from experiments.data.features import encode_sequences
from experiments.parallel import DataParallel
from models.bilstm import BiLSTMConfig
from models.transformer import TransformerConfig

FAMILIES = ("transformer", "bilstm")
INITS = ("every_other", "first", "random")

DISTILL_SCHEMA = {
    **{k: v for k, v in config_validation.FINETUNE_SCHEMA.items() if k not in FINETUNE_ONLY},
    "job": Field(str, choices=("distill",)),
    "teacher_dir": Field(str),
    "student": {
        "family": Field(str, choices=FAMILIES),
        "num_layers": Field(int, min=1),
        "init": Field(str, choices=INITS),
        "embed_dim": Field(int, min=1),
        "hidden_size": Field(int, min=1),
        "mlp_hidden": Field(int, min=1),
        "pooling": Field(str, choices=("max", "mean", "attention")),
        "dropout_rate": Field(float, min=0.0, max=0.99),
        "max_vocab": Field(int, min=3),
    },
    "distill": {
        "preset": Field(str, choices=("none",) + tuple(presets.PRESETS)),
        "temperature": Field(float),
        "kd_weight": Field(float),
        "ce_weight": Field(float),
    },
    "augment": {
        "n_per_example": Field(int, min=0),
        "max_examples": Field(int, min=0),
        "p_mask": Field(float, min=0.0, max=1.0),
        "p_pos": Field(float, min=0.0, max=1.0),
        "p_ng": Field(float, min=0.0, max=1.0),
    },
}


# -- inputs ----------------------------------------------------------------------------------------------

def _preset(config) -> presets.Preset | None:
    d = config.distill
    if d.preset == "none":
        return None
    overrides = {k: v for k, v in (("temperature", d.temperature), ("kd_weight", d.kd_weight),
                                   ("ce_weight", d.ce_weight)) if v != -1.0}
    try:
        return presets.get_preset(d.preset, **overrides)
    except ValueError as e:
        raise config_validation.ConfigError(f"config.distill: {e}") from e


def _with_index(split: Split) -> Split:
    """``split`` whose batches carry ``example_index`` (int32 [B]): row -> position in the split."""
    feats = dataclasses.replace(split.features, scalars={**split.features.scalars,
                                                         "example_index": np.arange(len(split), dtype=np.int32)})
    return Split(split.name, labels=split.labels, features=feats, buckets=split.buckets, texts=split.texts,
                 texts_b=split.texts_b, tokens=split.tokens)


def _augmented(task: TaskData, config) -> Split | None:
    """Tang et al.'s synthetic transfer examples of the training texts, encoded for teacher and student
    (labels are placeholders until the teacher labels them)."""
    a = config.augment
    if a.n_per_example == 0:
        return None
    train = task.train
    kw = {"p_mask": a.p_mask, "p_pos": a.p_pos, "p_ng": a.p_ng}
    if task.is_pair:
        pairs = augment.augment_pairs(list(zip(train.texts, train.texts_b)), a.n_per_example, config.seed, **kw)
        texts, texts_b = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        texts, texts_b = augment.augment(train.texts, a.n_per_example, config.seed, **kw), None
    if a.max_examples and len(texts) > a.max_examples:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(texts), a.max_examples, replace=False))
        texts = [texts[i] for i in keep]
        texts_b = None if texts_b is None else [texts_b[i] for i in keep]
    if not texts:
        return None
    labels = np.zeros(len(texts), np.int32)
    feats = encode_sequences(f"{task.name}/augmented", texts, texts_b, labels, tokenizer=task.tokenizer,
                             word_vocab=task.word_vocab, max_length=task.max_length)
    return Split(f"{task.name}/augmented", labels=labels, features=feats, buckets=train.buckets, texts=texts,
                 texts_b=texts_b)


def teacher_logits(teacher_apply, teacher_params, split: Split, batch_size: int = 128,
                   progress_bar: str = "auto") -> np.ndarray:
    """The teacher's eval-mode logits over ``split`` in its order, float32 [N, C] (or [N, S, C] padded to the
    largest bucket for token tasks)."""
    @jax.jit
    def forward(params, batch):
        return trainer.model_outputs(teacher_apply, params, {}, batch, train=False).logits.astype(jnp.float32)

    out = []
    bar = observe.Progress(split.num_batches(batch_size, drop_remainder=False), 0, progress_bar)
    for batch in split.batches(batch_size, shuffle=False, drop_remainder=False):
        logits = np.asarray(forward(teacher_params, {k: batch[k] for k in evaluation.TRANSFORMER_INPUTS}))
        if logits.ndim == 3:
            logits = np.pad(logits, ((0, 0), (0, split.buckets[-1] - logits.shape[1]), (0, 0)))
        out.append(logits[batch["example_weight"] > 0])
        bar.update(1)
    bar.close()
    return np.concatenate(out)


def _cached_logits(path: str, compute, n: int) -> np.ndarray:
    """Loads ``path`` if it holds ``n`` rows, else computes and writes it atomically."""
    if os.path.exists(path):
        cached = np.load(path)["logits"]
        if len(cached) == n:
            return cached
        logging.warning("%s holds %d rows, the transfer set has %d: recomputing", path, len(cached), n)
    logits = compute()
    if observe.is_writer():
        tmp = path + ".tmp.npz"
        np.savez(tmp, logits=logits)
        os.replace(tmp, path)
    return logits


# -- students --------------------------------------------------------------------------------------------

def transformer_student(teacher_cfg: TransformerConfig, teacher_params, num_layers: int, init: str, key,
                        dropout_rate: float):
    """A ``num_layers`` Transformer from the teacher: its layers 0, 2, 4, ... (``every_other``) or its first
    layers (``first``) with embeddings and head, or the same shape freshly initialised (``random``)."""
    n = teacher_cfg.num_layers
    if num_layers > n:
        raise ValueError(f"a {num_layers}-layer student cannot be initialised from a {n}-layer teacher")
    stride = max(n // num_layers, 1) if init == "every_other" else 1
    keep = tuple(range(0, stride * num_layers, stride))
    cfg, params = keep_layers(teacher_cfg, teacher_params, keep)
    cfg = cfg.replace(hidden_dropout_rate=dropout_rate, attention_dropout_rate=dropout_rate)
    if init == "random":
        params = jax.jit(models.model_class("transformer")(cfg).init)(key, jnp.zeros((1, 8), jnp.int32))["params"]
    return cfg, params


def bilstm_student(task: TaskData, s, key):
    cfg = BiLSTMConfig(vocab_size=len(task.word_vocab.units), embed_dim=s.embed_dim, hidden_size=s.hidden_size,
                       num_layers=s.num_layers, mlp_hidden=s.mlp_hidden, num_labels=task.num_labels,
                       dropout_rate=s.dropout_rate, pooling=s.pooling, pair=task.is_pair)
    ids = jnp.zeros((1, 8), jnp.int32)
    args = (ids, ids != 0) + ((ids, ids != 0) if task.is_pair else ())
    params = jax.jit(models.model_class("bilstm")(cfg).init)(key, *args)["params"]
    return cfg, params


# -- the loss --------------------------------------------------------------------------------------------

def distillation_loss(student_apply, preset: presets.Preset | None):
    """``loss_fn(params, batch, rng, extras)`` for :func:`experiments.trainer.make_train_step`: the preset's
    loss against ``batch["teacher_logits"]``; gold labels only when ``preset`` is None. Augmented rows
    (``has_label`` 0) never enter the gold-label term."""
    if preset is None:
        return trainer.classification_loss(student_apply)

    def loss_fn(params, batch, rng, extras):
        out = trainer.model_outputs(student_apply, params, extras, batch, train=True, rng=rng)
        weight = batch["example_weight"]
        loss, terms = presets.distill_loss(preset, out, batch["teacher_logits"], {"example_weight": weight},
                                           weights={"ce": 0.0})
        if preset.ce_weight:
            gold = jnp.where(batch["has_label"] > 0, batch["labels"], losses.IGNORE_INDEX)
            terms["ce"] = losses.cross_entropy(out.logits, gold, weight)
            loss = loss + preset.ce_weight * terms["ce"]
        w = jnp.sum(weight)
        agree = (jnp.argmax(out.logits, -1) == jnp.argmax(batch["teacher_logits"], -1)).astype(jnp.float32)
        metrics = {**{f"loss_{k}": v for k, v in terms.items()},
                   "teacher_agreement": jnp.sum(agree * weight) / jnp.maximum(w, 1e-12)}
        return loss, trainer.LossAux(weight=w, metrics=metrics)

    return loss_fn


# -- the run ---------------------------------------------------------------------------------------------

def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Distils ``config.teacher_dir`` into the configured student in ``workdir``; returns the results dict."""
    config_validation.validate(config, DISTILL_SCHEMA)
    preset = _preset(config)
    observe.quiet_library_logs()
    start_time = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    teacher, teacher_cfg, teacher_params = models.load(config.teacher_dir)
    teacher_meta = models.read_meta(config.teacher_dir)["extra"]
    if teacher_cfg.family != "transformer":
        raise ValueError(f"the teacher {config.teacher_dir} is a {teacher_cfg.family}; distillation expects a "
                         "fine-tuned Transformer teacher")
    s = config.student
    word_level = s.family != "transformer"
    task = load_task(config.task, config.data_dir, tokenizer=config.teacher_dir, max_length=config.max_length,
                     word_vocab="build" if word_level else None, seed=config.seed,
                     synthetic_size=config.synthetic_size)
    if word_level and len(task.word_vocab.units) > s.max_vocab:
        from experiments.data.vocab import WordVocab
        texts = task.train.texts + (task.train.texts_b or [])
        task = load_task(config.task, config.data_dir, tokenizer=config.teacher_dir, max_length=config.max_length,
                         word_vocab=WordVocab.build(texts, max_size=s.max_vocab), seed=config.seed,
                         synthetic_size=config.synthetic_size)
    teacher_labels = teacher_meta.get("label_names")
    if teacher_labels is not None and list(teacher_labels) != list(task.label_names):
        raise ValueError(f"teacher and student label sets differ: the teacher was trained on {teacher_labels}, "
                         f"task {task.name} has {task.label_names}")
    if teacher_cfg.num_labels != task.num_labels:
        raise ValueError(f"the teacher has {teacher_cfg.num_labels} outputs, task {task.name} has "
                         f"{task.num_labels} labels")
    if task.kind == "token":
        raise ValueError(f"task {task.name} is a token task; this job distils sequence classifiers "
                         "(Transformer or BiLSTM students), not taggers")

    par = DataParallel(config.parallelism)
    inputs = evaluation.model_inputs(task, s.family)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))

    # Transfer set: the training split (+ augmented rows) with the teacher's logits.
    train = _with_index(task.train)
    aug = _augmented(task, config) if preset is not None else None
    logits_path = os.path.join(workdir, "teacher_logits.npz")
    t_logits = None
    if preset is not None:
        splits = [task.train] + ([aug] if aug is not None else [])
        n = sum(len(x) for x in splits)
        t_logits = _cached_logits(logits_path, lambda: np.concatenate(
            [teacher_logits(teacher.apply, teacher_params, x, progress_bar=config.progress_bar) for x in splits]), n)
        has_label = np.ones(n, np.int32)
        if aug is not None:
            logging.info("transfer set: %d training + %d augmented examples (teacher-labelled)", len(task.train),
                         len(aug))
            has_label[len(task.train):] = 0
            labels = np.concatenate([task.train.labels, t_logits[len(task.train):].argmax(-1).astype(np.int32)])
            feats = _concat_features(task.train, aug, labels, has_label)
            train = Split(f"{task.name}/transfer", labels=labels, features=feats, buckets=task.train.buckets,
                          texts=task.train.texts + aug.texts,
                          texts_b=None if aug.texts_b is None else task.train.texts_b + aug.texts_b)
        else:
            train = Split(train.name, labels=train.labels, features=dataclasses.replace(
                train.features, scalars={**train.features.scalars, "has_label": has_label}),
                buckets=train.buckets, texts=train.texts, texts_b=train.texts_b)

    if s.family == "transformer":
        student_cfg, params = transformer_student(teacher_cfg, teacher_params, s.num_layers, s.init, init_key,
                                                  s.dropout_rate)
    else:
        student_cfg, params = bilstm_student(task, s, init_key)
    student = models.model_class(student_cfg.family)(student_cfg)

    steps_per_epoch = train.num_batches(config.batch_size, drop_remainder=True)
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else math.ceil(config.num_epochs * steps_per_epoch))
    if steps_per_epoch == 0 or total_steps < 1:
        raise config_validation.ConfigError(f"no training steps: {len(train)} transfer examples, batch "
                                            f"{config.batch_size}, {config.num_epochs} epochs")
    tx, schedule = trainer.optimizer_from_config(config.optimizer, params, total_steps)
    state = loop.host_state(jax.jit(lambda p, k: trainer.TrainState.create(p, tx, k))(params, train_key))
    feed = inputs + ("labels", "example_weight") + (("teacher_logits", "has_label") if preset is not None else ())

    def train_batches(epoch: int, start_batch: int):
        for batch in train.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                   start_batch=start_batch, drop_remainder=True,
                                   process_index=jax.process_index(), process_count=jax.process_count()):
            if preset is not None:
                batch["teacher_logits"] = t_logits[batch["example_index"]]
            yield {k: batch[k] for k in feed}

    eval_step = par.compile(trainer.make_eval_step(trainer.classification_predict(student.apply)))
    settings = loop.LoopSettings(
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, log_every_steps=config.log_every_steps,
        eval_every_steps=config.eval_every_steps, checkpoint_every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep, best_metric=config.checkpoint.best_metric, headline_metric=task.metric_names[0],
        best_mode=config.checkpoint.best_mode,
        async_save=config.checkpoint.async_save, export=config.export, progress_bar=config.progress_bar)
    result = loop.fit(
        workdir, par=par, state=state, settings=settings,
        train_step=trainer.make_train_step(distillation_loss(student.apply, preset), tx, steps_per_epoch, schedule),
        train_batches=train_batches,
        evaluate=lambda d: loop.evaluate(par, eval_step, d, task, config.eval_batch_size,
                                         inputs + ("labels", "example_weight")),
        extra_overview=f"distil {config.teacher_dir} -> {s.family} student ({config.distill.preset}) on "
                       f"{task.name}: {len(train)} transfer / {len(task.dev)} dev examples")
    if result.preempted_at_step is not None:
        return {"preempted_at_step": result.preempted_at_step}
    wall = result.wall_time_s
    extra = {"task": task.name, "metric_names": task.metric_names, "exported_step": result.exported_step,
             "student_family": s.family, "preset": config.distill.preset, "teacher_dir": config.teacher_dir,
             "transfer_examples": len(train), "num_devices": par.num_devices, "parallelism": par.mode,
             "teacher_eval": teacher_meta.get("eval", {})}
    results_path = observe.write_results(workdir, final=result.final, best=result.best, steps=result.steps,
                                         wall_time_s=wall, extra=extra)
    if observe.is_writer():
        tok_dir = config.teacher_dir
        if word_level:
            tok_dir = os.path.join(workdir, "vocab")
            os.makedirs(tok_dir, exist_ok=True)
            task.word_vocab.save(os.path.join(tok_dir, "word_vocab.json"))
        models.save(os.path.join(workdir, "model"), student_cfg.family, student_cfg, result.params,
                    tokenizer_dir=tok_dir, overwrite=True,
                    extra={"task": task.name, "kind": task.kind, "label_names": list(task.label_names),
                           "max_length": config.max_length, "step": result.exported_step,
                           "distilled_from": config.teacher_dir, "preset": config.distill.preset,
                           "eval": result.best if result.exported_step == result.best.get("step") else result.final})
        logging.info("done: %d steps in %.1f s (%.1f s this piece); final %s; best %s; results in %s",
                     result.steps, wall, time.time() - start_time, result.final, result.best, results_path)
    return {"final": result.final, "best": result.best, "steps": result.steps, "wall_time_s": wall, **extra}


def _concat_features(a: Split, b: Split, labels: np.ndarray, has_label: np.ndarray):
    """Features of ``a`` followed by ``b`` (same encoders), with ``labels``, ``has_label`` and
    ``example_index`` scalars over the whole."""
    fa, fb = a.features, b.features
    if set(fa.ragged) != set(fb.ragged):
        raise ValueError(f"cannot join {a.name} and {b.name}: features {sorted(fa.ragged)} vs {sorted(fb.ragged)}")
    lengths = {g: np.concatenate([fa.lengths[g], fb.lengths[g]]) for g in fa.lengths}
    ragged = {k: dataclasses.replace(r, rows=r.rows + fb.ragged[k].rows) for k, r in fa.ragged.items()}
    n = len(labels)
    scalars = {"labels": labels, "has_label": has_label, "example_index": np.arange(n, dtype=np.int32)}
    return dataclasses.replace(fa, lengths=lengths, ragged=ragged, scalars=scalars,
                               truncated={k: fa.truncated.get(k, 0) + fb.truncated.get(k, 0)
                                          for k in set(fa.truncated) | set(fb.truncated)})
