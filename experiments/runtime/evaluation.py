"""Dev-set metrics of any model of the three families, on one host: what stages without a training loop use
(pruning curves, quantization and precision tables, export parity by task metric, reports).

* :func:`load_model_task`: a model directory (``models.save``) and its task, encoded as that family reads it;
* :func:`dev_logits`: ``apply_fn`` (a model's ``apply``, or one wrapped by transforms) over ``task.dev`` in eval
  mode, batch by batch;
* :func:`dev_predictions` / :class:`Predictions`: the argmax predictions of those logits, their task metrics
  and their agreement with another model's;
* :func:`dev_metrics`: the task's metrics (accuracy/F1/MCC or span F1) in one call;
* :func:`task_metrics` turns gathered predictions into metrics and is shared with the training loop's
  data-parallel evaluation;
* :func:`batch_apply`: a model's apply called with a batch's inputs as keywords, the calling convention of
  :mod:`compression.quantization`'s calibration and int8 conversion, for every family;
* :func:`require_transformer` / :func:`check_fine_tuned_for`: the checks every job that starts from a saved,
  fine-tuned Transformer (distillation teacher, L0 pruning, Theseus predecessor) makes before it trains.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import models
from experiments.data import Split, TaskData, load_task
from experiments.data.vocab import CharVocab, WordVocab
from experiments.runtime import metrics, selection, trainer
from models import storage

TRANSFORMER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TASK_KIND = {"bilstm": "sequence", "cnn_lstm": "token"}  # what the LSTM families predict (Transformer: its head)


def task_metrics(task: TaskData, preds: list[np.ndarray], labels: list[np.ndarray],
                 weights: np.ndarray) -> dict[str, float]:
    """The task's metrics from per-batch predictions and labels ([B] or [B, S] each, widths may differ)."""
    if task.kind == "token":
        width = max(p.shape[1] for p in preds)
        pad = lambda a, v: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=v)
        result = metrics.token_metrics(np.concatenate([pad(p, 0) for p in preds]),
                                       np.concatenate([pad(y, metrics.IGNORE_INDEX) for y in labels]),
                                       task.label_names, weights)
    else:
        result = metrics.classification_metrics(np.concatenate(preds), np.concatenate(labels), task.num_labels,
                                                weights)
    return {k: v for k, v in result.items() if k in task.metric_names or k.startswith(("span_", "token_"))}


def model_inputs(task: TaskData, family: str) -> tuple[str, ...]:
    """The batch keys a model of ``family`` reads on ``task``."""
    if family == "transformer":
        return TRANSFORMER_INPUTS
    if family == "cnn_lstm":
        return ("word_ids", "char_ids", "word_mask")
    if task.kind == "token":
        raise ValueError("a BiLSTM classifier cannot learn a token task; use the CNN-LSTM tagger")
    return ("word_ids", "word_mask") + (("word_ids_b", "word_mask_b") if task.is_pair else ())


def calibration_batches(split, inputs: tuple[str, ...], num_batches: int, batch_size: int = 32,
                        seed: int = 0) -> list[dict]:
    """``num_batches`` shuffled full batches of ``split`` (a :class:`~experiments.data.Split`; its ``inputs`` keys
    only), for calibrating int8 activation scales. Raises ValueError if the split has fewer full batches."""
    if num_batches < 1:
        raise ValueError(f"calibration needs at least one batch, got num_batches={num_batches}")
    out = []
    for batch in split.batches(batch_size, shuffle=True, seed=seed, drop_remainder=True):
        out.append({k: batch[k] for k in inputs})
        if len(out) == num_batches:
            return out
    raise ValueError(f"{num_batches} calibration batches of {batch_size} requested, but {split.name} has only "
                     f"{len(out)} full batches")


def require_transformer(model_dir: str, model_cfg, role: str, purpose: str) -> None:
    """Raises ``ValueError`` unless the model saved in ``model_dir`` is a Transformer (``role``: how the job
    calls it, e.g. "teacher"; ``purpose``: what needs it, e.g. "distillation")."""
    if model_cfg.family != "transformer":
        raise ValueError(f"the {role} {model_dir} is a {model_cfg.family}; {purpose} needs a fine-tuned Transformer")


def check_fine_tuned_for(model_dir: str, model_cfg, meta: dict, task: TaskData, role: str) -> None:
    """Raises ``ValueError`` unless the Transformer in ``model_dir`` was fine-tuned on a task of ``task``'s kind
    (its saved ``meta["kind"]``, else its head) with ``task``'s label names and number of labels."""
    kind = meta.get("kind") or ("token" if model_cfg.head == "token" else "sequence")
    if kind != task.kind:
        raise ValueError(f"the {role} {model_dir} was fine-tuned on a {kind} task ({meta.get('task', 'unknown')}), "
                         f"task {task.name} is a {task.kind} task: use a {role} fine-tuned on this task")
    labels = meta.get("label_names")
    if labels is not None and list(labels) != list(task.label_names):
        raise ValueError(f"label sets differ: the {role} {model_dir} was trained on {list(labels)}, task "
                         f"{task.name} has {list(task.label_names)}")
    if model_cfg.num_labels != task.num_labels:
        raise ValueError(f"the {role} {model_dir} has {model_cfg.num_labels} outputs, task {task.name} has "
                         f"{task.num_labels} labels")


def _vocab(model_dir: str, cls, file: str):
    path = os.path.join(model_dir, file)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{model_dir} holds no {file}: a word-level model directory carries the "
                                "vocabularies it was trained with")
    return cls.load(path)


def load_model_task(model_dir: str, task: str | None = None, data_dir: str | None = None, *,
                    max_length: int | None = None, with_selection: bool = False, **task_kwargs):
    """``(model, config, params, task)`` of a model directory (``models.save``) of any family.

    The task is encoded as the model reads it: sub-words with the directory's tokenizer (Transformer), words
    with its ``word_vocab.json`` (BiLSTM) and, for the CNN-LSTM, ``max_chars_per_token`` characters per word with
    its ``char_vocab.json``. ``task``/``max_length`` default to the directory's ``extra.task``/``extra.max_length``
    (a Transformer's: else its position table); ``task_kwargs`` go to :func:`~experiments.data.load_task`
    (``seed``, ``synthetic_size``, ``buckets``). ``with_selection``: carve the selection split the model was
    trained without (its ``extra.selection``; :mod:`experiments.runtime.selection`), for tools that choose.
    Raises ``ValueError`` when the task does not fit the model.
    """
    extra = models.read_meta(model_dir).get("extra", {})
    name = task or extra.get("task")
    if not name:
        raise ValueError(f"{model_dir}/config.json names no task (extra.task); pass the task")
    model, cfg, params = models.load(model_dir)
    max_length = max_length or extra.get("max_length") or getattr(cfg, "max_position_embeddings", None)
    if not max_length:
        raise ValueError(f"{model_dir}/config.json records no max_length (extra.max_length); pass it")
    if cfg.family == "transformer":
        encoders = {"tokenizer": model_dir}
    else:
        encoders = {"word_vocab": _vocab(model_dir, WordVocab, "word_vocab.json")}
        if cfg.family == "cnn_lstm":
            encoders.update(char_vocab=_vocab(model_dir, CharVocab, "char_vocab.json"),
                            max_word_chars=cfg.max_chars_per_token)
    if with_selection:
        task_kwargs["selection"] = selection.task_arg_of_model(extra, model_dir)
    data = load_task(name, data_dir, max_length=max_length, **encoders, **task_kwargs)
    kind = TASK_KIND.get(cfg.family, getattr(cfg, "head", None))
    if data.kind != kind:
        raise ValueError(f"{model_dir} holds a {cfg.family} model with a {kind} head; task {name!r} is a "
                         f"{data.kind} task")
    if data.num_labels != cfg.num_labels:
        raise ValueError(f"task {name!r} has {data.num_labels} labels, the model's head {cfg.num_labels}")
    if getattr(cfg, "pair", data.is_pair) != data.is_pair:
        raise ValueError(f"{model_dir} holds a {'pair' if cfg.pair else 'single-sentence'} classifier; task "
                         f"{name!r} is {'a pair' if data.is_pair else 'a single-sentence'} task")
    return model, cfg, params, data


def batch_apply(apply_fn: Callable, inputs: tuple[str, ...]) -> Callable:
    """``fn(variables, **batch_inputs, **kwargs)``: ``apply_fn`` in eval mode on the batch keys ``inputs`` (those of
    :func:`model_inputs`, e.g. ``word_ids``/``word_mask``, whatever the model names its arguments) given as
    keywords; other keywords (``mutable=``) pass on to ``apply_fn``. Returns the model's output."""

    def fn(variables, **kwargs):
        batch = {k: kwargs.pop(k) for k in inputs if k in kwargs}
        extras = {k: v for k, v in variables.items() if k != "params"}
        return trainer.model_outputs(apply_fn, variables["params"], extras, batch, train=False, **kwargs)

    return fn


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(apply_fn: Callable, variables: dict, batch: dict) -> jax.Array:
    """float32 eval-mode logits; compiled once per (apply_fn, input shapes)."""
    params = variables["params"]
    extras = {k: v for k, v in variables.items() if k != "params"}
    return trainer.model_outputs(apply_fn, params, extras, batch, train=False).logits.astype(jnp.float32)


def dev_logits(apply_fn: Callable, variables: dict, task: TaskData, inputs: tuple[str, ...],
               batch_size: int = 64, split: Split | None = None) -> Iterator[tuple[np.ndarray, dict]]:
    """Yields ``(logits float32 numpy [B, C] or [B, S, C], batch)`` over the dev split (or ``split``, e.g.
    ``task.selection``) in order (eval mode; the last batch is padded with rows of weight 0)."""
    for batch in (task.dev if split is None else split).batches(batch_size, shuffle=False, drop_remainder=False):
        yield np.asarray(_eval_logits(apply_fn, variables, {k: batch[k] for k in inputs})), batch


def scored(labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """bool, the shape of ``labels`` ([N] or [N, S]): the positions a metric scores, real rows (weight > 0) and,
    for token labels, the labelled tokens."""
    real = np.asarray(weights) > 0
    return real if labels.ndim == 1 else real[:, None] & (labels != metrics.IGNORE_INDEX)


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Argmax predictions over a split, batch by batch (the batches of a token task may differ in width).

    Attributes:
      preds, labels: int per batch, [B] (sequence tasks) or [B, S] (token tasks; ``IGNORE_INDEX`` labels unscored).
      weights: float32 [B] per batch, 0 for padding rows.
      logits: float32 [B, C] or [B, S, C] per batch when collected with ``keep_logits``, else ``None``.
    """

    preds: list[np.ndarray]
    labels: list[np.ndarray]
    weights: list[np.ndarray]
    logits: list[np.ndarray] | None = None

    @classmethod
    def collect(cls, outputs: Iterable[tuple[np.ndarray, dict]], keep_logits: bool = False) -> Predictions:
        """From ``(logits, batch)`` pairs, as :func:`dev_logits` yields them (batches with ``labels`` and
        ``example_weight``)."""
        preds, labels, weights, logits = [], [], [], []
        for out, batch in outputs:
            preds.append(np.asarray(out).argmax(-1))
            labels.append(batch["labels"])
            weights.append(batch["example_weight"])
            if keep_logits:
                logits.append(np.asarray(out, np.float32))
        return cls(preds, labels, weights, logits if keep_logits else None)

    def metrics(self, task: TaskData) -> dict[str, float]:
        """The task's metrics (:func:`task_metrics`)."""
        return task_metrics(task, self.preds, self.labels, np.concatenate(self.weights))

    def agreement(self, other: Predictions) -> float:
        """Share of the scored positions (:func:`scored`) where ``other`` (same split) predicts the same."""
        same = total = 0
        for a, b, y, w in zip(self.preds, other.preds, self.labels, self.weights, strict=True):
            keep = scored(y, w)
            same += int(np.sum((a == b)[keep]))
            total += int(np.sum(keep))
        return same / max(total, 1)


def dev_predictions(apply_fn: Callable, variables: dict, task: TaskData, inputs: tuple[str, ...],
                    batch_size: int = 64, keep_logits: bool = False, split: Split | None = None) -> Predictions:
    """:class:`Predictions` of ``apply_fn`` with ``variables`` over the dev split or ``split`` (see
    :func:`dev_logits`)."""
    return Predictions.collect(dev_logits(apply_fn, variables, task, inputs, batch_size, split), keep_logits)


def dev_metrics(apply_fn: Callable, variables: dict, task: TaskData, inputs: tuple[str, ...],
                batch_size: int = 64, split: Split | None = None) -> dict[str, float]:
    """The task's metrics of ``apply_fn`` with ``variables`` on the dev split or ``split`` (see the module
    docstring)."""
    return dev_predictions(apply_fn, variables, task, inputs, batch_size, split=split).metrics(task)
