"""Compression recipes: a chain of stages over one model, each reading an earlier stage's model directory.

A recipe config (``experiments/configs/recipe.py``) lists ``stages`` in order; each stage has a section of
the same name with its ``kind`` and, except for fine-tuning, a ``source`` (the earlier stage whose ``model/``
it starts from). Kinds:

* ``finetune``: :func:`experiments.train.train_and_evaluate` (the teacher);
* ``distill``: :func:`experiments.distill.distill_and_evaluate` (``source`` is the teacher);
* ``theseus``: :func:`experiments.theseus.theseus_and_evaluate` (module replacement; ``source`` is the
  predecessor);
* ``prune``: head-importance pruning to a dev-metric budget, then compaction (:mod:`experiments.prune`);
* ``quantize``: post-training int8 quantization (calibrated fake-quant accuracy, real int8 execution);
* ``export``: ONNX files (fp32, fp16, int8 Q/DQ) with parity against the JAX model.

Each stage writes ``WORKDIR/<stage>/`` (its ``model/`` where it makes one, and ``results.json``). A stage whose
``results.json`` and outputs exist is skipped on a rerun; an interrupted training stage resumes from its
checkpoints. ``WORKDIR/recipe.json`` records the recipe: running a different recipe in the same workdir is an
error before any stage runs, as is a recipe whose stages do not fit together (a source that is not an earlier
stage, quantizing or pruning a model family the stage cannot handle, exporting a stage that made no model).
At the end the report (:mod:`experiments.report`) measures every model side by side and writes
``report.md``, ``report.html`` and the plots at the top of the workdir.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
from absl import logging

from experiments import config_validation

KINDS = ("finetune", "distill", "theseus", "prune", "quantize", "export")
TRAINING_KINDS = ("finetune", "distill", "theseus")
# Families each kind accepts as its source model.
ACCEPTS = {"distill": ("transformer",), "theseus": ("transformer",), "prune": ("transformer",),
           "quantize": ("transformer",),
           "export": ("transformer", "bilstm", "cnn_lstm")}


class RecipeError(ValueError):
    """A recipe whose stages do not fit together, or a workdir that belongs to another recipe."""


def stage_names(config) -> list[str]:
    names = [s.strip() for s in config.stages.split(",") if s.strip()]
    if not names:
        raise RecipeError("config.stages lists no stage")
    if len(set(names)) != len(names):
        raise RecipeError(f"config.stages names a stage twice: {names}")
    return names


def _family_of(config, name: str) -> str | None:
    """The model family stage ``name`` produces (None: it produces no model)."""
    stage = config[name]
    if stage.kind == "finetune":
        return "transformer"
    if stage.kind == "distill":
        return stage.config.student.family
    if stage.kind in ("theseus", "prune"):
        return "transformer"
    return None


def check_recipe(config) -> list[str]:
    """Raises :class:`RecipeError` naming the first stage that does not fit; returns the stage names."""
    names = stage_names(config)
    for i, name in enumerate(names):
        if name not in config:
            raise RecipeError(f"stage {name!r} has no config section config.{name}")
        stage = config[name]
        if stage.get("kind") not in KINDS:
            raise RecipeError(f"stage {name!r}: kind {stage.get('kind')!r} is not one of {list(KINDS)}")
        if stage.kind == "finetune":
            if i:
                raise RecipeError(f"stage {name!r}: fine-tuning must be the first stage")
            continue
        sources = [s.strip() for s in stage.source.split(",")] if stage.kind == "export" else [stage.source]
        for src in sources:
            if src not in names[:i]:
                raise RecipeError(f"stage {name!r} ({stage.kind}) starts from {src!r}, which is not an earlier "
                                  f"stage of {names}")
            family = _family_of(config, src)
            if family is None:
                raise RecipeError(f"stage {name!r} ({stage.kind}) starts from {src!r}, a {config[src].kind} "
                                  "stage that makes no model")
            if family not in ACCEPTS[stage.kind]:
                raise RecipeError(f"stage {name!r} ({stage.kind}) cannot start from {src!r}: a {family} model "
                                  f"(accepts {list(ACCEPTS[stage.kind])})")
    return names


def _recipe_record(config, names) -> dict:
    return {"stages": names, "kinds": {n: config[n].kind for n in names},
            "sources": {n: config[n].get("source") for n in names}, "task": config.task}


def _claim_workdir(workdir: str, record: dict) -> None:
    path = os.path.join(workdir, "recipe.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != record:
            raise RecipeError(f"{workdir} holds a different recipe ({old['stages']} on {old['task']}); use a new "
                              f"workdir for {record['stages']} on {record['task']}")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


def is_done(stage_dir: str, kind: str) -> bool:
    """A stage is finished when its results.json exists (written last) and, for model-making kinds, model/."""
    if not os.path.exists(os.path.join(stage_dir, "results.json")):
        return False
    return kind in ("quantize", "export") or os.path.exists(os.path.join(stage_dir, "model", "config.json"))


def _run_stage(config, name: str, workdir: str) -> None:
    stage = config[name]
    stage_dir = os.path.join(workdir, name)
    src_model = (lambda s: os.path.join(workdir, s, "model"))
    if stage.kind == "finetune":
        from experiments.train import train_and_evaluate
        train_and_evaluate(stage.config, stage_dir)
    elif stage.kind == "distill":
        from experiments.distill import distill_and_evaluate
        distill_and_evaluate(stage.config, stage_dir)  # teacher_dir: set by run_recipe from the source
    elif stage.kind == "theseus":
        from experiments.theseus import theseus_and_evaluate
        theseus_and_evaluate(stage.config, stage_dir)  # teacher_dir: set by run_recipe from the source
    elif stage.kind == "prune":
        from experiments import prune
        task = _task_for(config, src_model(stage.source))
        prune.prune_and_compact(src_model(stage.source), task, stage_dir, max_drop=stage.max_drop,
                                step=stage.step, max_fraction=stage.max_fraction,
                                importance_examples=stage.importance_examples)
    elif stage.kind == "quantize":
        quantize_stage(src_model(stage.source), _task_for(config, src_model(stage.source)), stage_dir,
                       calibrator=stage.calibrator, calibration_batches=stage.calibration_batches, seed=config.seed)
    elif stage.kind == "export":
        export_stage(config, [s.strip() for s in stage.source.split(",")], workdir, stage_dir,
                     precisions=tuple(p.strip() for p in stage.precisions.split(",")))


def _write_results(stage_dir: str, results: dict) -> None:
    os.makedirs(stage_dir, exist_ok=True)
    path = os.path.join(stage_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


def quantize_stage(model_dir: str, task, stage_dir: str, *, calibrator: str, calibration_batches: int,
                   seed: int = 0) -> dict:
    """Post-training int8 of a Transformer: calibrate on training batches, score the fake-quantized and the
    real int8 model on dev; writes the ``quant`` collection (:data:`~experiments.qat.QUANT_STATE_FILE`) for
    export and the report."""
    import models
    from compression import quantization as q
    from experiments import evaluation, export
    from experiments.qat import QUANT_STATE_FILE

    model, _, params = models.load(model_dir)
    inputs = evaluation.TRANSFORMER_INPUTS
    calib = evaluation.calibration_batches(task.train, inputs, calibration_batches, seed=seed)
    variables = q.post_training_quantize(model.apply, params, calib, calibrator, inputs=inputs)
    fp32 = evaluation.dev_metrics(model.apply, {"params": params}, task, inputs)
    fake = evaluation.dev_metrics(q.fake_quant().wrap(model.apply), variables, task, inputs)
    v8 = q.int8_variables(model.apply, variables, calib[0], inputs=inputs)
    real = evaluation.dev_metrics(q.int8().wrap(model.apply), v8, task, inputs)
    os.makedirs(stage_dir, exist_ok=True)
    export.save_quant_state(os.path.join(stage_dir, QUANT_STATE_FILE), variables[q.QUANT])
    name = task.metric_names[0]
    results = {"source_model": model_dir, "calibrator": calibrator, "metric_names": task.metric_names,
               "float32": fp32, "fake_quant": fake, "int8": real, "final": real, "best": real,
               "variants": [{"kind": "int8", "source_model": model_dir, "quant_state": QUANT_STATE_FILE,
                             "metric_name": name, "metric": real[name]}]}
    _write_results(stage_dir, results)
    return results


def export_stage(config, sources: list[str], workdir: str, stage_dir: str, precisions: tuple[str, ...]) -> dict:
    """ONNX files of each source stage's model (``stage_dir/<source>/``) with parity reports; int8 Q/DQ for a
    Transformer uses the calibration of the recipe's quantize stage on the same model when there is one."""
    from experiments import export
    from experiments.qat import QUANT_STATE_FILE

    results = {"models": {}}
    for src in sources:
        model_dir = os.path.join(workdir, src, "model")
        quant_state, wanted = None, [p for p in precisions if p != "int8"]
        for name in stage_names(config):
            st = config[name]
            if st.kind == "quantize" and st.source == src:
                quant_state = export.load_quant_state(os.path.join(workdir, name, QUANT_STATE_FILE))
                wanted.append("int8")
        report = export.export_model_dir(model_dir, os.path.join(stage_dir, src), wanted, quant_state=quant_state,
                                         overwrite=True)
        results["models"][src] = {f: {"max_abs_diff": max(c["max_abs_diff"] for c in r["comparisons"]),
                                      "bound": max(c["bound"] for c in r["comparisons"]), "op_counts": r["op_counts"]}
                                  for f, r in report["files"].items()}
    _write_results(stage_dir, results)
    return results


def _task_for(config, model_dir: str):
    """The recipe's task encoded for ``model_dir``'s tokenizer, at the length the model was trained with."""
    import models
    from experiments.data import load_task
    meta = models.read_meta(model_dir)["extra"]
    return load_task(config.task, config.data_dir, tokenizer=model_dir, max_length=meta.get("max_length", 128),
                     synthetic_size=config.synthetic_size, seed=config.seed)


def run_recipe(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the recipe's unfinished stages in order, then the report; returns ``{stage: results}``."""
    names = check_recipe(config)
    workdir = os.path.abspath(workdir)
    for name in names:
        stage = config[name]
        if stage.kind in ("distill", "theseus"):
            with stage.config.unlocked():
                stage.config.teacher_dir = os.path.join(workdir, stage.source, "model")
        if stage.kind in TRAINING_KINDS:
            from experiments.distill import DISTILL_SCHEMA
            from experiments.theseus import THESEUS_SCHEMA
            schema = {"finetune": config_validation.FINETUNE_SCHEMA, "distill": DISTILL_SCHEMA,
                      "theseus": THESEUS_SCHEMA}[stage.kind]
            try:
                config_validation.validate(stage.config, schema)
            except config_validation.ConfigError as e:
                raise config_validation.ConfigError(f"stage {name!r}: {e}") from e
    _claim_workdir(workdir, _recipe_record(config, names))
    out = {}
    for i, name in enumerate(names):
        stage_dir = os.path.join(workdir, name)
        kind = config[name].kind
        if is_done(stage_dir, kind):
            logging.info("[%d/%d] %s (%s): done, skipped", i + 1, len(names), name, kind)
        else:
            logging.info("[%d/%d] %s (%s): running in %s", i + 1, len(names), name, kind, stage_dir)
            start = time.time()
            _run_stage(config, name, workdir)
            logging.info("[%d/%d] %s finished in %.1f s", i + 1, len(names), name, time.time() - start)
        with open(os.path.join(stage_dir, "results.json")) as f:
            out[name] = json.load(f)
    if config.report.enabled:
        from experiments import report
        report.build_report([workdir], workdir, reference=names[0], batch=config.report.batch,
                            seq=config.report.seq, rounds=config.report.rounds,
                            title=f"Compression report: {config.task}")
        logging.info("report: %s (and report.html, plots)", os.path.join(workdir, "report.md"))
    return out
