"""The jobs that start from a saved model without training it: head pruning, post-training int8, ONNX export.

Each is ``fn(config, workdir) -> results`` over its config (``experiments/configs/{prune,quantize,export}.py``),
registered in :mod:`experiments.jobs.registry`, so ``experiments.main`` runs it and a recipe uses it as a stage.
Every one writes ``workdir/results.json`` last.
"""

from __future__ import annotations

import os

import models
from compression import quantization as q
from experiments.data import load_task
from experiments.runtime import evaluation, observe, selection
from experiments.runtime.config_validation import ConfigError
from experiments.techniques import qat
from models import storage


def _write_results(workdir: str, results: dict) -> None:
    observe.write_json(os.path.join(workdir, "results.json"), results)  # written last: the stage is done


def _require_model_dir(config) -> str:
    if not config.model_dir or not storage.is_file(os.path.join(config.model_dir, models.io.CONFIG_FILE)):
        raise ConfigError(f"config.model_dir={config.model_dir!r} is not a model directory (DIR/model of a job)")
    return config.model_dir


def task_for(config, model_dir: str):
    """``config.task`` encoded for ``model_dir``'s tokenizer, at the length the model was trained with, with
    the selection split the model was trained without (its ``extra.selection``)."""
    meta = models.read_meta(model_dir)["extra"]
    return load_task(config.task, config.data_dir, tokenizer=model_dir, max_length=meta.get("max_length", 128),
                     synthetic_size=config.synthetic_size, seed=config.seed,
                     selection=selection.task_arg_of_model(meta, model_dir))


def prune(config, workdir: str) -> dict:
    """Head pruning to ``max_drop`` and compaction (:func:`experiments.tools.prune.prune_and_compact`)."""
    from experiments.tools import prune as prune_tool
    model_dir = _require_model_dir(config)
    return prune_tool.prune_and_compact(model_dir, task_for(config, model_dir), workdir, max_drop=config.max_drop,
                                        step=config.step, max_fraction=config.max_fraction,
                                        importance_examples=config.importance_examples, seed=config.seed)


def quantize(config, workdir: str) -> dict:
    """Post-training int8 of a Transformer: calibrate on training batches, score the fake-quantized and the
    real int8 model on dev; writes the ``quant`` collection (``quant_state.npz``) for export and the report."""
    model_dir = _require_model_dir(config)
    task = task_for(config, model_dir)
    model, _, params = models.load(model_dir)
    inputs = evaluation.TRANSFORMER_INPUTS
    calib = evaluation.calibration_batches(task.train, inputs, config.calibration_batches, seed=config.seed)
    variables = q.post_training_quantize(model.apply, params, calib, config.calibrator, inputs=inputs)
    fp32 = evaluation.dev_metrics(model.apply, {"params": params}, task, inputs)
    fake = evaluation.dev_metrics(q.fake_quant().wrap(model.apply), variables, task, inputs)
    v8 = q.int8_variables(model.apply, variables, calib[0], inputs=inputs)
    real = evaluation.dev_metrics(q.int8().wrap(model.apply), v8, task, inputs)
    storage.makedirs(workdir)
    qat.save_quant_state(os.path.join(workdir, qat.QUANT_STATE_FILE), variables[q.QUANT])
    name = task.metric_names[0]
    results = {"source_model": model_dir, "calibrator": config.calibrator, "metric_names": task.metric_names,
               "float32": fp32, "fake_quant": fake, "int8": real, "final": real, "best": real,
               "variants": [{"kind": "int8", "source_model": model_dir, "quant_state": qat.QUANT_STATE_FILE,
                             "metric_name": name, "metric": real[name]}]}
    _write_results(workdir, results)
    return results


def named_paths(text: str, field: str) -> dict[str, str]:
    """``"a=DIR,b=DIR"`` -> ``{"a": "DIR", "b": "DIR"}``; ConfigError naming ``field`` when malformed."""
    out = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in out:
            raise ConfigError(f"config.{field}: {item!r} is not NAME=PATH (names unique), in {text!r}")
        out[name] = path
    return out


def export(config, workdir: str) -> dict:
    """ONNX files of each model (``workdir/<name>/``) with parity reports and matmul FLOPs by format; int8 Q/DQ
    with a quant state from ``config.quant_states``, or the file of the scales a QAT model directory carries
    (int8, FP8, or its precision plan's: :func:`experiments.techniques.qat.carried_rules`)."""
    from experiments.tools import export as export_tool
    model_dirs = named_paths(config.models, "models")
    quant_states = named_paths(config.quant_states, "quant_states")
    if not model_dirs:
        raise ConfigError("config.models names no model (NAME=DIR, comma-separated)")
    unknown = sorted(set(quant_states) - set(model_dirs))
    if unknown:
        raise ConfigError(f"config.quant_states names {unknown}, which config.models does not")
    precisions = [p.strip() for p in config.precisions.split(",") if p.strip()]
    results = {"models": {}}
    for name, model_dir in model_dirs.items():
        carried = qat.quant_state_path(model_dir)  # a QAT model carries its own scales (int8, FP8 or a plan's)
        path = quant_states.get(name) or (carried if storage.is_file(carried) else None)
        quant_state = qat.load_quant_state(path) if path else None
        state_precision, plan = "int8", None
        if quant_state is not None and path == carried:
            state_precision, _, plan = qat.carried_rules(model_dir)
        wanted = precisions + ([state_precision] if quant_state is not None else [])
        report = export_tool.export_model_dir(model_dir, os.path.join(workdir, name), wanted, quant_state=quant_state,
                                              plan=plan, state_precision=state_precision, overwrite=True)
        files = {f: {"max_abs_diff": max(c["max_abs_diff"] for c in r["comparisons"]),
                     "bound": max(c["bound"] for c in r["comparisons"]), "op_counts": r["op_counts"],
                     "precision": f.removeprefix("model_").removesuffix(".onnx"),
                     "matmul_flops": r["matmul_flops"]["fractions"],
                     "size_mb": storage.size(os.path.join(workdir, name, f)) / 2 ** 20}
                 for f, r in report["files"].items()}
        if config.evaluate:
            _score_onnx_files(config, model_dir, os.path.join(workdir, name), files)
        results["models"][name] = {"model_dir": model_dir, "files": files}
    _write_results(workdir, results)
    return results


def _score_onnx_files(config, model_dir: str, out_dir: str, files: dict) -> None:
    """Adds ``metrics`` (the task's, on dev, in onnxruntime) to each entry of ``files``."""
    from experiments.tools.export_eval import onnx_logits
    *_, task = evaluation.load_model_task(model_dir, data_dir=config.data_dir, synthetic_size=config.synthetic_size,
                                          seed=config.seed)
    for f, entry in files.items():
        preds = evaluation.Predictions.collect(onnx_logits(os.path.join(out_dir, f), task, 32))
        entry["metrics"] = preds.metrics(task)
