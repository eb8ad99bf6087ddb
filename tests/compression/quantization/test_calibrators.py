"""Calibrators on fixed data: percentile against numpy, entropy against a straightforward reference
implementation of TensorRT's algorithm, MSE against max calibration."""

import math

import numpy as np
import pytest

from compression.quantization.calibrators import (
    EntropyCalibrator,
    MaxCalibrator,
    MSECalibrator,
    PercentileCalibrator,
    entropy_divergences,
    entropy_threshold,
    get_calibrator,
    histogram_mse,
    mse_threshold,
    percentile_threshold,
)


def _abs_hist(x, bins=2048):
    a = np.abs(x)
    hist, _ = np.histogram(a, bins=bins, range=(0, a.max()))
    return hist, float(a.max())


def _fq_mse(x, threshold, bits=8):
    """Mean squared error of symmetric fake quantization of the raw data with a clipping threshold."""
    qmax = 2 ** (bits - 1) - 1
    s = threshold / qmax
    return float(np.mean((np.clip(np.round(x / s), -qmax, qmax) * s - x) ** 2))


def reference_entropy(hist, amax, bits=8):
    """TensorRT's entropy calibration written out step by step as on Migacz's slide (GTC 2017), with plain
    Python loops: returns (KL divergence per candidate i in [L, n), threshold)."""
    hist = [float(h) for h in hist]
    n = len(hist)
    levels = 2 ** (bits - 1)
    divergences = []
    for i in range(levels, n):
        reference_p = hist[:i]                        # P = bins [0, i)
        reference_p[i - 1] += sum(hist[i:])           # outliers folded into P's last bin
        candidate_q = [0.0] * i                       # Q = bins [0, i) quantized into `levels` levels ...
        per_level = i // levels
        for j in range(levels):
            start = j * per_level
            stop = start + per_level if j < levels - 1 else i   # the remainder joins the last level
            total = sum(hist[start:stop])
            used = [k for k in range(start, stop) if reference_p[k] != 0]
            for k in used:                            # ... and expanded over P's non-empty bins
                candidate_q[k] = total / len(used)
        p_total, q_total = sum(reference_p), sum(candidate_q)
        kl = 0.0
        for pk, qk in zip(reference_p, candidate_q):
            if pk == 0:
                continue
            if qk == 0:
                kl = math.inf
                break
            kl += (pk / p_total) * math.log((pk / p_total) / (qk / q_total))
        divergences.append(kl)
    best = min(range(len(divergences)), key=lambda k: divergences[k])  # first minimum
    if divergences[best] == math.inf:
        return divergences, amax
    return divergences, (best + levels + 0.5) * amax / n


@pytest.mark.parametrize("p", [99.9, 99.99, 99.999])
def test_percentile_within_one_bin_of_numpy(p):
    x = np.random.default_rng(0).standard_normal(200_000)
    hist, amax = _abs_hist(x)
    t = percentile_threshold(hist, amax, p)
    assert abs(t - np.percentile(np.abs(x), p)) <= amax / 2048 + 1e-12
    assert PercentileCalibrator(p).threshold(amax, hist, 8) == t


def test_percentile_by_hand():
    hist = np.array([50, 30, 15, 5])  # cdf 0.5, 0.8, 0.95, 1.0 over [0, 4]
    assert percentile_threshold(hist, 4.0, 80.0) == 2.0
    assert percentile_threshold(hist, 4.0, 90.0) == 3.0
    assert percentile_threshold(hist, 4.0, 100.0) == 4.0


def _fixed_histograms():
    rng = np.random.default_rng(1)
    gauss, gauss_amax = _abs_hist(rng.standard_normal(100_000))
    spiky = rng.integers(0, 50, 2048) * (rng.random(2048) > 0.3)  # zeros sprinkled in
    spiky[-5:] = 0
    spiky[2000] = 7
    tail = np.zeros(512, int)
    tail[:40] = np.arange(40, 0, -1) * 100
    tail[300] = 3  # a far outlier
    return [(gauss, gauss_amax, 8), (spiky, 3.0, 8), (tail, 1.0, 8), (tail, 1.0, 4)]


@pytest.mark.parametrize("case", range(4))
def test_entropy_matches_reference_implementation(case):
    hist, amax, bits = _fixed_histograms()[case]
    ref_kl, ref_threshold = reference_entropy(hist, amax, bits)
    candidates, kl = entropy_divergences(hist, bits)
    np.testing.assert_array_equal(candidates, np.arange(2 ** (bits - 1), len(hist)))
    np.testing.assert_array_equal(np.isinf(kl), np.isinf(ref_kl))
    finite = np.isfinite(kl)
    np.testing.assert_allclose(kl[finite], np.asarray(ref_kl)[finite], rtol=1e-9, atol=1e-15)
    assert entropy_threshold(hist, amax, bits) == pytest.approx(ref_threshold, rel=1e-12)


def test_entropy_divergence_by_hand():
    # 4 bins, bits=2 -> 2 levels, candidates i in [2, 4): i = 2 and i = 3.
    hist = np.array([4.0, 0.0, 2.0, 2.0])
    cands, kl = entropy_divergences(hist, bits=2)
    assert list(cands) == [2, 3]
    # i = 2: P = [4, 4] (outliers 4 folded); Q merges one bin per level: [4, 0] -> Q misses P's mass: inf
    assert kl[0] == np.inf
    # i = 3: P = [4, 0, 4] -> [.5, 0, .5]; levels [0,1) and [1,3) hold 4 and 2 of the unfolded hist;
    #        Q = [4, 0, 2] -> [2/3, 0, 1/3]; KL = .5 log(.5 / (2/3)) + .5 log(.5 / (1/3)) = .5 log(9/8)
    assert kl[1] == pytest.approx(0.5 * np.log(9 / 8))
    assert entropy_threshold(hist, 4.0, bits=2) == pytest.approx(3.5)


def test_entropy_clips_heavy_tail_below_max():
    x = np.random.default_rng(2).standard_t(df=2, size=200_000)
    hist, amax = _abs_hist(x)
    t = entropy_threshold(hist, amax)
    assert t < 0.5 * amax
    assert t > np.percentile(np.abs(x), 90)  # but does not clip the bulk


def test_mse_threshold_beats_max_on_heavy_tail():
    x = np.random.default_rng(3).standard_t(df=3, size=100_000)
    hist, amax = _abs_hist(x)
    t = mse_threshold(hist, amax)
    assert t < amax
    assert _fq_mse(x, t) <= _fq_mse(x, amax)


def test_mse_threshold_is_the_histogram_argmin():
    hist, amax = _abs_hist(np.random.default_rng(4).laplace(size=50_000), bins=256)
    edges = amax * np.arange(1, 257) / 256
    errors = histogram_mse(hist, amax, edges, 8)
    assert mse_threshold(hist, amax) == pytest.approx(edges[np.argmin(errors)])
    # by hand: one bin holding everything at centre 0.5 of [0, 1]: threshold 1 -> scale 1/127,
    # 0.5 * 127 = 63.5 -> 64 (half to even) -> error (64/127 - 0.5)^2
    assert histogram_mse([10.0], 1.0, [1.0], 8)[0] == pytest.approx((64 / 127 - 0.5) ** 2)


def test_get_calibrator():
    assert get_calibrator("max") == MaxCalibrator()
    assert get_calibrator("percentile") == PercentileCalibrator(99.99)
    assert get_calibrator("percentile:99.9") == PercentileCalibrator(99.9)
    assert get_calibrator("mse") == MSECalibrator() and get_calibrator("entropy") == EntropyCalibrator()
    assert not MaxCalibrator().needs_histogram and EntropyCalibrator().needs_histogram
    for bad in ("kl", "max:3", "percentile:abc", "percentile:101"):
        with pytest.raises(ValueError):
            get_calibrator(bad)


def test_bad_histograms():
    with pytest.raises(ValueError, match="empty"):
        entropy_threshold(np.zeros(2048), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        mse_threshold(np.array([1.0, -1.0]), 1.0)
    with pytest.raises(ValueError, match="more than 128"):
        entropy_threshold(np.ones(100), 1.0)
