"""Int8 Q/DQ export from given per-module scales: the graph has the TensorRT form (symmetric int8, zero
point 0, per-channel weights on the output axis) and matches a JAX fake-quantized reference."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from compression.export import INT8_VS_FAKE_QUANT, ExportError, MatMulQuant, ParityError, Tolerance, export
from tests.compression.export.conftest import ort_run


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="down")(nn.relu(nn.Dense(8, name="up")(x)))


def _fq(x, s, lo, hi):
    return jnp.clip(jnp.round(x / s), lo, hi) * s


def _setup():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    net = _MLP()
    variables = net.init(jax.random.key(0), x)
    p = variables["params"]
    plan = {
        "up": MatMulQuant(np.abs(np.asarray(p["up"]["kernel"])).max(0) / 127, float(np.abs(x).max() / 127)),
        "down": MatMulQuant(np.float32(np.abs(np.asarray(p["down"]["kernel"])).max() / 127), 0.02),
    }

    def fake_quant_apply(v, x):  # the int8 model, written directly in JAX
        q = v["params"]
        h = _fq(x, plan["up"].activation_scale, -128, 127) @ _fq(q["up"]["kernel"], plan["up"].weight_scale, -127, 127)
        h = nn.relu(h + q["up"]["bias"])
        a = _fq(h, plan["down"].activation_scale, -128, 127)
        return a @ _fq(q["down"]["kernel"], plan["down"].weight_scale, -127, 127) + q["down"]["bias"]

    return net, variables, x, plan, fake_quant_apply


def test_int8_qdq_graph_matches_fake_quant_reference(tmp_path):
    net, variables, x, plan, reference = _setup()
    path = tmp_path / "model_int8.onnx"
    report = export(net.apply, variables, [x], str(path), precision="int8", quant=plan, reference_fn=reference,
                    tolerance=Tolerance(atol=1e-5, rtol=1e-5))
    assert report.op_counts["QuantizeLinear"] == 2 and report.op_counts["DequantizeLinear"] == 4
    m = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    w = inits["params/up/kernel_int8"]
    assert w.dtype == np.int8 and np.abs(w).max() == 127
    kernel = np.asarray(variables["params"]["up"]["kernel"])
    np.testing.assert_array_equal(w, np.round(kernel / plan["up"].weight_scale))
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
            axis = [onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"]
            per_channel = inits.get(n.input[1], np.zeros(())).size > 1
            assert axis == ([1] if per_channel else [])
    # at another batch size too
    y = np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32)
    np.testing.assert_allclose(ort_run(path, {"input_0": y})[0], reference(variables, y), atol=1e-5)


def test_int8_errors():
    net, variables, x, plan, _ = _setup()
    with pytest.raises(ExportError, match=r"no MatMul or Conv: \['head'\]"):
        export(net.apply, variables, [x], "/nonexistent/m.onnx", precision="int8", quant={**plan, "head": plan["up"]})
    with pytest.raises(ExportError, match="weight_scale has 3 channels for a kernel with 8 outputs"):
        export(net.apply, variables, [x], "/nonexistent/m.onnx", precision="int8",
               quant={"up": MatMulQuant(np.ones(3, np.float32), 0.1)})
    with pytest.raises(ValueError, match="activation_scale must be positive"):
        MatMulQuant(np.ones(3, np.float32), 0.0)
    with pytest.raises(ExportError, match="use precision='int8'"):
        export(net.apply, variables, [x], "/nonexistent/m.onnx", quant=plan)


def test_wrong_scales_fail_the_relative_rms_gate(tmp_path):
    net, variables, x, plan, reference = _setup()
    report = export(net.apply, variables, [x], str(tmp_path / "ok.onnx"), precision="int8", quant=plan,
                    reference_fn=reference, tolerance=INT8_VS_FAKE_QUANT)
    assert max(c.relative_rms for c in report.comparisons) < 1e-6
    up = plan["up"]
    bad = {**plan, "up": MatMulQuant(up.weight_scale, up.activation_scale / 20)}  # most inputs clip
    with pytest.raises(ParityError, match=r"relative RMS (0\.[2-9]|[1-9])[\d.]* > 0\.15"):
        export(net.apply, variables, [x], str(tmp_path / "bad.onnx"), precision="int8", quant=bad,
               reference_fn=reference, tolerance=INT8_VS_FAKE_QUANT)
    assert sorted(os.listdir(tmp_path)) == ["ok.onnx"]


def test_scales_from_the_quantization_library(tmp_path):
    """The plug-in: calibrated scales from compression.quantization drive the Q/DQ graph, which then matches
    that library's fake-quantized model."""
    from compression import quantization as q
    from tests.compression.export.conftest import CONSTRAINTS, batch, make_model

    model, variables = make_model()
    calib = [batch(4, 6, seed=i)["input_ids"] for i in range(2)]
    variables = q.calibrate(model.apply, variables, calib, q.DEFAULT_RULES)
    scales = q.dense_quant_scales(model.apply, variables, calib[0])
    report = export(model.apply, variables, batch(2, 5), str(tmp_path / "model_int8.onnx"), precision="int8",
                    quant=scales, reference_fn=q.fake_quant().wrap(model.apply), dim_constraints=CONSTRAINTS,
                    # as written, the Q/DQ graph computes the fake-quantized model exactly; with onnxruntime's
                    # integer kernels, a rounding flip here and there (relative RMS)
                    tolerance={"ORT_DISABLE_ALL": Tolerance(atol=1e-5), "ORT_ENABLE_ALL": INT8_VS_FAKE_QUANT})
    assert report.op_counts["QuantizeLinear"] == len(scales) == 8  # q, k, v, output, ffn x2, pooler, classifier
    # onnxruntime turns the encoder's six Q/DQ MatMuls into integer matmuls, also the query/key/value
    # projections that read one tensor with one scale (their Q/DQ pairs must not be merged into one shared
    # DequantizeLinear); the 2-D pooler and classifier become float Gemms first
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(tmp_path / "model_int8.onnx"), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert fused.count("MatMulIntegerToFloat") == 6


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x [B, W, C]
        return nn.Conv(4, kernel_size=(3,), name="conv")(x)


def test_int8_conv_has_per_output_channel_weight_scales(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 3)).astype(np.float32)
    net = _ConvNet()
    variables = net.init(jax.random.key(0), x)
    kernel = np.asarray(variables["params"]["conv"]["kernel"])  # [3 (width), 3 (in), 4 (out)]
    spec = MatMulQuant(np.abs(kernel).max((0, 1)) / 127, float(np.abs(x).max() / 127))

    def reference(v, x):
        w = _fq(v["params"]["conv"]["kernel"], spec.weight_scale, -127, 127)
        y = jax.lax.conv_general_dilated(_fq(x, spec.activation_scale, -128, 127), w, (1,), "SAME",
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y + v["params"]["conv"]["bias"]

    path = tmp_path / "conv_int8.onnx"
    report = export(net.apply, variables, [x], str(path), precision="int8", quant={"conv": spec},
                    reference_fn=reference, tolerance=Tolerance(atol=1e-5, rtol=1e-5),
                    dynamic_axes={"input_0": ("batch", "sequence", None)})
    assert report.op_counts["Conv"] == 1 and report.op_counts["QuantizeLinear"] == 1
    m = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    w = inits["params/conv/kernel_out_in_spatial_int8"]
    assert w.dtype == np.int8 and w.shape == (4, 3, 3)  # ONNX (out, in, width) layout
    np.testing.assert_array_equal(w, np.round(kernel / spec.weight_scale).transpose(2, 1, 0))
    dq = next(n for n in m.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] == "params/conv/kernel_out_in_spatial_int8")
    assert [onnx.helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"] == [0]
    y = rng.standard_normal((3, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(ort_run(path, {"input_0": y})[0], reference(variables, y), atol=1e-5)

