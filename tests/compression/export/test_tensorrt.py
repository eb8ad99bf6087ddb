"""TensorRT: shape profiles and the trtexec command everywhere; engines (fp32, fp16, int8 from the same
tiny Transformer) built and compared with onnxruntime only where an NVIDIA GPU and TensorRT are present."""

import numpy as np
import pytest

from compression.export import INT8_VS_FAKE_QUANT, ExportError, Tolerance, export, tensorrt
from tests.compression.export.conftest import CONSTRAINTS, batch, make_model

INPUTS = {"input_ids": ("int32", ["batch", "sequence"]), "char_ids": ("int32", ["batch", "sequence", 6])}


def test_shape_profile_and_trtexec_command():
    profile = tensorrt.shape_profile(INPUTS, {"batch": (1, 8, 32), "sequence": (2, 16, 64)})
    assert profile == {"input_ids": ((1, 2), (8, 16), (32, 64)), "char_ids": ((1, 2, 6), (8, 16, 6), (32, 64, 6))}
    assert tensorrt.trtexec_command("m.onnx", "m.plan", profile) == (
        "trtexec --onnx=m.onnx --saveEngine=m.plan --stronglyTyped "
        "--minShapes=input_ids:1x2,char_ids:1x2x6 --optShapes=input_ids:8x16,char_ids:8x16x6 "
        "--maxShapes=input_ids:32x64,char_ids:32x64x6")


@pytest.mark.parametrize("ranges,message", [
    ({"batch": (1, 8, 32)}, "dynamic dim 'sequence'"),
    ({"batch": (1, 8, 32), "sequence": (16, 8, 64)}, "1 <= min <= opt <= max"),
])
def test_shape_profile_errors(ranges, message):
    with pytest.raises(ExportError, match=message):
        tensorrt.shape_profile(INPUTS, ranges)


def test_build_without_tensorrt_is_a_clear_error(tmp_path):
    reason = tensorrt.unavailable()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(ExportError, match="TensorRT cannot run here"):
        tensorrt.build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "m.plan"), {})
    assert not (tmp_path / "m.plan").exists()


def test_engines_match_onnxruntime(tmp_path):
    pytest.importorskip("tensorrt")
    reason = tensorrt.unavailable()
    if reason is not None:
        pytest.skip(reason)
    from compression import quantization as q

    model, variables = make_model(num_layers=2)
    calib = [batch(4, 6, seed=i)["input_ids"] for i in range(2)]
    qvars = q.calibrate(model.apply, variables, calib, q.DEFAULT_RULES)
    scales = q.dense_quant_scales(model.apply, qvars, calib[0])
    feeds = [batch(3, 7, seed=1), batch(1, 16, seed=2)]
    tolerances = {"fp32": Tolerance(1e-4, 1e-4), "fp16": Tolerance(1e-2, 1e-2), "int8": INT8_VS_FAKE_QUANT}
    for precision, tol in tolerances.items():
        path = str(tmp_path / f"model_{precision}.onnx")
        kw = {"quant": scales, "reference_fn": q.fake_quant().wrap(model.apply)} if precision == "int8" else {}
        report = export(model.apply, qvars if precision == "int8" else variables, batch(2, 5), path,
                        precision=precision, dim_constraints=CONSTRAINTS, **kw)
        profile = tensorrt.shape_profile(report.inputs, {"batch": (1, 2, 4), "sequence": (1, 8, 16)})
        engine = tensorrt.build_engine(path, str(tmp_path / f"model_{precision}.plan"), profile)
        comparisons = tensorrt.compare_with_onnxruntime(path, engine, feeds, tol)
        assert all(np.isfinite(c.max_abs_diff) for c in comparisons)
