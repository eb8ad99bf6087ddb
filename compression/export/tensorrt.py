"""TensorRT engines from the exported ONNX files, and their comparison with onnxruntime.

Precision is declared in the graph (float16 tensors, explicit int8 or FP8 Q/DQ), so engines are built as
*strongly typed* networks: TensorRT 10 takes the graph's types as they are, and TensorRT 11 removed the
FP16/INT8 builder flags altogether. Only on TensorRT 8.x (no strong typing) are the flags set from the
file's precision; FP8 files (float8e4m3fn Q/DQ, opset 19) need TensorRT 10 or later and a GPU of compute
capability 8.9 or more (Ada, Hopper: :data:`REQUIREMENTS`). Dynamic axes (``batch``, ``sequence``) get one
optimisation profile of (min, opt, max) sizes.

Everything here needs an NVIDIA GPU and the ``tensorrt`` package (running an engine also needs a CUDA
build of PyTorch for device buffers); :func:`unavailable` says why it cannot run, and
:func:`trtexec_command` gives the equivalent command line, which needs neither::

    profile = shape_profile(report.inputs, {"batch": (1, 8, 32), "sequence": (1, 128, 512)})
    print(trtexec_command("model_int8.onnx", "model_int8.plan", profile))
    build_engine("model_int8.onnx", "model_int8.plan", profile)
    comparisons = compare_with_onnxruntime("model_int8.onnx", "model_int8.plan", [feeds], Tolerance(1e-2, 1e-2))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from compression.export.parity import Comparison, ParityError, Tolerance, measure, ort_session
from compression.export.program import ExportError

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shapes
# What an engine of each precision needs (file precision as :func:`precision_of` reads it).
REQUIREMENTS = {
    "fp32": "TensorRT >= 10 (8.6 without --stronglyTyped)",
    "fp16": "TensorRT >= 10 (8.6 without --stronglyTyped)",
    "int8": "TensorRT >= 10 (8.6 without --stronglyTyped)",
    "fp8": "TensorRT >= 10 and compute capability >= 8.9 (Ada, Hopper and later)",
    "mixed": "TensorRT >= 10 and, for its FP8 layers, compute capability >= 8.9 (Ada, Hopper and later)",
}


def shape_profile(inputs: Mapping[str, tuple], ranges: Mapping[str, tuple[int, int, int]]) -> Profile:
    """(min, opt, max) shapes of every input from its dims and ``ranges`` of the named dims.

    Args:
      inputs: name -> ``(dtype name, dims)`` as in :attr:`~compression.export.api.ExportReport.inputs`
        (dims are ints or names such as ``batch``), or name -> dims.
      ranges: dim name -> (min, opt, max), e.g. ``{"batch": (1, 8, 32), "sequence": (1, 128, 512)}``.
    """
    profile: Profile = {}
    for name, spec in inputs.items():
        dims = spec[1] if len(spec) == 2 and isinstance(spec[0], str) else spec
        shapes = ([], [], [])
        for d in dims:
            if isinstance(d, str):
                if d not in ranges:
                    raise ExportError(f"input {name!r} has dynamic dim {d!r}; give its (min, opt, max) in ranges "
                                      f"(known: {sorted(ranges)})")
                lo, opt, hi = (int(v) for v in ranges[d])
                if not 1 <= lo <= opt <= hi:
                    raise ExportError(f"range of {d!r} must satisfy 1 <= min <= opt <= max, got {ranges[d]}")
                for s, v in zip(shapes, (lo, opt, hi)):
                    s.append(v)
            else:
                for s in shapes:
                    s.append(int(d))
        profile[name] = tuple(tuple(s) for s in shapes)
    return profile


def _shapes_flag(profile: Profile, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[which]))}" for name, shapes in profile.items())


def trtexec_command(onnx_path: str, engine_path: str, profile: Profile) -> str:
    """The ``trtexec`` command line that builds the same engine as :func:`build_engine` (TensorRT >= 10)."""
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped"]
    if profile:
        parts += [f"--minShapes={_shapes_flag(profile, 0)}", f"--optShapes={_shapes_flag(profile, 1)}",
                  f"--maxShapes={_shapes_flag(profile, 2)}"]
    return " ".join(parts)


def unavailable() -> str | None:
    """Why engines cannot be built here (no ``tensorrt`` package, no NVIDIA GPU), or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed"
    try:
        import torch
    except ImportError:
        return "running engines needs a CUDA build of PyTorch (not installed)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch"
    return None


def _trt():
    reason = unavailable()
    if reason is not None:
        raise ExportError(f"TensorRT cannot run here: {reason}")
    import tensorrt as trt
    return trt


def precision_of(onnx_path: str) -> str:
    """``fp32``, ``fp16``, ``int8``, ``fp8`` or ``mixed`` (int8 and FP8 Q/DQ) as the file declares it: the types of
    its DequantizeLinear zero points (or quantized initializers), else float16 initializers."""
    import onnx
    model = onnx.load(onnx_path, load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    formats = set()
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            t = types.get(n.input[2] if len(n.input) > 2 and n.input[2] else n.input[0])
            formats.add("fp8" if t == onnx.TensorProto.FLOAT8E4M3FN else "int8")
    if formats:
        return formats.pop() if len(formats) == 1 else "mixed"
    if any(t == onnx.TensorProto.FLOAT16 for t in types.values()):
        return "fp16"
    return "fp32"


def build_engine(onnx_path: str, engine_path: str, profile: Profile, workspace_gib: float = 4.0) -> str:
    """Builds a serialized engine from ``onnx_path`` and writes it to ``engine_path`` (atomically).

    Raises :class:`ExportError` with TensorRT's parser errors when the graph does not parse, or when the
    builder fails; nothing is written then. Returns ``engine_path``.
    """
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags_enum = trt.NetworkDefinitionCreationFlag
    strongly_typed = hasattr(flags_enum, "STRONGLY_TYPED")
    flags = 1 << int(flags_enum.STRONGLY_TYPED) if strongly_typed else 1 << int(flags_enum.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:  # TensorRT 8.x: precision from builder flags
        precision = precision_of(onnx_path)
        if precision in ("fp8", "mixed"):
            raise ExportError(f"{onnx_path} holds FP8 Q/DQ: {REQUIREMENTS[precision]}")
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if profile:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    partial = engine_path + ".partial"
    try:
        with open(partial, "wb") as f:
            f.write(bytes(serialized))
        os.replace(partial, engine_path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return engine_path


def run_engine(engine_path: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs a serialized engine once on ``feeds`` (host arrays); returns every output as a host array."""
    trt = _trt()
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    with open(engine_path, "rb") as f:
        engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
    if engine is None:
        raise ExportError(f"TensorRT could not deserialize {engine_path}")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    missing = sorted(set(inputs) - set(feeds))
    if missing:
        raise ExportError(f"engine inputs {missing} not fed (given: {sorted(feeds)})")
    buffers = {}
    for name in inputs:
        want = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=want)).cuda()
        context.set_input_shape(name, tuple(buffers[name].shape))
        context.set_tensor_address(name, buffers[name].data_ptr())
    outputs = [n for n in names if n not in inputs]
    for name in outputs:
        shape = tuple(context.get_tensor_shape(name))
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        buffers[name] = torch.from_numpy(np.empty(shape, dtype)).cuda()
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError(f"TensorRT failed to run {engine_path}")
    stream.synchronize()
    return {name: buffers[name].cpu().numpy() for name in outputs}


def compare_with_onnxruntime(onnx_path: str, engine_path: str, input_sets: Sequence[Mapping[str, np.ndarray]],
                             tolerance: Tolerance) -> list[Comparison]:
    """TensorRT vs onnxruntime (``ORT_DISABLE_ALL``, the graph as written) on every input set; raises
    :class:`~compression.export.parity.ParityError` listing every output outside ``tolerance``."""
    sess = ort_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    results = []
    for feeds in input_sets:
        expected = dict(zip(names, sess.run(None, dict(feeds))))
        got = run_engine(engine_path, feeds)
        shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
        for name in names:
            if np.shape(got[name]) != np.shape(expected[name]):
                raise ParityError(f"output {name!r}: TensorRT shape {np.shape(got[name])} != onnxruntime "
                                  f"{np.shape(expected[name])} on {shapes}")
            results.append(measure("TensorRT", shapes, name, got[name], expected[name], tolerance))
    failed = [c for c in results if not c.ok]
    if failed:
        raise ParityError("TensorRT does not match onnxruntime: " + "; ".join(
            f"{c.output} on {c.shapes}: {c.describe()}" for c in failed))
    return results
