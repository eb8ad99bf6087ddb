"""Parity gates run by every export; a failed gate raises :class:`ParityError` with the measurements.

1. Structure: ``onnx.checker.check_model(full_check=True)`` and strict shape inference (types checked,
   data propagation on), so a graph that only onnxruntime's lenient loader would accept fails here.
2. TensorRT: every node's op is in :data:`TENSORRT_OPS` and the default-domain opset is in
   :data:`OPSET_WINDOW`. The allow-list is the ONNX operators onnx-tensorrt (TensorRT 10, opsets 9-20)
   documents as supported, minus those older TensorRT 8.x releases still lacked (Reciprocal, Mod,
   IsInf, MatMulInteger, ConvInteger) so that an export also builds on TensorRT 8.6; custom domains
   (``com.microsoft`` fusions) are not allowed. The window 17-20 is where onnxruntime's Q/DQ handling
   and TensorRT overlap (LayerNormalization needs 17).
3. Numerics: onnxruntime (CPU) against the JAX function on each input set, at two onnxruntime graph
   optimisation levels (``ORT_DISABLE_ALL`` runs the graph as written; ``ORT_ENABLE_ALL``, onnxruntime's
   default, runs its own fusions and layout transforms, which is what deployment sees), within
   :data:`TOLERANCES` of the precision (elementwise, or relative RMS for int8: see :class:`Tolerance`),
   for every output; a tolerance may also differ per level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from compression.export.program import ExportError

OPSET_WINDOW = (17, 20)

TENSORRT_OPS = frozenset([
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu",
    "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GRU", "HardSigmoid", "Identity", "If",
    "InstanceNormalization", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax",
    "Loop", "LRN", "LSTM", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "PRelu",
    "QuantizeLinear", "Range", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "RNN", "Round", "Scan",
    "ScatterElements", "ScatterND", "Selu", "Shape", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax",
    "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "Tile", "TopK",
    "Transpose", "Unsqueeze", "Where", "Xor"])


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Allowed onnxruntime-vs-JAX difference per output.

    Elementwise (``relative_rms`` None): max |ort - jax| <= ``atol + rtol * max|jax|``. With
    ``relative_rms``: ||ort - jax||_2 / ||jax||_2 <= ``relative_rms`` instead. The latter is for int8
    graphs: an activation that lands on the other side of a rounding boundary (float summation order
    differs between runtimes) moves a few elements by a whole quantization step, large elementwise and
    negligible overall, while a wiring error (a wrong scale, axis or layout) moves all of them.
    """

    atol: float = 0.0
    rtol: float = 0.0
    relative_rms: float | None = None

    def bound(self, reference: np.ndarray) -> float:
        scale = float(np.max(np.abs(reference))) if reference.size else 0.0
        return self.atol + self.rtol * scale


# fp32: the acceptance bound on logits. fp16: float16 storage/compute (11-bit mantissa) through a
# few layers, float32 LayerNorm/softmax. int8 against the float model: a wiring check only (int8
# accuracy is judged by the task metric); against the fake-quantized JAX model (``reference_fn``),
# INT8_VS_FAKE_QUANT checks that the graph computes what the quantized model computes. Each layer
# matches it closely (MiniLM, one layer: relative RMS 2e-5), but a float difference of 1e-6 moves some
# activations across a rounding boundary, and the flips compound through the layers (all six MiniLM
# layers: 0.086, at either onnxruntime level); a wrong scale, axis or layout gives errors of order 1.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2),
    "int8": Tolerance(relative_rms=0.3),
    "fp8": Tolerance(relative_rms=0.3),
    "mixed": Tolerance(relative_rms=0.3),
}
INT8_VS_FAKE_QUANT = Tolerance(relative_rms=0.15)
FP8_VS_FAKE_QUANT = Tolerance(relative_rms=0.15)


class ParityError(ExportError):
    """An exported graph failed a parity gate."""


@dataclasses.dataclass
class Comparison:
    """One output compared on one input set at one onnxruntime optimisation level.

    ``max_abs_diff`` and ``relative_rms`` (||ort - jax|| / ||jax||) are always measured; ``bound`` is the
    elementwise bound, ``rms_bound`` the relative-RMS bound when the tolerance is of that kind (then it
    decides).
    """

    level: str
    shapes: dict
    output: str
    max_abs_diff: float
    bound: float
    relative_rms: float = 0.0
    rms_bound: float | None = None

    @property
    def ok(self) -> bool:
        if self.rms_bound is not None:
            return bool(np.isfinite(self.relative_rms)) and self.relative_rms <= self.rms_bound
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.bound

    def describe(self) -> str:
        if self.rms_bound is not None:
            return f"relative RMS {self.relative_rms:.3g} > {self.rms_bound:.3g} (max |diff| {self.max_abs_diff:.3g})"
        return f"max |diff| {self.max_abs_diff:.3g} > {self.bound:.3g}"


def measure(level: str, shapes: dict, name: str, got: np.ndarray, want: np.ndarray, tol: Tolerance) -> Comparison:
    """A :class:`Comparison` of ``got`` against ``want`` (integer and bool outputs must match exactly)."""
    g, e = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = float(np.max(np.abs(g - e))) if e.size else 0.0
    norm = float(np.sqrt(np.sum(e * e)))
    rms = float(np.sqrt(np.sum((g - e) ** 2)) / norm) if norm > 0 else (0.0 if diff == 0 else float("inf"))
    exact = np.asarray(got).dtype == np.bool_ or np.issubdtype(np.asarray(got).dtype, np.integer)
    if exact:
        return Comparison(level, shapes, name, diff, 0.0, rms, None)
    return Comparison(level, shapes, name, diff, tol.bound(e), rms, tol.relative_rms)


def check_structure(path: str) -> onnx.ModelProto:
    """Checker (full) and strict, type-checking shape inference on the file at ``path``."""
    try:
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ParityError(f"ONNX structure gate failed: {e}") from e


def check_tensorrt(model: onnx.ModelProto) -> None:
    """Raises unless every op (including Loop/If bodies) is in :data:`TENSORRT_OPS` and the opset fits."""
    opsets = {o.domain: o.version for o in model.opset_import}
    version = opsets.get("", opsets.get("ai.onnx"))
    bad_domains = sorted(d for d in opsets if d not in ("", "ai.onnx"))
    problems = []
    if version is None or not OPSET_WINDOW[0] <= version <= OPSET_WINDOW[1]:
        problems.append(f"opset {version} outside the TensorRT window {OPSET_WINDOW[0]}-{OPSET_WINDOW[1]}")
    if bad_domains:
        problems.append(f"custom op domains {bad_domains}")
    unsupported: dict[str, str] = {}

    def visit(graph):
        for n in graph.node:
            if n.domain not in ("", "ai.onnx") or n.op_type not in TENSORRT_OPS:
                unsupported.setdefault(f"{n.domain + '.' if n.domain else ''}{n.op_type}", n.name)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)

    visit(model.graph)
    if unsupported:
        problems.append("ops outside the TensorRT allow-list: "
                        + ", ".join(f"{op} (e.g. node {name!r})" for op, name in sorted(unsupported.items())))
    if problems:
        raise ParityError("TensorRT gate failed: " + "; ".join(problems))


LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")


def ort_levels():
    import onnxruntime as ort
    return {name: getattr(ort.GraphOptimizationLevel, name)
            for name in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")}


def ort_session(path: str, level: str = "ORT_DISABLE_ALL"):
    """An onnxruntime CPU session on the model at ``path`` with the named graph optimisation level.

    Integer matmuls run in onnxruntime's exact mode (``session.x64quantprecision``): on x86 CPUs without
    VNNI its default uint8 x int8 kernels add pairs of products in 16 bits, which saturates (elements off
    by several units on MiniLM), and the gate checks the graph, not that CPU's kernels. Deployments on
    such CPUs should set the same option; it has no effect elsewhere.
    """
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort_levels()[level]
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_onnxruntime(path: str, feeds: Mapping[str, np.ndarray], level: str = "ORT_DISABLE_ALL") -> list[np.ndarray]:
    """Runs the model at ``path`` once on CPU with the named graph optimisation level."""
    return ort_session(path, level).run(None, dict(feeds))


def compare(
    path: str,
    reference: Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]],
    input_sets: Sequence[Mapping[str, np.ndarray]],
    output_names: Sequence[str],
    tolerance: Tolerance | Mapping[str, Tolerance],
    levels: Sequence[str] = LEVELS,
) -> list[Comparison]:
    """onnxruntime vs ``reference`` on every input set and level; raises :class:`ParityError` on any
    output outside ``tolerance`` (one for all levels, or ``{level: Tolerance}``; the message lists every
    failing comparison)."""
    if isinstance(tolerance, Mapping):
        missing = [lv for lv in levels if lv not in tolerance]
        if missing:
            raise ExportError(f"tolerance has no entry for levels {missing}")
    expected = [[np.asarray(r, np.float64) for r in reference(feeds)] for feeds in input_sets]
    results = []
    for level in levels:
        tol = tolerance[level] if isinstance(tolerance, Mapping) else tolerance
        try:
            sess = ort_session(path, level)
        except Exception as e:  # onnxruntime rejects the graph
            raise ParityError(f"onnxruntime ({level}) cannot load the graph: {e}") from e
        for feeds, want in zip(input_sets, expected):
            shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
            try:
                got = sess.run(None, dict(feeds))
            except Exception as e:  # onnxruntime fails at run time
                raise ParityError(f"onnxruntime ({level}) failed on inputs {shapes}: {e}") from e
            for name, g, e in zip(output_names, got, want):
                if np.shape(g) != e.shape:
                    raise ParityError(f"output {name!r}: onnxruntime ({level}) shape {np.shape(g)} != JAX {e.shape} "
                                      f"on inputs {shapes}")
                results.append(measure(level, shapes, name, g, e, tol))
    failed = [c for c in results if not c.ok]
    if failed:
        raise ParityError("onnxruntime does not match JAX: " + "; ".join(
            f"{c.output} at {c.level} on {c.shapes}: {c.describe()}" for c in failed))
    return results


FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "Gelu",
             "BiasGelu", "FastGelu", "EmbedLayerNormalization")


def onnxruntime_bert_fusion(path: str, num_heads: int, hidden_size: int, out_path: str | None = None,
                            opt_level: int = 1) -> dict[str, int]:
    """Runs onnxruntime's BERT optimizer on ``path`` and returns the fused-op counts (``FUSED_OPS``).

    The attention mask is kept as a 2-D mask (``AttentionMaskFormat.AttentionMask``): the default
    converts it to sequence lengths, which is exact only for right-padded masks. ``opt_level`` > 1
    imports torch, so 0 or 1. Writes the optimized model to ``out_path`` when given.
    """
    if opt_level not in (0, 1):
        raise ValueError(f"opt_level must be 0 or 1 (higher levels need torch), got {opt_level}")
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    optimized = optimize_model(path, model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=opt_level, optimization_options=options)
    if out_path is not None:
        optimized.save_model_to_file(out_path)
    counts: dict[str, int] = {}
    for node in optimized.model.graph.node:
        if node.op_type in FUSED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
