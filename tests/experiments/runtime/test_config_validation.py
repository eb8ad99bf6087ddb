"""Field checks of experiment config schemas (experiments.runtime.config_validation)."""

import math

import pytest

from experiments.runtime.config_validation import ConfigError, Field, validate


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_fields_reject_nan_and_infinities(value):
    # NaN compares false with every bound, so min/max alone would let it through.
    assert Field(float, min=0.0, max=1.0).problems("config.optimizer.learning_rate", value) == [
        f"config.optimizer.learning_rate={value!r} is not a finite number"]
    assert Field(float).problems("config.x", value) == [f"config.x={value!r} is not a finite number"]
    with pytest.raises(ConfigError, match=rf"config.optimizer.learning_rate={value!r} is not a finite number"):
        validate({"optimizer": {"learning_rate": value}}, {"optimizer": {"learning_rate": Field(float)}})


def test_finite_floats_and_ints_still_pass():
    assert Field(float, min=0.0).problems("config.x", 1e308) == []
    assert Field(float).problems("config.x", 10 ** 400) == []  # an int beyond float range is still finite
    assert Field(int).problems("config.n", 3) == []
