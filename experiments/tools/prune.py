"""Head pruning of a fine-tuned Transformer (Michel et al. 2019) and compaction into a smaller model directory.

``head_pruning_curve`` estimates head importance (|dL/d mask| summed over importance batches drawn from the
training split), removes the least important ``step`` fraction of all heads, re-estimates, and records the
metric after every round on the selection split (the held-out rows of train the model was trained without,
as its ``extra.selection`` records; :mod:`experiments.runtime.selection`), and the dev metric beside it: the
metric-vs-heads-pruned curve. ``prune_and_compact`` then takes the most heads whose *selection* metric stays
within ``max_drop`` points of the unpruned model's, or the curve point nearest a target (``target_fraction`` of
all heads, or ``target_heads``), and compacts the model so the pruning gives real speed; the compacted model's
dev metrics are what it reports, from data that took no part in the choice. A model that records no held-out
split (trained on all of train) is chosen on dev, with a warning, as before.

The curve's points lie ``round(step x all heads)`` heads apart, up to ``floor(max_fraction x all heads)``
(:func:`planned_grid`): with 72 heads and ``step=0.1`` they are 0, 7, 14, 21, 28, ... heads, so
``--target_fraction=0.4`` (28.8 heads) takes the 28-head point (0.3889), and says so in the log and in
``results.json`` (``chosen.target``). A target the curve cannot reach (negative, all heads or more, above
``max_fraction``) is refused before any model or data is loaded: the head count comes from the model
directory's config.json.

What is kept for a rerun: the curve is written to ``OUT_DIR/curve.json`` (with the masks of every point) and
``OUT_DIR/curve.png`` as soon as it is computed, before the choice; a rerun with the same model (config and
params file size and mtime), the same encoded task data and the same curve flags (``step``, ``max_fraction``,
``importance_examples``, ``seed``, ``batch_size``) reuses it, so trying another ``max_drop`` or target costs
only the compaction and one dev pass. Nothing else is cached. The model directory, the data folder and
``OUT_DIR`` may be local or in a bucket (``gs://``, :mod:`models.storage`).

Command line (one model directory in, a pruned model directory and the curve out)::

    python -m experiments.tools.prune --model_dir=/tmp/sst2/model --data_dir=../shared/data/sst2 \\
        --out_dir=/tmp/pruned --target_fraction=0.4
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

import models
from compression.pruning import compaction, head_importance
from compression.pruning.head_importance import PruningStep
from compression.pruning.site_masks import MASKS, site_masks, unflatten
from experiments.data import TaskData, load_task
from experiments.runtime import evaluation, observe, selection, trainer
from experiments.runtime import cli
from models import storage

INPUTS = evaluation.TRANSFORMER_INPUTS


def masked_model(model, params, sample_batch):
    """(wrapped apply, variables with an all-ones ``masks`` collection at every head site)."""
    t = site_masks("heads")
    variables = t.init(jax.random.key(0), {"params": params}, model.apply, sample_batch["input_ids"],
                       attention_mask=sample_batch["attention_mask"])
    return t.wrap(model.apply), variables


def head_pruning_curve(model, params, task: TaskData, *, importance_examples: int = 2048, step: float = 0.1,
                       max_fraction: float = 0.6, batch_size: int = 64, seed: int = 0):
    """The iterative pruning curve; returns ``(curve, apply_fn, variables)`` (see the module docstring).

    ``curve``: list of :class:`compression.pruning.head_importance.PruningStep` (fraction 0 first) whose
    ``metric`` is the task's first metric on ``task.choice_split`` (the selection split, else dev).
    """
    if task.kind != "sequence":
        raise ValueError("head pruning here scores sequence classifiers; token tasks are not wired in")
    first = next(task.dev.batches(batch_size))
    apply_fn, variables = masked_model(model, params, {k: jnp.asarray(first[k][:1]) for k in INPUTS})
    n = min(importance_examples, len(task.train))
    subset = task.train.select(np.random.default_rng(seed).permutation(len(task.train))[:n])
    metric_name = task.metric_names[0]

    def loss_fn(variables, batch):
        out = trainer.model_outputs(apply_fn, variables["params"], {MASKS: variables[MASKS]}, batch, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(out.logits.astype(jnp.float32), batch["labels"]).mean()

    def batches():
        for b in subset.batches(min(batch_size, n), drop_remainder=True):
            yield {k: b[k] for k in INPUTS + ("labels",)}

    def metric_fn(v):
        return evaluation.dev_metrics(apply_fn, v, task, INPUTS, batch_size, split=task.choice_split)[metric_name]

    curve = head_importance.iterative_head_pruning(loss_fn, metric_fn, variables, batches, fraction_per_round=step,
                                                   max_fraction=max_fraction)
    return curve, apply_fn, variables


def choose(curve, *, max_drop: float | None = None, target_fraction: float | None = None,
           target_heads: int | None = None):
    """The curve point to keep: the largest fraction within ``max_drop`` (metric points x 100, e.g. 1.0) of
    the unpruned metric, or the point nearest ``target_fraction`` / ``target_heads`` (a tie goes to fewer heads:
    the grid's points are ``step`` x all heads apart, so a target rarely falls on one exactly)."""
    if sum(x is not None for x in (max_drop, target_fraction, target_heads)) != 1:
        raise ValueError("give exactly one of max_drop, target_fraction and target_heads")
    if target_fraction is not None:
        return min(curve, key=lambda p: (abs(p.fraction_pruned - target_fraction), p.heads_pruned))
    if target_heads is not None:
        return min(curve, key=lambda p: (abs(p.heads_pruned - target_heads), p.heads_pruned))
    base = curve[0].metric
    ok = [p for p in curve if (base - p.metric) * 100 <= max_drop]
    return max(ok, key=lambda p: p.fraction_pruned)


def compact_heads(config, params, masks_by_site: dict[str, np.ndarray]):
    """(config, params) of the model with the masked heads physically removed."""
    heads, _ = compaction.layer_masks(unflatten({p: np.asarray(m) for p, m in masks_by_site.items()}))
    return compaction.compact(config, params, head_masks=heads)


def total_heads(model_dir: str) -> int:
    """Attention heads of a Transformer model directory, from its config.json alone (no parameters read)."""
    meta = models.read_meta(model_dir)
    if meta["family"] != "transformer":
        raise ValueError(f"{model_dir} holds a {meta['family']!r} model; head pruning needs a Transformer")
    cfg = models.io.config_class("transformer").from_dict(meta["config"])
    return sum(cfg.heads(i) for i in range(cfg.num_layers))


def planned_grid(total: int, step: float, max_fraction: float) -> list[int]:
    """Heads pruned at each point of the curve :func:`head_importance.iterative_head_pruning` computes for
    ``total`` heads (fewer only where a layer would lose its last head)."""
    per_round, limit = max(1, round(step * total)), math.floor(max_fraction * total)
    grid = [0]
    while grid[-1] < limit:
        grid.append(min(grid[-1] + per_round, limit))
    return grid


def check_target(total: int, *, step: float, max_fraction: float, target_fraction: float | None = None,
                 target_heads: int | None = None) -> None:
    """Raises ``ValueError`` naming the argument when the curve flags are out of range or the target is one
    the curve cannot reach (negative, all ``total`` heads or more, beyond ``max_fraction``)."""
    for name, value in (("step", step), ("max_fraction", max_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name}={value} must be in (0, 1)")
    if target_fraction is not None and target_heads is not None:
        raise ValueError("give target_fraction or target_heads, not both")
    if target_fraction is not None and not 0 <= target_fraction <= max_fraction:
        raise ValueError(f"target_fraction={target_fraction} must be in [0, max_fraction={max_fraction}]: the curve "
                         "stops at max_fraction")
    if target_heads is not None:
        if not 0 <= target_heads < total:
            raise ValueError(f"target_heads={target_heads} must be in [0, {total}): the model has {total} heads")
        if target_heads > max_fraction * total:
            raise ValueError(f"target_heads={target_heads} is beyond the curve, which stops at max_fraction="
                             f"{max_fraction} ({math.floor(max_fraction * total)} of {total} heads)")


def describe_choice(chosen: PruningStep, total: int, *, target_fraction: float | None = None,
                    target_heads: int | None = None) -> dict:
    """``chosen.target`` of results.json: the target asked for and the curve point taken for it."""
    wanted = target_heads if target_heads is not None else target_fraction * total
    asked = (f"target_heads={target_heads} of {total}" if target_heads is not None else
             f"target_fraction={target_fraction} ({wanted:g} of {total} heads)")
    note = f"{asked}: took the nearest curve point, {chosen.heads_pruned} heads ({chosen.fraction_pruned:.4f})"
    return {"fraction": target_fraction, "heads": target_heads, "heads_wanted": wanted, "note": note}


CURVE_DEFAULTS = {k: p.default for k, p in inspect.signature(head_pruning_curve).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}


def curve_fingerprint(model_dir: str, task: TaskData, **curve_kwargs) -> str:
    """A key of everything the curve depends on: the model directory's config.json and its params file's size
    and mtime, the task's encoded examples (so data files, tokenizer and max_length), and the curve flags."""
    h = hashlib.sha256()
    h.update(storage.read_bytes(os.path.join(model_dir, models.io.CONFIG_FILE)))
    size, mtime = storage.size_and_mtime_ns(os.path.join(model_dir, models.io.PARAMS_FILE))
    h.update(f"{size}:{mtime}:{task.name}".encode())
    for split in (task.train, task.dev, task.choice_split):
        h.update(np.asarray(split.labels).tobytes())
        for key in sorted(split.features.ragged):
            h.update(key.encode())
            h.update(np.concatenate([r.ravel() for r in split.features.ragged[key].rows]).tobytes())
    h.update(json.dumps({**CURVE_DEFAULTS, **curve_kwargs}, sort_keys=True).encode())
    return h.hexdigest()


def dev_curve(model, params, task: TaskData, curve: list[PruningStep], batch_size: int = 64) -> list[float]:
    """The task's first metric on dev at every point of ``curve`` (the model with that point's masks)."""
    first = next(task.dev.batches(batch_size))
    apply_fn, variables = masked_model(model, params, {k: jnp.asarray(first[k][:1]) for k in INPUTS})
    name = task.metric_names[0]
    return [evaluation.dev_metrics(apply_fn, {**variables, MASKS: unflatten(p.masks)}, task, INPUTS,
                                   batch_size)[name] for p in curve]


def save_curve(out_dir: str, curve: list[PruningStep], dev: list[float], fingerprint: str, metric_name: str,
               chosen_on: str) -> None:
    """``OUT_DIR/curve.json`` (atomically; every point with its masks, its metric on the ``chosen_on`` split and
    on dev) and the plot ``OUT_DIR/curve.png``."""
    payload = {"fingerprint": fingerprint, "metric": metric_name, "chosen_on": chosen_on,
               "points": [{"fraction_pruned": p.fraction_pruned, "heads_pruned": p.heads_pruned, "metric": p.metric,
                           "dev_metric": d, "masks": {k: np.asarray(m).tolist() for k, m in p.masks.items()}}
                          for p, d in zip(curve, dev, strict=True)]}
    observe.write_json(os.path.join(out_dir, "curve.json"), payload)
    _plot_curve(curve, dev, metric_name, chosen_on, os.path.join(out_dir, "curve.png"))


def load_curve(out_dir: str, fingerprint: str) -> tuple[list[PruningStep], list[float]] | None:
    """``(curve, dev metrics)`` as :func:`save_curve` wrote them into ``out_dir`` if its fingerprint is
    ``fingerprint``, else None."""
    path = os.path.join(out_dir, "curve.json")
    if not storage.is_file(path):
        return None
    payload = json.loads(storage.read_text(path))
    if payload.get("fingerprint") != fingerprint:
        logging.info("%s was computed for another model, data or curve flags: recomputing", path)
        return None
    points = payload["points"]
    return ([PruningStep(p["fraction_pruned"], p["heads_pruned"], p["metric"],
                         {k: np.asarray(m, np.float32) for k, m in p["masks"].items()}) for p in points],
            [p["dev_metric"] for p in points])


def _plot_curve(curve: list[PruningStep], dev: list[float], metric_name: str, chosen_on: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    heads = [p.heads_pruned for p in curve]
    if chosen_on != "dev":
        ax.plot(heads, [p.metric for p in curve], "s--", label=f"{chosen_on} (the choice)")
    ax.plot(heads, dev, "o-", label="dev (reported)")
    ax.legend()
    ax.set_xlabel("heads pruned")
    ax.set_ylabel(metric_name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with storage.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def pruning_curve(model_dir: str, task: TaskData, out_dir: str,
                  **curve_kwargs) -> tuple[list[PruningStep], list[float]]:
    """``(curve, its dev metrics)`` of ``model_dir`` on ``task``: reused from ``out_dir`` when computed there for
    the same inputs, else computed and saved there at once (see the module docstring)."""
    key = curve_fingerprint(model_dir, task, **curve_kwargs)
    cached = load_curve(out_dir, key)
    if cached is not None:
        logging.info("reusing the pruning curve in %s", os.path.join(out_dir, "curve.json"))
        return cached
    model, _, params = models.load(model_dir)
    curve, _, _ = head_pruning_curve(model, params, task, **curve_kwargs)
    dev = ([p.metric for p in curve] if task.selection is None else
           dev_curve(model, params, task, curve, curve_kwargs.get("batch_size", CURVE_DEFAULTS["batch_size"])))
    save_curve(out_dir, curve, dev, key, task.metric_names[0], selection.record(task)["split"])
    return curve, dev


def prune_and_compact(model_dir: str, task: TaskData, out_dir: str, *, max_drop: float | None = 1.0,
                      target_fraction: float | None = None, target_heads: int | None = None,
                      **curve_kwargs) -> dict:
    """Curve (reused or computed, see :func:`pruning_curve`), choice, compaction; writes ``out_dir/model`` and
    ``out_dir/results.json``; returns the results. A target overrides ``max_drop``; an unreachable one is a
    ``ValueError`` before the model's parameters are read."""
    total = total_heads(model_dir)
    shape = {**CURVE_DEFAULTS, **curve_kwargs}
    check_target(total, step=shape["step"], max_fraction=shape["max_fraction"], target_fraction=target_fraction,
                 target_heads=target_heads)
    targeted = target_fraction is not None or target_heads is not None
    if targeted:
        logging.info("curve points (heads pruned of %d): %s", total,
                     planned_grid(total, shape["step"], shape["max_fraction"]))
    curve, dev = pruning_curve(model_dir, task, out_dir, **curve_kwargs)
    chosen = choose(curve, max_drop=None if targeted else max_drop, target_fraction=target_fraction,
                    target_heads=target_heads)
    target = describe_choice(chosen, total, target_fraction=target_fraction,
                             target_heads=target_heads) if targeted else None
    if target:
        logging.info("%s", target["note"])
    _, config, params = models.load(model_dir)
    meta = models.read_meta(model_dir)["extra"]
    new_cfg, new_params = compact_heads(config, params, chosen.masks)
    metric_name, chosen_on = task.metric_names[0], selection.record(task)["split"]
    on_choice = selection.PREFIX + metric_name  # the metric on the selection split (absent when choosing on dev)

    def point(metric_on_choice: float, dev_metric: float) -> dict:
        return {metric_name: dev_metric, **({on_choice: metric_on_choice} if chosen_on != "dev" else {})}

    compacted = evaluation.dev_metrics(models.model_class("transformer")(new_cfg).apply, {"params": new_params}, task,
                                       INPUTS)
    results = {
        "curve": [{"fraction_pruned": p.fraction_pruned, "heads_pruned": p.heads_pruned,
                   **point(p.metric, d)} for p, d in zip(curve, dev)],
        "selection": selection.record(task),
        "chosen": {"fraction_pruned": chosen.fraction_pruned, "heads_pruned": chosen.heads_pruned,
                   **point(chosen.metric, next(d for p, d in zip(curve, dev) if p is chosen)),
                   "masks": {p: np.asarray(m).tolist() for p, m in chosen.masks.items()},
                   "rule": {"max_drop": max_drop} if target is None else {"target": target}},
        "final": compacted, "best": compacted, "heads_per_layer": [new_cfg.heads(i) for i in range(new_cfg.num_layers)],
        "total_heads": total, "source_model": model_dir, "task": task.name,
    }
    models.save(os.path.join(out_dir, "model"), "transformer", new_cfg, new_params, tokenizer_dir=model_dir,
                overwrite=True, extra={**meta, "pruned_from": model_dir, "eval": compacted,
                                       "heads_pruned": chosen.heads_pruned})
    observe.write_json(os.path.join(out_dir, "results.json"), results)  # written last: the stage is done
    return results


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("model_dir", None, "fine-tuned Transformer model directory (DIR/model of a run)",
                        flag_values=fv)
    flags.DEFINE_string("task", None, "task name (default: the model's own task)", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "the task's data folder", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "where the pruned model, results.json and the curve go", flag_values=fv)
    flags.DEFINE_float("max_drop", 1.0, "largest allowed drop of the metric on the selection split (the model's "
                       "held-out train rows; dev for a model that holds none out), in points", lower_bound=0.0,
                       flag_values=fv)
    flags.DEFINE_float("target_fraction", None, "prune the curve point nearest this fraction of all heads instead",
                       flag_values=fv)
    flags.DEFINE_integer("target_heads", None, "prune the curve point nearest this many heads instead",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_float("step", 0.1, "fraction of all heads removed per round, in (0, 1)", flag_values=fv)
    flags.DEFINE_float("max_fraction", 0.6, "stop the curve here, in (0, 1)", flag_values=fv)
    flags.DEFINE_integer("importance_examples", 2048, "training examples used to estimate importance per round",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("batch_size", CURVE_DEFAULTS["batch_size"], "batch of importance and dev passes",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the importance subset", lower_bound=0, flag_values=fv)
    flags.mark_flags_as_required(["model_dir", "out_dir"], flag_values=fv)
    cli.model_dir(fv, "model_dir", ["transformer"])
    cli.directory(fv, "data_dir")
    for name in ("step", "max_fraction"):
        cli.check(fv, name, lambda v: 0 < v < 1, "must be in (0, 1)")
    cli.check(fv, "target_fraction", lambda v: 0 <= v < 1, "must be in [0, 1)")
    flags.register_multi_flags_validator(
        ["target_fraction", "max_fraction"], lambda d: d["target_fraction"] is None
        or d["target_fraction"] <= d["max_fraction"], "--target_fraction is above --max_fraction, where the "
        "curve stops", flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["target_fraction", "target_heads"], flag_values=fv)


def run(fv: flags.FlagValues) -> dict:
    """The command line's work on parsed flags ``fv`` (:func:`define_flags`); returns the results."""
    if fv["max_drop"].present and (fv.target_fraction is not None or fv.target_heads is not None):
        raise app.UsageError("--max_drop and a target (--target_fraction/--target_heads) choose the point two "
                             "ways: give one")
    try:  # the head count is in config.json: an unreachable target fails here, before any data is read
        check_target(total_heads(fv.model_dir), step=fv.step, max_fraction=fv.max_fraction,
                     target_fraction=fv.target_fraction, target_heads=fv.target_heads)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    meta = models.read_meta(fv.model_dir)["extra"]
    if not (fv.task or meta.get("task")):
        raise app.UsageError(f"{fv.model_dir} records no task: pass --task")
    task = load_task(fv.task or meta["task"], fv.data_dir, tokenizer=fv.model_dir,
                     max_length=meta.get("max_length", 128),
                     selection=selection.task_arg_of_model(meta, fv.model_dir))
    results = prune_and_compact(fv.model_dir, task, fv.out_dir, max_drop=fv.max_drop,
                                target_fraction=fv.target_fraction, target_heads=fv.target_heads, step=fv.step,
                                max_fraction=fv.max_fraction, importance_examples=fv.importance_examples,
                                batch_size=fv.batch_size, seed=fv.seed)
    name = task.metric_names[0]
    for p in results["curve"]:
        on_choice = p.get(selection.PREFIX + name)
        logging.info("heads pruned %5.1f%% (%3d): dev %s %.4f%s", 100 * p["fraction_pruned"], p["heads_pruned"],
                     name, p[name], "" if on_choice is None else f" (selection split {on_choice:.4f})")
    print(json.dumps({"chosen": {k: v for k, v in results["chosen"].items() if k != "masks"},
                      "compacted": results["final"]}, indent=2))
    return results


if __name__ == "__main__":
    cli.run_script(define_flags, run)
