"""onnxruntime's BERT optimizer fuses our exported Transformer: one Attention and two
SkipLayerNormalization per layer, BiasGelu in every FFN, and the fused graph still matches JAX."""

import numpy as np
import onnx
import pytest

from compression.export import export, onnxruntime_bert_fusion
from compression.export.parity import check_tensorrt
from tests.compression.export.conftest import CONSTRAINTS, batch, jax_outputs, make_model, ort_run


def test_bert_optimizer_fuses_every_layer(tmp_path):
    layers = 2
    model, variables = make_model(num_layers=layers, num_heads=2, hidden_size=16)
    path, fused = tmp_path / "model.onnx", tmp_path / "fused.onnx"
    export(model.apply, variables, batch(2, 5), str(path), dim_constraints=CONSTRAINTS)
    counts = onnxruntime_bert_fusion(str(path), num_heads=2, hidden_size=16, out_path=str(fused))
    assert counts.get("Attention") == layers
    assert counts.get("SkipLayerNormalization") == 2 * layers
    assert counts.get("BiasGelu", 0) + counts.get("Gelu", 0) + counts.get("FastGelu", 0) == layers
    for b, s in ((3, 7), (1, 4)):  # left padding and holes included: the 2-D mask keeps them exact
        feeds = batch(b, s, seed=b)
        for got, want in zip(ort_run(fused, feeds), jax_outputs(model, variables, feeds)):
            np.testing.assert_allclose(got, want, atol=1e-4)
    # onnxruntime's fused ops are com.microsoft contrib ops: not for TensorRT
    with pytest.raises(Exception, match="custom op domains"):
        check_tensorrt(onnx.load(str(fused)))


def test_fusion_rejects_torch_levels(tmp_path):
    with pytest.raises(ValueError, match="opt_level must be 0 or 1"):
        onnxruntime_bert_fusion(str(tmp_path / "x.onnx"), 2, 16, opt_level=2)
