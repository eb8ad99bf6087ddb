"""A per-layer precision plan chosen by sensitivity: each quantized site int8, FP8 or float, under an accuracy
budget, keeping as much of the matmul work in low precision as the budget allows.

    python -m experiments.tools.precision_plan --model_dir=runs/sst2/model --data_dir=../shared/data/sst2 \\
        --out=runs/sst2_plan [--budget=0.5] [--formats=int8,fp8] [--calib_examples=512] [--export]

Reads a model directory of any family (``models.save``) and its task as :mod:`experiments.tools.quant_eval`
does (calibration on the first ``--calib_examples`` of the shuffled train split), then:

1. **Sites** (:func:`compression.quantization.plans.find_sites`): the modules the default rules quantize,
   grouped by the activation they read (query/key/value of a block are one site), with their matmul FLOPs.
2. **Sensitivity**, on the selection split (the held-out train rows the model was trained without, its
   ``extra.selection``; dev, with a warning, for a model that holds none out): for each format and each site,
   the task metric and the output KL(float || quantized), mean over scored examples (tokens), with that site
   alone quantized, and with every site but that one quantized; all through one compiled model
   (:func:`~compression.quantization.plans.switched_fake_quant`). A site's sensitivity in a format is the KL
   it adds alone plus the KL it removes when kept float among all others quantized.
3. **Choice** (:func:`~compression.quantization.plans.choose_plan`): each site in its less sensitive format
   (int8 on a tie), then the fewest sites in float, most sensitive per FLOP first, such that the plan's metric
   on the selection split stays within ``--budget`` points of float32's.
4. **Report**: float32, all-int8, all-FP8 and the plan, each with the default rules' fake quantization on the
   same calibration batches, on the selection split and on dev (the dev figures took no part in the choice), and
   the share of the sites' matmul FLOPs each keeps in low precision. ``--export`` also writes the plan's ONNX
   file (``OUT/onnx``, :mod:`experiments.tools.export`), whose ``parity.json`` counts the FLOPs by format from
   the graph itself (attention score products and LSTM recurrences included: they stay float).

Writes ``OUT/precision_plan.json`` (the plan, with every measurement in its ``record``), ``OUT/quant_state.npz``
(the plan's calibrated scales: ``export --plan=... --quant_state=... --precision=plan`` reproduces the plan's
file) and ``OUT/report.json``. The plan drives QAT (``--config.qat.plan=OUT/precision_plan.json``) and
:mod:`experiments.tools.quant_eval` (``--plan``). Flags are checked when parsed, before anything is loaded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
from absl import flags, logging

from compression import quantization as q
from compression.quantization.plans import (
    LOW_PRECISION,
    PrecisionPlan,
    choose_plan,
    find_sites,
    switch_variables,
    switched_fake_quant,
)
from experiments.runtime import cli, evaluation, measuring, selection
from experiments.techniques.qat import PLAN_FILE, QUANT_STATE_FILE, save_plan, save_quant_state
from experiments.tools.quant_eval import calibration_batches
from models import storage


def kl_divergence(reference: evaluation.Predictions, other: evaluation.Predictions) -> float:
    """Mean KL(softmax(reference) || softmax(other)) over the scored positions (both collected with logits)."""
    total = count = 0.0
    for a, b, y, w in zip(reference.logits, other.logits, reference.labels, reference.weights, strict=True):
        la = a.astype(np.float64) - np.logaddexp.reduce(a.astype(np.float64), axis=-1, keepdims=True)
        lb = b.astype(np.float64) - np.logaddexp.reduce(b.astype(np.float64), axis=-1, keepdims=True)
        kl = np.sum(np.exp(la) * (la - lb), axis=-1)
        keep = evaluation.scored(y, w)
        total += float(np.sum(kl[keep]))
        count += float(np.sum(keep))
    return total / max(count, 1.0)


def plan_model(model_dir: str, out_dir: str, task: str | None = None, data_dir: str | None = None, *,
               budget: float = 0.5, formats: Sequence[str] = LOW_PRECISION,
               calibrators: Mapping[str, str] | None = None, calib_examples: int = 512, batch_size: int = 32,
               max_selection: int | None = None, seed: int = 0, export: bool = False, max_length: int | None = None,
               **task_kwargs) -> dict:
    """Measures, chooses and reports (see the module docstring); returns the report written to ``report.json``.

    Args:
      budget: the allowed drop of the task's first metric on the selection split, in points (x100).
      formats: the low-precision formats sites may take (``int8``, ``fp8``), most preferred first.
      calibrators: activation calibrator per format (default ``max`` for both).
      max_selection: use at most this many selection examples (a quick look; the default is all).
      export: also export the plan's ONNX file (and float32's) under ``out_dir/onnx``.
    """
    calibrators = {"int8": "max", "fp8": "max", **(calibrators or {})}
    model, cfg, params, data = evaluation.load_model_task(model_dir, task, data_dir, max_length=max_length, seed=seed,
                                                          with_selection=True, **task_kwargs)
    split = data.choice_split
    if max_selection is not None and len(split) > max_selection:
        split = split.select(range(max_selection))
    key = data.metric_names[0]
    inputs = evaluation.model_inputs(data, cfg.family)
    keyed = evaluation.batch_apply(model.apply, inputs)
    calib = calibration_batches(data, inputs, calib_examples, batch_size, seed)
    variables = {"params": params}
    sites = find_sites(keyed, variables, **{k: v[:1] for k, v in calib[0].items()})
    needs_hist = any(q.get_calibrator(c).needs_histogram for c in calibrators.values())
    stats = q.collect_statistics(keyed, variables, calib, histogram=needs_hist)
    scales = {"int8": stats.scales(calibrators["int8"]), "fp8": stats.scales(calibrators["fp8"], format="fp8")}
    switched = switched_fake_quant().wrap(model.apply)

    def predictions(apply_fn, v, on=split):
        return evaluation.dev_predictions(apply_fn, v, data, inputs, batch_size, keep_logits=True, split=on)

    reference = predictions(model.apply, variables)
    float_metric = reference.metrics(data)[key]
    start = time.perf_counter()

    def assess(assignment: Mapping[str, str]) -> dict:
        p = predictions(switched, switch_variables(variables, assignment, scales["int8"], scales["fp8"]))
        return {"metric": p.metrics(data)[key], "kl": kl_divergence(reference, p)}

    names = [s.name for s in sites]
    table = {s.name: {"flops": s.flops} for s in sites}
    overall = {}
    for fmt in formats:
        overall[fmt] = assess(dict.fromkeys(names, fmt))
        for s in names:
            alone = assess({n: fmt if n == s else "float" for n in names})
            all_but = assess({n: "float" if n == s else fmt for n in names})
            table[s][fmt] = {"alone": alone, "all_but": all_but,
                             "sensitivity": alone["kl"] + max(0.0, overall[fmt]["kl"] - all_but["kl"])}
        logging.info("precision_plan: %s sensitivities of %d sites measured (%.0f s so far)", fmt, len(sites),
                     time.perf_counter() - start)
    sensitivity = {s: {f: table[s][f]["sensitivity"] for f in formats} for s in names}
    chosen, record = choose_plan(sites, sensitivity, lambda a: assess(a)["metric"], reference=float_metric,
                                 budget=budget / 100.0, formats=formats)
    measure_seconds = time.perf_counter() - start
    where = {**selection.record(data), "examples": len(split)}
    plan = PrecisionPlan(sites, chosen, calibrators=calibrators,
                         record={"model_dir": storage.absolute(model_dir), "task": data.name, "metric": key,
                                 "selection": where, "budget_points": budget, "float_metric": float_metric,
                                 "all_quantized": overall, "sites": table, "choice": record,
                                 "measure_seconds": measure_seconds})

    plan_variables = q.calibrate(keyed, variables, calib, plan.rules()) if chosen and any(
        f != "float" for f in chosen.values()) else None
    candidates = {"float32": (model.apply, variables, dict.fromkeys(names, "float")),
                  "int8": (q.fake_quant().wrap(model.apply), {**variables, q.QUANT: scales["int8"]},
                           dict.fromkeys(names, "int8")),
                  "fp8": (q.fake_quant(q.FP8_RULES).wrap(model.apply), {**variables, q.QUANT: scales["fp8"]},
                          dict.fromkeys(names, "fp8"))}
    if plan_variables is not None:
        candidates["plan"] = (q.fake_quant(plan.rules()).wrap(model.apply), plan_variables, chosen)
    rows, dev_preds = [], {}
    for name, (apply_fn, v, assignment) in candidates.items():
        sel = predictions(apply_fn, v).metrics(data)[key]
        dev_preds[name] = predictions(apply_fn, v, data.dev)
        dev = dev_preds[name].metrics(data)
        flops = PrecisionPlan(sites, assignment).flops()
        rows.append({"variant": name, f"selection_{key}": sel, **dev,
                     "delta_vs_float32": 100 * (dev[key] - (rows[0][key] if rows else dev[key])),
                     "selection_delta": 100 * (sel - float_metric),
                     "agreement_with_float32": dev_preds[name].agreement(dev_preds["float32"]),
                     "low_precision_flops": (flops["int8"] + flops["fp8"]) / max(sum(flops.values()), 1)})
    if plan_variables is None:
        logging.warning("precision_plan: every site stays float within the budget; no plan file to export")
    storage.makedirs(out_dir)
    save_plan(os.path.join(out_dir, PLAN_FILE), plan)
    report = {"model_dir": storage.absolute(model_dir), "family": cfg.family, "task": data.name, "metric": key,
              "selection": where, "dev_examples": len(data.dev), "budget_points": budget, "rows": rows,
              "plan": {s: chosen[s] for s in names}, "flops": plan.flops()}
    if plan_variables is not None:
        save_quant_state(os.path.join(out_dir, QUANT_STATE_FILE), plan_variables[q.QUANT])
        if export:
            from experiments.tools import export as export_tool
            parity = export_tool.export_model_dir(model_dir, os.path.join(out_dir, "onnx"), ["fp32", "plan"],
                                                  plan=plan, quant_state=plan_variables[q.QUANT],
                                                  state_precision="plan", overwrite=True)
            report["onnx_matmul_flops"] = parity["files"]["model_plan.onnx"]["matmul_flops"]
    measuring.write_json(os.path.join(out_dir, "report.json"), report)
    return report


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("model_dir", None, "model directory (models.save) of any family", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory (precision_plan.json, quant_state.npz, report.json)",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "the task's data folder (not needed for synthetic tasks)", flag_values=fv)
    flags.DEFINE_string("task", None, "default: the model directory's extra.task", flag_values=fv)
    flags.DEFINE_integer("max_length", None, "default: the model directory's", lower_bound=4, flag_values=fv)
    flags.DEFINE_float("budget", 0.5, "allowed drop of the task's first metric on the selection split, in points",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_list("formats", list(LOW_PRECISION), "low-precision formats a site may take, preferred first",
                      flag_values=fv)
    flags.DEFINE_string("int8_calibrator", "max", "int8 activation calibrator", flag_values=fv)
    flags.DEFINE_string("fp8_calibrator", "max", "FP8 activation calibrator (max, percentile:P or mse)",
                        flag_values=fv)
    flags.DEFINE_integer("calib_examples", 512, "calibration examples of the train split", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "calibration and evaluation batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_selection", None, "use at most this many selection examples", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the calibration shuffle", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("synthetic_size", 2000, "synthetic tasks only", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("export", False, "also export the plan's ONNX file (OUT/onnx) with FLOPs by format",
                      flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace --out if it exists", flag_values=fv)
    flags.mark_flags_as_required(["model_dir", "out"], flag_values=fv)
    cli.model_dir(fv, "model_dir")
    cli.directory(fv, "data_dir")
    cli.task(fv, "task")
    cli.subset(fv, "formats", LOW_PRECISION)
    cli.calibrator(fv, "int8_calibrator")
    cli.check(fv, "fp8_calibrator", lambda v: "fp8" in q.get_calibrator(v).formats,
              "must name a calibrator of FP8 (max, percentile:P or mse)")
    cli.new_output(fv, "out")


def run(fv: flags.FlagValues) -> dict:
    """The command line's work on parsed flags ``fv`` (:func:`define_flags`); returns the report."""
    report = plan_model(fv.model_dir, fv.out, fv.task, fv.data_dir, budget=fv.budget, formats=fv.formats,
                        calibrators={"int8": fv.int8_calibrator, "fp8": fv.fp8_calibrator},
                        calib_examples=fv.calib_examples, batch_size=fv.batch_size, max_selection=fv.max_selection,
                        seed=fv.seed, export=fv.export, max_length=fv.max_length, synthetic_size=fv.synthetic_size)
    key = report["metric"]
    print(f"\nplan ({report['selection']['split']} split, {report['selection']['examples']} examples, budget "
          f"{report['budget_points']} points):")
    for site, fmt in report["plan"].items():
        print(f"  {fmt:5s}  {site}")
    measuring.print_table(report["rows"], ["variant", f"selection_{key}", key, "selection_delta", "delta_vs_float32",
                                        "agreement_with_float32", "low_precision_flops"],
                       f"{report['task']} ({report['family']}): float32, all-int8, all-FP8 and the plan")
    if "onnx_matmul_flops" in report:
        shares = report["onnx_matmul_flops"]["fractions"]
        print("matmul FLOPs of the exported plan (from the graph): "
              + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    return report


if __name__ == "__main__":
    cli.run_script(define_flags, run)
