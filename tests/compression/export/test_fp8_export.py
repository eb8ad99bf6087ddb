"""FP8 (float8e4m3fn) Q/DQ export: opset 19 while int8 stays at 17, the TensorRT form (zero points float8 zeros,
weights float8 initializers equal to ml_dtypes' E4M3 codes), and the parity gate against the FP8 fake-quantized
JAX model, argmax agreement and a stated logit bound included; plans mixing int8, FP8 and float in one graph."""

import jax
import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compression import quantization as q
from compression.export import FP8_VS_FAKE_QUANT, ExportError, ParityError, export, tensorrt
from tests.compression.export.conftest import CONSTRAINTS, batch, jax_outputs, make_model, ort_run

E4M3 = ml_dtypes.float8_e4m3fn
# The FP8 graph multiplies the same E4M3 codes with the same float32 scales as the fake-quantized JAX model; only
# the float32 summation order differs (relative ~K * 2^-24, K <= 24 here), which could move an activation across
# an E4M3 rounding boundary (one step: at most 2^-3 of its magnitude) and so one logit by a few units of 1e-2 at
# most in this 2-layer model of logits O(1). Measured: no crossing at all (|diff| < 1e-6). The bound below
# allows summation-order differences without a crossing; the argmax must agree everywhere.
LOGIT_ATOL, LOGIT_RTOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def fp8_model():
    model, variables = make_model(num_layers=2)
    calib = [batch(4, 12, seed=s) for s in range(3)]
    fp8 = q.calibrate(model.apply, variables, calib, q.FP8_RULES)
    return model, variables, calib, fp8


def test_fp8_graph_form_and_parity(fp8_model, tmp_path):
    model, _, calib, fp8 = fp8_model
    scales = q.qdq_scales(model.apply, fp8, rules=q.FP8_RULES, **calib[0])
    assert {s[2] for s in scales.values()} == {"fp8"} and len(scales) == 14  # 6 Dense a layer, pooler, classifier
    reference = q.fake_quant(q.FP8_RULES).wrap(model.apply)
    path = tmp_path / "model_fp8.onnx"
    report = export(model.apply, fp8, batch(2, 5), str(path), precision="fp8", quant=scales, reference_fn=reference,
                    tolerance=FP8_VS_FAKE_QUANT, dim_constraints=CONSTRAINTS)
    assert report.opset == 19 and report.op_counts["QuantizeLinear"] == 14  # each module quantizes its input
    assert report.op_counts["DequantizeLinear"] == 14 * 2
    m = onnx.load(str(path))
    assert m.opset_import[0].version == 19 and m.ir_version == 9
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = inits[n.input[2]]
            assert zero.data_type == onnx.TensorProto.FLOAT8E4M3FN and not numpy_helper.to_array(zero).astype(
                np.float32).any()
    # weights are stored as their E4M3 codes: w / scale in float32, saturated, rounded to nearest even
    kernel = np.asarray(fp8["params"]["encoder"]["layer_0"]["intermediate"]["kernel"], np.float32)
    codes = numpy_helper.to_array(inits["params/encoder/layer_0/intermediate/kernel_fp8"])
    w_scale = scales["encoder/layer_0/intermediate"][0]
    assert codes.dtype == E4M3 and float(np.abs(codes.astype(np.float32)).max()) == 448.0
    np.testing.assert_array_equal(codes.astype(np.float32), (kernel / w_scale).astype(E4M3).astype(np.float32))
    assert tensorrt.precision_of(str(path)) == "fp8"
    # on inputs the export never saw (onnxruntime's default optimisation level)
    fake = jax.jit(lambda v, kw: reference(v, **kw).logits)
    for feeds in (batch(3, 9, seed=11), batch(5, 16, seed=12), batch(1, 3, seed=13)):
        logits_got, logits_want = ort_run(path, feeds)[0], np.asarray(fake(fp8, feeds))
        assert logits_got.shape == logits_want.shape
        np.testing.assert_array_equal(logits_got.argmax(-1), logits_want.argmax(-1))
        bound = LOGIT_ATOL + LOGIT_RTOL * np.abs(logits_want).max()
        assert np.abs(logits_got - logits_want).max() <= bound
    for c in report.comparisons:
        assert c.relative_rms <= 1e-5  # far inside the gate's 0.15: no rounding boundary crossed


def test_fp8_differs_from_int8_and_float(fp8_model, tmp_path):
    """The FP8 graph is not the float or the int8 graph under another name: its logits differ from both."""
    model, variables, calib, fp8 = fp8_model
    feeds = batch(4, 10, seed=5)
    int8 = q.calibrate(model.apply, variables, calib)
    paths = {}
    for name, v, rules in (("int8", int8, q.DEFAULT_RULES), ("fp8", fp8, q.FP8_RULES)):
        paths[name] = tmp_path / f"m_{name}.onnx"
        rep = export(model.apply, v, batch(2, 5), str(paths[name]), precision=name,
                     quant=q.qdq_scales(model.apply, v, rules=rules, **calib[0]),
                     reference_fn=q.fake_quant(rules).wrap(model.apply), dim_constraints=CONSTRAINTS)
        assert rep.opset == (17 if name == "int8" else 19)
    float_logits = jax_outputs(model, variables, feeds)[0]
    got = {name: ort_run(p, feeds)[0] for name, p in paths.items()}
    assert not np.allclose(got["fp8"], float_logits, atol=1e-6)
    assert not np.allclose(got["fp8"], got["int8"], atol=1e-6)
    np.testing.assert_allclose(got["fp8"], float_logits, atol=0.1 * np.abs(float_logits).max())


def test_mixed_plan_graph(fp8_model, tmp_path):
    model, variables, calib, _ = fp8_model
    rules = (q.QuantRule(r"^encoder/layer_0/", format="fp8"), q.QuantRule(r"^(.*)/(query|key|value)$",
                                                                          share_input_scale_group=1),
             q.QuantRule(r"^classifier$", weights=False, inputs=False), q.QuantRule(".*"))
    v = q.calibrate(model.apply, variables, calib, rules)
    scales = q.qdq_scales(model.apply, v, rules=rules, **calib[0])
    formats = {p: s[2] for p, s in scales.items()}
    assert formats["encoder/layer_0/attention/query"] == "fp8" and formats["encoder/layer_1/output"] == "int8"
    assert "classifier" not in formats
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="precision='fp8' allows fp8 Q/DQ; modules .* are int8"):
        export(model.apply, v, batch(2, 5), str(path), precision="fp8", quant=scales, dim_constraints=CONSTRAINTS)
    with pytest.raises(ExportError, match="FP8 Q/DQ .* needs opset 19 or later, got opset 17"):
        export(model.apply, v, batch(2, 5), str(path), precision="mixed", quant=scales, opset=17,
               dim_constraints=CONSTRAINTS)
    report = export(model.apply, v, batch(2, 5), str(path), precision="mixed", quant=scales,
                    reference_fn=q.fake_quant(rules).wrap(model.apply), tolerance=FP8_VS_FAKE_QUANT,
                    dim_constraints=CONSTRAINTS)
    assert report.opset == 19 and tensorrt.precision_of(str(path)) == "mixed"
    assert max(c.relative_rms for c in report.comparisons) <= 1e-3  # an int8 rounding flip is one step


def test_the_gate_catches_a_wrong_fp8_scale(fp8_model, tmp_path):
    model, _, calib, fp8 = fp8_model
    scales = q.qdq_scales(model.apply, fp8, rules=q.FP8_RULES, **calib[0])
    w, a, fmt = scales["classifier"]
    scales["classifier"] = (w, a / 64, fmt)  # the classifier's input saturates at 448 (too small) scales
    with pytest.raises(ParityError, match="onnxruntime does not match JAX"):
        export(model.apply, fp8, batch(2, 5), str(tmp_path / "m.onnx"), precision="fp8", quant=scales,
               reference_fn=q.fake_quant(q.FP8_RULES).wrap(model.apply), tolerance=FP8_VS_FAKE_QUANT,
               dim_constraints=CONSTRAINTS)
    assert not (tmp_path / "m.onnx").exists()
