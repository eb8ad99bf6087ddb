"""Head pruning of a fine-tuned Transformer (Michel et al. 2019) and compaction into a smaller model directory.

``head_pruning_curve`` estimates head importance (|dL/d mask| summed over importance batches drawn from the
training split, never the dev set it is judged on), removes the least important ``step`` fraction of all heads,
re-estimates, and records the dev metric after every round: the metric-vs-heads-pruned curve.
``prune_and_compact`` then takes the most heads whose dev metric stays within ``max_drop`` points of the
unpruned model (or a fixed ``target_fraction``), and compacts the model so the pruning gives real speed.

Command line (one model directory in, a pruned model directory and the curve out)::

    python -m experiments.prune --model_dir=/tmp/sst2/model --data_dir=../shared/data/sst2 --out_dir=/tmp/pruned
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

import models
from compression.pruning import compaction, head_importance
from compression.pruning.site_masks import MASKS, site_masks, unflatten
from experiments import evaluation, trainer
from experiments.data import TaskData, load_task

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
    ``metric`` is the task's first metric on the dev set.
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
        return evaluation.dev_metrics(apply_fn, v, task, INPUTS, batch_size)[metric_name]

    curve = head_importance.iterative_head_pruning(loss_fn, metric_fn, variables, batches, fraction_per_round=step,
                                                   max_fraction=max_fraction)
    return curve, apply_fn, variables


def choose(curve, *, max_drop: float | None = None, target_fraction: float | None = None):
    """The curve point to keep: the largest fraction within ``max_drop`` (metric points x 100, e.g. 1.0) of
    the unpruned metric, or the point at ``target_fraction``."""
    if (max_drop is None) == (target_fraction is None):
        raise ValueError("give exactly one of max_drop and target_fraction")
    if target_fraction is not None:
        matches = [p for p in curve if abs(p.fraction_pruned - target_fraction) < 1e-6]
        if not matches:
            raise ValueError(f"target_fraction {target_fraction} is not on the curve "
                             f"{[round(p.fraction_pruned, 4) for p in curve]}")
        return matches[0]
    base = curve[0].metric
    ok = [p for p in curve if (base - p.metric) * 100 <= max_drop]
    return max(ok, key=lambda p: p.fraction_pruned)


def compact_heads(config, params, masks_by_site: dict[str, np.ndarray]):
    """(config, params) of the model with the masked heads physically removed."""
    heads, _ = compaction.layer_masks(unflatten({p: np.asarray(m) for p, m in masks_by_site.items()}))
    return compaction.compact(config, params, head_masks=heads)


def prune_and_compact(model_dir: str, task: TaskData, out_dir: str, *, max_drop: float | None = 1.0,
                      target_fraction: float | None = None, **curve_kwargs) -> dict:
    """Curve, choice, compaction; writes ``out_dir/model`` and ``out_dir/results.json``; returns the results."""
    model, config, params = models.load(model_dir)
    meta = models.read_meta(model_dir)["extra"]
    curve, apply_fn, variables = head_pruning_curve(model, params, task, **curve_kwargs)
    chosen = choose(curve, max_drop=None if target_fraction is not None else max_drop,
                    target_fraction=target_fraction)
    new_cfg, new_params = compact_heads(config, params, chosen.masks)
    metric_name = task.metric_names[0]
    compacted = evaluation.dev_metrics(models.model_class("transformer")(new_cfg).apply, {"params": new_params}, task,
                                       INPUTS)
    results = {
        "curve": [{"fraction_pruned": p.fraction_pruned, "heads_pruned": p.heads_pruned, metric_name: p.metric}
                  for p in curve],
        "chosen": {"fraction_pruned": chosen.fraction_pruned, "heads_pruned": chosen.heads_pruned,
                   metric_name: chosen.metric, "masks": {p: m.tolist() for p, m in chosen.masks.items()}},
        "final": compacted, "best": compacted, "heads_per_layer": [new_cfg.heads(i) for i in range(new_cfg.num_layers)],
        "source_model": model_dir, "task": task.name,
    }
    os.makedirs(out_dir, exist_ok=True)
    models.save(os.path.join(out_dir, "model"), "transformer", new_cfg, new_params, tokenizer_dir=model_dir,
                overwrite=True, extra={**meta, "pruned_from": model_dir, "eval": compacted,
                                       "heads_pruned": chosen.heads_pruned})
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Command-line flags (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("model_dir", None, "fine-tuned Transformer model directory (DIR/model of a run)")
    flags.DEFINE_string("task", None, "task name (default: the model's own task)")
    flags.DEFINE_string("data_dir", None, "the task's data folder")
    flags.DEFINE_string("out_dir", None, "where the pruned model and results.json go")
    flags.DEFINE_float("max_drop", 1.0, "largest allowed drop of the dev metric, in points")
    flags.DEFINE_float("target_fraction", None, "prune exactly this fraction of heads instead (a curve point)")
    flags.DEFINE_float("step", 0.1, "fraction of all heads removed per round")
    flags.DEFINE_float("max_fraction", 0.6, "stop the curve here")
    flags.DEFINE_integer("importance_examples", 2048, "training examples used to estimate importance per round")


def main(argv):
    del argv
    meta = models.read_meta(FLAGS.model_dir)["extra"]
    task = load_task(FLAGS.task or meta["task"], FLAGS.data_dir, tokenizer=FLAGS.model_dir,
                     max_length=meta.get("max_length", 128))
    results = prune_and_compact(FLAGS.model_dir, task, FLAGS.out_dir, max_drop=FLAGS.max_drop,
                                target_fraction=FLAGS.target_fraction, step=FLAGS.step,
                                max_fraction=FLAGS.max_fraction, importance_examples=FLAGS.importance_examples)
    name = task.metric_names[0]
    for p in results["curve"]:
        logging.info("heads pruned %5.1f%% (%3d): %s %.4f", 100 * p["fraction_pruned"], p["heads_pruned"], name,
                     p[name])
    print(json.dumps({"chosen": results["chosen"], "compacted": results["final"]}, indent=2))


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["model_dir", "out_dir"])
    app.run(main)
