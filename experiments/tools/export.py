"""Export a model directory to ONNX with verified parity, and print the TensorRT commands.

    python -m experiments.tools.export --model=DIR --out=OUT [--precision=fp32,fp16,int8,fp8,plan]
        [--calib_task=sst2 --calib_data=../shared/data/sst2 --calib_batches=16 --calib_method=max]
        [--plan=precision_plan.json] [--quant_state=quant_state.npz]

Reads any directory that ``models.load`` reads (every family) and writes, atomically (all or nothing)::

    OUT/model_fp32.onnx  model_fp16.onnx   float files (opset 17)
    OUT/model_int8.onnx                    int8 Q/DQ on every quantized Dense and Conv (opset 17)
    OUT/model_fp8.onnx                     FP8 (float8e4m3fn) Q/DQ on the same modules (opset 19)
    OUT/model_plan.onnx                    each site in its precision plan's format: int8, FP8 or float
    OUT/parity.json      per file: op counts, inputs/outputs, every onnxruntime-vs-JAX comparison, and the
                         matmul FLOPs in each format counted from the graph (compression.export.flops)
    OUT/tensorrt.sh      the trtexec command building each (strongly typed) engine, with what it needs

Q/DQ files need activation scales: ``--calib_task``/``--calib_data`` calibrate them on shuffled training
batches of the task as the model reads it (sub-words, or words and characters with the directory's
vocabularies: every family; ``--calib_method`` overrides the calibrator of the int8 and fp8 files, the plan
file keeps its plan's calibrators), or ``--quant_state FILE.npz`` gives a calibrated/QAT ``"quant"``
collection (``experiments.techniques.qat.save_quant_state``): the int8 file's, or the plan file's when a plan
is given. ``plan`` needs a precision plan (``--plan``, default: the model directory's ``precision_plan.json``,
which a QAT run from a plan carries). Each Q/DQ graph is compared with the fake-quantized JAX model of its
rules. FLOPs are counted at batch 1 and ``--flop_sequence`` tokens.

Every flag is checked when parsed, before anything is loaded: the model directory, the precisions, the
calibration task name, folder and method, the quant-state and plan files, the numbers, the Q/DQ files' need for
a calibration source, and ``--out`` not existing without ``--overwrite``. Nothing is cached: the output is
written all at once or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from absl import flags

import models
from models import storage
from compression.export import FP8_VS_FAKE_QUANT, INT8_VS_FAKE_QUANT, ExportError, export, tensorrt
from compression.export.api import resized_inputs
from compression.export.flops import matmul_flops
from compression.quantization.plans import PrecisionPlan
from experiments.techniques.qat import load_plan, load_quant_state, plan_path
from experiments.runtime import cli

TRT_RANGES = {"batch": (1, 32, 64), "sequence": (1, 128, 512)}
PRECISIONS = ("fp32", "fp16", "int8", "fp8", "plan")
QDQ = {"int8": ("int8", INT8_VS_FAKE_QUANT), "fp8": ("fp8", FP8_VS_FAKE_QUANT),
       "plan": ("mixed", FP8_VS_FAKE_QUANT)}  # tool precision -> (export precision, gate vs fake quantization)
FLOP_SEQUENCE = 128


@dataclasses.dataclass(frozen=True)
class Signature:
    """How a family's model is called for export.

    Attributes:
      inputs: name -> example array (int32, batch-major).
      dynamic_axes: name -> dim name or None per axis.
      dim_constraints: JAX symbolic-shape constraints (the position-table bound of the Transformer).
      max_sizes: dim name -> largest size the model accepts (the Transformer's position table).
    """

    inputs: dict
    dynamic_axes: dict
    dim_constraints: tuple = ()
    max_sizes: dict = dataclasses.field(default_factory=dict)

    def trt_ranges(self, ranges: Mapping[str, tuple[int, int, int]]) -> dict:
        """``ranges`` (dim name -> (min, opt, max)) clipped to :attr:`max_sizes`."""
        out = {}
        for d, r in ranges.items():
            top = self.max_sizes.get(d)
            out[d] = tuple(int(v) for v in r) if top is None else tuple(min(int(v), top) for v in r)
        return out


def signature(family: str, config, batch: int = 2, seq: int = 16, seed: int = 0) -> Signature:
    """Example inputs of a ``family`` model, with padding in the first row (ids valid for ``config``)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int32)
    mask[0, seq // 2:] = 0
    pair = ("batch", "sequence")
    if family == "transformer":
        seq = min(seq, config.max_position_embeddings)
        mask = mask[:, :seq]
        inputs = {"input_ids": rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int32),
                  "attention_mask": mask,
                  "token_type_ids": np.zeros((batch, seq), np.int32)}
        return Signature(inputs, dict.fromkeys(inputs, pair), (f"sequence <= {config.max_position_embeddings}",),
                         {"sequence": config.max_position_embeddings})
    words = (rng.integers(1, config.vocab_size, (batch, seq)) * mask).astype(np.int32)
    if family == "bilstm":
        inputs = {"word_ids": words, "mask": mask}
        if config.pair:
            inputs.update(word_ids_b=words[::-1].copy(), mask_b=mask[::-1].copy())
        axes = {k: pair if k in ("word_ids", "mask") else ("batch", "sequence_b") for k in inputs}
        return Signature(inputs, axes)
    if family == "cnn_lstm":
        chars = rng.integers(1, config.char_vocab_size, (batch, seq, config.max_chars_per_token)).astype(np.int32)
        inputs = {"word_ids": words, "char_ids": chars * mask[..., None], "mask": mask}
        return Signature(inputs, {"word_ids": pair, "char_ids": pair + (None,), "mask": pair})
    raise ExportError(f"no export signature for family {family!r}; known: transformer, bilstm, cnn_lstm")


BATCH_KEYS = {"mask": "word_mask", "mask_b": "word_mask_b"}  # graph input (model argument) -> batch key


def onnx_feed(batch: Mapping, input_names: Sequence[str]) -> dict:
    """The exported graph's inputs (``input_names``, the model's argument names, as :func:`signature` gives them)
    from a batch of the data pipeline, whose word-level masks are named ``word_mask``/``word_mask_b``."""
    return {name: np.asarray(batch[BATCH_KEYS.get(name, name)]) for name in input_names}


def output_fields(apply_fn, keep: Sequence[str] | None = None):
    """``apply_fn`` returning a dict of its output dataclass's fields (those in ``keep``, default all),
    without the ``None`` ones: the ONNX outputs are named by these keys."""

    def fn(variables, **inputs):
        out = apply_fn(variables, **inputs)
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return {k: v for k, v in fields.items() if v is not None and (keep is None or k in keep)}

    return fn


def qdq_rules(precision: str, plan: PrecisionPlan | None = None) -> tuple:
    """The quantization rules of a Q/DQ file: the default rules in int8 or FP8, or the plan's."""
    from compression import quantization as q
    if precision == "plan":
        if plan is None:
            raise ExportError("the plan file needs a precision plan (--plan, or the model directory's "
                              "precision_plan.json)")
        return plan.rules()
    return q.DEFAULT_RULES if precision == "int8" else q.FP8_RULES


def export_model_dir(model_dir: str, out_dir: str, precisions: Sequence[str] = ("fp32",), *,
                     calibration: Sequence[Mapping] | None = None, quant_state: Mapping | None = None,
                     plan: PrecisionPlan | None = None, state_precision: str | None = None,
                     calib_method: str | None = None,
                     outputs: Sequence[str] | None = None, trt_ranges: Mapping = TRT_RANGES, overwrite: bool = False,
                     batch: int = 2, seq: int = 16, flop_sequence: int = FLOP_SEQUENCE) -> dict:
    """Exports ``model_dir`` at each precision into ``out_dir`` (see the module docstring); returns the
    parity report written to ``parity.json``.

    Args:
      calibration: input batches (dicts of the model's arguments, as :func:`signature` names them) to calibrate
        the Q/DQ files' activation scales on.
      quant_state: a calibrated/QAT ``"quant"`` collection of the ``state_precision`` file's rules (other Q/DQ
        files then need ``calibration``).
      plan: the precision plan of the ``plan`` file.
      state_precision: ``int8``, ``fp8`` or ``plan``: whose scales ``quant_state`` holds (default: ``plan`` when
        a plan is given, else ``int8``; :func:`experiments.techniques.qat.carried_rules` tells a QAT model's).
      calib_method: calibrator override of the int8 and fp8 files (``max``, ``percentile:99.99``, ``mse``,
        ``entropy`` (int8 only)).
      outputs: output fields to export (default: every non-None field of the model's output).
      trt_ranges: dim name -> (min, opt, max) of the TensorRT shape profiles (clipped to what the model
        accepts).
      flop_sequence: the sequence length the matmul FLOPs are counted at (batch 1; clipped likewise).
    """
    from compression import quantization as q

    precisions = list(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if not precisions or unknown:
        raise ExportError(f"precisions must be a non-empty subset of {PRECISIONS}, got {list(precisions)}")
    state_precision = state_precision or ("plan" if plan is not None else "int8")
    if state_precision not in QDQ:
        raise ExportError(f"state_precision must be one of {sorted(QDQ)}, got {state_precision!r}")
    uncovered = [p for p in precisions if p in QDQ and calibration is None
                 and (quant_state is None or p != state_precision)]
    if uncovered:
        raise ExportError(f"{'/'.join(uncovered)} export needs calibration state: give calibration batches "
                          f"(--calib_task/--calib_data) or a calibrated/QAT quant collection of its rules "
                          f"(--quant_state{', with --plan for the plan file' if 'plan' in uncovered else ''})")
    if "plan" in precisions and plan is None:
        raise ExportError("the plan file needs a precision plan (--plan)")
    if storage.is_complete(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    model, config, params = models.load(model_dir)
    family = models.read_meta(model_dir)["family"]
    sig = signature(family, config, batch, seq)
    fn = output_fields(model.apply, outputs)
    variables = {"params": params}
    sequence = min(flop_sequence, sig.max_sizes.get("sequence", flop_sequence))
    flop_feeds = resized_inputs(sig.inputs, sig.dynamic_axes, {"batch": 1, "sequence": sequence,
                                                               "sequence_b": sequence})
    report = {"model": storage.absolute(model_dir), "family": family, "files": {}, "tensorrt": {}}
    if plan is not None:
        report["plan"] = plan.to_dict()
    with storage.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for precision in precisions:
            path = os.path.join(tmp, f"model_{precision}.onnx")
            kw = {}
            v = variables
            api_precision = precision
            if precision in QDQ:
                rules = qdq_rules(precision, plan)
                api_precision, tolerance = QDQ[precision]
                if quant_state is not None and precision == state_precision:
                    v = {**variables, q.QUANT: quant_state}
                else:
                    method = None if precision == "plan" else calib_method
                    v = q.calibrate(model.apply, variables, list(calibration), rules, method=method)
                kw = {"quant": q.qdq_scales(model.apply, v, rules=rules, **sig.inputs),
                      "reference_fn": output_fields(q.fake_quant(rules).wrap(model.apply), outputs),
                      "tolerance": tolerance}
            rep = export(fn, v, sig.inputs, path, precision=api_precision, dynamic_axes=sig.dynamic_axes,
                         dim_constraints=sig.dim_constraints, **kw)
            name = os.path.basename(path)
            report["files"][name] = {**rep.to_dict(), "path": name, "precision": precision,
                                     "matmul_flops": matmul_flops(path, flop_feeds)}
            ranges = sig.trt_ranges({**trt_ranges, "sequence_b": trt_ranges["sequence"]})
            profile = tensorrt.shape_profile(rep.inputs, ranges)
            report["tensorrt"][name] = tensorrt.trtexec_command(name, name.replace(".onnx", ".plan"), profile)
        with open(os.path.join(tmp, "parity.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(tmp, "tensorrt.sh"), "w") as f:
            f.write("#!/bin/sh\n# TensorRT engines (NVIDIA GPU), strongly typed: each file declares its precision;"
                    " run from this directory\nset -e\n")
            for name, cmd in report["tensorrt"].items():
                graph = tensorrt.precision_of(os.path.join(tmp, name))
                f.write(f"# {name} ({graph}): {tensorrt.REQUIREMENTS[graph]}\n{cmd}\n")
    return report


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    from experiments.runtime import cli

    flags.DEFINE_string("model", None, "model directory (models.save)", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory (written atomically)", flag_values=fv)
    flags.DEFINE_list("precision", "fp32,fp16,int8", f"comma-separated subset of {','.join(PRECISIONS)}",
                      flag_values=fv)
    flags.DEFINE_string("calib_task", None, "task name for the Q/DQ files' calibration (e.g. sst2; every family)",
                        flag_values=fv)
    flags.DEFINE_string("calib_data", None, "the calibration task's data directory", flag_values=fv)
    flags.DEFINE_integer("calib_batches", 16, "calibration batches", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("calib_batch_size", 32, "calibration batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("calib_method", None, "max, percentile:99.99, mse or entropy (int8 only); default: max",
                        flag_values=fv)
    flags.DEFINE_string("quant_state", None, ".npz quant collection (instead of calibration): the int8 file's, "
                        "or the plan file's with a plan", flag_values=fv)
    flags.DEFINE_string("plan", None, "precision plan (JSON) of the plan file; default: the model directory's "
                        "precision_plan.json", flag_values=fv)
    flags.DEFINE_integer("max_length", None, "longest calibration sequence (default: the model's)", lower_bound=4,
                         flag_values=fv)
    flags.DEFINE_integer("synthetic_size", 2000, "synthetic calibration tasks only", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("flop_sequence", FLOP_SEQUENCE, "sequence length of the FLOP count (batch 1)",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace --out if it exists", flag_values=fv)
    flags.mark_flags_as_required(["model", "out"], flag_values=fv)
    cli.model_dir(fv, "model")
    cli.subset(fv, "precision", PRECISIONS)
    cli.task(fv, "calib_task")
    cli.directory(fv, "calib_data")
    cli.calibrator(fv, "calib_method")
    cli.file(fv, "quant_state")
    cli.file(fv, "plan")
    cli.new_output(fv, "out")
    flags.register_multi_flags_validator(
        ["precision", "calib_task", "quant_state"],
        lambda d: not set(d["precision"]) & set(QDQ) or d["calib_task"] or d["quant_state"],
        "int8 export needs calibration state, as fp8 and plan export do: give --calib_task (and --calib_data) or "
        "--quant_state",
        flag_values=fv)
    flags.register_multi_flags_validator(
        ["precision", "plan", "model"],
        lambda d: "plan" not in d["precision"] or d["plan"] or not d["model"]
        or storage.is_file(plan_path(d["model"])),
        "the plan file needs a precision plan: give --plan (the model directory holds no precision_plan.json)",
        flag_values=fv)


def calibration_inputs(model_dir: str, task: str, data_dir: str | None, batches: int, batch_size: int, *,
                       max_length: int | None = None, **task_kwargs) -> list[dict]:
    """``batches`` shuffled training batches of ``task`` as the model in ``model_dir`` reads it (any family),
    keyed by the model's argument names (:func:`signature`): what :func:`export_model_dir` calibrates on."""
    from experiments.runtime import evaluation
    _, cfg, _, data = evaluation.load_model_task(model_dir, task, data_dir, max_length=max_length, **task_kwargs)
    inputs = evaluation.model_inputs(data, cfg.family)
    names = list(signature(cfg.family, cfg).inputs)
    return [onnx_feed(b, names) for b in evaluation.calibration_batches(data.train, inputs, batches, batch_size)]


def run(fv: flags.FlagValues) -> dict:
    """The command line's work on parsed flags ``fv`` (:func:`define_flags`); returns the parity report."""
    calibration = quant_state = plan = None
    carried = plan_path(fv.model)
    if fv.plan or ("plan" in fv.precision and storage.is_file(carried)):
        plan = load_plan(fv.plan or carried)
    if fv.quant_state:
        quant_state = load_quant_state(fv.quant_state)
    state_precision = "plan" if plan is not None else "int8"
    if any(p in QDQ and (quant_state is None or p != state_precision) for p in fv.precision):
        calibration = calibration_inputs(fv.model, fv.calib_task, fv.calib_data, fv.calib_batches,
                                         fv.calib_batch_size, max_length=fv.max_length,
                                         synthetic_size=fv.synthetic_size)
    report = export_model_dir(fv.model, fv.out, fv.precision, calibration=calibration, quant_state=quant_state,
                              plan=plan, calib_method=fv.calib_method, overwrite=fv.overwrite,
                              flop_sequence=fv.flop_sequence)
    for name, info in report["files"].items():
        worst = max(c["max_abs_diff"] for c in info["comparisons"])
        shares = ", ".join(f"{k} {v:.1%}" for k, v in info["matmul_flops"]["fractions"].items())
        print(f"{name}: max |onnxruntime - JAX| {worst:.3g} over {len(info['comparisons'])} comparisons; "
              f"matmul FLOPs {shares}")
    print("TensorRT (NVIDIA GPU):")
    for cmd in report["tensorrt"].values():
        print("  " + cmd)
    return report


if __name__ == "__main__":
    cli.run_script(define_flags, run)
