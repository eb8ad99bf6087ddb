"""The distillation job (``config.job = "distill"``): train a student built from a fine-tuned teacher.

The teacher is a model directory written by fine-tuning (``config.teacher_dir``). Students: a Transformer
initialised from a subset of the teacher's layers (``student.init``: every other layer, DistilBERT's
initialisation, the first layers, or random) or from a pretrained student (``student.model_dir``: a model
directory of general distillation, ``experiments/jobs/general_distill.py``, or a BERT checkpoint; its own shape and
a fresh task head: TinyBERT's second stage), a BiLSTM over words (sequence tasks; Tang et al. 2019), or the
CNN-LSTM tagger over words and characters (token tasks; Izsak et al. 2019). The loss -- any
:mod:`compression.distillation` preset, from cached teacher logits or a live teacher (PKD, TinyBERT) -- is the
``distill`` technique's (:mod:`experiments.techniques.distill`); ``preset = "none"`` trains the same student
on gold labels only, the baseline every distillation figure is compared with.

The transfer set is the training split, plus an augmented set when ``config.augment.n_per_example > 0`` (Tang
et al. 2019: masking, same-tag replacement, n-gram sampling), plus the unlabeled text of
``config.transfer_file`` (Mukherjee & Awadallah 2020), all labelled by the teacher's soft targets; rows without
a gold label never enter the gold-label term. ``config.labelled.examples`` keeps the gold labels of a seeded sample
of the training rows only (Hinton et al.'s 3% experiment); the other rows are dropped or, with
``labelled.rest = "transfer"``, join the transfer set without their labels (XtremeDistil's few labels plus
teacher-labelled text). Word-level students get word (and character) vocabularies built
from the training text (and the transfer text) and saved with the model.

Token tasks: the teacher tags sub-tokens, the CNN-LSTM tags words; each word takes the teacher's logits at its
first sub-token (the data's ``word_start_index``).

Like every training job this only builds the run; the runner (:mod:`experiments.jobs.runner`) does the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import models
from compression.distillation import augment
from compression.pruning.compaction import keep_layers
from experiments.data import IGNORE, Split, TaskData, load_task, readers
from experiments.data.batching import Features
from experiments.data.features import encode_sequences, encode_tagged
from experiments.data.readers import RawSplit
from experiments.data.vocab import CharVocab, WordVocab
from experiments.jobs.train import with_index
from experiments.runtime import evaluation, loop, observe, selection
from experiments.runtime.config_validation import ConfigError
from experiments.techniques.base import Run
from models.bilstm import BiLSTMConfig
from models.cnn_lstm import CNNLSTMConfig
from models.transformer import TransformerConfig

FAMILIES = ("transformer", "bilstm", "cnn_lstm")
INITS = ("every_other", "first", "random")


# -- transfer set ----------------------------------------------------------------------------------------

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


def _read_transfer_file(config, task: TaskData) -> RawSplit | None:
    """The unlabeled transfer examples of ``config.transfer_file`` (None without one), read and checked before
    the teacher labels anything or training starts: the file must exist and fit the task (one sentence per line,
    or two tab-separated texts for pairs)."""
    if not config.transfer_file:
        return None
    if config.distill.preset == "none":
        raise ConfigError(
            "config.transfer_file is set but config.distill.preset is 'none': unlabeled transfer text trains only "
            "on the teacher's soft targets; drop transfer_file for a gold-label baseline")
    raw = readers.read_unlabeled(config.transfer_file, kind=task.kind, is_pair=task.is_pair)
    logging.info("%s: %d unlabeled transfer examples", config.transfer_file, len(raw))
    return raw


LABEL_SAMPLE_STREAM = 7  # the labelled sample's RNG stream beside config.seed (data order uses the seed itself)


def _labelled_sample(task: TaskData, config) -> tuple[TaskData, RawSplit | None]:
    """``task`` with only ``config.labelled.examples`` training rows (a sample seeded by ``config.seed``, in file
    order), and the other rows as unlabeled transfer examples when ``labelled.rest == "transfer"`` (else None)."""
    n, rows = config.labelled.examples, len(task.train)
    if not n:
        return task, None
    if n >= rows:
        raise ConfigError(f"config.labelled.examples={n} keeps every one of the {rows} training rows; give fewer, "
                          "or 0 for all")
    keep = np.sort(np.random.default_rng([config.seed, LABEL_SAMPLE_STREAM]).permutation(rows)[:n])
    rest = np.setdiff1d(np.arange(rows), keep)
    logging.info("labelled sample: %d of %d training rows keep their gold labels; the other %d are %s", n, rows,
                 len(rest), "teacher-labelled transfer rows" if config.labelled.rest == "transfer" else "dropped")
    rest_raw = None
    if config.labelled.rest == "transfer":
        pick = lambda xs: None if xs is None else [xs[i] for i in rest]
        t = task.train
        rest_raw = RawSplit(f"{t.name} (unlabelled rest)", [None] * len(rest), [0] * len(rest), texts=pick(t.texts),
                            texts_b=pick(t.texts_b), tokens=pick(t.tokens))
    return dataclasses.replace(task, train=task.train.select(keep)), rest_raw


def _joined(a: RawSplit | None, b: RawSplit | None) -> RawSplit | None:
    """Two unlabeled raw splits one after the other (either may be None)."""
    if a is None or b is None:
        return a or b
    join = lambda x, y: None if x is None else x + y
    return RawSplit(f"{a.source} + {b.source}", a.labels + b.labels, a.lines + b.lines, join(a.texts, b.texts),
                    join(a.texts_b, b.texts_b), join(a.tokens, b.tokens))


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


def _transfer_split(task: TaskData, extras: list[Split], tagger: bool) -> Split:
    """The student's training rows: the training split, then ``extras`` (augmented / unlabeled rows), with
    ``has_label`` (1 = gold label) and ``example_index`` (row in the teacher's rows, in this order). Sequence
    extras get the placeholder label 0 (never used for a loss: ``has_label`` 0)."""
    parts = [task.train] + extras
    has_label = np.concatenate([np.full(len(x), int(i == 0), np.int32) for i, x in enumerate(parts)])
    join = lambda xs: None if any(x is None for x in xs) else [v for x in xs for v in x]
    if tagger:
        views = [_tagger_split(x) for x in parts]
        labels = join([x.labels for x in parts])
    else:
        views = parts
        labels = np.concatenate([task.train.labels] + [np.zeros(len(x), np.int32) for x in extras])
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


# -- students ------------------------------------------------------------------------------------------

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


def pretrained_student(model_dir: str, teacher_cfg: TransformerConfig, task: TaskData, key, dropout_rate: float,
                       max_length: int):
    """The Transformer of ``model_dir`` (a general-distillation student, or a Hugging Face BERT checkpoint) with a
    fresh sequence head; it must read the teacher's vocabulary (the task is encoded with the teacher's tokenizer)."""
    from experiments.jobs.train import is_saved_model, saved_transformer
    from models import hf

    if is_saved_model(model_dir):
        cfg, params = saved_transformer(model_dir, max_length, task, "sequence", key)
    else:
        cfg, params = hf.load_bert(model_dir, head="sequence", num_labels=task.num_labels, init_key=key)
    if cfg.vocab_size != teacher_cfg.vocab_size:
        raise ConfigError(f"config.student.model_dir {model_dir} has a vocabulary of {cfg.vocab_size} ids, the "
                          f"teacher {teacher_cfg.vocab_size}: the student must read the teacher's tokenizer")
    return cfg.replace(hidden_dropout_rate=dropout_rate, attention_dropout_rate=dropout_rate), params


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


# -- the job ---------------------------------------------------------------------------------------------

def _check_pairing(family: str, kind: str, subject: str) -> None:
    """Raises unless a ``family`` student fits a ``kind`` (``"sequence"``/``"token"``) task; ``subject`` opens
    the message (e.g. ``"task wikiann is"``)."""
    if kind == "token" and family != "cnn_lstm":
        raise ConfigError(f"{subject} a token task (one tag per word): token tasks distil into the CNN-LSTM tagger "
                         f"(student family cnn_lstm, e.g. distill.py:wikiann,cnn_lstm), not a {family} student")
    if kind == "sequence" and family == "cnn_lstm":
        raise ConfigError(f"{subject} a sequence task (one label per example): the CNN-LSTM student tags words; use "
                         "a transformer or bilstm student (e.g. distill.py:sst2,bilstm)")


def build(config, workdir: str, key) -> Run:
    """The run of a distillation job: the task in the teacher's and the student's encodings, the transfer
    rows, and the student built from (or beside) the teacher."""
    teacher_dir = config.teacher_dir
    if not teacher_dir:
        raise ConfigError("config.teacher_dir is required: the fine-tuned teacher's model directory (DIR/model)")
    _, teacher_cfg, teacher_params = models.load(teacher_dir)
    evaluation.require_transformer(teacher_dir, teacher_cfg, "teacher", "distillation")
    s = config.student
    tagger = s.family == "cnn_lstm"
    word_level = s.family != "transformer"
    load = functools.partial(load_task, config.task, config.data_dir, tokenizer=teacher_dir,
                             max_length=config.max_length, seed=config.seed, synthetic_size=config.synthetic_size,
                             selection=selection.task_arg(config),
                             **({"max_word_chars": s.max_word_chars} if tagger else {}))
    if config.labelled.rest == "transfer" and config.distill.preset == "none":
        raise ConfigError("config.labelled.rest='transfer' with config.distill.preset='none': unlabelled rows train "
                          "only on the teacher's soft targets; use labelled.rest='drop' for a gold-label baseline")
    task, rest_raw = _labelled_sample(load(word_vocab="build" if word_level else None), config)
    _check_pairing(s.family, task.kind, f"task {task.name} is")
    evaluation.check_fine_tuned_for(teacher_dir, teacher_cfg, models.read_meta(teacher_dir).get("extra", {}), task,
                                    "teacher")
    unlabeled_raw = _joined(_read_transfer_file(config, task), rest_raw)
    rows_changed = unlabeled_raw is not None or config.labelled.examples > 0
    if word_level and (rows_changed or len(task.word_vocab.units) > s.max_vocab):
        # the student's vocabularies come from the rows it trains on, the unlabeled transfer text included
        raws = [task.train] + ([unlabeled_raw] if unlabeled_raw is not None else [])
        texts = [t for r in raws for t in (r.tokens if tagger else r.texts + (r.texts_b or []))]
        char_vocab = CharVocab.build(texts) if tagger and rows_changed else task.char_vocab
        task, _ = _labelled_sample(load(word_vocab=WordVocab.build(texts, max_size=s.max_vocab),
                                        char_vocab=char_vocab), config)
    if tagger and config.augment.n_per_example > 0:
        raise ConfigError(
            "config.augment.n_per_example > 0: transfer-set augmentation rewrites raw text and has no tags for a "
            "token task; set it to 0 (token tasks distil on the training split, plus config.transfer_file)")

    # The CNN-LSTM trains and evaluates on the word-level view of the splits; the teacher reads sub-tokens.
    model_task = task
    if tagger:
        model_task = dataclasses.replace(task, train=_tagger_split(task.train), dev=_tagger_split(task.dev),
                                         selection=None if task.selection is None else _tagger_split(task.selection))
    extras = [x for x in (_augmented(task, config), _unlabeled_split(task, unlabeled_raw, s.max_word_chars))
              if x is not None] if config.distill.preset != "none" else []
    if extras:
        logging.info("transfer set: %d training + %s examples (teacher-labelled)", len(task.train),
                     " + ".join(f"{len(x)} {x.name.rpartition('/')[2]}" for x in extras))
        train = _transfer_split(task, extras, tagger)
    else:
        train = model_task.train if tagger else with_index(task.train)

    if s.family == "transformer" and s.model_dir:
        student_cfg, params = pretrained_student(s.model_dir, teacher_cfg, task, key, s.dropout_rate,
                                                 config.max_length)
    elif s.family == "transformer":
        student_cfg, params = transformer_student(teacher_cfg, teacher_params, s.num_layers, s.init, key,
                                                  s.dropout_rate)
    elif s.family == "bilstm":
        student_cfg, params = bilstm_student(task, s, key)
    else:
        student_cfg, params = cnn_lstm_student(task, s, key)
    tokenizer_dir = teacher_dir
    if word_level:
        tokenizer_dir = os.path.join(workdir, "vocab")
        if observe.is_writer():  # read back by the same process when it saves the model
            task.word_vocab.save(os.path.join(tokenizer_dir, "word_vocab.json"))
            if tagger:
                task.char_vocab.save(os.path.join(tokenizer_dir, "char_vocab.json"))
    steps_per_epoch, total_steps = loop.run_length(config, train)
    return Run(config=config, workdir=workdir, task=task, model_task=model_task, train=train,
               teacher_rows=[task.train] + extras, family=s.family, model_cfg=student_cfg,
               model=models.model_class(s.family)(student_cfg), inputs=evaluation.model_inputs(task, s.family),
               tree={"model": params}, steps_per_epoch=steps_per_epoch, total_steps=total_steps, key=key,
               tokenizer_dir=tokenizer_dir,
               metadata={"student_family": s.family, "distilled_from": teacher_dir, "transfer_examples": len(train),
                         **({"student_init": s.model_dir} if s.family == "transformer" and s.model_dir else {})})


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
