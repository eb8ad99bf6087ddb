"""FP8 (E4M3FN) quantization: fake quantization against ml_dtypes' rounding (ties, subnormals, saturation at
+-448, the scale), the straight-through gradients worked out by hand, FP8 calibration, and FP8 rules mixed with
int8 rules in one model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from compression import quantization as q
from compression.quantization.calibrators import histogram_mse, mse_threshold
from compression.quantization.fake_quant import fake_quantize

E4M3 = ml_dtypes.float8_e4m3fn


def _reference(x, s):
    """ml_dtypes' E4M3FN of clip(x / s, +-448), times s, in float64 (the TensorRT/ONNX definition)."""
    t = np.clip(np.asarray(x, np.float32) / np.float32(s), -448, 448)
    return t.astype(E4M3).astype(np.float64) * np.float64(np.float32(s))


def test_every_e4m3_value_and_every_midpoint_rounds_as_ml_dtypes():
    finite = np.array([v for v in np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32) if np.isfinite(v)])
    finite = np.unique(finite)
    assert finite.max() == 448 and finite[finite > 0].min() == 2.0 ** -9  # the subnormal floor
    mids = (finite[1:] + finite[:-1]) / 2  # ties: round to the even mantissa
    x = np.concatenate([finite, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]).astype(np.float32)
    got = np.asarray(fake_quantize(jnp.asarray(x), 1.0, format="fp8"), np.float64)
    np.testing.assert_array_equal(got, _reference(x, 1.0))
    np.testing.assert_array_equal(np.asarray(fake_quantize(jnp.asarray(finite), 1.0, format="fp8")), finite)


def test_ties_subnormals_and_saturation_by_hand():
    x = jnp.array([17.0, 19.0, 2.0 ** -10, 3 * 2.0 ** -10, 1e-5, 460.0, 464.0, 500.0, -1e6, 0.3])
    # 17 is halfway between 16 and 18: even mantissa (16); 19 -> 20; 2^-10 is half the smallest subnormal
    # (ties to 0); 3 * 2^-10 is halfway between 2^-9 and 2^-8 (-> 2^-8); beyond 448 saturates (no NaN, no inf).
    want = [16.0, 20.0, 0.0, 2.0 ** -8, 0.0, 448.0, 448.0, 448.0, -448.0, 0.3125]
    np.testing.assert_array_equal(fake_quantize(x, 1.0, format="fp8"), want)


def test_scale_per_tensor_and_per_channel():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 5)) * np.logspace(-4, 2, 5)).astype(np.float32)  # five magnitudes of columns
    s = np.float32(0.0123)
    np.testing.assert_array_equal(np.asarray(fake_quantize(jnp.asarray(x), s, format="fp8"), np.float64),
                                  _reference(x, s).astype(np.float32))
    amax = np.abs(x).max(0)
    scale = q.qarray.symmetric_scale(amax, 8, "fp8")
    np.testing.assert_allclose(scale, amax / 448, rtol=1e-7)
    y = np.asarray(fake_quantize(jnp.asarray(x), scale, axis=1, format="fp8"))
    want = np.stack([_reference(x[:, j], scale[j]) for j in range(5)], axis=1).astype(np.float32)
    np.testing.assert_array_equal(y, want)
    # each column's max maps onto 448 exactly, so it survives quantization up to the scale's rounding
    np.testing.assert_allclose(np.abs(y).max(0), amax, rtol=1e-6)


def test_bfloat16_inputs_and_jit():
    x = jnp.linspace(-3, 3, 37, dtype=jnp.bfloat16)
    y = jax.jit(lambda t: fake_quantize(t, 0.01, format="fp8"))(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float64), _reference(np.asarray(x, np.float32), 0.01)
                                  .astype(jnp.bfloat16).astype(np.float64))


def test_ste_gradient_inside_and_outside():
    s = 1 / 448  # range [-1, 1]
    x = jnp.array([-2.0, -1.0, -0.5, 0.3, 0.99, 1.0, 1.001, 1.5])
    g = jax.grad(lambda t: jnp.sum(fake_quantize(t, s, format="fp8") * jnp.arange(1.0, 9.0)))(x)
    np.testing.assert_array_equal(g, [0, 2, 3, 4, 5, 6, 0, 0])


def test_scale_gradient_by_hand():
    s = jnp.float32(0.5)
    x = jnp.array([1.3, -0.7, 300.0, -250.0])  # x/s = 2.6, -1.4 inside; 600 and -500 clipped
    g = jax.grad(lambda sc: fake_quantize(x, sc, format="fp8").sum())(s)
    t = np.asarray(x, np.float32) / np.float32(0.5)
    inside = t[:2].astype(E4M3).astype(np.float32) - t[:2]  # fp8(x/s) - x/s: 2.5 - 2.6, -1.5 + 1.4
    np.testing.assert_allclose(g, inside.sum() + 448 + (-448), rtol=1e-6)  # + the clipped two


def test_fp8_needs_8_bits_and_symmetry():
    with pytest.raises(ValueError, match="8 bits and symmetric"):
        fake_quantize(jnp.ones(3), 0.1, bits=4, format="fp8")
    with pytest.raises(ValueError, match="8 bits and symmetric"):
        q.QuantRule(format="fp8", symmetric=False)
    with pytest.raises(ValueError, match="calibrator 'entropy' does not calibrate the fp8 format"):
        q.QuantRule(format="fp8", calibrator="entropy")
    with pytest.raises(ValueError, match="unknown quantization format 'e5m2'"):
        q.QuantRule(format="e5m2")
    with pytest.raises(ValueError, match="entropy"):
        q.with_format([q.QuantRule(calibrator="entropy")], "fp8")
    assert all(r.format == "fp8" for r in q.FP8_RULES) and q.with_format(q.FP8_RULES, "int") == q.DEFAULT_RULES


def test_fp8_mse_against_brute_force():
    rng = np.random.default_rng(1)
    a = np.abs(rng.standard_t(3, 20000))
    amax = float(a.max())
    hist, _ = np.histogram(a, bins=256, range=(0, amax))
    centres = (np.arange(256) + 0.5) * amax / 256
    candidates = amax * np.arange(1, 257) / 256
    errors = [np.sum(hist * ((np.clip(centres / (t / 448), -448, 448).astype(E4M3).astype(np.float64) * t / 448
                              - centres) ** 2)) / hist.sum() for t in candidates]
    np.testing.assert_allclose(histogram_mse(hist, amax, candidates, 8, "fp8"), errors, rtol=1e-12)
    assert mse_threshold(hist, amax, 8, "fp8") == pytest.approx(candidates[int(np.argmin(errors))])


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="query")(x) + nn.Dense(6, name="key")(x)
        return nn.Dense(3, name="out")(nn.relu(h))


def test_mixed_formats_in_one_model_and_qat_gradients():
    """query/key FP8 (one rule), out int8: scales amax/448 and amax/127; the wrapped model computes what the
    fake quantizers compute by hand; gradients flow (straight through) to every kernel."""
    net = _Net()
    x = jax.random.normal(jax.random.key(1), (4, 5)) * 3
    variables = net.init(jax.random.key(0), x)
    rules = (q.QuantRule(r"^(query|key)$", format="fp8"), q.QuantRule(r"^out$"))
    calibrated = q.calibrate(net.apply, variables, [x], rules)
    quant = calibrated["quant"]
    amax_x = float(jnp.abs(x).max())
    assert float(quant["query"]["input_scale"]) == pytest.approx(amax_x / 448, rel=1e-6)
    p = variables["params"]

    def fq_w(w, fmt):
        amax = jnp.abs(w).max(0)
        return fake_quantize(w, amax / (448 if fmt == "fp8" else 127), axis=1, format=fmt)

    xq = fake_quantize(x, quant["query"]["input_scale"], format="fp8")
    h = (xq @ fq_w(p["query"]["kernel"], "fp8") + p["query"]["bias"]
         + xq @ fq_w(p["key"]["kernel"], "fp8") + p["key"]["bias"])
    h = nn.relu(h)
    h_float = nn.relu(x @ p["query"]["kernel"] + p["query"]["bias"] + x @ p["key"]["kernel"] + p["key"]["bias"])
    # calibration observes the float model, as TensorRT's does
    assert float(quant["out"]["input_scale"]) == pytest.approx(float(jnp.abs(h_float).max()) / 127, rel=1e-5)
    want = fake_quantize(h, quant["out"]["input_scale"]) @ fq_w(p["out"]["kernel"], "int") + p["out"]["bias"]
    apply = q.fake_quant(rules).wrap(net.apply)
    np.testing.assert_allclose(apply(calibrated, x), want, rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda params: jnp.sum(apply({**calibrated, "params": params}, x) ** 2))(p)
    for name in ("query", "key", "out"):
        g = np.asarray(grads[name]["kernel"])
        assert np.all(np.isfinite(g)) and np.any(g != 0)
    # the int8 path leaves the FP8 layers alone: only "out" becomes an int8 kernel
    v8 = q.int8(rules).init(jax.random.key(0), calibrated, net.apply, x)
    assert v8["params"]["out"]["kernel"].dtype == jnp.int8 and v8["params"]["query"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(q.int8(rules).wrap(net.apply)(v8, x), want, rtol=1e-5, atol=1e-6)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="query")(x) + nn.Dense(2, name="key")(x)


class _Top(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Block(name="attention")(x)


def test_a_shared_scale_cannot_mix_formats():
    x = jnp.ones((2, 5))
    top = _Top()
    variables = top.init(jax.random.key(0), x)
    rules = (q.QuantRule(r"^(.*)/query$", share_input_scale_group=1, format="fp8"),
             q.QuantRule(r"^(.*)/key$", share_input_scale_group=1))
    with pytest.raises(ValueError, match="share an input scale at 'attention' but their rules quantize differently"):
        q.calibrate(top.apply, variables, [x], rules)
