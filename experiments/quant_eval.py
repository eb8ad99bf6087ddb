"""Dev-set quality of a saved Transformer under float32, post-training int8 quantization and real int8.

    python -m experiments.quant_eval --model_dir runs/sst2/model --data_dir ../shared/data \
        --calibrators max,percentile:99.99,mse,entropy --calib_examples 512 --out runs/sst2/quant.json

``--model_dir`` is a model directory written by ``train_and_evaluate`` (``models.save``: params, config, the
tokenizer, and ``extra.task``/``extra.max_length``, which ``--task``/``--max_length`` override). Calibration uses
the first ``--calib_examples`` examples (rounded to whole batches) of the shuffled train split (``--seed``), never
the dev split. Rows:

* ``float32``: the model as trained;
* ``ptq:<calibrator>``: simulated int8 (fake quantization, :func:`compression.quantization.fake_quant`) with the
  default rules: per-output-channel int8 weights, per-tensor int8 activations at every Dense input calibrated by
  that calibrator, one shared scale for query/key/value; all calibrators from one statistics collection
  (:func:`compression.quantization.post_training_variants`);
* ``int8:<calibrator>``: the same variables converted to int8 kernels and run with int8 x int8 -> int32 matmuls
  (:func:`compression.quantization.int8`), for ``--int8_calibrator`` (default: the best PTQ row on dev, so the
  int8 row says how far real int8 is from the simulation it must reproduce: ``agreement_with_ptq`` is the
  fraction of dev examples with the same prediction, the issue's bar is accuracy within 0.1 point).

Each row reports the task's metrics (accuracy, F1, MCC for binary tasks), ``delta_vs_float32`` of the first
metric in points, ``agreement_with_float32`` and ``dev_seconds``, the wall time of the dev pass (compilation
included: not a speed figure; see ``experiments/benchmarks/bench_int8.py`` for speed). Sequence-classification tasks
only (the task's ``kind`` must be ``"sequence"``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

import models
from compression import quantization as q
from experiments import metrics
from experiments.benchmarks import common
from experiments.data import TaskData, load_task

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_model_and_task(model_dir: str, data_dir: str | None = None, task: str | None = None,
                        max_length: int | None = None, seed: int = 0, synthetic_size: int = 2000):
    """``(model, params, task)`` of a model directory; the task is encoded with the directory's tokenizer."""
    meta = models.io.read_meta(model_dir)
    if meta["family"] != "transformer":
        raise ValueError(f"{model_dir}: quant_eval evaluates Transformer model directories, got family "
                         f"{meta['family']!r}")
    extra = meta.get("extra", {})
    task_name = task or extra.get("task")
    if not task_name:
        raise ValueError(f"{model_dir}/config.json names no task (extra.task); pass --task")
    model, cfg, params = models.load(model_dir)
    data = load_task(task_name, data_dir, tokenizer=model_dir,
                     max_length=max_length or extra.get("max_length") or cfg.max_position_embeddings,
                     seed=seed, synthetic_size=synthetic_size)
    if data.kind != "sequence":
        raise ValueError(f"task {task_name!r} is a {data.kind} task; quant_eval scores sequence classification")
    if data.num_labels != cfg.num_labels:
        raise ValueError(f"task {task_name!r} has {data.num_labels} labels, the model's head {cfg.num_labels}")
    return model, params, data


def calibration_batches(task: TaskData, examples: int, batch_size: int, seed: int) -> list[dict]:
    """The model inputs of the first ``examples`` examples of the shuffled train split, rounded to whole batches
    of ``batch_size`` (at least one; all of the split if it is smaller): equal batch shapes compile once."""
    if examples < 1:
        raise ValueError(f"calib_examples must be >= 1, got {examples}")
    n_batches = max(1, round(min(examples, len(task.train)) / batch_size))
    out = []
    for batch in task.train.batches(batch_size, shuffle=True, seed=seed):
        real = batch["example_weight"] > 0
        out.append({k: batch[k][real] for k in MODEL_INPUTS if k in batch})
        if len(out) == n_batches:
            break
    return out


def forward(apply_fn: Callable) -> Callable:
    """``fwd(variables, batch) -> predictions int32 [B]``, jitted once per apply function (variables of the same
    structure, e.g. every calibrator's, share its compilations)."""
    return jax.jit(lambda v, b: apply_fn(v, **{k: b[k] for k in MODEL_INPUTS}).logits.argmax(-1))


def predict(fwd: Callable, variables, task: TaskData, batch_size: int) -> tuple[np.ndarray, ...]:
    """``(predictions, labels, weights)`` of :func:`forward` ``fwd`` over the dev split (padding rows: weight 0)."""
    preds, labels, weights = [], [], []
    for batch in task.dev.batches(batch_size, shuffle=False, drop_remainder=False):
        preds.append(np.asarray(fwd(variables, {k: batch[k] for k in MODEL_INPUTS})))
        labels.append(batch["labels"])
        weights.append(batch["example_weight"])
    return np.concatenate(preds), np.concatenate(labels), np.concatenate(weights)


def _agreement(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    return float(np.sum((a == b) * w) / np.sum(w))


def evaluate_quantized(model, params, task: TaskData, calibrators: Sequence[str] = q.PTQ_CALIBRATORS, *,
                       calib_examples: int = 512, batch_size: int = 32, int8_calibrator: str | None = None,
                       seed: int = 0) -> list[dict]:
    """The rows described in the module docstring, float32 first."""
    if not calibrators:
        raise ValueError("give at least one calibrator")
    if int8_calibrator is not None and int8_calibrator not in calibrators:
        raise ValueError(f"int8_calibrator {int8_calibrator!r} is not among the calibrators {list(calibrators)}")
    key = task.metric_names[0]
    rows, preds = [], {}

    def add(name, fwd, variables, **more):
        start = time.perf_counter()
        p, y, w = predict(fwd, variables, task, batch_size)
        scores = metrics.classification_metrics(p, y, task.num_labels, w)
        preds[name] = p
        row = {"variant": name, **{m: scores[m] for m in task.metric_names},
               "delta_vs_float32": 100 * (scores[key] - rows[0][key]) if rows else 0.0,
               "agreement_with_float32": _agreement(p, preds["float32"], w), "dev_seconds": time.perf_counter() - start,
               **more}
        rows.append(row)
        return row, w

    add("float32", forward(model.apply), {"params": params})
    calib = calibration_batches(task, calib_examples, batch_size, seed)
    start = time.perf_counter()
    variants = q.post_training_variants(model.apply, params, calib, tuple(calibrators), inputs=MODEL_INPUTS)
    calib_seconds = time.perf_counter() - start
    fake = forward(q.fake_quant().wrap(model.apply))
    for name, variables in variants.items():
        add(f"ptq:{name}", fake, variables, calib_examples=sum(len(b["input_ids"]) for b in calib),
            calib_seconds=calib_seconds)
    if int8_calibrator is None:
        int8_calibrator = max(calibrators, key=lambda c: next(r[key] for r in rows if r["variant"] == f"ptq:{c}"))
    v8 = q.int8_variables(model.apply, variants[int8_calibrator], calib[0], inputs=MODEL_INPUTS)
    row, w = add(f"int8:{int8_calibrator}", forward(q.int8().wrap(model.apply)), v8)
    ptq_row = next(r for r in rows if r["variant"] == f"ptq:{int8_calibrator}")
    row["agreement_with_ptq"] = _agreement(preds[row["variant"]], preds[ptq_row["variant"]], w)
    row["delta_vs_ptq"] = 100 * (row[key] - ptq_row[key])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--data_dir", default=None, help="the task's data folder (not needed for synthetic tasks)")
    parser.add_argument("--task", default=None, help="default: the model directory's extra.task")
    parser.add_argument("--max_length", type=int, default=None, help="default: the model directory's")
    parser.add_argument("--calibrators", default=",".join(q.PTQ_CALIBRATORS))
    parser.add_argument("--calib_examples", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--int8_calibrator", default=None, help="default: the best PTQ calibrator on dev")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic_size", type=int, default=2000, help="synthetic tasks only")
    parser.add_argument("--out", default=None, help="JSON results path")
    args = parser.parse_args(argv)
    calibrators = [c for c in args.calibrators.split(",") if c]
    for c in calibrators:
        q.get_calibrator(c)  # unknown names fail before the model is loaded
    model, params, task = load_model_and_task(args.model_dir, args.data_dir, args.task, args.max_length,
                                              args.seed, args.synthetic_size)
    rows = evaluate_quantized(model, params, task, calibrators, calib_examples=args.calib_examples,
                              batch_size=args.batch_size, int8_calibrator=args.int8_calibrator, seed=args.seed)
    common.print_table(rows, ["variant", *task.metric_names, "delta_vs_float32", "agreement_with_float32",
                              "agreement_with_ptq", "delta_vs_ptq", "dev_seconds"],
                       f"{task.name} dev ({len(task.dev)} examples): float32 vs int8 PTQ vs real int8")
    common.write_json(args.out, {"model_dir": args.model_dir, "task": task.name, "dev_examples": len(task.dev),
                                 "rows": rows})
    return rows


if __name__ == "__main__":
    main()
