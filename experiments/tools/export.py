"""Export a model directory to ONNX with verified parity, and print the TensorRT commands.

    python -m experiments.tools.export --model=DIR --out=OUT [--precision=fp32,fp16,int8]
        [--calib_task=sst2 --calib_data=../shared/data/sst2 --calib_batches=16 --calib_method=max]

Reads any directory that ``models.load`` reads (every family) and writes, atomically (all or nothing)::

    OUT/model_fp32.onnx  model_fp16.onnx  model_int8.onnx   the requested precisions, each past its gates
    OUT/parity.json      per file: op counts, inputs/outputs, every onnxruntime-vs-JAX comparison
    OUT/tensorrt.sh      the trtexec command building each engine (TensorRT needs an NVIDIA GPU)

int8 needs activation scales: ``--calib_task``/``--calib_data`` calibrate them on training batches encoded
with the model directory's tokenizer (Transformer family), or ``--quant_state FILE.npz`` gives a
calibrated/QAT ``"quant"`` collection (``experiments.techniques.qat.save_quant_state``) for
any family. The int8 graph is compared with the fake-quantized JAX model.

Every flag is checked when parsed, before anything is loaded: the model directory, the precisions, the
calibration task name, folder and method, the quant-state file, the numbers, int8's need for one of the two
calibration sources, and ``--out`` not existing without ``--overwrite``. Nothing is cached: the output is
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
from compression.export import INT8_VS_FAKE_QUANT, PRECISIONS, ExportError, export, tensorrt
from experiments.techniques.qat import load_quant_state
from experiments.tools import cli

TRT_RANGES = {"batch": (1, 32, 64), "sequence": (1, 128, 512)}


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


def export_model_dir(model_dir: str, out_dir: str, precisions: Sequence[str] = ("fp32",), *,
                     calibration: Sequence[Mapping] | None = None, quant_state: Mapping | None = None,
                     calib_method: str | None = None, outputs: Sequence[str] | None = None,
                     trt_ranges: Mapping = TRT_RANGES, overwrite: bool = False, batch: int = 2,
                     seq: int = 16) -> dict:
    """Exports ``model_dir`` at each precision into ``out_dir`` (see the module docstring); returns the
    parity report written to ``parity.json``.

    Args:
      calibration: input batches (dicts of the model's inputs) to calibrate int8 activation scales on.
      quant_state: a calibrated/QAT ``"quant"`` collection (instead of ``calibration``).
      calib_method: calibrator override (``max``, ``percentile:99.99``, ``mse``, ``entropy``).
      outputs: output fields to export (default: every non-None field of the model's output).
      trt_ranges: dim name -> (min, opt, max) of the TensorRT shape profiles (clipped to what the model
        accepts).
    """
    from compression import quantization as q

    precisions = list(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if not precisions or unknown:
        raise ExportError(f"precisions must be a non-empty subset of {PRECISIONS}, got {list(precisions)}")
    if "int8" in precisions and calibration is None and quant_state is None:
        raise ExportError("int8 export needs calibration state: give calibration batches (--calib_task/"
                          "--calib_data) or a calibrated/QAT quant collection (--quant_state)")
    if storage.is_complete(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    model, config, params = models.load(model_dir)
    family = models.read_meta(model_dir)["family"]
    sig = signature(family, config, batch, seq)
    fn = output_fields(model.apply, outputs)
    variables = {"params": params}
    report = {"model": storage.absolute(model_dir), "family": family, "files": {}, "tensorrt": {}}
    with storage.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for precision in precisions:
            path = os.path.join(tmp, f"model_{precision}.onnx")
            kw = {}
            v = variables
            if precision == "int8":
                if quant_state is not None:
                    v = {**variables, q.QUANT: quant_state}
                else:
                    v = q.calibrate(model.apply, variables, list(calibration), method=calib_method)
                kw = {"quant": q.dense_quant_scales(model.apply, v, **sig.inputs),
                      "reference_fn": output_fields(q.fake_quant().wrap(model.apply), outputs),
                      "tolerance": INT8_VS_FAKE_QUANT}
            rep = export(fn, v, sig.inputs, path, precision=precision, dynamic_axes=sig.dynamic_axes,
                         dim_constraints=sig.dim_constraints, **kw)
            name = os.path.basename(path)
            report["files"][name] = {**rep.to_dict(), "path": name}
            ranges = sig.trt_ranges({**trt_ranges, "sequence_b": trt_ranges["sequence"]})
            profile = tensorrt.shape_profile(rep.inputs, ranges)
            report["tensorrt"][name] = tensorrt.trtexec_command(name, name.replace(".onnx", ".plan"), profile)
        with open(os.path.join(tmp, "parity.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(tmp, "tensorrt.sh"), "w") as f:
            f.write("#!/bin/sh\n# TensorRT engines (NVIDIA GPU, TensorRT >= 10); run from this directory\nset -e\n")
            f.write("".join(cmd + "\n" for cmd in report["tensorrt"].values()))
    return report


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    from experiments.tools import cli

    flags.DEFINE_string("model", None, "model directory (models.save)", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory (written atomically)", flag_values=fv)
    flags.DEFINE_list("precision", "fp32,fp16,int8", f"comma-separated subset of {','.join(PRECISIONS)}",
                      flag_values=fv)
    flags.DEFINE_string("calib_task", None, "task name for int8 calibration (e.g. sst2; Transformer family)",
                        flag_values=fv)
    flags.DEFINE_string("calib_data", None, "the calibration task's data directory", flag_values=fv)
    flags.DEFINE_integer("calib_batches", 16, "calibration batches", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("calib_batch_size", 32, "calibration batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("calib_method", None, "max, percentile:99.99, mse or entropy (default: the rules')",
                        flag_values=fv)
    flags.DEFINE_string("quant_state", None, ".npz quant collection (instead of calibration)", flag_values=fv)
    flags.DEFINE_integer("max_length", 128, "longest calibration sequence", lower_bound=4, flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace --out if it exists", flag_values=fv)
    flags.mark_flags_as_required(["model", "out"], flag_values=fv)
    cli.model_dir(fv, "model")
    cli.subset(fv, "precision", PRECISIONS)
    cli.task(fv, "calib_task")
    cli.directory(fv, "calib_data")
    cli.calibrator(fv, "calib_method")
    cli.file(fv, "quant_state")
    cli.new_output(fv, "out")
    flags.register_multi_flags_validator(
        ["precision", "calib_task", "quant_state"],
        lambda d: "int8" not in d["precision"] or d["calib_task"] or d["quant_state"],
        "int8 export needs calibration state: give --calib_task (and --calib_data) or --quant_state",
        flag_values=fv)


def run(fv: flags.FlagValues) -> dict:
    """The command line's work on parsed flags ``fv`` (:func:`define_flags`); returns the parity report."""
    calibration = quant_state = None
    if "int8" in fv.precision:
        if fv.quant_state:
            quant_state = load_quant_state(fv.quant_state)
        else:
            from experiments.data import load_task
            from experiments.runtime import evaluation
            data = load_task(fv.calib_task, fv.calib_data, tokenizer=fv.model, max_length=fv.max_length)
            calibration = evaluation.calibration_batches(data.train, evaluation.TRANSFORMER_INPUTS,
                                                         fv.calib_batches, fv.calib_batch_size)
    report = export_model_dir(fv.model, fv.out, fv.precision, calibration=calibration, quant_state=quant_state,
                              calib_method=fv.calib_method, overwrite=fv.overwrite)
    for name, info in report["files"].items():
        worst = max(c["max_abs_diff"] for c in info["comparisons"])
        print(f"{name}: max |onnxruntime - JAX| {worst:.3g} over {len(info['comparisons'])} comparisons")
    print("TensorRT (NVIDIA GPU):")
    for cmd in report["tensorrt"].values():
        print("  " + cmd)
    return report


if __name__ == "__main__":
    cli.run_script(define_flags, run)
