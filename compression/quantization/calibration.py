"""Post-training calibration: observe activations through interception, then compute scales.

::

    variables = calibrate(model.apply, variables, batches, rules, method="entropy")
    apply = fake_quant(rules).wrap(model.apply)          # now quantized with the calibrated scales

or, to compare calibrators on one collection::

    stats = collect_statistics(model.apply, variables, batches, rules)
    for method in ("max", "percentile:99.99", "mse", "entropy"):
        variables_m = {**variables, "quant": stats.scales(method)}

Collection runs the float model (jitted; weights not quantized, as TensorRT calibrates) on each calibration
batch with an interceptor that reads the input of every module whose rule quantizes inputs and accumulates, in a
temporary ``"calibration"`` collection:

* pass 1: the running ``max |x|``, ``min x``, ``max x`` and the count of non-finite values;
* pass 2 (only if some calibrator needs it): TensorRT's histogram of ``|x|``, ``num_bins`` (2048) equal bins
  over ``[0, amax]`` with ``amax`` from pass 1 (two passes instead of re-binning when the max grows, so the
  histogram is exact). Modules that share an input scale histogram over their common ``amax``.

Then :mod:`compression.quantization.calibrators` turns each (shared) activation's statistics into a clipping
threshold and the scale ``threshold / qmax`` (448 for FP8 rules; asymmetric rules: min/max), stored in the
``"quant"`` collection at the places :mod:`compression.quantization.rules` documents.

Batches: each element of ``batches`` is a tuple (positional arguments after ``variables``), a dict (keyword
arguments), a :class:`Call` (both) or a single array (one positional argument); ``apply_kwargs`` (e.g.
``{"train": False}``) are added to every call. Array arguments are traced; any other argument (bools, ints,
strings, None) is static. A one-shot iterator is materialised into a list (two passes).

Bad input: zero batches, non-finite values (the first module in call order that sees them is named),
already-calibrated variables and rules that match nothing raise ``ValueError``; an all-zero or constant
activation emits a :class:`QuantizationWarning` naming the module and gets a safe non-zero scale.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from compression.quantization.calibrators import (
    DEFAULT_NUM_BINS,
    Calibrator,
    get_calibrator,
)
from compression.quantization.qarray import (
    MIN_SCALE,
    asymmetric_params,
    symmetric_scale,
)
from compression.quantization.rules import (
    DEFAULT_RULES,
    QUANT,
    QuantRule,
    Target,
    Tracker,
    check_rules,
    hooked_call,
    promoted,
    quant_interceptor,
)

CALIBRATION = "calibration"  # temporary collection of activation statistics


class QuantizationWarning(UserWarning):
    """A degenerate activation (all zero or constant) met during calibration."""


# ---------------------------------------------------------------------------------------------------------
# Calls


@dataclasses.dataclass(frozen=True)
class Call:
    """One explicit model call as a calibration batch: ``apply_fn(variables, *args, **kwargs)``."""

    args: tuple = ()
    kwargs: Mapping = dataclasses.field(default_factory=dict)


def call_args(batch: Any, apply_kwargs: Mapping) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one batch (see the module docstring), with ``apply_kwargs`` added."""
    if isinstance(batch, Call):
        return tuple(batch.args), {**batch.kwargs, **apply_kwargs}
    if isinstance(batch, tuple):
        return batch, dict(apply_kwargs)
    if isinstance(batch, Mapping):
        return (), {**batch, **apply_kwargs}
    return (batch,), dict(apply_kwargs)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or (
        isinstance(x, (tuple, list, dict)) and bool(jax.tree.leaves(x))
        and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree.leaves(x)))


class _Runner:
    """Runs ``apply_fn`` under an interceptor with the ``"calibration"`` collection mutable; each call returns
    the statistics of that one batch (combined across batches on the host, so that the compiled function does
    not depend on what earlier batches saw).

    Array arguments are traced, other arguments are static (one compiled function per static signature).
    """

    def __init__(self, apply_fn: Callable, interceptor, use_jit: bool):
        self.apply_fn, self.interceptor, self.use_jit = apply_fn, interceptor, use_jit
        self._compiled: dict[Any, Callable] = {}

    def _fn(self, static_key, static_args, static_kwargs, dyn_positions, dyn_names):
        def run(variables, inputs, dyn_args, dyn_kwargs):
            args = list(static_args)
            for pos, value in zip(dyn_positions, dyn_args):
                args[pos] = value
            kwargs = {**static_kwargs, **dict(zip(dyn_names, dyn_kwargs))}
            with nn.intercept_methods(self.interceptor):
                _, new = self.apply_fn({**variables, CALIBRATION: inputs}, *args, mutable=[CALIBRATION], **kwargs)
            return new.get(CALIBRATION, {})

        if not self.use_jit:
            return run
        if static_key not in self._compiled:
            self._compiled[static_key] = jax.jit(run)
        return self._compiled[static_key]

    def _split(self, call: tuple[tuple, dict]):
        args, kwargs = call
        dyn_positions = tuple(i for i, a in enumerate(args) if _is_array(a))
        dyn_names = tuple(sorted(k for k, v in kwargs.items() if _is_array(v)))
        static_args = [None if i in dyn_positions else a for i, a in enumerate(args)]
        static_kwargs = {k: v for k, v in kwargs.items() if k not in dyn_names}
        static_key = (len(args), dyn_positions, dyn_names, repr(static_args), repr(sorted(static_kwargs.items())))
        fn = self._fn(static_key, static_args, static_kwargs, dyn_positions, dyn_names)
        return fn, tuple(args[i] for i in dyn_positions), tuple(kwargs[k] for k in dyn_names)

    def __call__(self, variables, inputs, call: tuple[tuple, dict]) -> dict:
        """The statistics of one batch, as host numpy arrays."""
        fn, dyn_args, dyn_kwargs = self._split(call)
        return jax.device_get(fn(variables, inputs, dyn_args, dyn_kwargs))

    def trace(self, variables, inputs, call: tuple[tuple, dict]) -> None:
        """Traces one call without running it (the interceptors see every module; with jit, the trace is
        reused by the first real call)."""
        fn, dyn_args, dyn_kwargs = self._split(call)
        if self.use_jit:
            fn.trace(variables, inputs, dyn_args, dyn_kwargs)
        else:
            jax.eval_shape(fn, variables, inputs, dyn_args, dyn_kwargs)


_COMBINE = {"amax": np.maximum, "max": np.maximum, "min": np.minimum, "nonfinite": np.add, "hist": np.add}


def _combine(total: dict | None, batch: dict) -> dict:
    """Merges one batch's statistics into the running ones (leaf-wise by statistic name)."""
    flat = {k: np.asarray(v, np.int64) if k[-1] == "hist" else np.asarray(v)  # no int32 overflow over batches
            for k, v in traverse_util.flatten_dict(batch).items()}
    if total is None:
        return flat
    for k, v in flat.items():
        total[k] = _COMBINE[k[-1]](total[k], v) if k[-1] in _COMBINE and k in total else v
    return total


# ---------------------------------------------------------------------------------------------------------
# The collectors (run inside the traced model)


def _input_of(target: Target, ops: list):
    x = ops[target.input_index]
    return x if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else None


def _accumulate(module: nn.Module, name: str, value, combine):
    if module.has_variable(CALIBRATION, name):
        value = combine(module.get_variable(CALIBRATION, name), value)
    module.put_variable(CALIBRATION, name, value)


def _range_collector(target: Target, module: nn.Module, next_fun, args, kwargs):
    if not target.quantize_input:
        return next_fun(*args, **kwargs)

    def observe(ops):
        x = _input_of(target, ops)
        if x is not None:
            xf = x.astype(jnp.float32)
            finite = jnp.isfinite(xf)
            _accumulate(module, "amax", jnp.max(jnp.where(finite, jnp.abs(xf), 0.0)), jnp.maximum)
            _accumulate(module, "min", jnp.min(jnp.where(finite, xf, jnp.inf)), jnp.minimum)
            _accumulate(module, "max", jnp.max(jnp.where(finite, xf, -jnp.inf)), jnp.maximum)
            _accumulate(module, "nonfinite", jnp.sum(~finite, dtype=jnp.int32), jnp.add)
        return ops

    return hooked_call(module, next_fun, args, kwargs, promoted(observe))


def _histogram_collector(num_bins: int):
    def collector(target: Target, module: nn.Module, next_fun, args, kwargs):
        if not (target.quantize_input and module.has_variable(CALIBRATION, "hist_range")):
            return next_fun(*args, **kwargs)

        def observe(ops):
            x = _input_of(target, ops)
            if x is not None:
                top = module.get_variable(CALIBRATION, "hist_range")
                a = jnp.abs(x.astype(jnp.float32)).ravel()
                idx = jnp.clip(jnp.floor(a * (num_bins / top)), 0, num_bins - 1).astype(jnp.int32)
                _accumulate(module, "hist", jnp.bincount(idx, length=num_bins).astype(jnp.int32), jnp.add)
            return ops

        return hooked_call(module, next_fun, args, kwargs, promoted(observe))

    return collector


# ---------------------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass
class ActivationStatistics:
    """What was observed of one (possibly shared) activation over the calibration batches.

    Attributes:
      modules: paths of the modules reading it (several when they share an input scale).
      rule: the rule quantizing it.
      amax, lo, hi: max |x|, min x, max x.
      hist: counts of |x| in ``num_bins`` bins over ``[0, amax]`` (int64), or ``None`` if not collected.
    """

    modules: list[str]
    rule: QuantRule
    amax: float
    lo: float
    hi: float
    hist: np.ndarray | None = None

    @property
    def bin_width(self) -> float:
        return self.amax / self.hist.size if self.hist is not None else float("nan")


@dataclasses.dataclass
class Statistics:
    """Statistics of every quantized activation, keyed by ``(owner path, scale variable name)``."""

    entries: dict[tuple[tuple[str, ...], str], ActivationStatistics]
    num_batches: int
    num_bins: int

    def by_module(self, name: str) -> ActivationStatistics:
        """The statistics of the activation read by the module at slash-joined path ``name``."""
        for entry in self.entries.values():
            if name in entry.modules:
                return entry
        raise KeyError(f"no statistics for module {name!r}; modules: "
                       f"{sorted(m for e in self.entries.values() for m in e.modules)}")

    def scales(self, method: str | Calibrator | None = None, format: str | None = None) -> dict:
        """The ``"quant"`` collection: each activation's scale (and zero point) under its rule's calibrator,
        or under ``method`` for every symmetric activation when given; in ``format`` (``"int"``, ``"fp8"``) for
        every symmetric activation when given, else in its rule's."""
        return compute_scales(self, method, format)


def _batches_list(batches) -> list:
    if callable(batches) and not isinstance(batches, (list, tuple)):
        batches = batches()
    if isinstance(batches, (Mapping, jax.Array, np.ndarray)):
        raise TypeError("batches must be an iterable of batches (a list of tuples / dicts / arrays), "
                        f"got a single {type(batches).__name__}")
    if not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}")
    return list(batches)


def check_not_quantized(variables: Mapping, what: str) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = list(variables) if isinstance(variables, Mapping) else "-"
        raise ValueError(f"{what}: variables must be a dict with a 'params' collection "
                         f"(got {type(variables).__name__} with keys {keys})")
    if QUANT in variables:
        raise ValueError(f"{what}: the variables already have a {QUANT!r} collection: the model is already "
                         f"quantized/calibrated. Drop variables[{QUANT!r}] to calibrate again.")


def collect_statistics(apply_fn: Callable, variables: Mapping, batches, rules: Sequence[QuantRule] = DEFAULT_RULES,
                       *, histogram: bool | None = None, num_bins: int = DEFAULT_NUM_BINS,
                       apply_kwargs: Mapping | None = None, jit: bool = True) -> Statistics:
    """Runs the model over ``batches`` and collects the statistics of every quantized activation.

    Args:
      apply_fn: ``model.apply`` (or a transform-wrapped one with its signature).
      variables: ``{"params": ..., ...}`` without a ``"quant"`` collection.
      batches: calibration batches (see the module docstring); at least one.
      rules: quantization rules.
      histogram: collect histograms (second pass); default: if any rule's calibrator needs one. Pass
        ``True`` to compute several calibrators from one collection.
      num_bins: histogram bins (TensorRT: 2048).
      apply_kwargs: keyword arguments added to every call (static when not arrays).
      jit: run the calls jitted (default) or eagerly.

    Returns:
      :class:`Statistics`.
    """
    check_not_quantized(variables, "collect_statistics")
    rules = check_rules(rules)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    calls = [call_args(b, apply_kwargs or {}) for b in _batches_list(batches)]
    if not calls:
        raise ValueError("calibration needs at least one batch; got zero calibration batches")
    if histogram is None:
        histogram = any(r.get_calibrator().needs_histogram for r in rules if r.inputs)

    tracker = Tracker()
    runner = _Runner(apply_fn, quant_interceptor(rules, _range_collector, tracker), jit)
    runner.trace(variables, {}, calls[0])  # rules are checked before any batch runs
    tracker.check(rules, "calibration")
    targets = [t for t in tracker.targets.values() if t.quantize_input]
    entries = _range_pass(runner, variables, calls, targets)
    if histogram:
        wanted = {key: e for key, e in entries.items() if e.rule.symmetric and e.amax > 0}
        if wanted:
            hist_runner = _Runner(apply_fn, quant_interceptor(rules, _histogram_collector(num_bins)), jit)
            _histogram_pass(hist_runner, variables, calls, targets, wanted)
    return Statistics(entries, len(calls), num_bins)


def _stats_of(flat: Mapping, path: tuple[str, ...]) -> dict | None:
    """The statistics a module accumulated, ``{name: array}`` (``None`` if it saw no float input)."""
    out = {k[-1]: v for k, v in flat.items() if k[:-1] == path}
    return out if ("amax" in out or "hist" in out) else None


def _range_pass(runner: _Runner, variables, calls, targets) -> dict:
    """Pass 1: running max |x|, min, max per module; raises on non-finite inputs; merges shared scales."""
    total = None
    for i, call in enumerate(calls):
        batch = traverse_util.flatten_dict(runner(variables, {}, call))
        for t in targets:  # call order: the first module that sees a NaN is named
            s = _stats_of(batch, t.path)
            if s is not None and int(s["nonfinite"]) > 0:
                raise ValueError(f"calibration batch {i}: {int(s['nonfinite'])} non-finite value(s) (NaN/Inf) in "
                                 f"the input of module {t.name} (the first quantized module, in call order, "
                                 "that sees them)")
        total = _combine(total, traverse_util.unflatten_dict(batch))
    entries: dict[tuple[tuple[str, ...], str], ActivationStatistics] = {}
    for t in targets:
        s = _stats_of(total, t.path)
        if s is None:
            continue  # the module never saw a float input
        amax, lo, hi = float(s["amax"]), float(s["min"]), float(s["max"])
        e = entries.get((t.owner, t.scale_name))
        if e is None:
            entries[(t.owner, t.scale_name)] = ActivationStatistics([t.name], t.rule, amax, lo, hi)
        elif t.name not in e.modules:
            e.modules.append(t.name)
            e.amax, e.lo, e.hi = max(e.amax, amax), min(e.lo, lo), max(e.hi, hi)
    return entries


def _histogram_pass(runner: _Runner, variables, calls, targets, wanted: dict) -> None:
    """Pass 2: |x| histograms over each (shared) activation's [0, amax]; summed over sharing modules."""
    ranges = traverse_util.unflatten_dict({t.path + ("hist_range",): np.float32(wanted[(t.owner, t.scale_name)].amax)
                                           for t in targets if (t.owner, t.scale_name) in wanted})
    total = None
    for call in calls:
        total = _combine(total, runner(variables, ranges, call))
    seen = set()
    for t in targets:
        key = (t.owner, t.scale_name)
        s = _stats_of(total, t.path)
        if key not in wanted or s is None or "hist" not in s or t.path in seen:
            continue
        seen.add(t.path)
        h = np.asarray(s["hist"], dtype=np.int64)
        e = wanted[key]
        e.hist = h if e.hist is None else e.hist + h


# ---------------------------------------------------------------------------------------------------------
# Scales


def compute_scales(stats: Statistics, method: str | Calibrator | None = None, format: str | None = None) -> dict:
    """The ``"quant"`` collection from :class:`Statistics` (see :meth:`Statistics.scales`): one collection of
    statistics gives the scales of every calibrator and of both formats (int8 ``amax / 127``, FP8 ``amax / 448``
    for ``max``)."""
    override = None if method is None else get_calibrator(method)
    flat: dict[tuple[str, ...], jax.Array] = {}
    for (owner, scale_name), e in stats.entries.items():
        rule = e.rule
        if format is not None and rule.symmetric and format != rule.format:
            rule = dataclasses.replace(rule, format=format, calibrator="max")  # e.rule's calibrator is checked below
        names = ", ".join(e.modules)
        if not rule.symmetric:
            if override is not None and override.needs_histogram:
                raise ValueError(f"method {override.name!r} cannot calibrate the asymmetric activation of "
                                 f"{names}: asymmetric rules calibrate with 'max' (min/max)")
            if e.amax <= 0:
                warnings.warn(f"the input of module(s) {names} is all zero over the calibration batches; "
                              f"using the floor scale {MIN_SCALE:g}", QuantizationWarning, stacklevel=2)
            scale, zero_point = asymmetric_params(e.lo, e.hi, rule.bits)
            flat[owner + (scale_name,)] = jnp.asarray(scale, jnp.float32)
            flat[owner + (scale_name.replace("scale", "zero_point"),)] = jnp.asarray(zero_point, jnp.float32)
            continue
        calibrator = override or e.rule.get_calibrator()
        if rule.format not in calibrator.formats:
            raise ValueError(f"calibrator {calibrator.name!r} cannot calibrate the {rule.format} activation of "
                             f"{names} (it calibrates {', '.join(calibrator.formats)})")
        if e.amax <= 0:
            warnings.warn(f"the input of module(s) {names} is all zero over the calibration batches; using the "
                          f"floor scale {MIN_SCALE:g} (any positive scale represents zero exactly)",
                          QuantizationWarning, stacklevel=2)
            threshold = 0.0
        elif e.lo == e.hi:
            warnings.warn(f"the input of module(s) {names} is constant ({e.lo:g}) over the calibration batches; "
                          f"{calibrator.name!r} calibration degenerates there, using its max", QuantizationWarning,
                          stacklevel=2)
            threshold = e.amax
        else:
            if calibrator.needs_histogram and e.hist is None:
                raise ValueError(f"calibrator {calibrator.name!r} needs histograms; collect the statistics with "
                                 "histogram=True")
            by_format = {} if rule.format == "int" else {"format": rule.format}
            threshold = calibrator.threshold(e.amax, e.hist, rule.bits, **by_format)
        scale = symmetric_scale(threshold, rule.bits, rule.format)
        if not np.isfinite(float(scale)) or float(scale) <= 0:
            raise ValueError(f"calibration of {names} produced an invalid scale {float(scale)}")
        flat[owner + (scale_name,)] = jnp.asarray(scale, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def calibrate(apply_fn: Callable, variables: Mapping, batches, rules: Sequence[QuantRule] = DEFAULT_RULES, *,
              method: str | Calibrator | None = None, num_bins: int = DEFAULT_NUM_BINS,
              apply_kwargs: Mapping | None = None, jit: bool = True) -> dict:
    """Calibrates activation scales; returns ``variables`` with the ``"quant"`` collection added.

    ``method`` overrides the rules' calibrators (``"max"``, ``"percentile:99.99"``, ``"mse"``, ``"entropy"``,
    or a Calibrator). Other arguments as :func:`collect_statistics`.
    """
    needs_hist = (get_calibrator(method).needs_histogram if method is not None else None)
    stats = collect_statistics(apply_fn, variables, batches, rules, histogram=needs_hist, num_bins=num_bins,
                               apply_kwargs=apply_kwargs, jit=jit)
    return {**variables, QUANT: compute_scales(stats, method)}

