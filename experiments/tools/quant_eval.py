"""Dev-set quality of a saved model (Transformer, BiLSTM or CNN-LSTM) under float32, post-training int8
quantization, real int8 and, optionally, post-training FP8, a precision plan and quantization-aware training.

    python -m experiments.tools.quant_eval --model_dir=runs/sst2/model --data_dir=../shared/data/sst2 \
        --calibrators=max,percentile:99.99,mse,entropy --calib_examples=512 --out=runs/sst2/quant.json \
        [--formats=int8,fp8] [--plan=runs/sst2_plan/precision_plan.json] [--qat_model_dir=runs/sst2_qat/model]

``--model_dir`` is a model directory written by ``models.save`` of any family (every training job writes one
to ``WORKDIR/model``); the task, ``extra.task`` unless ``--task``, is encoded as that family reads it
(:func:`experiments.runtime.evaluation.load_model_task`: sub-words with the directory's tokenizer, words and
characters with its vocabularies), at ``extra.max_length`` unless ``--max_length``. Calibration uses the model
inputs of the first ``--calib_examples`` examples (rounded to whole batches) of the shuffled train split
(``--seed``), never the dev split. Rows:

* ``float32``: the model as trained;
* ``ptq:<calibrator>``: simulated int8 (fake quantization, :func:`compression.quantization.fake_quant`) with the
  default rules: per-output-channel int8 weights, per-tensor int8 activations at every selected module's input
  calibrated by that calibrator; all calibrators from one statistics collection
  (:func:`compression.quantization.post_training_variants`);
* ``int8:<calibrator>``: the same variables converted to int8 kernels and run with int8 x int8 -> int32 matmuls
  (:func:`compression.quantization.int8`), for ``--int8_calibrator`` (default: the PTQ calibrator whose
  simulated int8 scores best on the selection split, the held-out train rows the model was trained without as
  its ``extra.selection`` records, :mod:`experiments.runtime.selection`; on dev, with a warning, for a model
  that holds none out). ``choice`` in the JSON gives every calibrator's selection-split metric and the pick.
  ``agreement_with_ptq`` is the share of dev predictions equal to the simulation it was converted from (the
  int8 Dense computes what the fake-quantized Dense computes, to the bit, so 1.0 is expected in every family);
* ``fp8:<calibrator>`` (with ``--formats`` holding ``fp8``): simulated FP8 (E4M3) with the default rules in FP8
  (:data:`compression.quantization.FP8_RULES`), for each calibrator that calibrates FP8 (``entropy`` does not);
  ``choice_fp8`` in the JSON: the one scoring best on the selection split, as for int8;
* ``plan`` (with ``--plan``): simulated with a precision plan's rules (each site int8, FP8 or float; the plan's
  calibrators, on the same calibration batches), with ``low_precision_flops``, the share of the sites' matmul
  FLOPs the plan keeps in int8 or FP8;
* ``qat`` and ``qat:int8`` (with ``--qat_model_dir``): a model directory trained with quantization-aware training
  from ``--model_dir`` (same architecture and tokenizer/vocabularies) holding ``quant_state.npz``, its calibrated
  ``quant`` collection (:func:`experiments.techniques.qat.save_quant_state`): fake-quantized with that state, and
  converted to real int8 (``agreement_with_qat``, ``delta_vs_qat``). Their deltas are against ``--model_dir``'s
  float32 row.

Each row reports the task's metrics (accuracy, F1, MCC for binary tasks; span F1 and token accuracy for NER),
``delta_vs_float32`` of the first metric in points, ``agreement_with_float32`` (share of scored dev examples, or
labelled tokens, predicted as float32 does), ``quantized_modules`` and ``int8_modules`` (modules fake-quantized,
and those of them running as int8 matmuls), and ``dev_seconds``, the wall time of the dev pass (compilation
included: not a speed figure; see ``experiments/benchmarks/bench_int8.py`` for speed).

What the default rules (:data:`compression.quantization.DEFAULT_RULES`) quantize, per family (the JSON's
``modules`` lists them; embedding tables stay float):

* Transformer: every Dense (query/key/value share one input scale, attention output, FFN, pooler, classifier);
* BiLSTM: each LSTM layer's input projection ``encoder/layer_i/{forward,backward}/input`` (one input scale shared
  by both directions), the attention-pooling projections, the MLP and the classifier;
* CNN-LSTM: the character CNN's ``char_cnn/conv``, the LSTM input projections and the classifier.

The LSTM recurrence ``h @ W_hh`` is a matmul inside the time scan, not a module: it stays float in every row.
Only Dense layers run as int8 matmuls; the Conv stays fake-quantized in the int8 rows. Rules that select no
module, or a required rule that matches none, are a ``ValueError`` before any calibration.

Every flag is checked when parsed, before anything is loaded: the model directories, the data folder, a known
task name, the calibrator names (``--int8_calibrator`` among ``--calibrators``) and the numbers. Nothing is
cached: calibration and every dev pass are redone on every run (a few minutes for MiniLM on SST-2). Paths may be
local or in a bucket (``gs://``, :mod:`models.storage`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import flags

import models
from compression import quantization as q
from compression.quantization.int8 import runs_in_int8
from compression.quantization.plans import PrecisionPlan
from compression.quantization.rules import trace_targets
from experiments.runtime import measuring
from experiments.data import TaskData
from experiments.runtime import evaluation, selection
from experiments.techniques import qat
from experiments.techniques.qat import QUANT_STATE_FILE, load_plan
from experiments.runtime import cli
from models import storage


def calibration_batches(task: TaskData, inputs: Sequence[str], examples: int, batch_size: int,
                        seed: int) -> list[dict]:
    """The ``inputs`` keys of the first ``examples`` examples of the shuffled train split, rounded to whole
    batches of ``batch_size`` (at least one; all of the split if it is smaller); padding rows dropped."""
    if examples < 1:
        raise ValueError(f"calib_examples must be >= 1, got {examples}")
    n_batches = max(1, round(min(examples, len(task.train)) / batch_size))
    out = []
    for batch in task.train.batches(batch_size, shuffle=True, seed=seed):
        real = batch["example_weight"] > 0
        out.append({k: batch[k][real] for k in inputs})
        if len(out) == n_batches:
            break
    return out


def quantized_modules(apply_fn, params, batch: Mapping, rules: Sequence[q.QuantRule] = q.DEFAULT_RULES,
                      what: str = "quant_eval") -> list[dict]:
    """``[{"module", "kind", "int8"}]``: the modules ``rules`` quantize in ``apply_fn({"params": params}, **batch)``
    (:func:`evaluation.batch_apply` convention), in call order, and whether each runs as an int8 matmul after
    conversion. Traces abstractly; raises ``ValueError`` when the rules select nothing or a required rule
    matches no module."""
    targets = trace_targets(apply_fn, {"params": params}, rules=rules, what=what, **batch)
    return [{"module": t.name, "kind": t.kind, "int8": runs_in_int8(t)} for t in targets if t.active]


def load_qat(qat_dir: str, model_dir: str, params) -> tuple[dict, dict]:
    """``(params, quant collection)`` of a quantization-aware trained model directory, checked against the
    model directory it was trained from (``params``: its parameters): same family and parameter shapes, same
    tokenizer/vocabulary files."""
    meta = models.read_meta(qat_dir)
    _, cfg, qat_params = models.load(qat_dir)
    base = models.read_meta(model_dir)["family"]
    if cfg.family != base or jax.tree.map(np.shape, qat_params) != jax.tree.map(np.shape, params):
        raise ValueError(f"--qat_model_dir {qat_dir} holds a {cfg.family} model whose parameters differ from "
                         f"those of {model_dir} ({base}): QAT keeps the architecture")
    for name in models.io.TOKENIZER_FILES:
        a, b = os.path.join(model_dir, name), os.path.join(qat_dir, name)
        if storage.is_file(a) and not (storage.is_file(b) and storage.read_bytes(a) == storage.read_bytes(b)):
            raise ValueError(f"{b} is missing or differs from {a}: the QAT model would read other ids")
    state = os.path.join(qat_dir, meta.get("extra", {}).get("qat", {}).get("quant_state", QUANT_STATE_FILE))
    if not storage.is_file(state):
        raise FileNotFoundError(f"{qat_dir} holds no {os.path.basename(state)} (the calibrated quant collection "
                                "a quantization-aware training run saves beside its params)")
    quant = qat.load_quant_state(state)
    q.check_scales(quant, state)
    return qat_params, quant


def evaluate_quantized(model, params, task: TaskData, calibrators: Sequence[str] = q.PTQ_CALIBRATORS, *,
                       calib_examples: int = 512, batch_size: int = 32, int8_calibrator: str | None = None,
                       seed: int = 0, rules: Sequence[q.QuantRule] = q.DEFAULT_RULES,
                       qat: tuple[Mapping, Mapping] | None = None, formats: Sequence[str] = ("int8",),
                       plan: PrecisionPlan | None = None) -> dict:
    """``{"modules": quantized_modules(...), "rows": [...]}``, the rows described in the module docstring,
    float32 first; ``qat``: ``(params, quant)`` of a QAT model (:func:`load_qat`) adds ``qat`` and ``qat:int8``;
    ``formats`` with ``fp8`` adds the ``fp8:<calibrator>`` rows, ``plan`` the ``plan`` row."""
    if not calibrators:
        raise ValueError("give at least one calibrator")
    if int8_calibrator is not None and int8_calibrator not in calibrators:
        raise ValueError(f"int8_calibrator {int8_calibrator!r} is not among the calibrators {list(calibrators)}")
    inputs = evaluation.model_inputs(task, model.config.family)
    keyed = evaluation.batch_apply(model.apply, inputs)  # calibration and conversion pass batches as keywords
    calib = calibration_batches(task, inputs, calib_examples, batch_size, seed)
    modules = quantized_modules(keyed, params, calib[0], rules, f"quant_eval ({model.config.family})")
    fake, int8_apply = q.fake_quant(rules).wrap(model.apply), q.int8(rules).wrap(model.apply)  # one compile each
    key = task.metric_names[0]
    rows, preds = [], {}

    def add(name, apply_fn, variables, quantized, int8_modules=0, **more):
        start = time.perf_counter()
        p = evaluation.dev_predictions(apply_fn, variables, task, inputs, batch_size)
        scores = p.metrics(task)
        preds[name] = p
        base = rows[0][key] if rows else scores[key]
        rows.append({"variant": name, **scores, "delta_vs_float32": 100 * (scores[key] - base),
                     "agreement_with_float32": p.agreement(preds["float32"]),
                     "quantized_modules": len(modules) if quantized else 0, "int8_modules": int8_modules,
                     "dev_seconds": time.perf_counter() - start, **more})
        return rows[-1]

    def add_int8(name, variables, source):
        v8 = q.int8_variables(keyed, variables, calib[0], rules=rules)
        row = add(name, int8_apply, v8, True, len(q.int8_weights(v8)))
        kind = source.partition(":")[0]  # "ptq" or "qat"
        row[f"agreement_with_{kind}"] = preds[name].agreement(preds[source])
        row[f"delta_vs_{kind}"] = 100 * (row[key] - next(r[key] for r in rows if r["variant"] == source))

    add("float32", model.apply, {"params": params}, False)
    start = time.perf_counter()
    variants = q.post_training_variants(keyed, params, calib, tuple(calibrators), rules=rules)
    calib_seconds = time.perf_counter() - start
    n_calib = sum(len(b[inputs[0]]) for b in calib)
    for name, variables in variants.items():
        add(f"ptq:{name}", fake, variables, True, calib_examples=n_calib, calib_seconds=calib_seconds)
    choice = None
    if int8_calibrator is None:
        int8_calibrator, choice = choose_calibrator(fake, variants, task, inputs, batch_size)
    add_int8(f"int8:{int8_calibrator}", variants[int8_calibrator], f"ptq:{int8_calibrator}")
    if qat is not None:
        qat_variables = {"params": qat[0], q.QUANT: qat[1]}
        add("qat", fake, qat_variables, True)
        add_int8("qat:int8", qat_variables, "qat")
    result = {"modules": modules, "rows": rows, "choice": choice}
    fp8_calibrators = tuple(c for c in calibrators if "fp8" in q.get_calibrator(c).formats)
    if "fp8" in formats and fp8_calibrators:
        fake8 = q.fake_quant(q.with_format(rules, "fp8")).wrap(model.apply)
        start = time.perf_counter()
        variants8 = q.post_training_variants(keyed, params, calib, fp8_calibrators, rules=q.with_format(rules, "fp8"))
        seconds = time.perf_counter() - start
        for name, variables in variants8.items():
            add(f"fp8:{name}", fake8, variables, True, calib_examples=n_calib, calib_seconds=seconds)
        result["choice_fp8"] = choose_calibrator(fake8, variants8, task, inputs, batch_size)[1]
    if plan is not None:
        plan_rules = plan.rules()
        variables = q.calibrate(keyed, {"params": params}, calib, plan_rules)
        flops = plan.flops()
        add("plan", q.fake_quant(plan_rules).wrap(model.apply), variables, True, calib_examples=n_calib,
            low_precision_flops=(flops["int8"] + flops["fp8"]) / max(sum(flops.values()), 1))
        result["plan"] = plan.to_dict()
    return result


def choose_calibrator(fake_apply, variants: Mapping[str, dict], task: TaskData, inputs: Sequence[str],
                      batch_size: int) -> tuple[str, dict]:
    """``(calibrator, record)``: the calibrator whose fake-quantized model scores best (first metric; the first
    listed wins a tie) on ``task.choice_split``; ``record`` gives the split and every calibrator's score."""
    key = task.metric_names[0]
    scores = {name: evaluation.dev_metrics(fake_apply, variables, task, inputs, batch_size,
                                           split=task.choice_split)[key] for name, variables in variants.items()}
    best = max(scores, key=scores.get)
    return best, {**selection.record(task), "metric": key, "scores": scores, "chosen": best}


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("model_dir", None, "model directory (models.save) of any family", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "the task's data folder (not needed for synthetic tasks)", flag_values=fv)
    flags.DEFINE_string("task", None, "default: the model directory's extra.task", flag_values=fv)
    flags.DEFINE_integer("max_length", None, "default: the model directory's", lower_bound=4, flag_values=fv)
    flags.DEFINE_list("calibrators", list(q.PTQ_CALIBRATORS), "comma-separated calibrators", flag_values=fv)
    flags.DEFINE_integer("calib_examples", 512, "calibration examples of the train split", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "calibration and dev batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("int8_calibrator", None, "default: the best PTQ calibrator on the selection split (the "
                        "model's held-out train rows; dev for a model that holds none out)", flag_values=fv)
    flags.DEFINE_string("qat_model_dir", None, "a QAT model directory trained from --model_dir, with "
                        "quant_state.npz: adds the qat and qat:int8 rows", flag_values=fv)
    flags.DEFINE_list("formats", ["int8"], "int8 and/or fp8: fp8 adds the fp8:<calibrator> rows (simulated FP8 "
                      "E4M3 PTQ)", flag_values=fv)
    flags.DEFINE_string("plan", None, "a precision plan (precision_plan.json): adds the plan row", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the calibration shuffle", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("synthetic_size", 2000, "synthetic tasks only", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("out", None, "JSON results path", flag_values=fv)
    flags.mark_flag_as_required("model_dir", flag_values=fv)
    cli.model_dir(fv, "model_dir")
    cli.model_dir(fv, "qat_model_dir")
    cli.directory(fv, "data_dir")
    cli.task(fv, "task")
    cli.calibrator(fv, "calibrators")
    cli.subset(fv, "formats", ("int8", "fp8"))
    cli.file(fv, "plan")
    flags.register_multi_flags_validator(
        ["int8_calibrator", "calibrators"], lambda d: d["int8_calibrator"] in [None, *d["calibrators"]],
        "--int8_calibrator must be one of --calibrators", flag_values=fv)


def run(fv: flags.FlagValues) -> dict:
    """The command line's work on parsed flags ``fv`` (:func:`define_flags`); returns the JSON payload."""
    model, cfg, params, task = evaluation.load_model_task(fv.model_dir, fv.task, fv.data_dir,
                                                          max_length=fv.max_length, seed=fv.seed,
                                                          synthetic_size=fv.synthetic_size, with_selection=True)
    qat = load_qat(fv.qat_model_dir, fv.model_dir, params) if fv.qat_model_dir else None
    plan = load_plan(fv.plan) if fv.plan else None
    result = evaluate_quantized(model, params, task, fv.calibrators, calib_examples=fv.calib_examples,
                                batch_size=fv.batch_size, int8_calibrator=fv.int8_calibrator, seed=fv.seed, qat=qat,
                                formats=fv.formats, plan=plan)
    rows = result["rows"]
    metric_columns = [k for k in rows[0] if k in task.metric_names or k.startswith(("span_", "token_"))]
    qat_columns = ["agreement_with_qat", "delta_vs_qat"] if qat else []
    measuring.print_table(rows, ["variant", *metric_columns, "delta_vs_float32", "agreement_with_float32",
                              "agreement_with_ptq", "delta_vs_ptq", *qat_columns, "quantized_modules",
                              "int8_modules", *(["low_precision_flops"] if plan else []), "dev_seconds"],
                       f"{task.name} dev ({len(task.dev)} examples), {cfg.family}: float32, int8 PTQ, real int8"
                       + (", FP8 PTQ" if "fp8" in fv.formats else "") + (", plan" if plan else "")
                       + (", QAT" if qat else ""))
    for kind, c in (("int8", result["choice"]), ("fp8", result.get("choice_fp8"))):
        if c:
            print(f"{kind} calibrator chosen on the {c['split']} split ({c['examples']} examples): {c['chosen']} "
                  f"({', '.join(f'{k} {v:.4f}' for k, v in c['scores'].items())})")
    payload = {"model_dir": fv.model_dir, "qat_model_dir": fv.qat_model_dir, "family": cfg.family,
               "task": task.name, "dev_examples": len(task.dev), **result}
    measuring.write_json(fv.out, payload)
    return payload


if __name__ == "__main__":
    cli.run_script(define_flags, run)
