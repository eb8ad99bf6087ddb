"""Post-training quantization (PTQ) of a trained model in one call: what an accuracy script needs.

::

    model, cfg, params = models.load(model_dir)                     # a fine-tuned Transformer
    inputs = ("input_ids", "attention_mask", "token_type_ids")       # the batch keys apply() takes
    calib = [next(batches) for _ in range(16)]                       # dicts of arrays, e.g. task.train.batches(32)
    variables = ptq.post_training_quantize(model.apply, params, calib, "entropy", inputs=inputs)
    logits = fake_quant().wrap(model.apply)(variables, ids, attention_mask=mask).logits     # simulated int8
    variables8 = ptq.int8_variables(model.apply, variables, calib[0], inputs=inputs)
    logits8 = int8().wrap(model.apply)(variables8, ids, attention_mask=mask).logits          # real int8 matmuls

    # every calibrator of the acceptance table from one statistics collection (one pass per statistic):
    variants = ptq.post_training_variants(model.apply, params, calib, PTQ_CALIBRATORS, inputs=inputs)

Batches: anything :func:`~compression.quantization.calibration.calibrate` takes; with ``inputs`` a tuple of
names, each batch is a dict and only those keys (the ones present) are passed, as keyword arguments, so the
training batches of :mod:`experiments.data` (which also hold ``labels``/``example_weight``) can be used as
they are; ``inputs`` may also be a function ``batch -> Call``. ``apply_kwargs`` (e.g. ``{"train": False}``)
are added to every call.

The returned variables are ``{"params": params (float, unchanged), "quant": scales, ...}`` (other collections
of ``variables`` are kept), validated: every scale finite and at least ``MIN_SCALE``. Weights are quantized
per output channel by the default rules (:data:`~compression.quantization.rules.DEFAULT_RULES`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from compression.quantization.calibration import (
    Call,
    calibrate,
    call_args,
    collect_statistics,
    compute_scales,
)
from compression.quantization.calibrators import DEFAULT_NUM_BINS, get_calibrator
from compression.quantization.int8 import convert_to_int8
from compression.quantization.rules import DEFAULT_RULES, QUANT, QuantRule, check_scales

PTQ_CALIBRATORS = ("max", "percentile:99.99", "mse", "entropy")  # the acceptance table's calibrators

Inputs = Sequence[str] | Callable[[Any], Call] | None


def as_variables(params_or_variables: Mapping) -> dict:
    """``{"params": tree}`` for a bare parameter tree (what ``models.load`` returns); variables as they are."""
    if not isinstance(params_or_variables, Mapping):
        raise TypeError(f"expected a parameter tree or a variables dict, got {type(params_or_variables).__name__}")
    if "params" in params_or_variables:
        return dict(params_or_variables)
    return {"params": params_or_variables}


def as_call(batch: Any, inputs: Inputs) -> Any:
    """One calibration batch as :func:`calibrate` takes it (see the module docstring for ``inputs``)."""
    if inputs is None:
        return batch
    if callable(inputs):
        call = inputs(batch)
        if not isinstance(call, Call):
            raise TypeError(f"inputs(batch) must return a quantization.Call, got {type(call).__name__}")
        return call
    if isinstance(inputs, str):
        raise TypeError(f"inputs must be a sequence of names, not the string {inputs!r}")
    if not isinstance(batch, Mapping):
        raise TypeError(f"inputs={tuple(inputs)} selects keys of dict batches; got a {type(batch).__name__}")
    missing = [k for k in inputs if k not in batch]
    if len(missing) == len(tuple(inputs)):
        raise ValueError(f"a calibration batch has none of the inputs {tuple(inputs)}; its keys: {sorted(batch)}")
    return Call((), {k: batch[k] for k in inputs if k in batch})


def _calls(batches: Iterable, inputs: Inputs) -> list:
    if isinstance(batches, Mapping) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches, got a {type(batches).__name__}")
    return [as_call(b, inputs) for b in batches]


def post_training_quantize(apply_fn: Callable, params: Mapping, batches: Iterable,
                           calibrator: str = "percentile:99.99", *, rules: Sequence[QuantRule] = DEFAULT_RULES,
                           inputs: Inputs = None, apply_kwargs: Mapping | None = None,
                           num_bins: int = DEFAULT_NUM_BINS) -> dict:
    """Calibrates activation scales with ``calibrator`` over ``batches``; returns PTQ variables.

    Args:
      apply_fn: ``model.apply``.
      params: the trained parameter tree (or a variables dict holding ``"params"``), without a ``"quant"``
        collection.
      batches: calibration batches (at least one).
      calibrator: ``"max"``, ``"percentile:P"``, ``"mse"``, ``"entropy"`` (or a Calibrator), applied to every
        symmetric activation.
      rules, inputs, apply_kwargs, num_bins: see the module docstring and :func:`calibrate`.

    Returns:
      ``{"params": ..., "quant": {...}}``: run with ``fake_quant(rules).wrap(apply_fn)``; convert with
      :func:`int8_variables` for real int8 execution.
    """
    get_calibrator(calibrator)  # an unknown name fails before any work
    variables = calibrate(apply_fn, as_variables(params), _calls(batches, inputs), rules, method=calibrator,
                          num_bins=num_bins, apply_kwargs=apply_kwargs)
    check_scales(variables[QUANT], f"post_training_quantize({calibrator!r})")
    return variables


def post_training_variants(apply_fn: Callable, params: Mapping, batches: Iterable,
                           calibrators: Sequence[str] = PTQ_CALIBRATORS, *,
                           rules: Sequence[QuantRule] = DEFAULT_RULES, inputs: Inputs = None,
                           apply_kwargs: Mapping | None = None, num_bins: int = DEFAULT_NUM_BINS) -> dict[str, dict]:
    """``{calibrator: PTQ variables}`` for several calibrators from one collection of statistics.

    Equivalent to calling :func:`post_training_quantize` once per calibrator (same scales), but the model runs
    over the batches only twice in all (ranges, then histograms), not twice per calibrator.
    """
    if isinstance(calibrators, str) or not calibrators:
        raise ValueError(f"calibrators must be a non-empty sequence of names, got {calibrators!r}")
    methods = {str(c): get_calibrator(c) for c in calibrators}
    variables = as_variables(params)
    stats = collect_statistics(apply_fn, variables, _calls(batches, inputs), rules,
                               histogram=any(m.needs_histogram for m in methods.values()), num_bins=num_bins,
                               apply_kwargs=apply_kwargs)
    out = {}
    for name, method in methods.items():
        quant = compute_scales(stats, method)
        check_scales(quant, f"post_training_variants({name!r})")
        out[name] = {**variables, QUANT: quant}
    return out


def int8_variables(apply_fn: Callable, variables: Mapping, batch: Any, *, rules: Sequence[QuantRule] = DEFAULT_RULES,
                   inputs: Inputs = None, apply_kwargs: Mapping | None = None) -> dict:
    """PTQ variables converted for real int8 execution (int8 kernels + kernel scales, see
    :func:`~compression.quantization.int8.convert_to_int8`); ``batch`` is one sample batch (only traced).
    Run the result with ``quantization.int8(rules).wrap(apply_fn)``."""
    args, kwargs = call_args(as_call(batch, inputs), apply_kwargs or {})
    return convert_to_int8(apply_fn, variables, *args, rules=rules, **kwargs)
