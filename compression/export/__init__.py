"""Export to ONNX with verified parity: our own jaxpr -> ONNX converter, float16, int8 and FP8 Q/DQ variants,
and the gates every export runs (structure, TensorRT op allow-list, onnxruntime vs JAX at two sizes and
two optimisation levels).

    from compression.export import export
    report = export(model.apply, variables, {"input_ids": ids, "attention_mask": mask}, "model_fp32.onnx",
                    dim_constraints=("sequence <= 512",))

Modules: ``program`` (tracing, inlining), ``graph`` (ONNX builder), ``converter`` (the jaxpr walk),
``lower_*`` (rules per primitive family), ``patterns`` (whole ops: LayerNormalization, Softmax, GELU,
BERT attention), ``precision`` (float16 variant), ``qdq`` (int8/FP8 Q/DQ), ``parity`` (gates), ``api``,
``tensorrt`` (engines from the exported files; needs an NVIDIA GPU).
"""

from compression.export.api import PRECISIONS, ExportReport, export
from compression.export.converter import convert, register
from compression.export.parity import (FP8_VS_FAKE_QUANT, INT8_VS_FAKE_QUANT, TENSORRT_OPS, TOLERANCES, ParityError,
                                       Tolerance, onnxruntime_bert_fusion)
from compression.export.precision import to_float16
from compression.export.program import ExportError, trace
from compression.export.qdq import FP8_OPSET, MatMulQuant

__all__ = [
    "FP8_OPSET",
    "FP8_VS_FAKE_QUANT",
    "INT8_VS_FAKE_QUANT",
    "PRECISIONS",
    "TENSORRT_OPS",
    "TOLERANCES",
    "ExportError",
    "ExportReport",
    "MatMulQuant",
    "ParityError",
    "Tolerance",
    "convert",
    "export",
    "onnxruntime_bert_fusion",
    "register",
    "to_float16",
    "trace",
]
