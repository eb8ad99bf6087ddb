"""Training precision: the same fine-tuning run in float32, bfloat16 and float16 (with and without dynamic
loss scaling), side by side, against float32's dev metric.

    python -m experiments.precision_train --task synthetic --workdir /tmp/precision_train
    python -m experiments.precision_train --task sst2 --workdir /tmp/sst2_prec --set num_train_steps=700 \\
        --variants float32,float16

Each variant runs :func:`experiments.train.train_and_evaluate` on ``experiments/configs/finetune.py``'s
config for the task once per ``--seeds`` seed (a seed fixes initialisation, dropout and data order, the
same for every variant) in ``WORKDIR/<variant>/seed_<s>``, with ``--set key=value`` overrides applied to
all of them. Several seeds matter: where training passes a plateau (the synthetic task does), 16-bit
rounding changes when it escapes, and single runs of the same precision already differ by points.
Variants:

* ``float32``: the reference;
* ``bfloat16``: bfloat16 compute (float32's exponent range: no loss scaling needed);
* ``float16``: float16 compute with dynamic loss scaling (``config.loss_scale.dynamic``);
* ``float16_unscaled``: float16 without loss scaling (warns; shows what the scaling buys).

Prints a table (dev metric mean / min / max over seeds, mean difference to float32 in points, final train
loss, skipped steps) and writes ``WORKDIR/precision_train.json`` (per-run details included). A variant whose
run fails (e.g. a non-finite loss without loss scaling) is reported with its error instead of stopping the
others. The acceptance
target: float16 with loss scaling within 0.5 points of float32. Runtime: the task's run time per variant
(synthetic: about a minute or two each on 2 CPU cores, more for 16 bits, which XLA on CPU runs slowly).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
import warnings

import numpy as np

from experiments.benchmarks import common
from experiments.configs import finetune

VARIANTS = {  # name -> (config.precision, config.loss_scale.dynamic)
    "float32": ("float32", False),
    "bfloat16": ("bfloat16", False),
    "float16": ("float16", True),
    "float16_unscaled": ("float16", False),
}


def _apply_override(config, assignment: str) -> None:
    """``a.b=value`` on a ConfigDict; the value is a Python literal when it parses as one, else a string."""
    if "=" not in assignment:
        raise ValueError(f"--set takes key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise ValueError(f"--set {key}: no config section {part!r}")
        node = node[part]
    if leaf not in node:
        raise ValueError(f"--set {key}: no config field {leaf!r}; fields here: {sorted(node.keys())}")
    node[leaf] = value


def _train_log(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def _one_run(task: str, vdir: str, name: str, seed: int, overrides: list[str]) -> dict:
    """One train_and_evaluate run of variant ``name``; a failure is returned as ``{"error": ...}``."""
    from experiments.train import train_and_evaluate  # heavy import after argument checks

    config = finetune.get_config(task)
    for assignment in overrides:
        _apply_override(config, assignment)
    config.precision, config.loss_scale.dynamic = VARIANTS[name]
    config.seed = seed
    config.progress_bar = "off"
    start = time.time()
    print(f"\n=== {name} seed {seed}: precision={config.precision} loss_scale.dynamic={config.loss_scale.dynamic}"
          f" -> {vdir}", flush=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = train_and_evaluate(config, vdir)
    except Exception as e:  # noqa: BLE001 -- a failing variant is a result (float16 without scaling)
        print(f"=== {name} seed {seed} failed: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.time() - start}
    log = _train_log(vdir)
    metric = results["metric_names"][0]
    return {"metric": metric, metric: results["final"][metric], "final": results["final"],
            "train_loss": log[-1]["loss"] if log else float("nan"), "steps": results["steps"],
            "skipped_steps": sum(r.get("skipped_steps", 0.0) for r in log),
            "loss_scale": log[-1].get("loss_scale") if log else None,
            "warnings": sorted({str(w.message) for w in caught if "float16" in str(w.message)}),
            "seconds": time.time() - start}


def run(task: str, workdir: str, names: list[str], seeds: list[int], overrides: list[str]) -> dict[str, dict]:
    """Trains each variant with each seed (in ``WORKDIR/<variant>/seed_<s>``); returns ``{variant: row}`` with
    the per-seed runs, the mean / min / max of the dev metric over the seeds that finished, and
    ``delta_points`` = 100 x (mean - float32's mean)."""
    rows = {}
    for name in names:
        runs = {seed: _one_run(task, os.path.join(workdir, name, f"seed_{seed}"), name, seed, overrides)
                for seed in seeds}
        done = [r for r in runs.values() if "error" not in r]
        row = {"runs": runs, "failed": len(runs) - len(done)}
        if done:
            metric = done[0]["metric"]
            values = [r[metric] for r in done]
            row.update(metric=metric, mean=float(np.mean(values)), min=min(values), max=max(values),
                       train_loss=float(np.mean([r["train_loss"] for r in done])),
                       skipped_steps=float(np.mean([r["skipped_steps"] for r in done])))
        rows[name] = row
    ref = rows.get("float32", {})
    for row in rows.values():
        if "mean" in row and "mean" in ref:
            row["delta_points"] = 100.0 * (row["mean"] - ref["mean"])
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="synthetic", help=f"one of {list(finetune.TASKS)}")
    parser.add_argument("--workdir", required=True, help="each variant runs in WORKDIR/<variant>")
    parser.add_argument("--variants", default="float32,bfloat16,float16,float16_unscaled",
                        help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each variant runs once per seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant, e.g. num_train_steps=500 (repeatable)")
    args = parser.parse_args(argv)
    if args.task not in finetune.TASKS:
        parser.error(f"unknown task {args.task!r}; allowed: {list(finetune.TASKS)}")
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    probe = finetune.get_config(args.task)
    for assignment in args.set:  # bad overrides fail here, before any training
        try:
            _apply_override(probe, assignment)
        except (ValueError, TypeError, KeyError) as e:
            parser.error(str(e))

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or min(seeds) < 0:
        parser.error("--seeds needs at least one seed >= 0")

    rows = run(args.task, args.workdir, names, seeds, args.set)
    table = [{"variant": n, "metric": r.get("metric", "-"), "mean": r.get("mean", "-"), "min": r.get("min", "-"),
              "max": r.get("max", "-"), "delta_points": r.get("delta_points", "-"),
              "train_loss": r.get("train_loss", "-"), "skipped_steps": r.get("skipped_steps", "-"),
              "failed_runs": r["failed"]} for n, r in rows.items()]
    common.print_table(table, ["variant", "metric", "mean", "min", "max", "delta_points", "train_loss",
                               "skipped_steps", "failed_runs"],
                       f"Training precision on {args.task}, seeds {seeds} (dev; delta: mean vs float32's mean, "
                       "in points)")
    payload = {"task": args.task, "seeds": seeds, "overrides": args.set, "variants": rows}
    common.write_json(os.path.join(args.workdir, "precision_train.json"), payload)
    return payload


if __name__ == "__main__":
    main()
