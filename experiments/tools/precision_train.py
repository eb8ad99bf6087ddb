"""Training precision: the same fine-tuning run in float32, bfloat16 and float16 (with and without dynamic
loss scaling), side by side, against float32's dev metric.

    python -m experiments.tools.precision_train --workdir=/tmp/precision_train
    python -m experiments.tools.precision_train --config=experiments/configs/finetune.py:sst2 \\
        --config.num_train_steps=700 --workdir=/tmp/sst2_prec --variants=float32,float16

Each variant runs the fine-tuning job (:func:`experiments.jobs.registry.run`) on the ``--config`` file's config
(default: ``experiments/configs/finetune.py:synthetic``, overrides as ``--config.a.b=value``, as in
``experiments.main``) once per ``--seeds`` seed (a seed fixes initialisation, dropout and data order, the
same for every variant) in ``WORKDIR/<variant>/seed_<s>``; each run sets ``precision``,
``loss_scale.dynamic`` and ``seed`` itself. Several seeds matter: where training passes a plateau (the
synthetic task does), 16-bit rounding changes when it escapes, and single runs of the same precision already
differ by points. Variants:

* ``float32``: the reference;
* ``bfloat16``: bfloat16 compute (float32's exponent range: no loss scaling needed);
* ``float16``: float16 compute with dynamic loss scaling (``config.loss_scale.dynamic``);
* ``float16_unscaled``: float16 without loss scaling (warns; shows what the scaling buys).

Prints a table (dev metric mean / min / max over seeds, mean difference to float32 in points, final train
loss, skipped steps) and writes ``WORKDIR/precision_train.json`` (per-run details included). A variant whose
run fails (e.g. a non-finite loss without loss scaling) is reported with its error instead of stopping the
others. The acceptance target: float16 with loss scaling within 0.5 points of float32. Runtime: the task's
run time per variant (synthetic: about a minute or two each on 2 CPU cores, more for 16 bits, which XLA on
CPU runs slowly).

Every flag is checked when parsed, before any training: the config file and each override (an unknown field
or a value of the wrong type fails naming it), the variant names and the seeds. What a rerun reuses: each run
is a fine-tuning run in its own folder, which resumes from that folder's checkpoints, so rerunning the
same command after an interruption continues each run instead of starting it over; the table and JSON are
rebuilt from the runs. ``--workdir`` may be local or in a bucket (``gs://``, :mod:`models.storage`).
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments.runtime import measuring
from experiments.configs import finetune
from experiments.runtime import cli
from models import storage

VARIANTS = {  # name -> (config.precision, config.loss_scale.dynamic)
    "float32": ("float32", False),
    "bfloat16": ("bfloat16", False),
    "float16": ("float16", True),
    "float16_unscaled": ("float16", False),
}


def _train_log(workdir: str) -> list[dict]:
    lines = storage.read_text(os.path.join(workdir, "metrics.jsonl")).splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def _one_run(base, vdir: str, name: str, seed: int) -> dict:
    """One fine-tuning run of variant ``name`` on a copy of config ``base``; a failure is returned as
    ``{"error": ...}``."""
    from experiments.jobs import registry  # heavy import after argument checks

    config = copy.deepcopy(base)
    config.precision, config.loss_scale.dynamic = VARIANTS[name]
    config.seed = seed
    config.progress_bar = "off"
    start = time.time()
    print(f"\n=== {name} seed {seed}: precision={config.precision} loss_scale.dynamic={config.loss_scale.dynamic}"
          f" -> {vdir}", flush=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = registry.run(config, vdir)
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


def train_variants(config, workdir: str, names: list[str], seeds: list[int]) -> dict[str, dict]:
    """Trains each variant with each seed on ``config`` (a fine-tuning ConfigDict) in
    ``WORKDIR/<variant>/seed_<s>``; returns ``{variant: row}`` with the per-seed runs, the mean / min / max of
    the dev metric over the seeds that finished, and ``delta_points`` = 100 x (mean - float32's mean)."""
    rows = {}
    for name in names:
        runs = {seed: _one_run(config, os.path.join(workdir, name, f"seed_{seed}"), name, seed)
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


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS, argv: list[str] | None = None) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none);
    ``argv`` (default ``sys.argv``) is where ml_collections finds the ``--config.a.b=value`` overrides."""
    try:
        config_flags.DEFINE_config_file("config", f"{finetune.__file__}:synthetic", "fine-tuning config file[:task]; "
                                        "override fields with --config.a.b=value", flag_values=fv, sys_argv=argv)
    except AttributeError as e:  # ml_collections' word for an override of a field the config lacks
        raise flags.IllegalFlagValueError(f"a --config.* override names no field of the config: {e}") from None
    flags.DEFINE_string("workdir", None, "each variant runs in WORKDIR/<variant>/seed_<s>", flag_values=fv)
    flags.DEFINE_list("variants", list(VARIANTS), f"comma-separated subset of {','.join(VARIANTS)}",
                      flag_values=fv)
    flags.DEFINE_list("seeds", ["0"], "comma-separated seeds; each variant runs once per seed", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    cli.subset(fv, "variants", VARIANTS)
    cli.integers(fv, "seeds", minimum=0)


def run(fv: flags.FlagValues) -> dict:
    """The command line's work on parsed flags ``fv`` (:func:`define_flags`); returns the JSON payload."""
    config, seeds = fv.config, [int(s) for s in fv.seeds]
    rows = train_variants(config, fv.workdir, fv.variants, seeds)
    table = [{"variant": n, "metric": r.get("metric", "-"), "mean": r.get("mean", "-"), "min": r.get("min", "-"),
              "max": r.get("max", "-"), "delta_points": r.get("delta_points", "-"),
              "train_loss": r.get("train_loss", "-"), "skipped_steps": r.get("skipped_steps", "-"),
              "failed_runs": r["failed"]} for n, r in rows.items()]
    measuring.print_table(table, ["variant", "metric", "mean", "min", "max", "delta_points", "train_loss",
                               "skipped_steps", "failed_runs"],
                       f"Training precision on {config.task}, seeds {seeds} (dev; delta: mean vs float32's mean, "
                       "in points)")
    payload = {"task": config.task, "seeds": seeds, "config": config.to_dict(), "variants": rows}
    measuring.write_json(os.path.join(fv.workdir, "precision_train.json"), payload)
    return payload


if __name__ == "__main__":
    cli.run_script(define_flags, run)
