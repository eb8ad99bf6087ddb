"""Choose on one split, report on another: where runs and tools make their choices.

A run that picks among candidates (the best checkpoint, a pruning point, an int8 calibrator) and reports the
winner's figure on the same split reports a figure biased upward, the more so the more candidates it compared.
So choices are made on a *selection split*, by default whole texts carved out of the train split, never trained
on, with every row that shares text with them left out of training (:mod:`experiments.data.holdout`), and the dev figure of the chosen candidate is what
``results.json``, the saved model's ``eval`` and the reports give. ``config.selection="dev"`` (jobs) keeps the
old behaviour on request: choose and report on dev.

The split a model was trained without travels with it: the saved model's ``extra.selection``
(:func:`record`) is what the tools that read the model (prune, quant_eval, recipe stages) carve again
(:func:`task_arg_of_model`), so they never choose on rows the model was trained on.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from experiments.data import TaskData
from experiments.data.holdout import METHOD, SELECTION_SEED

HOLDOUT, DEV = "holdout", "dev"
CHOICES = (HOLDOUT, DEV)
PREFIX = "selection/"  # metrics measured on the selection split, beside the dev metrics


def section_fields(c: ml_collections.ConfigDict) -> None:
    """Adds the shared fields ``selection`` and ``selection_size`` to a job config ``c``."""
    c.selection = HOLDOUT  # where choices are made: "holdout" (carved from train, never trained on) | "dev"
    c.selection_size = 0  # whole texts in the holdout; 0: min(2000, a tenth of train's whole texts)


CONSTRAINTS = {"selection": dict(choices=CHOICES), "selection_size": dict(min=0)}


def task_arg(config) -> int | str | None:
    """``load_task``'s ``selection`` argument for a job config: a count, ``"auto"``, or None (choose on dev)."""
    if config.selection == DEV:
        return None
    return config.selection_size or "auto"


def record(task: TaskData) -> dict:
    """What the choices of a run on ``task`` were made on (``results.json`` and the saved model's
    ``extra.selection``): ``{"split": "holdout", "examples": N, "seed": S, "method": "whole_texts",
    "candidates": C, "left_out": L}`` or ``{"split": "dev", "examples": N}``."""
    if task.selection is None:
        return {"split": DEV, "examples": len(task.dev)}
    return {"split": HOLDOUT, "seed": SELECTION_SEED, **task.selection_summary}


def task_arg_of_model(extra: dict, model_dir: str) -> int | None:
    """``load_task``'s ``selection`` argument that carves again the holdout a saved model was trained without
    (its ``extra.selection``); None (choose on dev, with a warning) for a model that records none, chose on
    dev, or was trained beside the earlier random carve-out (no ``method``): it may have trained on every train
    row, or on text the carve would now hold out, so no train row is a fair place to choose."""
    chosen = extra.get("selection")
    if not chosen or chosen.get("split") != HOLDOUT:
        logging.warning("%s records no held-out selection split (trained on all of train, or chose on dev): "
                        "choices are made on dev, and the dev figures are biased by them", model_dir)
        return None
    if chosen.get("method") != METHOD:
        logging.warning("%s was trained beside the earlier random carve-out of train, whose rows share text with "
                        "training rows: choices are made on dev, and the dev figures are biased by them; retrain "
                        "it to choose on held-out whole texts", model_dir)
        return None
    return int(chosen["examples"])


def merge(dev_metrics: dict, selection_metrics: dict | None) -> dict:
    """Dev metrics with the selection split's beside them under :data:`PREFIX` (none when choosing on dev)."""
    if selection_metrics is None:
        return dict(dev_metrics)
    return {**dev_metrics, **{PREFIX + k: v for k, v in selection_metrics.items()}}


def choice_key(task: TaskData, metric: str) -> str:
    """The key of ``metric`` (a task metric or ``loss``) as measured on the split choices are made on."""
    return metric if task.selection is None else PREFIX + metric
