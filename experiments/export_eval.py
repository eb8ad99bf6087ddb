"""Task accuracy of a model directory's ONNX exports in onnxruntime, beside the JAX model they came from.

    python -m experiments.export_eval --model DIR --task sst2 --data_dir ../shared/data/sst2 --out OUT \
        [--precision fp32,fp16,int8] [--calib_batches 16] [--calib_method percentile:99.99]

Exports the model with :func:`experiments.export.export_model_dir` (int8 activation scales calibrated on
shuffled training batches of the task), then scores the dev split with: the JAX model (float32), the JAX
fake-quantized int8 model (when int8 is requested: what the int8 graph is meant to compute), and each ONNX
file in onnxruntime (CPU, ``ORT_ENABLE_ALL``, onnxruntime's default). Reports the task metrics, the change
in accuracy points against JAX float32 and the share of dev predictions that agree with it; prints a table
and writes ``OUT/eval.json`` beside the ONNX files. Sequence-classification tasks of the Transformer family
(the tokenizer comes from the model directory).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

import models
from compression.export import ExportError
from experiments.benchmarks.common import print_table, write_json
from experiments.export import calibration_batches, export_model_dir, output_fields
from experiments.metrics import classification_metrics

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _predict_jax(apply_fn, variables, batches) -> np.ndarray:
    logits = jax.jit(lambda v, b: output_fields(apply_fn, ["logits"])(v, **b)["logits"])
    return np.concatenate([np.asarray(logits(variables, b)).argmax(-1) for b in batches])


def _predict_onnx(path: str, batches) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = [o.name for o in sess.get_outputs()].index("logits")
    return np.concatenate([sess.run(None, b)[out].argmax(-1) for b in batches])


def evaluate_exports(model_dir: str, task: str, data_dir: str | None, out_dir: str,
                     precisions: Sequence[str] = ("fp32", "fp16", "int8"), *, calib_batches: int = 16,
                     calib_method: str | None = None, batch_size: int = 32, max_length: int = 128,
                     max_examples: int | None = None, overwrite: bool = False, **task_kwargs) -> dict:
    """Exports ``model_dir`` into ``out_dir`` and scores the dev split of ``task`` (see the module docstring).

    Returns ``{"rows": [...], "export": parity report}``; each row has ``name``, the task metrics,
    ``delta_points`` (accuracy minus JAX float32's, in points) and ``agreement`` (share of dev predictions
    equal to JAX float32's).
    """
    from compression import quantization as q
    from experiments.data import load_task

    meta = models.read_meta(model_dir)
    if meta["family"] != "transformer":
        raise ExportError(f"export_eval scores Transformer models; {model_dir} is a {meta['family']!r} model")
    data = load_task(task, data_dir, tokenizer=model_dir, max_length=max_length, **task_kwargs)
    if data.kind != "sequence":
        raise ExportError(f"export_eval scores sequence-classification tasks; {task!r} is a {data.kind} task")
    dev = data.dev if max_examples is None else data.dev.select(range(min(max_examples, len(data.dev))))
    batches, labels, weights = [], [], []
    for b in dev.batches(batch_size):
        batches.append({k: b[k] for k in INPUTS})
        labels.append(b["labels"])
        weights.append(b["example_weight"])
    labels, weights = np.concatenate(labels), np.concatenate(weights)

    model, config, params = models.load(model_dir)
    if config.num_labels != data.num_labels:
        raise ExportError(f"the model has {config.num_labels} labels, task {task!r} has {data.num_labels}")
    qvars = None
    if "int8" in precisions:
        calibration = calibration_batches(data.train, calib_batches, batch_size)
        qvars = q.calibrate(model.apply, {"params": params}, calibration, method=calib_method)
    report = export_model_dir(model_dir, out_dir, precisions, quant_state=qvars and qvars[q.QUANT],
                              outputs=["logits"], overwrite=overwrite)

    predictions = {"jax_fp32": _predict_jax(model.apply, {"params": params}, batches)}
    if qvars is not None:
        predictions["jax_int8_fake_quant"] = _predict_jax(q.fake_quant().wrap(model.apply), qvars, batches)
    for p in precisions:
        predictions[f"onnx_{p}"] = _predict_onnx(os.path.join(out_dir, f"model_{p}.onnx"), batches)

    real = weights > 0
    rows = []
    base = None
    for name, pred in predictions.items():
        metrics = classification_metrics(pred, labels, data.num_labels, weights)
        base = metrics["accuracy"] if base is None else base
        rows.append({"name": name, **metrics, "delta_points": 100.0 * (metrics["accuracy"] - base),
                     "agreement": float(np.mean(pred[real] == predictions["jax_fp32"][real]))})
    result = {"task": task, "dev_examples": int(real.sum()), "rows": rows, "export": report}
    print_table(rows, ["name", "accuracy", *[m for m in ("f1", "mcc") if m in rows[0]], "delta_points", "agreement"],
                title=f"{task} dev ({int(real.sum())} examples): JAX vs exported ONNX in onnxruntime")
    write_json(os.path.join(out_dir, "eval.json"), result)
    return result


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="fine-tuned model directory (models.save)")
    parser.add_argument("--task", required=True, help="task name (experiments.data.load_task), e.g. sst2")
    parser.add_argument("--data_dir", default=None, help="the task's data directory")
    parser.add_argument("--out", required=True, help="output directory for the ONNX files and eval.json")
    parser.add_argument("--precision", default="fp32,fp16,int8")
    parser.add_argument("--calib_batches", type=int, default=16)
    parser.add_argument("--calib_method", default=None, help="max, percentile:99.99, mse or entropy")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    evaluate_exports(args.model, args.task, args.data_dir, args.out,
                     [p.strip() for p in args.precision.split(",") if p.strip()], calib_batches=args.calib_batches,
                     calib_method=args.calib_method, batch_size=args.batch_size, max_length=args.max_length,
                     overwrite=args.overwrite)


if __name__ == "__main__":
    main()
