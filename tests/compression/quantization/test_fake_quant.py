"""Fake quantization: forward values and straight-through gradients, worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.quantization.fake_quant import fake_quantize
from compression.quantization.qarray import QArray
from compression.quantization.qat import grid_dot


def test_forward_matches_qarray_round_trip():
    x = jax.random.normal(jax.random.key(0), (5, 4))
    for axis in (None, 0, 1):
        q = QArray.quantize(x, axis=axis)
        np.testing.assert_allclose(fake_quantize(x, q.scale, axis=axis), q.dequantize(), rtol=1e-6, atol=1e-7)
        qa = QArray.quantize(x, axis=axis, symmetric=False)
        np.testing.assert_allclose(fake_quantize(x, qa.scale, qa.zero_point, symmetric=False, axis=axis),
                                   qa.dequantize(), rtol=1e-6, atol=1e-6)


def test_forward_by_hand():
    s = 1 / 127
    x = jnp.array([-2.0, -0.5, 0.3, 1.5])
    # -2 and 1.5 clip to -127 s and 127 s; -0.5 -> -64 s (half to even); 0.3 -> round(38.1) = 38
    np.testing.assert_allclose(fake_quantize(x, s), np.array([-127, -64, 38, 127]) * s, rtol=1e-6)


def test_ste_gradient_inside_and_outside():
    s = 1 / 127  # clipping range [-1, 1]
    x = jnp.array([-2.0, -1.0, -0.5, 0.3, 0.99, 1.0, 1.001, 1.5])
    g = jax.grad(lambda t: jnp.sum(fake_quantize(t, s) * jnp.arange(1.0, 9.0)))(x)
    # identity (times the upstream weights 1..8) inside [-1, 1], zero outside
    np.testing.assert_array_equal(g, [0, 2, 3, 4, 5, 6, 0, 0])


def test_ste_gradient_per_channel_axes():
    x = jnp.array([[0.5, 0.5, 0.5],
                   [2.0, 2.0, 2.0]])
    amax = jnp.array([1.0, 0.4, 3.0])  # per column (axis 1)
    g = jax.grad(lambda t: fake_quantize(t, amax / 127, axis=1).sum())(x)
    np.testing.assert_array_equal(g, [[1, 0, 1], [0, 0, 1]])
    amax_rows = jnp.array([0.6, 1.0])  # per row (axis 0): row 0 inside, row 1 outside
    g0 = jax.grad(lambda t: fake_quantize(t, amax_rows / 127, axis=0).sum())(x)
    np.testing.assert_array_equal(g0, [[1, 1, 1], [0, 0, 0]])


def test_scale_gradient_by_hand():
    s = 0.1
    x = jnp.array([0.26, -0.33, 5.0, -20.0])  # bits=4: grid [-7, 7], range [-0.7, 0.7]
    ds = jax.grad(lambda sc: fake_quantize(x, sc, bits=4).sum())(jnp.float32(s))
    # inside: round(x/s) - x/s = 3 - 2.6 = 0.4 and -3 + 3.3 = 0.3; outside: qmax = 7 and qmin = -7
    np.testing.assert_allclose(ds, 0.4 + 0.3 + 7 - 7, rtol=1e-5)
    ds_c = jax.grad(lambda sc: fake_quantize(x[:, None] * jnp.ones((1, 2)), sc, bits=4, axis=1).sum())(
        jnp.array([s, s]))
    np.testing.assert_allclose(ds_c, [0.7, 0.7], rtol=1e-5)  # summed over the elements sharing each scale


def test_asymmetric_zero_point_gradient():
    s, z = jnp.float32(0.1), jnp.float32(10.0)  # unsigned 8 bits: range [-1.0, 24.5]
    x = jnp.array([-3.0, 0.0, 30.0])
    gx, gs, gz = jax.grad(lambda a, b, c: fake_quantize(a, b, c, symmetric=False).sum(), argnums=(0, 1, 2))(x, s, z)
    np.testing.assert_array_equal(gx, [0, 1, 0])
    np.testing.assert_allclose(gz, -2 * 0.1, rtol=1e-6)  # -s for each of the two clipped values
    np.testing.assert_allclose(gs, (0 - 10) + 0 + (255 - 10), rtol=1e-5)


def test_dtype_and_jit():
    x = jnp.linspace(-1, 1, 11).astype(jnp.bfloat16)
    y = jax.jit(lambda t: fake_quantize(t, 1 / 127))(x)
    assert y.dtype == jnp.bfloat16
    g = jax.grad(lambda t: fake_quantize(t, 1 / 127).astype(jnp.float32).sum())(x)
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(g == 1))


@pytest.mark.parametrize("kwargs,match", [
    ({"zero_point": 1.0}, "zero point 0"),
    ({"symmetric": False}, "zero_point"),
    ({"axis": 1}, "rank 1"),
    ({"bits": 9}, "num_bits"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fake_quantize(jnp.ones((2, 3)), jnp.float32(0.1), **kwargs)


def test_bad_per_channel_shape_and_dtype():
    with pytest.raises(ValueError, match="shape"):
        fake_quantize(jnp.ones((2, 3)), jnp.ones(2), axis=1)
    with pytest.raises(ValueError, match="float"):
        fake_quantize(jnp.ones((2,), jnp.int32), 0.1)


def test_grid_dot_is_the_integer_product_with_plain_gradients():
    """Dense layers of the fake-quantized model multiply on the integer grid, as the int8 kernel does."""
    rng = np.random.default_rng(0)
    qx, qw = rng.integers(-127, 128, (6, 40)), rng.integers(-127, 128, (40, 5))
    s_x, s_w = np.float32(0.013), rng.uniform(0.001, 0.01, 5).astype(np.float32)
    lhs, rhs = jnp.asarray(qx * s_x, jnp.float32), jnp.asarray(qw * s_w, jnp.float32)
    dn = (((1,), (0,)), ((), ()))
    y = jax.jit(grid_dot, static_argnums=4)(lhs, rhs, s_x, s_w, dn)
    acc = (qx @ qw).astype(np.float32)  # int64 in numpy: the exact integer sums
    np.testing.assert_array_equal(y, acc * (s_x * s_w))
    weights = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    g = jax.grad(lambda a, b: jnp.sum(grid_dot(a, b, s_x, s_w, dn) * weights), argnums=(0, 1))(lhs, rhs)
    want = jax.grad(lambda a, b: jnp.sum((a @ b) * weights), argnums=(0, 1))(lhs, rhs)
    for got, ref in zip(g, want):
        np.testing.assert_allclose(got, ref, rtol=1e-6)
