"""``distill_and_evaluate(config, workdir)``: train a student from a fine-tuned teacher's soft targets.

The teacher is a model directory written by fine-tuning (``models.load``). Its logits over the transfer set
(the training split, plus an augmented set when ``config.augment.n_per_example > 0``, Tang et al. 2019, plus the
unlabeled text of ``config.transfer_file``, Mukherjee & Awadallah 2020) are computed once, in eval mode, and
cached in ``workdir/teacher_logits.npz`` under a fingerprint of the teacher and the rows (a changed transfer set
or teacher recomputes them); each training batch then carries
``teacher_logits`` for its rows, so a step costs only the student's forward and backward. The loss is a
:mod:`compression.distillation` preset (``none``: gold labels only, the baseline every figure is compared
with). Students: a Transformer initialised from a subset of the teacher's layers, or a BiLSTM over words
(sequence tasks); the CNN-LSTM tagger (token tasks, Izsak et al. 2019).

Token tasks: the teacher tags sub-tokens, the CNN-LSTM tags words. Each word takes the teacher's logits at its
first sub-token (the data's ``word_start_index``, the position the teacher's own labels sit at), so the cache
holds word-level logits float32 [N, max_length, C] (zeros past each sentence). The soft-target and gold-label
terms are means over real words (``word_mask``); padded words never enter the loss.

``config.qat.enabled`` trains the student quantization-aware (:mod:`experiments.qat`: scales calibrated once on
transfer batches, then fake quantization in every step; ``model/quant_state.npz`` saved with the student).

Writes, like fine-tuning, ``checkpoints/``, ``metrics.jsonl``, ``results.json`` and ``model/`` (a
self-describing model directory with its tokenizer, or its word (and character) vocabulary) into ``workdir``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
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
from experiments import config_validation, evaluation, loop, observe, qat, trainer
from experiments.config_validation import Field
from experiments.configs.finetune import FINETUNE_ONLY
from experiments.data import IGNORE, Split, TaskData, load_task, readers
from experiments.data.batching import Features
from experiments.data.features import encode_sequences, encode_tagged
from experiments.data.readers import RawSplit
from experiments.data.vocab import CharVocab, WordVocab
from experiments.parallel import DataParallel
from models.bilstm import BiLSTMConfig
from models.cnn_lstm import CNNLSTMConfig
from models.transformer import TransformerConfig

FAMILIES = ("transformer", "bilstm", "cnn_lstm")
INITS = ("every_other", "first", "random")

DISTILL_SCHEMA = {
    **{k: v for k, v in config_validation.FINETUNE_SCHEMA.items() if k not in FINETUNE_ONLY},
    "job": Field(str, choices=("distill",)),
    "teacher_dir": Field(str),
    "transfer_file": Field(str, nullable=True),
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
        "char_embed_dim": Field(int, min=1),
        "char_filters": Field(int, min=1),
        "char_kernel_size": Field(int, min=1),
        "max_word_chars": Field(int, min=1),
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


def first_subtoken_logits(logits, word_start_index, word_mask):
    """Word-level teacher logits: each word's logits at its first sub-token.

    Args:
      logits: float [B, S, C], the teacher's per-sub-token logits.
      word_start_index: int32 [B, W], the position in the sub-token row of each word's first sub-token
        (the data's ``word_start_index``; 0 past the sentence).
      word_mask: int [B, W], 1 = real word.

    Returns: float [B, W, C] (``logits``' dtype), zeros at padded words.
    """
    xp = jnp if isinstance(logits, jax.Array) else np
    picked = xp.take_along_axis(logits, word_start_index[..., None], axis=1)
    return xp.where(word_mask[..., None] > 0, picked, xp.zeros((), picked.dtype))


def teacher_logits(teacher_apply, teacher_params, split: Split, batch_size: int = 128,
                   progress_bar: str = "auto", word_level: bool = False) -> np.ndarray:
    """The teacher's eval-mode logits over ``split`` in its order: float32 [N, C] for sequence tasks, or
    [N, L, C] for token tasks padded to the largest bucket L -- per sub-token, or per word (each word's first
    sub-token, :func:`first_subtoken_logits`) with ``word_level``."""
    keys = evaluation.TRANSFORMER_INPUTS + (("word_start_index", "word_mask") if word_level else ())

    @jax.jit
    def forward(params, batch):
        inputs = {k: batch[k] for k in evaluation.TRANSFORMER_INPUTS}
        logits = trainer.model_outputs(teacher_apply, params, {}, inputs, train=False).logits.astype(jnp.float32)
        if word_level:
            logits = first_subtoken_logits(logits, batch["word_start_index"], batch["word_mask"])
        return logits

    out = []
    bar = observe.Progress(split.num_batches(batch_size, drop_remainder=False), 0, progress_bar)
    for batch in split.batches(batch_size, shuffle=False, drop_remainder=False):
        logits = np.asarray(forward(teacher_params, {k: batch[k] for k in keys}))
        if logits.ndim == 3:
            logits = np.pad(logits, ((0, 0), (0, split.buckets[-1] - logits.shape[1]), (0, 0)))
        out.append(logits[batch["example_weight"] > 0])
        bar.update(1)
    bar.close()
    return np.concatenate(out)


def transfer_key(teacher_dir: str, splits: list[Split]) -> str:
    """A fingerprint of the teacher (its directory and saved step) and of the teacher inputs of ``splits``:
    cached logits are reused only for the same teacher over the same rows."""
    h = hashlib.sha256(os.path.abspath(teacher_dir).encode())
    h.update(str(models.read_meta(teacher_dir)["extra"].get("step")).encode())
    for split in splits:
        for name in ("input_ids", "token_type_ids", "word_start_index"):
            if name in split.features.ragged:
                h.update(name.encode())
                for row in split.features.ragged[name].rows:
                    h.update(np.ascontiguousarray(row, np.int32).tobytes() + b";")
    return h.hexdigest()


def cached_teacher_logits(path: str, key: str, compute, shape: tuple[int, ...]) -> np.ndarray:
    """Loads ``path`` if it holds logits of ``shape`` for ``key`` (:func:`transfer_key`), else computes them
    with ``compute()`` and writes them atomically."""
    if os.path.exists(path):
        with np.load(path) as cached:
            old_key = str(cached["key"]) if "key" in cached.files else None
            if old_key == key and cached["logits"].shape == tuple(shape):
                return cached["logits"]
            logging.warning("%s holds logits of shape %s for %s; this run needs %s for teacher/transfer set %s: "
                            "recomputing", path, cached["logits"].shape, old_key and old_key[:12], tuple(shape),
                            key[:12])
    logits = compute()
    if observe.is_writer():
        tmp = path + ".tmp.npz"
        np.savez(tmp, logits=logits, key=np.array(key))
        os.replace(tmp, path)
    return logits


def _read_transfer_file(config, task: TaskData, preset) -> RawSplit | None:
    """The unlabeled transfer examples of ``config.transfer_file`` (None without one), read and checked before
    the teacher labels anything or training starts: the file must exist and fit the task (one sentence per line,
    or two tab-separated texts for pairs)."""
    if not config.transfer_file:
        return None
    if preset is None:
        raise config_validation.ConfigError(
            "config.transfer_file is set but config.distill.preset is 'none': unlabeled transfer text trains only "
            "on the teacher's soft targets; drop transfer_file for a gold-label baseline")
    raw = readers.read_unlabeled(config.transfer_file, kind=task.kind, is_pair=task.is_pair)
    logging.info("%s: %d unlabeled transfer examples", config.transfer_file, len(raw))
    return raw


def _unlabeled_split(task: TaskData, raw: RawSplit | None, max_word_chars: int) -> Split | None:
    """``raw`` (from :func:`_read_transfer_file`) encoded like the task's training split, with placeholder
    labels: 0 per example (sequence tasks) or ``IGNORE`` per word (token tasks, so no gold-label term sees
    them)."""
    if raw is None:
        return None
    name = f"{task.name}/unlabeled"
    if task.kind == "token":
        labels = [np.full(len(words), IGNORE, np.int32) for words in raw.tokens]
        feats = encode_tagged(name, raw.tokens, labels, tokenizer=task.tokenizer, word_vocab=task.word_vocab,
                              char_vocab=task.char_vocab, max_length=task.max_length, max_word_chars=max_word_chars)
    else:
        labels = np.zeros(len(raw), np.int32)
        feats = encode_sequences(name, raw.texts, raw.texts_b, labels, tokenizer=task.tokenizer,
                                 word_vocab=task.word_vocab, max_length=task.max_length)
    return Split(name, labels=labels, features=feats, buckets=task.train.buckets, texts=raw.texts,
                 texts_b=raw.texts_b, tokens=raw.tokens)


def _transfer_split(task: TaskData, extras: list[Split], t_logits: np.ndarray, tagger: bool) -> Split:
    """The student's training rows: the training split, then ``extras`` (augmented / unlabeled rows, in the
    teacher-logits order), with ``has_label`` (1 = gold label) and ``example_index`` (row in ``t_logits``).
    Sequence extras take the teacher's argmax as ``labels`` (never used for a loss: ``has_label`` 0)."""
    parts = [task.train] + extras
    has_label = np.concatenate([np.full(len(x), int(i == 0), np.int32) for i, x in enumerate(parts)])
    join = lambda xs: None if any(x is None for x in xs) else [v for x in xs for v in x]
    if tagger:
        views = [_tagger_split(x) for x in parts]
        labels = join([x.labels for x in parts])
    else:
        views = parts
        n_train = len(task.train)
        labels = np.concatenate([task.train.labels, t_logits[n_train:].argmax(-1).astype(np.int32)])
    scalars = {"has_label": has_label, "example_index": np.arange(len(has_label), dtype=np.int32)}
    if not tagger:
        scalars["labels"] = labels
    name = task.train.name if not extras else f"{task.name}/transfer"
    return Split(name, labels=labels, features=_join_features(views, scalars), buckets=task.train.buckets,
                 texts=join([x.texts for x in parts]), texts_b=join([x.texts_b for x in parts]),
                 tokens=join([x.tokens for x in parts]))


def _tagger_split(split: Split) -> Split:
    """The CNN-LSTM's view of a token-task split: word features only (``word_ids``, ``char_ids``,
    ``word_mask``), ``labels`` = the word tags (int32 [B, W], -100 past the sentence) and ``example_index``."""
    f = split.features
    ragged = {"word_ids": f.ragged["word_ids"], "char_ids": f.ragged["char_ids"], "labels": f.ragged["word_labels"]}
    feats = Features(lengths={"word": f.lengths["word"]}, ragged=ragged,
                     scalars={"example_index": np.arange(len(split), dtype=np.int32)}, truncated=f.truncated)
    return Split(split.name, labels=split.labels, features=feats, buckets=split.buckets, tokens=split.tokens)


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


def cnn_lstm_student(task: TaskData, s, key):
    """A fresh CNN-LSTM tagger over the task's word and character vocabularies (``s``: config.student)."""
    cfg = CNNLSTMConfig(vocab_size=len(task.word_vocab), char_vocab_size=len(task.char_vocab),
                        word_embed_dim=s.embed_dim, char_embed_dim=s.char_embed_dim, char_filters=s.char_filters,
                        char_kernel_size=s.char_kernel_size, max_chars_per_token=s.max_word_chars,
                        hidden_size=s.hidden_size, num_layers=s.num_layers, num_labels=task.num_labels,
                        dropout_rate=s.dropout_rate)
    words = jnp.zeros((1, 8), jnp.int32)
    chars = jnp.zeros((1, 8, s.max_word_chars), jnp.int32)
    params = jax.jit(models.model_class("cnn_lstm")(cfg).init)(key, words, chars, jnp.ones((1, 8), jnp.int32))
    return cfg, params["params"]


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


def tagger_distillation_loss(student_apply, preset: presets.Preset | None):
    """Token-level ``loss_fn(params, batch, rng, extras)`` for a word-level tagger (the CNN-LSTM).

    The batch holds ``word_ids`` int32 [B, W], ``char_ids`` int32 [B, W, L], ``word_mask`` int32 [B, W],
    ``labels`` int32 [B, W] (-100 past the sentence), ``example_weight`` float32 [B] and, with a preset,
    ``teacher_logits`` float32 [B, W, C]. The preset's soft-target term and its gold-label term are means
    over the real words (``word_mask`` x ``example_weight``), so padded positions never count whatever the
    teacher's values there; ``LossAux.weight`` is that word count, so devices combine per word. Without a
    preset (None): cross-entropy on the gold tags only.
    """
    if preset is None:
        return trainer.classification_loss(student_apply)

    def loss_fn(params, batch, rng, extras):
        out = trainer.model_outputs(student_apply, params, extras, batch, train=True, rng=rng)
        loss, terms = presets.distill_loss(
            preset, out, batch["teacher_logits"],
            {k: batch[k] for k in ("labels", "word_mask", "example_weight")}, mask_key="word_mask")
        real = batch["word_mask"].astype(jnp.float32) * batch["example_weight"][:, None]
        n = jnp.sum(real)
        agree = (jnp.argmax(out.logits, -1) == jnp.argmax(batch["teacher_logits"], -1)).astype(jnp.float32)
        metrics = {**{f"loss_{k}": v for k, v in terms.items()},
                   "teacher_agreement": jnp.sum(agree * real) / jnp.maximum(n, 1e-12)}
        return loss, trainer.LossAux(weight=n, metrics=metrics)

    return loss_fn


# -- the run ---------------------------------------------------------------------------------------------

def _check_pairing(family: str, kind: str, subject: str) -> None:
    """Raises unless a ``family`` student fits a ``kind`` (``"sequence"``/``"token"``) task; ``subject`` opens
    the message (e.g. ``"task wikiann is"``)."""
    if kind == "token" and family != "cnn_lstm":
        raise ValueError(f"{subject} a token task (one tag per word): token tasks distil into the CNN-LSTM tagger "
                         f"(student family cnn_lstm, e.g. distill.py:wikiann,cnn_lstm), not a {family} student")
    if kind == "sequence" and family == "cnn_lstm":
        raise ValueError(f"{subject} a sequence task (one label per example): the CNN-LSTM student tags words; use "
                         "a transformer or bilstm student (e.g. distill.py:sst2,bilstm)")


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Distils ``config.teacher_dir`` into the configured student in ``workdir``; returns the results dict."""
    config_validation.validate(config, DISTILL_SCHEMA)
    preset = _preset(config)
    observe.quiet_library_logs()
    start_time = time.time()
    workdir = os.path.abspath(workdir)
    teacher, teacher_cfg, teacher_params = models.load(config.teacher_dir)
    teacher_meta = models.read_meta(config.teacher_dir)["extra"]
    evaluation.require_transformer(config.teacher_dir, teacher_cfg, "teacher", "distillation")
    s = config.student
    tagger = s.family == "cnn_lstm"
    word_level = s.family != "transformer"
    load = functools.partial(load_task, config.task, config.data_dir, tokenizer=config.teacher_dir,
                             max_length=config.max_length, seed=config.seed, synthetic_size=config.synthetic_size,
                             **({"max_word_chars": s.max_word_chars} if tagger else {}))
    task = load(word_vocab="build" if word_level else None)
    _check_pairing(s.family, task.kind, f"task {task.name} is")
    evaluation.check_fine_tuned_for(config.teacher_dir, teacher_cfg, teacher_meta, task, "teacher")
    unlabeled_raw = _read_transfer_file(config, task, preset)
    if word_level and (unlabeled_raw is not None or len(task.word_vocab.units) > s.max_vocab):
        # the student's vocabularies cover the unlabeled transfer text too: its words train on soft targets
        raws = [task.train] + ([unlabeled_raw] if unlabeled_raw is not None else [])
        texts = [t for r in raws for t in (r.tokens if tagger else r.texts + (r.texts_b or []))]
        char_vocab = CharVocab.build(texts) if tagger and unlabeled_raw is not None else task.char_vocab
        task = load(word_vocab=WordVocab.build(texts, max_size=s.max_vocab), char_vocab=char_vocab)
    if tagger and config.augment.n_per_example > 0:
        raise config_validation.ConfigError(
            "config.augment.n_per_example > 0: transfer-set augmentation rewrites raw text and has no tags for a "
            "token task; set it to 0 (token tasks distil on the training split, plus config.transfer_file)")
    best_metric = config.checkpoint.best_metric
    if best_metric and best_metric not in task.metric_names + ["loss"]:
        raise config_validation.ConfigError(f"config.checkpoint.best_metric={best_metric!r} is not a metric of task "
                                            f"{task.name}; allowed: {task.metric_names + ['loss']}")
    os.makedirs(workdir, exist_ok=True)

    par = DataParallel(config.parallelism)
    inputs = evaluation.model_inputs(task, s.family)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))

    # Transfer set: the training split (+ augmented rows) with the teacher's logits. The CNN-LSTM trains and
    # evaluates on the word-level view of the splits; the teacher reads the sub-token features.
    student_task = task
    if tagger:
        student_task = dataclasses.replace(task, train=_tagger_split(task.train), dev=_tagger_split(task.dev))
        train = student_task.train
    else:
        train = _with_index(task.train)
    t_logits = None
    if preset is not None:
        extras = [x for x in (_augmented(task, config), _unlabeled_split(task, unlabeled_raw, s.max_word_chars))
                  if x is not None]
        splits = [task.train] + extras
        n = sum(len(x) for x in splits)
        shape = (n, task.train.buckets[-1], task.num_labels) if tagger else (n, task.num_labels)
        t_logits = cached_teacher_logits(
            os.path.join(workdir, "teacher_logits.npz"), transfer_key(config.teacher_dir, splits),
            lambda: np.concatenate([teacher_logits(teacher.apply, teacher_params, x, progress_bar=config.progress_bar,
                                                   word_level=tagger) for x in splits]), shape)
        if extras:
            logging.info("transfer set: %d training + %s examples (teacher-labelled)", len(task.train),
                         " + ".join(f"{len(x)} {x.name.rpartition('/')[2]}" for x in extras))
        train = _transfer_split(task, extras, t_logits, tagger)

    if s.family == "transformer":
        student_cfg, params = transformer_student(teacher_cfg, teacher_params, s.num_layers, s.init, init_key,
                                                  s.dropout_rate)
    elif s.family == "bilstm":
        student_cfg, params = bilstm_student(task, s, init_key)
    else:
        student_cfg, params = cnn_lstm_student(task, s, init_key)
    student = models.model_class(student_cfg.family)(student_cfg)

    steps_per_epoch, total_steps = loop.run_length(config, train)
    tx, schedule = trainer.optimizer_from_config(config.optimizer, params, total_steps)
    state = loop.host_state(jax.jit(lambda p, k: trainer.TrainState.create(p, tx, k))(params, train_key))
    feed = inputs + ("labels", "example_weight") + (("teacher_logits", "has_label") if preset is not None else ())

    def train_batches(epoch: int, start_batch: int):
        for batch in train.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                   start_batch=start_batch, drop_remainder=True,
                                   process_index=jax.process_index(), process_count=jax.process_count()):
            if preset is not None:
                rows = t_logits[batch["example_index"]]  # token tasks: [B, max_length, C] -> the batch's width
                batch["teacher_logits"] = rows[:, :batch["word_mask"].shape[1]] if tagger else rows
            yield {k: batch[k] for k in feed}

    student_apply, quant_state = qat.quantization_aware(config.qat, student.apply, params, train, inputs,
                                                        config.batch_size, config.seed)
    loss_fn = (tagger_distillation_loss if tagger else distillation_loss)(student_apply, preset)
    eval_step = par.compile(trainer.make_eval_step(trainer.classification_predict(student_apply)))
    settings = loop.LoopSettings.from_config(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                             headline_metric=task.metric_names[0])
    result = loop.fit(
        workdir, par=par, state=state, settings=settings,
        train_step=trainer.make_train_step(loss_fn, tx, steps_per_epoch, schedule),
        train_batches=train_batches,
        evaluate=lambda d: loop.evaluate(par, eval_step, d, student_task, config.eval_batch_size,
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
            if tagger:
                task.char_vocab.save(os.path.join(tok_dir, "char_vocab.json"))
        models.save(os.path.join(workdir, "model"), student_cfg.family, student_cfg, result.params,
                    tokenizer_dir=tok_dir, overwrite=True,
                    extra={"task": task.name, "kind": task.kind, "label_names": list(task.label_names),
                           "max_length": config.max_length, "step": result.exported_step,
                           "distilled_from": config.teacher_dir, "preset": config.distill.preset,
                           "eval": result.best if result.exported_step == result.best.get("step") else result.final,
                           **(qat.model_extra(config.qat) if quant_state is not None else {})})
        if quant_state is not None:
            qat.save_state(os.path.join(workdir, "model"), quant_state)
        logging.info("done: %d steps in %.1f s (%.1f s this piece); final %s; best %s; results in %s",
                     result.steps, wall, time.time() - start_time, result.final, result.best, results_path)
    return {"final": result.final, "best": result.best, "steps": result.steps, "wall_time_s": wall, **extra}


def _join_features(splits: list[Split], scalars: dict[str, np.ndarray]) -> Features:
    """The features of ``splits`` one after another (same encoders), with ``scalars`` over the whole."""
    first = splits[0].features
    for x in splits[1:]:
        if set(x.features.ragged) != set(first.ragged):
            raise ValueError(f"cannot join {splits[0].name} and {x.name}: features {sorted(first.ragged)} vs "
                             f"{sorted(x.features.ragged)}")
    feats = [x.features for x in splits]
    lengths = {g: np.concatenate([f.lengths[g] for f in feats]) for g in first.lengths}
    ragged = {k: dataclasses.replace(r, rows=[row for f in feats for row in f.ragged[k].rows])
              for k, r in first.ragged.items()}
    truncated = {k: sum(f.truncated.get(k, 0) for f in feats) for f0 in feats for k in f0.truncated}
    return dataclasses.replace(first, lengths=lengths, ragged=ragged, scalars=scalars, truncated=truncated)
