"""int8 and FP8 (E4M3) quantization: straight-through fake quantization (QAT), TensorRT-style calibration (PTQ) and
real int8 execution, for every model family through Flax interception of Dense/DenseGeneral/Conv/Einsum/Embed
calls. The format is part of a rule (``QuantRule(format="int" | "fp8")``), so one model can mix int8 and FP8.

Modules:

* :mod:`.qarray`: integer and FP8 grids and scales, :class:`QArray` (int values + scale + zero point + bits + axis);
* :mod:`.fake_quant`: :func:`fake_quantize`, quantize-dequantize with the straight-through gradient;
* :mod:`.rules`: :class:`QuantRule`, :data:`DEFAULT_RULES`, :data:`FP8_RULES`, :func:`with_format`, the
  interception machinery, the "quant" layout;
* :mod:`.calibrators`: max / percentile / MSE / entropy (KL) thresholds from histograms;
* :mod:`.calibration`: :func:`calibrate`, :func:`collect_statistics` (activation statistics via interception);
* :mod:`.qat`: :func:`fake_quant`, the transform for PTQ evaluation and QAT (fixed / EMA / learned scales);
* :mod:`.int8`: :func:`convert_to_int8` and :func:`int8`, int8 x int8 -> int32 Dense execution;
* :mod:`.plans`: :class:`~.plans.PrecisionPlan` (per-site int8 / FP8 / float), :func:`~.plans.find_sites`,
  :func:`~.plans.choose_plan` and :func:`~.plans.switched_fake_quant` (sensitivity without recompiling);
* :mod:`.ptq`: :func:`post_training_quantize` / :func:`post_training_variants` (PTQ variables of a trained model
  from calibration batches and a calibrator name) and :func:`int8_variables`, for accuracy scripts;
  :func:`qat_loss` (in :mod:`.qat`) is the quantization-aware loss for ``experiments/runtime/trainer.py``.

Typical use::

    from compression import quantization as q
    variables = q.calibrate(model.apply, variables, calib_batches, q.DEFAULT_RULES, method="percentile:99.99")
    logits = q.fake_quant().wrap(model.apply)(variables, ids).logits        # simulated int8
    t = q.int8()
    variables8 = t.init(key, variables, model.apply, ids)                    # int8 kernels
    logits8 = t.wrap(model.apply)(variables8, ids).logits                   # real int8 matmuls
    fp8 = q.calibrate(model.apply, {"params": variables["params"]}, calib_batches, q.FP8_RULES)  # amax / 448
    logits = q.fake_quant(q.FP8_RULES).wrap(model.apply)(fp8, ids).logits   # simulated FP8

From a saved model directory (``models.load``) and training-format batches (dicts with labels)::

    model, _, params = models.load(model_dir)
    inputs = ("input_ids", "attention_mask", "token_type_ids")
    variables = q.post_training_quantize(model.apply, params, batches, "entropy", inputs=inputs)
    variables8 = q.int8_variables(model.apply, variables, batches[0], inputs=inputs)
    loss_fn = q.qat_loss(trainer.classification_loss, model.apply, scales="ema")     # QAT, trainer extras
"""

from compression.quantization.calibration import (
    ActivationStatistics,
    Call,
    QuantizationWarning,
    Statistics,
    calibrate,
    collect_statistics,
    compute_scales,
)
from compression.quantization.calibrators import (
    CALIBRATORS,
    Calibrator,
    EntropyCalibrator,
    MaxCalibrator,
    MSECalibrator,
    PercentileCalibrator,
    entropy_threshold,
    get_calibrator,
    mse_threshold,
    percentile_threshold,
)
from compression.quantization.fake_quant import fake_quantize
from compression.quantization.int8 import (
    convert_to_int8,
    dense_quant_scales,
    int8,
    int8_weights,
    qdq_scales,
)
from compression.quantization.ptq import (
    PTQ_CALIBRATORS,
    int8_variables,
    post_training_quantize,
    post_training_variants,
)
from compression.quantization.qarray import FORMATS, FP8_MAX, MIN_SCALE, QArray, qrange
from compression.quantization.qat import (
    SCALE_MODES,
    fake_quant,
    project_scales,
    qat_loss,
)
from compression.quantization.rules import (
    DEFAULT_RULES,
    FP8_RULES,
    MODULE_TYPES,
    QUANT,
    QuantRule,
    check_scales,
    find_input_qparams,
    with_format,
)

__all__ = [
    "CALIBRATORS", "DEFAULT_RULES", "FORMATS", "FP8_MAX", "FP8_RULES", "MIN_SCALE", "MODULE_TYPES", "PTQ_CALIBRATORS",
    "QUANT", "SCALE_MODES",
    "ActivationStatistics",
    "Calibrator", "Call", "EntropyCalibrator", "MSECalibrator", "MaxCalibrator", "PercentileCalibrator", "QArray",
    "QuantRule", "QuantizationWarning", "Statistics", "calibrate", "check_scales", "collect_statistics",
    "compute_scales", "convert_to_int8", "dense_quant_scales", "entropy_threshold", "fake_quant", "fake_quantize",
    "find_input_qparams", "get_calibrator", "int8", "int8_variables", "int8_weights", "mse_threshold",
    "percentile_threshold", "post_training_quantize", "post_training_variants", "project_scales", "qat_loss",
    "qdq_scales",
    "qrange", "with_format",
]
