"""Task accuracy of a model directory's ONNX exports in onnxruntime, beside the JAX model they came from.

    python -m experiments.tools.export_eval --model=DIR --task=sst2 --data_dir=../shared/data/sst2 --out=OUT \
        [--precision=fp32,fp16,int8,fp8] [--calib_batches=16] [--calib_method=percentile:99.99]

Exports the model with :func:`experiments.tools.export.export_model_dir` (int8 activation scales: those a
QAT model directory carries in ``quant_state.npz``, else calibrated on shuffled training batches of the
task; FP8 scales calibrated on the same batches), then scores the dev split with: the JAX model (float32), the
JAX fake-quantized int8 and FP8 models (when requested: what the Q/DQ graphs are meant to compute), and each
ONNX file in onnxruntime (CPU,
``ORT_ENABLE_ALL``, onnxruntime's default). Reports the task metrics, the change in accuracy points against
JAX float32 and the share of dev predictions that agree with it; prints a table and writes ``OUT/eval.json``
beside the ONNX files. Sequence-classification tasks of the Transformer family (the tokenizer comes from the
model directory).

Every flag is checked when parsed, before anything is loaded: a Transformer model directory, a known task
name, an existing data folder, the precisions, the calibration method, the numbers, and ``--out`` not existing
without ``--overwrite``. Nothing is cached: the export is redone on every run. Paths may be local or in a bucket
(``gs://``, :mod:`models.storage`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags

import models
from compression.export import ExportError
from experiments.runtime.measuring import print_table, write_json
from experiments.runtime import evaluation
from experiments.runtime.metrics import classification_metrics
from experiments.techniques import qat
from experiments.tools.export import export_model_dir, onnx_feed
from models import storage

INPUTS = evaluation.TRANSFORMER_INPUTS
PRECISIONS = ("fp32", "fp16", "int8", "fp8")


def onnx_logits(path: str, task, batch_size: int):
    """``(logits, batch)`` of an ONNX file (of any family) in onnxruntime (CPU) over ``task.dev``, as
    :func:`experiments.runtime.evaluation.dev_logits` yields them for the JAX model."""
    import onnxruntime as ort
    with storage.local_copy(path) as local:  # the session reads the whole file when made
        sess = ort.InferenceSession(local, providers=["CPUExecutionProvider"])
    out = [o.name for o in sess.get_outputs()].index("logits")
    names = [i.name for i in sess.get_inputs()]
    for b in task.dev.batches(batch_size, shuffle=False, drop_remainder=False):
        yield sess.run(None, onnx_feed(b, names))[out], b


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
    if max_examples is not None:
        data = dataclasses.replace(data, dev=data.dev.select(range(min(max_examples, len(data.dev)))))
    model, config, params = models.load(model_dir)
    if config.num_labels != data.num_labels:
        raise ExportError(f"the model has {config.num_labels} labels, task {task!r} has {data.num_labels}")
    qvars = fp8vars = calibration = None
    carried = qat.quant_state_path(model_dir)
    if "int8" in precisions and storage.is_file(carried):  # a QAT model's own scales: what it trained with
        qvars = {"params": params, q.QUANT: qat.load_quant_state(carried)}
    elif "int8" in precisions:
        calibration = evaluation.calibration_batches(data.train, INPUTS, calib_batches, batch_size)
        qvars = q.calibrate(model.apply, {"params": params}, calibration, method=calib_method)
    if "fp8" in precisions:  # the export calibrates on the same batches: the same scales
        calibration = calibration or evaluation.calibration_batches(data.train, INPUTS, calib_batches, batch_size)
        fp8vars = q.calibrate(model.apply, {"params": params}, calibration, q.FP8_RULES, method=calib_method)
    report = export_model_dir(model_dir, out_dir, precisions, quant_state=qvars and qvars[q.QUANT],
                              calibration=calibration if fp8vars is not None else None, calib_method=calib_method,
                              outputs=["logits"], overwrite=overwrite)

    jax_models = {"jax_fp32": (model.apply, {"params": params})}
    if qvars is not None:
        jax_models["jax_int8_fake_quant"] = (q.fake_quant().wrap(model.apply), qvars)
    if fp8vars is not None:
        jax_models["jax_fp8_fake_quant"] = (q.fake_quant(q.FP8_RULES).wrap(model.apply), fp8vars)
    predictions = {name: evaluation.dev_predictions(fn, v, data, INPUTS, batch_size)
                   for name, (fn, v) in jax_models.items()}
    for p in precisions:
        predictions[f"onnx_{p}"] = evaluation.Predictions.collect(
            onnx_logits(os.path.join(out_dir, f"model_{p}.onnx"), data, batch_size))

    rows = []
    for name, pred in predictions.items():
        scores = classification_metrics(*map(np.concatenate, (pred.preds, pred.labels)), data.num_labels,
                                        np.concatenate(pred.weights))
        base = rows[0]["accuracy"] if rows else scores["accuracy"]
        rows.append({"name": name, **scores, "delta_points": 100.0 * (scores["accuracy"] - base),
                     "agreement": pred.agreement(predictions["jax_fp32"])})
    n_dev = len(data.dev)
    result = {"task": task, "dev_examples": n_dev, "rows": rows, "export": report}
    print_table(rows, ["name", "accuracy", *[m for m in ("f1", "mcc") if m in rows[0]], "delta_points", "agreement"],
                title=f"{task} dev ({n_dev} examples): JAX vs exported ONNX in onnxruntime")
    write_json(os.path.join(out_dir, "eval.json"), result)
    return result


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    from experiments.runtime import cli

    flags.DEFINE_string("model", None, "fine-tuned Transformer model directory (models.save)", flag_values=fv)
    flags.DEFINE_string("task", None, "task name (experiments.data.load_task), e.g. sst2", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "the task's data directory", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory for the ONNX files and eval.json", flag_values=fv)
    flags.DEFINE_list("precision", "fp32,fp16,int8", f"comma-separated subset of {','.join(PRECISIONS)}",
                      flag_values=fv)
    flags.DEFINE_integer("calib_batches", 16, "int8 calibration batches", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("calib_method", None, "max, percentile:99.99, mse or entropy", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "calibration and dev batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_length", 128, "longest sequence", lower_bound=4, flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace --out if it exists", flag_values=fv)
    flags.mark_flags_as_required(["model", "task", "out"], flag_values=fv)
    cli.model_dir(fv, "model", ["transformer"])
    cli.task(fv, "task")
    cli.directory(fv, "data_dir")
    cli.subset(fv, "precision", PRECISIONS)
    cli.calibrator(fv, "calib_method")
    cli.new_output(fv, "out")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    evaluate_exports(FLAGS.model, FLAGS.task, FLAGS.data_dir, FLAGS.out, FLAGS.precision,
                     calib_batches=FLAGS.calib_batches, calib_method=FLAGS.calib_method, batch_size=FLAGS.batch_size,
                     max_length=FLAGS.max_length, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    define_flags()
    app.run(main)
