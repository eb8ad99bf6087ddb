"""QArray and integer grids against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.quantization.qarray import MIN_SCALE, QArray, qrange


@pytest.mark.parametrize("bits,sym,expected", [
    (8, True, (-127, 127)), (4, True, (-7, 7)), (2, True, (-1, 1)),
    (8, False, (0, 255)), (4, False, (0, 15)), (2, False, (0, 3)),
])
def test_qrange(bits, sym, expected):
    assert qrange(bits, sym) == expected


def test_symmetric_per_tensor_round_trip_by_hand():
    x = jnp.array([-1.0, -0.5, 0.0, 0.26, 1.0])
    q = QArray.quantize(x)
    # amax 1 -> scale 1/127; -63.5 rounds half to even -> -64; 0.26 * 127 = 33.02 -> 33
    assert q.values.dtype == jnp.int8
    np.testing.assert_array_equal(q.values, [-127, -64, 0, 33, 127])
    np.testing.assert_allclose(q.scale, 1 / 127, rtol=1e-7)
    assert q.zero_point is None and q.symmetric and q.axis is None and q.bits == 8
    np.testing.assert_allclose(q.dequantize(), np.array([-127, -64, 0, 33, 127]) / 127, rtol=1e-6)


def test_asymmetric_round_trip_by_hand():
    x = jnp.array([-1.0, 0.0, 3.0])
    q = QArray.quantize(x, symmetric=False)
    # range [-1, 3]: scale 4/255, zero point round(63.75) = 64; -1 -> -64 + 64 = 0; 3 -> 191 + 64 = 255
    assert q.values.dtype == jnp.uint8
    np.testing.assert_allclose(q.scale, 4 / 255, rtol=1e-6)
    assert int(q.zero_point) == 64
    np.testing.assert_array_equal(q.values, [0, 64, 255])
    np.testing.assert_allclose(q.dequantize(), (np.array([0, 64, 255]) - 64) * 4 / 255, rtol=1e-6)


def test_asymmetric_range_contains_zero():
    q = QArray.quantize(jnp.array([2.0, 5.1]), symmetric=False)  # widened to [0, 5.1]: 0 stays exact
    assert int(q.zero_point) == 0
    np.testing.assert_allclose(q.scale, 5.1 / 255, rtol=1e-6)
    np.testing.assert_array_equal(q.values, [100, 255])


def test_four_bits_by_hand():
    q = QArray.quantize(jnp.array([0.7, -0.35, 0.1]), bits=4)
    # scale 0.1; -3.5 -> -4 (half to even); 1.0 -> 1
    np.testing.assert_allclose(q.scale, 0.1, rtol=1e-6)
    np.testing.assert_array_equal(q.values, [7, -4, 1])


def test_per_channel_axes():
    w = jnp.array([[1.0, -0.2, 0.0],
                   [-0.5, 0.4, 0.0]])  # [2, 3]
    q = QArray.quantize(w, axis=-1)  # one scale per column
    assert q.axis == (1,)
    np.testing.assert_allclose(q.scale, np.array([1.0, 0.4, MIN_SCALE * 127]) / 127, rtol=1e-6)
    np.testing.assert_array_equal(q.values, [[127, -64, 0], [-64, 127, 0]])  # -63.5 -> -64, -0.2/0.4*127 = -63.5
    q0 = QArray.quantize(w, axis=0)  # one scale per row
    assert q0.axis == (0,) and q0.scale.shape == (2,)
    np.testing.assert_allclose(q0.scale, np.array([1.0, 0.5]) / 127, rtol=1e-6)
    np.testing.assert_array_equal(q0.values[1], [-127, 102, 0])  # 0.4 / 0.5 * 127 = 101.6
    np.testing.assert_allclose(q0.dequantize(), w, atol=0.5 / 127 + 1e-7)


def test_given_scale_clips():
    q = QArray.quantize(jnp.array([0.5, 3.0, -3.0]), scale=jnp.float32(0.01))
    np.testing.assert_array_equal(q.values, [50, 127, -127])


def test_pytree_and_jit():
    q = QArray.quantize(jnp.ones((2, 3)), axis=1)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 2  # values, scale (no zero point)
    back = jax.jit(lambda a: a)(q)
    assert back.axis == (1,) and back.bits == 8
    np.testing.assert_array_equal(back.values, q.values)


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 1}, "num_bits"), ({"bits": 9}, "num_bits"), ({"bits": True}, "num_bits"),
    ({"axis": 2}, "out of range"), ({"axis": (0, 0)}, "repeats"),
    ({"scale": jnp.ones(3), "axis": None}, "scalar"),
    ({"scale": jnp.float32(1.0), "symmetric": False}, "zero_point"),
    ({"zero_point": 1}, "zero point 0"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QArray.quantize(jnp.ones((2, 3)), **kwargs)


def test_integer_input_rejected():
    with pytest.raises(ValueError, match="float"):
        QArray.quantize(jnp.ones((2,), jnp.int32))
