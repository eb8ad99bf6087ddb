"""Dev-set metrics of any model of the three families, on one host: what stages without a training loop use
(pruning curves, quantization and precision tables, export parity by task metric, reports).

``dev_metrics(apply_fn, variables, task, inputs)`` runs ``apply_fn`` (a model's ``apply``, or one wrapped by
transforms) over ``task.dev`` in eval mode and returns the task's metrics (accuracy/F1/MCC or span F1).
:func:`task_metrics` turns gathered predictions into metrics and is shared with the training loop's
data-parallel evaluation.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import metrics, trainer
from experiments.data import TaskData

TRANSFORMER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

def task_metrics(task: TaskData, preds: list[np.ndarray], labels: list[np.ndarray],
                 weights: np.ndarray) -> dict[str, float]:
    """The task's metrics from per-batch predictions and labels ([B] or [B, S] each, widths may differ)."""
    if task.kind == "token":
        width = max(p.shape[1] for p in preds)
        pad = lambda a, v: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=v)  # noqa: E731
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


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(apply_fn: Callable, variables: dict, batch: dict) -> jax.Array:
    """float32 eval-mode logits; compiled once per (apply_fn, input shapes)."""
    params = variables["params"]
    extras = {k: v for k, v in variables.items() if k != "params"}
    return trainer.model_outputs(apply_fn, params, extras, batch, train=False).logits.astype(jnp.float32)


def dev_logits(apply_fn: Callable, variables: dict, task: TaskData, inputs: tuple[str, ...],
               batch_size: int = 64):
    """Yields ``(logits float32 numpy, batch)`` over the dev split in order (eval mode)."""
    for batch in task.dev.batches(batch_size, shuffle=False, drop_remainder=False):
        yield np.asarray(_eval_logits(apply_fn, variables, {k: batch[k] for k in inputs})), batch


def dev_metrics(apply_fn: Callable, variables: dict, task: TaskData, inputs: tuple[str, ...],
                batch_size: int = 64) -> dict[str, float]:
    """The task's dev metrics of ``apply_fn`` with ``variables`` (see the module docstring)."""
    preds, labels, weights = [], [], []
    for logits, batch in dev_logits(apply_fn, variables, task, inputs, batch_size):
        preds.append(logits.argmax(-1))
        labels.append(batch["labels"])
        weights.append(batch["example_weight"])
    return task_metrics(task, preds, labels, np.concatenate(weights))
