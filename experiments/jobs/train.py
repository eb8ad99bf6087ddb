"""The fine-tuning job (``config.job = "finetune"``, and the ``theseus``, ``l0`` and ``qat`` presets of it): train
a Transformer from a Hugging Face BERT checkpoint, from a saved model directory, or from scratch.

``model_dir`` is either a Hugging Face BERT checkpoint (a new task head is initialised) or a model directory
written by a job (``models.save``; its head is kept, so the task must have the same labels): the second continues
training a fine-tuned model, which is how quantization-aware training, L0 pruning and module replacement of a
fine-tuned model run. A model directory without a task head (head ``"none"`` or ``"mlm"``: a student of general
distillation, ``experiments/jobs/general_distill.py``) is a pretrained body like a checkpoint: it gets a new head.
Without ``model_dir`` a word-level tokenizer is built from the training words and a ``config.model``-sized
Transformer is trained from scratch.

Depth (``config.layers.init``): ``"every_other"`` fine-tunes only the pretrained layers 0, 2, 4, ... (a half-depth
model, the baseline LayerDrop is compared with).

What the job does beyond building the model -- techniques, the loop, resume, results, ``model/`` -- is the
runner's (:mod:`experiments.jobs.runner`); config fields are documented in ``experiments/configs/finetune.py``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from absl import logging

import models
from compression.pruning import compaction, layerdrop
from experiments.data import Split, TaskData, load_task
from experiments.runtime import evaluation, loop, observe, selection
from experiments.runtime.config_validation import ConfigError
from experiments.techniques.base import Run
from models import hf, storage
from models.transformer import TASK_HEADS, Transformer, TransformerConfig, with_task_head

WORD_LEVEL_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


# -- inputs and model ------------------------------------------------------------------------------------

def _word_level_tokenizer(task_name: str, config, out_dir: str):
    """A word-level ``tokenizers.Tokenizer`` over the task's train words, saved as ``out_dir/tokenizer.json``.

    Used when training from scratch (no ``model_dir``), so that ``DIR/model`` still carries its tokenizer.
    Words are split as :func:`experiments.data.split_words` splits them (pre-split NER words pass through).
    """
    import tokenizers
    from tokenizers import models as tok_models
    from tokenizers import normalizers, pre_tokenizers

    probe = load_task(task_name, config.data_dir, word_vocab="build", max_length=config.max_length,
                      seed=config.seed, synthetic_size=config.synthetic_size, selection=selection.task_arg(config))
    words = [u for u in probe.word_vocab.units[2:]]
    vocab = {tok: i for i, tok in enumerate(WORD_LEVEL_SPECIALS + tuple(words))}
    tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(tokenizers.Regex(r"\w+(?:'\w+)*|'\w+|[^\w\s]"), behavior="isolated")])
    if observe.is_writer():
        with storage.atomic_file(os.path.join(out_dir, "tokenizer.json")) as tmp:
            tok.save(str(tmp))
    return tok


def is_saved_model(path: str | None) -> bool:
    """Whether ``path`` is a model directory written by ``models.save`` (not a Hugging Face checkpoint)."""
    if not path or not storage.is_file(os.path.join(path, models.io.CONFIG_FILE)):
        return False
    try:
        models.read_meta(path)
    except (ValueError, FileNotFoundError):
        return False
    return True


def _load_inputs(config, workdir: str) -> tuple[TaskData, str, int | None]:
    """(task encoded for the Transformer, directory holding its tokenizer files, vocabulary size of a
    from-scratch word-level tokenizer or ``None`` with a pretrained ``model_dir``)."""
    vocab_size = None
    if config.model_dir:
        if not storage.is_dir(config.model_dir):
            raise FileNotFoundError(f"config.model_dir {config.model_dir} is not a directory")
        tokenizer, tokenizer_dir = config.model_dir, config.model_dir
    else:
        tokenizer_dir = os.path.join(workdir, "tokenizer")
        tokenizer = _word_level_tokenizer(config.task, config, tokenizer_dir)
        vocab_size = tokenizer.get_vocab_size()
    task = load_task(config.task, config.data_dir, tokenizer=tokenizer, max_length=config.max_length,
                     seed=config.seed, synthetic_size=config.synthetic_size, selection=selection.task_arg(config))
    return task, tokenizer_dir, vocab_size


def _build_model(config, task: TaskData, vocab_size: int | None, key) -> tuple[TransformerConfig, Any]:
    """Pretrained body from ``config.model_dir`` with a fresh head, or a from-scratch ``config.model``."""
    head = "token" if task.kind == "token" else "sequence"
    if is_saved_model(config.model_dir):
        return saved_transformer(config.model_dir, config.max_length, task, head, key)
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


def saved_transformer(model_dir: str, max_length: int, task: TaskData, head: str, key) -> tuple[TransformerConfig,
                                                                                                   Any]:
    """The config and params (head included) of the Transformer saved in ``model_dir``, checked against the task;
    a saved body without a task head (general distillation's student) gets a fresh ``head`` initialised from
    ``key``."""
    meta = models.read_meta(model_dir)
    if meta["family"] != "transformer":
        raise ValueError(f"{model_dir} holds a {meta['family']!r} model; this job trains Transformers")
    _, model_cfg, params = models.load(model_dir)
    saved_labels = meta.get("extra", {}).get("label_names")
    if model_cfg.head not in TASK_HEADS:
        logging.info("%s has no task head (head %r): a fresh %s head over %d labels is initialised",
                     model_dir, model_cfg.head, head, task.num_labels)
        model_cfg, params = with_task_head(model_cfg, params, head, task.num_labels, key)
    elif model_cfg.head != head or model_cfg.num_labels != task.num_labels or (
            saved_labels is not None and list(saved_labels) != list(task.label_names)):
        raise ValueError(f"{model_dir} has a {model_cfg.head} head over labels "
                         f"{saved_labels or model_cfg.num_labels}; task {task.name!r} needs a {head} head over "
                         f"{list(task.label_names)}")
    if model_cfg.max_position_embeddings < max_length:
        raise ValueError(f"max_length={max_length} exceeds the model's position table "
                         f"({model_cfg.max_position_embeddings})")
    return model_cfg, params


def with_index(split: Split) -> Split:
    """``split`` whose batches carry ``example_index`` (int32 [B]): row -> position in the split."""
    feats = dataclasses.replace(split.features, scalars={**split.features.scalars,
                                                         "example_index": np.arange(len(split), dtype=np.int32)})
    return Split(split.name, labels=split.labels, features=feats, buckets=split.buckets, texts=split.texts,
                 texts_b=split.texts_b, tokens=split.tokens)


def build(config, workdir: str, key) -> Run:
    """The run of a fine-tuning job: the task encoded with the model's tokenizer, the model and its params."""
    if is_saved_model(config.model_dir):
        family = models.read_meta(config.model_dir)["family"]
        if family != "transformer":
            raise ConfigError(f"config.model_dir {config.model_dir} holds a {family!r} model; this job trains "
                              "Transformers")
    task, tokenizer_dir, vocab_size = _load_inputs(config, workdir)
    model_cfg, params = _build_model(config, task, vocab_size, key)
    if config.layers.init == "every_other":
        model_cfg, params = compaction.keep_layers(model_cfg, params, layerdrop.every_other(model_cfg.num_layers))
    train = with_index(task.train)
    steps_per_epoch, total_steps = loop.run_length(config, train)
    return Run(config=config, workdir=workdir, task=task, model_task=task, train=train, teacher_rows=[task.train],
               family="transformer", model_cfg=model_cfg, model=Transformer(model_cfg),
               inputs=evaluation.TRANSFORMER_INPUTS, tree={"model": params}, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, key=key, tokenizer_dir=tokenizer_dir,
               metadata={"model_dir": config.model_dir} if config.model_dir else {})
