"""Calibration through interception on a toy model: statistics against numpy, scales, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import quantization as q
from compression.quantization.qarray import MIN_SCALE


class Toy(nn.Module):
    """x [B, 5] -> Dense "first" (4) -> relu -> Dense "second" (3)."""

    @nn.compact
    def __call__(self, x, scale: float = 1.0):
        h = nn.relu(nn.Dense(4, name="first")(x * scale))
        return nn.Dense(3, name="second")(h)


@pytest.fixture(scope="module")
def toy():
    model = Toy()
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.standard_normal((16, 5)), jnp.float32) for _ in range(3)]
    variables = model.init(jax.random.key(0), batches[0])
    return model, variables, batches


def _hidden(variables, x):
    p = variables["params"]["first"]
    return np.maximum(np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"]), 0)


def test_max_scales_against_numpy(toy):
    model, variables, batches = toy
    out = q.calibrate(model.apply, variables, batches, method="max")
    xs = np.concatenate([np.asarray(b) for b in batches])
    np.testing.assert_allclose(out["quant"]["first"]["input_scale"], np.abs(xs).max() / 127, rtol=1e-6)
    np.testing.assert_allclose(out["quant"]["second"]["input_scale"], _hidden(variables, xs).max() / 127,
                               rtol=1e-5)
    assert set(out) == {"params", "quant"}  # the statistics collection is not kept


def test_statistics_and_histogram_against_numpy(toy):
    model, variables, batches = toy
    stats = q.collect_statistics(model.apply, variables, batches, histogram=True)
    xs = np.concatenate([np.asarray(b) for b in batches])
    first = stats.by_module("first")
    assert first.amax == pytest.approx(np.abs(xs).max()) and first.lo == pytest.approx(xs.min())
    ref, _ = np.histogram(np.abs(xs), bins=2048, range=(0, np.abs(xs).max()))
    assert first.hist.sum() == xs.size
    assert np.abs(first.hist - ref).sum() <= 2  # bin-edge rounding may move a value by one bin
    p = 99.9
    got = stats.scales(f"percentile:{p}")["first"]["input_scale"] * 127
    # few samples: compare with the percentile's definition as the smallest value whose cdf reaches p
    assert abs(float(got) - np.percentile(np.abs(xs), p, method="inverted_cdf")) <= first.bin_width * 1.01
    # several calibrators from one collection; MSE and entropy clip at most at the max
    for method in ("mse", "entropy"):
        assert float(stats.scales(method)["second"]["input_scale"]) <= stats.by_module("second").amax / 127 + 1e-9


def test_static_arguments_and_generators(toy):
    model, variables, batches = toy
    gen = ((b, 2.0) for b in batches)  # a one-shot iterator, a static float argument, histogram pass
    out = q.calibrate(model.apply, variables, gen, method="percentile:100")
    xs = np.concatenate([np.asarray(b) for b in batches]) * 2.0
    np.testing.assert_allclose(out["quant"]["first"]["input_scale"], np.abs(xs).max() / 127, rtol=1e-6)
    kw = q.calibrate(model.apply, variables, [{"x": b} for b in batches], apply_kwargs={"scale": 2.0})
    np.testing.assert_allclose(kw["quant"]["first"]["input_scale"], out["quant"]["first"]["input_scale"])


def test_asymmetric_rule(toy):
    model, variables, batches = toy
    rules = (q.QuantRule("second", symmetric=False), q.QuantRule("first"))
    out = q.calibrate(model.apply, variables, batches, rules)
    xs = np.concatenate([np.asarray(b) for b in batches])
    h = _hidden(variables, xs)  # >= 0 after relu: range [0, max]
    np.testing.assert_allclose(out["quant"]["second"]["input_scale"], h.max() / 255, rtol=1e-5)
    assert float(out["quant"]["second"]["input_zero_point"]) == 0.0
    y = q.fake_quant(rules).wrap(model.apply)(out, batches[0])
    assert y.shape == (16, 3) and bool(jnp.all(jnp.isfinite(y)))
    with pytest.raises(ValueError, match="asymmetric"):
        q.QuantRule("second", symmetric=False, calibrator="entropy")


class Shared(nn.Module):
    """One Dense applied to two inputs (weight sharing, like a pair model's encoder): x, y [B, 5] -> [B, 2, 3]."""

    @nn.compact
    def __call__(self, x, y):
        dense = nn.Dense(3, name="shared")
        return jnp.stack([dense(x), dense(y)], 1)


def test_module_called_twice_calibrates_over_both_inputs():
    model = Shared()
    rng = np.random.default_rng(1)
    x, y = (jnp.asarray(rng.standard_normal((4, 5)) * s, jnp.float32) for s in (1.0, 3.0))
    variables = jax.jit(model.init)(jax.random.key(0), x, y)
    stats = q.collect_statistics(model.apply, variables, [(x, y)], histogram=True, num_bins=64)
    entry = stats.by_module("shared")
    both = np.abs(np.concatenate([np.asarray(x), np.asarray(y)]))
    assert entry.amax == pytest.approx(both.max()) and entry.hist.sum() == both.size  # both calls counted
    ref, _ = np.histogram(both, bins=64, range=(0, both.max()))
    assert np.abs(entry.hist - ref).sum() <= 2


def test_zero_batches(toy):
    model, variables, _ = toy
    with pytest.raises(ValueError, match="zero calibration batches"):
        q.calibrate(model.apply, variables, [])


def test_nan_names_the_module_and_batch(toy):
    model, variables, batches = toy
    bad = batches[1].at[3, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"batch 1: 1 non-finite .* module first\b"):
        q.calibrate(model.apply, variables, [batches[0], bad])


def test_all_zero_activation_warns_and_floors(toy):
    model, variables, _ = toy
    with pytest.warns(q.QuantizationWarning) as record:
        out = q.calibrate(model.apply, variables, [jnp.zeros((4, 5))], method="entropy")
    messages = [str(w.message) for w in record]
    for name in ("first", "second"):  # relu(0 @ W + 0) is all zero too
        assert any(f"module(s) {name} is all zero" in m for m in messages), messages
    s = float(out["quant"]["first"]["input_scale"])
    assert s == pytest.approx(MIN_SCALE) and np.isfinite(s) and s > 0
    y = q.fake_quant().wrap(model.apply)(out, jnp.zeros((4, 5)))
    assert bool(jnp.all(jnp.isfinite(y)))


def test_constant_activation_warns(toy):
    model, variables, _ = toy
    with pytest.warns(q.QuantizationWarning, match="first.*constant"):
        out = q.calibrate(model.apply, variables, [jnp.full((4, 5), 3.0)], method="entropy")
    np.testing.assert_allclose(out["quant"]["first"]["input_scale"], 3.0 / 127, rtol=1e-6)


def test_rule_matching_nothing_is_named(toy):
    model, variables, batches = toy
    with pytest.raises(ValueError, match=r"QuantRule #1 \(module_path='decoder'"):
        q.calibrate(model.apply, variables, batches, (q.QuantRule("first"), q.QuantRule("decoder")))
    # shadowed by an earlier rule: matches nothing either
    with pytest.raises(ValueError, match="QuantRule #1"):
        q.calibrate(model.apply, variables, batches, (q.QuantRule(".*"), q.QuantRule("second")))
    q.calibrate(model.apply, variables, batches, (q.QuantRule("first"), q.QuantRule("decoder", required=False)))


def test_already_quantized(toy):
    model, variables, batches = toy
    out = q.calibrate(model.apply, variables, batches)
    with pytest.raises(ValueError, match="already"):
        q.calibrate(model.apply, out, batches)
    with pytest.raises(ValueError, match="already"):
        q.fake_quant().init(jax.random.key(0), out, model.apply, batches[0])


def test_bad_rules():
    with pytest.raises(ValueError, match="regex"):
        q.QuantRule("(")
    with pytest.raises(ValueError, match="module_types"):
        q.QuantRule(module_types=("LSTM",))
    with pytest.raises(ValueError, match="group"):
        q.QuantRule("^(.*)/query$", share_input_scale_group=2)
    with pytest.raises(ValueError, match="calibrator"):
        q.QuantRule(calibrator="kl")
