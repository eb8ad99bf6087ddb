"""``export()``: trace, convert, make the precision variant, run the parity gates, and only then write.

    report = export(model.apply, variables, {"input_ids": ids, "attention_mask": mask}, "out/model_fp32.onnx",
                    dim_constraints=("sequence <= 512",))

The graph is written to ``<path>.partial`` and renamed to ``path`` only after every gate passed; a
failure removes the partial file and raises (:class:`~compression.export.program.ExportError`, or its
subclass :class:`~compression.export.parity.ParityError` for a failed gate), so nothing that looks
finished is left behind.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
import onnx

from compression.export import converter, parity, patterns, program
from compression.export import precision as precision_mod
from compression.export.program import ExportError
from compression.export.qdq import FP8_OPSET, MatMulQuant

PRECISIONS = ("fp32", "fp16", "int8", "fp8", "mixed")
QDQ_PRECISIONS = {"int8": ("int8",), "fp8": ("fp8",), "mixed": ("int8", "fp8")}  # -> the formats they allow


@dataclasses.dataclass
class ExportReport:
    """What an export wrote and measured.

    Attributes:
      path: the written ONNX file.
      precision: ``fp32``, ``fp16``, ``int8``, ``fp8`` or ``mixed``.
      opset: default-domain opset.
      inputs: name -> (dtype name, dims with ``batch``/``sequence`` names).
      outputs: output names (paths in the function's output pytree, e.g. ``logits``).
      op_counts: ONNX op type -> number of nodes.
      comparisons: every onnxruntime-vs-JAX comparison of the parity gate.
    """

    path: str
    precision: str
    opset: int
    inputs: dict
    outputs: list
    op_counts: dict
    comparisons: list

    def max_abs_diff(self, output: str | None = None, level: str | None = None) -> float:
        """Largest |onnxruntime - JAX| over the comparisons of ``output`` (all outputs when None)."""
        diffs = [c.max_abs_diff for c in self.comparisons
                 if (output is None or c.output == output) and (level is None or c.level == level)]
        return max(diffs) if diffs else float("nan")

    def to_dict(self) -> dict:
        """A JSON-ready summary (for ``parity.json``)."""
        return {
            "path": self.path, "precision": self.precision, "opset": self.opset, "inputs": self.inputs,
            "outputs": self.outputs, "op_counts": self.op_counts,
            "comparisons": [{"level": c.level, "shapes": {k: list(v) for k, v in c.shapes.items()},
                             "output": c.output, "max_abs_diff": c.max_abs_diff, "bound": c.bound,
                             "relative_rms": c.relative_rms, "rms_bound": c.rms_bound}
                            for c in self.comparisons],
        }


def _named_inputs(example_inputs) -> tuple[dict, bool]:
    if isinstance(example_inputs, Mapping):
        named, keyword = dict(example_inputs), True
    elif isinstance(example_inputs, (list, tuple)):
        named, keyword = {f"input_{i}": x for i, x in enumerate(example_inputs)}, False
    else:
        raise ExportError(f"example_inputs must be a dict of named arrays or a sequence of arrays, "
                          f"got {type(example_inputs).__name__}")
    if not named:
        raise ExportError("example_inputs is empty")
    out = {}
    for name, x in named.items():
        if not isinstance(name, str) or not name:
            raise ExportError(f"input names must be non-empty strings, got {name!r}")
        a = np.asarray(x)
        if a.dtype == object or a.ndim == 0:
            raise ExportError(f"input {name!r} must be an array with at least one axis, got {type(x).__name__} "
                              f"of shape {a.shape}")
        out[name] = a
    return out, keyword


def resized_inputs(inputs: Mapping[str, np.ndarray], axes: Mapping[str, tuple], sizes: Mapping[str, int]) -> dict:
    """``inputs`` with every named axis resized to ``sizes[name]``: cropped, or extended by repeating
    rows/positions cyclically (so ids stay valid and masks keep their values)."""
    out = {}
    for name, x in inputs.items():
        for axis, d in enumerate(axes[name]):
            if d is not None:
                x = np.take(x, np.arange(sizes[d]) % x.shape[axis], axis=axis)
        out[name] = x
    return out


def second_sizes(inputs: Mapping[str, np.ndarray], axes: Mapping[str, tuple]) -> dict:
    """Check sizes different from the traced ones: batch + 1, sequence halved (or 2 from 1), others + 1."""
    traced = {}
    for name, x in inputs.items():
        for axis, d in enumerate(axes[name]):
            if d is not None:
                traced.setdefault(d, x.shape[axis])
    out = {}
    for d, n in traced.items():
        if d == "sequence":
            out[d] = n // 2 if n > 1 else 2
        else:
            out[d] = n + 1
    return out


def export(
    apply_fn: Callable,
    variables,
    example_inputs,
    path: str,
    *,
    precision: str = "fp32",
    opset: int | None = None,
    dynamic_axes: Mapping[str, tuple] | None = None,
    dim_constraints: Sequence[str] = (),
    quant: Mapping | None = None,
    check_inputs: Sequence | None = None,
    tolerance: parity.Tolerance | Mapping[str, parity.Tolerance] | None = None,
    reference_fn: Callable | None = None,
) -> ExportReport:
    """Exports ``apply_fn(variables, **inputs)`` to ONNX at ``path`` after the parity gates pass.

    Args:
      apply_fn: e.g. ``model.apply``, or a function of ``(variables, **inputs)`` returning any pytree of
        arrays (``None`` leaves dropped); ONNX outputs are named by their pytree paths.
      variables: the variables pytree (parameters become initializers named by their paths; NaN/inf
        anywhere is an error naming the parameter).
      example_inputs: ``{name: array}`` (keyword inputs, the ONNX input names) or a sequence of arrays
        (positional, named ``input_0``...). Used for tracing and as the first parity input set.
      path: destination ``.onnx`` file.
      precision: ``fp32``; ``fp16`` (float16 weights/activations, float32 LayerNorm/softmax/reductions,
        float32 outputs); ``int8`` or ``fp8`` (explicit int8 or float8e4m3fn Q/DQ from ``quant``, every module in
        that format); ``mixed`` (each module's Q/DQ in its own format: a precision plan).
      opset: default-domain opset, 17 to 20; default 17, or 19 (:data:`~compression.export.qdq.FP8_OPSET`) when
        a module is quantized to FP8 (float8 Q/DQ needs 19). The int8 files stay at 17, where their parity was
        established; 17-20 is the window onnxruntime's Q/DQ handling and TensorRT share.
      dynamic_axes: input name -> one name (``"batch"``, ``"sequence"``, ...) or None per axis. Default:
        axis 0 ``batch``; axis 1 ``sequence`` for integer/bool inputs (ids, masks); other axes static.
      dim_constraints: JAX symbolic-shape constraints, e.g. ``("sequence <= 512",)`` when the model checks
        the sequence length against its position table.
      quant: for ``int8``/``fp8``/``mixed``: module path -> :class:`~compression.export.qdq.MatMulQuant` or a
        ``(weight_scale, activation_scale[, format])`` tuple, as ``compression.quantization.dense_quant_scales``
        or ``qdq_scales`` return. ``variables`` must then hold the float weights (not int8-converted kernels).
      check_inputs: extra parity input sets (same structure as ``example_inputs``). By default one set at
        another batch and sequence size is derived from the example (see :func:`second_sizes`).
      tolerance: overrides ``parity.TOLERANCES[precision]``; a ``Tolerance`` or ``{level: Tolerance}`` for
        the onnxruntime levels of ``parity.LEVELS``.
      reference_fn: what onnxruntime is compared with (same signature as ``apply_fn``); defaults to
        ``apply_fn``. For Q/DQ files, pass the fake-quantized model to compare like with like (and
        ``tolerance=parity.INT8_VS_FAKE_QUANT`` or ``parity.FP8_VS_FAKE_QUANT``).

    Returns:
      An :class:`ExportReport`. Raises :class:`ExportError` / :class:`~compression.export.parity.ParityError`.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    path = os.fspath(path)
    if not path.endswith(".onnx"):
        raise ExportError(f"path must end with .onnx, got {path!r}")
    if precision in QDQ_PRECISIONS and not quant:
        raise ExportError(f"precision={precision!r} needs quant={{module path: MatMulQuant}} from calibration or QAT "
                          "state")
    if precision not in QDQ_PRECISIONS and quant:
        raise ExportError(f"quant scales given for precision={precision!r}; use precision='int8' (or 'fp8', 'mixed')")
    if quant:  # (weight_scale, activation_scale[, format]), e.g. compression.quantization.dense_quant_scales()
        quant = {path: q if isinstance(q, MatMulQuant) else MatMulQuant(*q) for path, q in quant.items()}
        wrong = sorted(p for p, q in quant.items() if q.format not in QDQ_PRECISIONS[precision])
        if wrong:
            raise ExportError(f"precision={precision!r} allows {' and '.join(QDQ_PRECISIONS[precision])} Q/DQ; "
                              f"modules {wrong[:3]} are {quant[wrong[0]].format} (use precision='mixed')")
    fp8 = any(q.format == "fp8" for q in (quant or {}).values())
    if opset is None:
        opset = FP8_OPSET if fp8 else converter.DEFAULT_OPSET
    if not parity.OPSET_WINDOW[0] <= opset <= parity.OPSET_WINDOW[1]:
        raise ExportError(f"opset {opset} outside {parity.OPSET_WINDOW[0]}-{parity.OPSET_WINDOW[1]} "
                          "(LayerNormalization needs 17; TensorRT supports up to 20)")
    if fp8 and opset < FP8_OPSET:
        raise ExportError(f"FP8 Q/DQ (float8e4m3fn) needs opset {FP8_OPSET} or later, got opset {opset}")
    inputs, keyword = _named_inputs(example_inputs)
    names = list(inputs)
    axes = {n: program.default_axes(inputs[n].shape, inputs[n].dtype) for n in names}
    if dynamic_axes is not None:
        unknown = sorted(set(dynamic_axes) - set(names))
        if unknown:
            raise ExportError(f"dynamic_axes names unknown inputs {unknown}; inputs are {names}")
        axes = {n: tuple(dynamic_axes.get(n, (None,) * inputs[n].ndim)) for n in names}
    sets = [inputs]
    for extra in (check_inputs or ()):
        sets.append(_named_inputs(extra)[0])
    if check_inputs is None:
        sets.append(resized_inputs(inputs, axes, second_sizes(inputs, axes)))
    program.check_finite(variables)

    fn = apply_fn if keyword else (lambda v, **kw: apply_fn(v, *[kw[n] for n in names]))
    ref = reference_fn or apply_fn
    ref_fn = ref if keyword else (lambda v, **kw: ref(v, *[kw[n] for n in names]))
    tags = patterns.ModuleTags()
    prog = program.trace(fn, variables, inputs, axes, dim_constraints, context=tags.context)
    model = converter.convert(prog, opset=opset, quant=quant if precision in QDQ_PRECISIONS else None, tags=tags)
    if precision == "fp16":
        model = precision_mod.to_float16(model)

    flat_ref = jax.jit(lambda v, kw: [leaf for leaf in jax.tree_util.tree_leaves(ref_fn(v, **kw))])
    tol = tolerance or parity.TOLERANCES[precision]
    partial = path + ".partial"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        onnx.save(model, partial)
        checked = parity.check_structure(partial)
        parity.check_tensorrt(checked)
        comparisons = parity.compare(partial, lambda feeds: flat_ref(variables, dict(feeds)), sets,
                                     prog.output_names, tol)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    counts = collections.Counter(n.op_type for n in model.graph.node)
    in_info = {i.name: (onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name,
                        [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
               for i in model.graph.input}
    return ExportReport(path, precision, opset, in_info, list(prog.output_names), dict(sorted(counts.items())),
                        comparisons)
