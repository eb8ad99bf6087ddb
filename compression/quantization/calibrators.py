"""Calibrators: clipping thresholds from activation statistics (max, percentile, MSE, entropy).

Every calibrator turns what :mod:`compression.quantization.calibration` collected for one activation tensor
into a clipping threshold ``T`` (the symmetric scale is then ``T / qmax``). The histogram is TensorRT's: the
absolute values ``|x|`` in ``num_bins`` (2048) equal bins over ``[0, amax]``, ``amax`` the running max.

* ``max``: ``T = amax``. Never clips; one outlier costs resolution everywhere.
* ``percentile(p)``: the upper edge of the bin where the cumulative fraction of ``|x|`` first reaches
  ``p / 100`` (99.9, 99.99, 99.999 are the usual choices); within one bin width of ``np.percentile(|x|, p)``.
* ``mse``: ``T`` among the bin upper edges minimising the expected squared quantisation error of the
  histogram, each bin represented by its centre: ``sum_j hist_j (fq(c_j; T) - c_j)^2`` (rounding and clipping
  error together).
* ``entropy``: TensorRT's KL-divergence calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017). With
  ``L = 2^(bits-1)`` levels (128 for 8 bits), for each ``i`` in ``[L, num_bins)``:

  - the reference ``P = hist[:i]`` with the outliers ``sum(hist[i:])`` folded into its last bin;
  - the candidate ``Q``: the unfolded ``hist[:i]`` merged into ``L`` levels (``i // L`` consecutive bins per
    level, the remainder joining the last level), each level's count then spread evenly over the bins of the
    level where ``P`` is non-zero (zero bins of ``P`` stay zero in ``Q``);
  - ``KL(P || Q)`` with both normalised (``inf`` where ``Q`` is 0 and ``P`` is not: that candidate is never
    chosen);

  and ``T = (i* + 0.5) * bin_width`` for the ``i*`` of least divergence (the first one on ties), as on
  TensorRT's slide. Folding the outliers into ``P`` but not into ``Q`` is what makes clipping cost divergence.
  If every candidate diverges (degenerate histograms) ``T = amax``.

**FP8** (E4M3, ``format="fp8"``): ``max`` and ``percentile`` give the same thresholds as for int8 (the scale is
then ``T / 448``); ``mse`` measures the error of E4M3 rounding (``ml_dtypes.float8_e4m3fn``) instead of the
integer grid's. ``entropy`` is int8's only: its candidate distributions merge bins into the 128 equal levels of
the integer grid, which FP8's logarithmically spaced values do not have (NVIDIA's Model Optimizer calibrates FP8
with max). A calibrator lists the formats it calibrates in ``formats``.

The functions are plain numpy (float64) and run on the host after collection.
"""

from __future__ import annotations

import abc
import dataclasses

import ml_dtypes
import numpy as np

from compression.quantization.qarray import FP8_MAX, check_bits, check_format, qrange

DEFAULT_NUM_BINS = 2048  # TensorRT's histogram size


def _check_hist(hist) -> np.ndarray:
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 1 or hist.size == 0:
        raise ValueError(f"a histogram must be a non-empty 1-D array, got shape {hist.shape}")
    if np.any(hist < 0) or not np.all(np.isfinite(hist)):
        raise ValueError("a histogram must have finite non-negative counts")
    if hist.sum() <= 0:
        raise ValueError("the histogram is empty (no counts)")
    return hist


def percentile_threshold(hist, amax: float, percentile: float) -> float:
    """Upper edge of the bin holding the ``percentile`` of ``|x|``; ``hist`` spans ``[0, amax]``."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    hist = _check_hist(hist)
    cdf = np.cumsum(hist) / hist.sum()
    idx = int(np.searchsorted(cdf, percentile / 100.0 - 1e-12))  # tolerance: cdf[-1] may be 1 - eps
    idx = min(idx, hist.size - 1)
    return float(amax) * (idx + 1) / hist.size


def fp8_grid(t: np.ndarray) -> np.ndarray:
    """``t`` saturated to +-448 and rounded to the nearest float8_e4m3fn (ties to even), as float64."""
    return np.clip(t, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def histogram_mse(hist, amax: float, thresholds, bits: int, format: str = "int") -> np.ndarray:
    """Expected squared error of symmetric ``bits``-bit quantisation (or FP8) with each clipping threshold.

    Each bin of ``hist`` (over ``[0, amax]``) is represented by its centre. Returns one value per threshold:
    ``sum_j hist_j (fq(c_j; T) - c_j)^2 / sum_j hist_j``.
    """
    hist = _check_hist(hist)
    width = float(amax) / hist.size
    centres = (np.arange(hist.size) + 0.5) * width
    t = np.asarray(thresholds, dtype=np.float64)[:, None]
    if check_format(format, bits) == "fp8":
        scale = t / FP8_MAX
        fq = fp8_grid(centres[None, :] / scale) * scale
    else:
        _, qmax = qrange(bits, True)
        scale = t / qmax
        fq = np.clip(np.round(centres[None, :] / scale), -qmax, qmax) * scale
    return ((fq - centres[None, :]) ** 2 @ hist) / hist.sum()


def mse_threshold(hist, amax: float, bits: int = 8, format: str = "int") -> float:
    """The bin upper edge minimising :func:`histogram_mse` (first minimum)."""
    hist = _check_hist(hist)
    candidates = float(amax) * np.arange(1, hist.size + 1) / hist.size
    errors = np.concatenate([histogram_mse(hist, amax, chunk, bits, format)
                             for chunk in np.array_split(candidates, 8)])
    return float(candidates[int(np.argmin(errors))])


def entropy_divergences(hist, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of TensorRT's entropy calibration for each candidate ``i`` (see the module docstring).

    Returns ``(candidates i, divergences)``; ``inf`` marks a candidate whose ``Q`` misses mass of ``P``.
    """
    hist = _check_hist(hist)
    levels = 2 ** (check_bits(bits) - 1)
    n = hist.size
    if n <= levels:
        raise ValueError(f"entropy calibration needs more than {levels} histogram bins for {bits} bits, got {n}")
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # suffix[i] = sum(hist[i:])
    candidates = np.arange(levels, n)
    divergences = np.empty(candidates.size)
    for k, i in enumerate(candidates):
        p = hist[:i].copy()
        p[-1] += suffix[i]
        nonzero = p > 0
        merged = i // levels
        starts = np.arange(levels) * merged
        level_sum = np.add.reduceat(hist[:i], starts)
        level_nonzero = np.add.reduceat(nonzero.astype(np.float64), starts)
        level_of_bin = np.minimum(np.arange(i) // merged, levels - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(nonzero, level_sum[level_of_bin] / level_nonzero[level_of_bin], 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum <= 0 or np.any(q[nonzero] <= 0):
            divergences[k] = np.inf
            continue
        pn, qn = p[nonzero] / p_sum, q[nonzero] / q_sum
        divergences[k] = float(np.sum(pn * np.log(pn / qn)))
    return candidates, divergences


def entropy_threshold(hist, amax: float, bits: int = 8) -> float:
    """TensorRT's KL-divergence threshold ``(i* + 0.5) * bin_width`` (``amax`` if every candidate diverges)."""
    hist = _check_hist(hist)
    candidates, divergences = entropy_divergences(hist, bits)
    if not np.any(np.isfinite(divergences)):
        return float(amax)
    best = int(candidates[int(np.argmin(divergences))])
    return float(amax) / hist.size * (best + 0.5)


# ---------------------------------------------------------------------------------------------------------
# Calibrator objects (what a QuantRule names)


@dataclasses.dataclass(frozen=True)
class Calibrator(abc.ABC):
    """A clipping-threshold method. ``needs_histogram``: whether it reads the histogram (second pass);
    ``formats``: the quantization formats it calibrates (``"int"``, ``"fp8"``)."""

    name = "calibrator"
    needs_histogram = True
    formats = ("int",)

    @abc.abstractmethod
    def threshold(self, amax: float, hist: np.ndarray | None, bits: int) -> float:
        """Clipping threshold from the running max ``amax`` and the |x| histogram over ``[0, amax]``. A calibrator
        of several formats also takes ``format=`` (passed only for formats other than ``"int"``)."""


@dataclasses.dataclass(frozen=True)
class MaxCalibrator(Calibrator):
    name = "max"
    needs_histogram = False
    formats = ("int", "fp8")

    def threshold(self, amax, hist, bits, format="int"):
        return float(amax)


@dataclasses.dataclass(frozen=True)
class PercentileCalibrator(Calibrator):
    percentile: float = 99.99
    name = "percentile"
    formats = ("int", "fp8")

    def __post_init__(self):
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")

    def threshold(self, amax, hist, bits, format="int"):
        return percentile_threshold(hist, amax, self.percentile)


@dataclasses.dataclass(frozen=True)
class MSECalibrator(Calibrator):
    name = "mse"
    formats = ("int", "fp8")

    def threshold(self, amax, hist, bits, format="int"):
        return mse_threshold(hist, amax, bits, format)


@dataclasses.dataclass(frozen=True)
class EntropyCalibrator(Calibrator):
    name = "entropy"

    def threshold(self, amax, hist, bits):
        return entropy_threshold(hist, amax, bits)


CALIBRATORS = ("max", "percentile", "mse", "entropy")


def get_calibrator(spec: str | Calibrator) -> Calibrator:
    """A :class:`Calibrator` from a name: ``"max"``, ``"percentile"`` (99.99), ``"percentile:99.9"``,
    ``"mse"``, ``"entropy"``; a :class:`Calibrator` is returned as is."""
    if isinstance(spec, Calibrator):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"calibrator must be a name or a Calibrator, got {type(spec).__name__}")
    name, _, arg = spec.partition(":")
    if name == "percentile":
        try:
            return PercentileCalibrator(float(arg)) if arg else PercentileCalibrator()
        except ValueError as e:
            raise ValueError(f"bad percentile calibrator {spec!r}: {e}") from None
    simple = {"max": MaxCalibrator, "mse": MSECalibrator, "entropy": EntropyCalibrator}
    if name not in simple or arg:
        raise ValueError(f"unknown calibrator {spec!r}; known: max, percentile[:P] (e.g. percentile:99.99), "
                         "mse, entropy")
    return simple[name]()
