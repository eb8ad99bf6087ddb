"""Inference precision of a trained model: dev metrics and logit drift under float32, bfloat16 and float16,
with the float32 islands and with each island turned off.

    python -m experiments.tools.precision_eval --model_dir=/tmp/sst2/model --data_dir=../shared/data/sst2 \\
        --out=/tmp/sst2_precision.json

``--model_dir`` is a Transformer model directory written by ``models.save`` (every training job writes
one to ``WORKDIR/model``, with its tokenizer); the task and ``max_length`` default to what the directory's
metadata records. Every variant runs the same float32 master weights through
:func:`compression.precision.policy`:

* ``float32``: the reference;
* ``bfloat16`` and ``float16`` with all islands on (softmax, attention scores, LayerNorm, logits in float32);
* the same with one island off at a time (``-softmax`` ...), and with all of them off (``-all``).

XLA may keep float32 intermediates inside a fused 16-bit kernel ("excess precision"; XLA on CPU evaluates
bfloat16 element-wise work in float32 and rounds once at the kernel's end), which hides what an island
protects: with the default flags the bfloat16 ``-softmax`` rows can equal the ``bfloat16`` row bit for bit.
For an ablation that rounds every operation to 16 bits, as a backend with native 16-bit arithmetic does,
run with ``XLA_FLAGS=--xla_allow_excess_precision=false`` (the flags are recorded in the JSON).

For each it reports the task's dev metrics, the difference to float32 in points of the first metric, the max
abs logit difference to float32 over real (unpadded) examples or tokens, and how many predictions differ
from float32's. Prints a table, writes JSON with ``--out``. Dev batches are padded to ``max_length`` so that
each variant compiles once. Expected runtime on 2 CPU cores for MiniLM on SST-2 dev (872 sentences): a few
minutes (13 variants; XLA on CPU runs 16-bit matmuls slower than float32).

Every flag is checked when parsed (a Transformer model directory, the data folder, a known task name, the
variant names, the numbers), and the task and ``max_length`` the model directory records before the data is
read. Nothing is cached: every variant's dev pass is redone on every run. Paths may be local or in a bucket
(``gs://``, :mod:`models.storage`).
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

import models
from compression import precision
from compression.sites import ISLAND_KINDS
from experiments.runtime import measuring
from experiments.data import TaskData
from experiments.runtime import evaluation
from experiments.runtime import cli
from models import storage

LOW = ("bfloat16", "float16")


def variants() -> dict[str, tuple[str, dict[str, bool]]]:
    """Variant name -> (policy name, islands switches): float32, then each 16-bit dtype with all islands,
    each island off alone, and all islands off."""
    out = {"float32": ("float32", {})}
    for dtype in LOW:
        out[dtype] = (dtype, {})
        for kind in ISLAND_KINDS:
            out[f"{dtype}-{kind}"] = (dtype, {kind: False})
        out[f"{dtype}-all"] = (dtype, {kind: False for kind in ISLAND_KINDS})
    return out


def evaluate(model, params, task: TaskData, *, batch_size: int = 64,
             names: list[str] | None = None) -> dict[str, dict]:
    """Dev metrics and drift of each variant (all of :func:`variants`, or ``names``), float32 first.

    Returns ``{variant: {"policy", "islands_off", <metrics>, "delta_points", "max_abs_logit_diff",
    "prediction_changes", "seconds"}}``; ``delta_points`` is 100 x (metric - float32's) of the task's first
    metric; the logit difference is over real examples (sequence tasks) or labelled tokens (token tasks).
    """
    table = variants()
    names = list(table) if names is None else ["float32"] + [n for n in names if n != "float32"]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(table)}")
    key = task.metric_names[0]
    results, ref = {}, None
    for name in names:
        policy_name, islands = table[name]
        start = time.perf_counter()
        p = evaluation.dev_predictions(precision.policy(policy_name, islands=islands).wrap(model.apply),
                                       {"params": params}, task, evaluation.TRANSFORMER_INPUTS, batch_size,
                                       keep_logits=True)
        logits, preds = np.concatenate(p.logits), np.concatenate(p.preds)  # one width: buckets=[max_length]
        real = evaluation.scored(np.concatenate(p.labels), np.concatenate(p.weights))
        row = {"policy": policy_name, "islands_off": sorted(k for k, on in islands.items() if not on),
               **p.metrics(task)}
        if ref is None:
            ref = (logits, preds, row[key])
        row["delta_points"] = 100.0 * (row[key] - ref[2])
        row["max_abs_logit_diff"] = float(np.max(np.abs(logits - ref[0])[real]))
        row["prediction_changes"] = int(np.sum((preds != ref[1])[real]))
        row["seconds"] = time.perf_counter() - start
        results[name] = row
        print(f"  {name}: {key} {row[key]:.4f} ({row['delta_points']:+.2f} points), max |dlogit| "
              f"{row['max_abs_logit_diff']:.3g}, {row['seconds']:.0f}s", flush=True)
    return results


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("model_dir", None, "Transformer model directory (models.save)", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "the task's data folder (none for synthetic tasks)", flag_values=fv)
    flags.DEFINE_string("task", None, "task name; default: the model directory's 'task'", flag_values=fv)
    flags.DEFINE_integer("max_length", None, "default: the model's 'max_length'", lower_bound=4, flag_values=fv)
    flags.DEFINE_integer("synthetic_size", 2000, "train size of a synthetic task", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "dev batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_list("variants", [], "comma-separated subset (float32 always runs); known: "
                      + ",".join(variants()), flag_values=fv)
    flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)
    flags.mark_flag_as_required("model_dir", flag_values=fv)
    cli.model_dir(fv, "model_dir", ["transformer"])
    cli.directory(fv, "data_dir")
    cli.task(fv, "task")
    cli.subset(fv, "variants", variants(), nonempty=False)


def run(fv: flags.FlagValues) -> dict:
    """The command line's work on parsed flags ``fv`` (:func:`define_flags`); returns the JSON payload."""
    extra = models.read_meta(fv.model_dir).get("extra", {})
    task_name = fv.task or extra.get("task")
    max_length = fv.max_length or extra.get("max_length")
    if not task_name or not max_length:
        raise app.UsageError(f"{fv.model_dir} records no task/max_length: pass --task and --max_length")

    model, _, params, task = evaluation.load_model_task(fv.model_dir, task_name, fv.data_dir,
                                                        max_length=max_length, synthetic_size=fv.synthetic_size,
                                                        buckets=[max_length])
    env = measuring.environment()
    print(f"{task.name}: {len(task.dev)} dev examples, max_length {max_length}; {env['platform']} "
          f"({env['device']}); XLA_FLAGS={env['xla_flags']!r}", flush=True)
    results = evaluate(model, params, task, batch_size=fv.batch_size, names=fv.variants or None)

    key = task.metric_names[0]
    rows = [{"variant": name, key: r[key], "delta_points": r["delta_points"],
             "max_abs_logit_diff": r["max_abs_logit_diff"], "prediction_changes": r["prediction_changes"]}
            for name, r in results.items()]
    measuring.print_table(rows, ["variant", key, "delta_points", "max_abs_logit_diff", "prediction_changes"],
                       f"{task.name} dev, {storage.absolute(fv.model_dir)} (islands: float32 unless '-kind' "
                       "turns one off)")
    payload = {"model_dir": storage.absolute(fv.model_dir), "task": task.name, "dev_examples": len(task.dev),
               "max_length": max_length, "metric": key, "results": results}
    measuring.write_json(fv.out, payload)
    return payload


if __name__ == "__main__":
    cli.run_script(define_flags, run)
