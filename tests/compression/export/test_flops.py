"""Matmul FLOPs by format, counted from exported graphs, against hand counts: a mixed int8/FP8/float MLP with a
Conv, and a BiLSTM whose recurrent matmul runs once per time step inside a Loop."""

import flax.linen as nn
import jax
import numpy as np
import onnx

from compression.export import MatMulQuant, Tolerance, export
from compression.export.flops import matmul_flops, node_formats
from experiments.tools import export as export_cli
from models.bilstm import BiLSTMClassifier, BiLSTMConfig


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):                               # x [B, L, 5]
        h = nn.Conv(6, (3,), padding="SAME", name="conv")(x)  # [B, L, 6]: 3 taps x 5 channels per output
        h = nn.relu(nn.Dense(8, name="up")(h))            # [B, L, 8]
        h = nn.relu(nn.Dense(4, name="down")(h))          # [B, L, 4]
        return nn.Dense(2, name="head")(h.mean(1))       # [B, 2]


def test_mixed_graph_by_hand(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 7, 5)).astype(np.float32)
    net = _Net()
    variables = net.init(jax.random.key(0), x)
    plan = {"conv": MatMulQuant(np.float32(0.01), 0.02, "fp8"),   # Conv in FP8
            "up": MatMulQuant(np.full(8, 0.01, np.float32), 0.05),  # int8
            "down": MatMulQuant(np.float32(0.01), 0.05, "fp8")}      # FP8; head stays float
    path = tmp_path / "m.onnx"
    # against the float model: a wiring check only (the scales above are arbitrary)
    export(net.apply, variables, [x], str(path), precision="mixed", quant=plan, tolerance=Tolerance(relative_rms=1.0))
    formats = node_formats(onnx.load(str(path)))
    assert sorted(formats.values()) == ["float", "fp8", "fp8", "int8"]
    b, length = 3, 7  # another batch size than the export's (the length of a float input is static)
    counts = matmul_flops(str(path), {"input_0": np.zeros((b, length, 5), np.float32)})
    conv = 2 * (b * length * 6) * (5 * 3)
    up = 2 * (b * length * 8) * 6
    down = 2 * (b * length * 4) * 8
    head = 2 * (b * 2) * 4
    assert counts["by_format"] == {"int8": up, "fp8": conv + down, "float": head}
    assert counts["total"] == conv + up + down + head
    assert counts["nodes"] == {"int8": 1, "fp8": 2, "float": 1}
    np.testing.assert_allclose(counts["fractions"]["fp8"], (conv + down) / counts["total"])
    assert counts["sizes"] == {"input_0": [b, length, 5]}


def test_bilstm_loop_counts_every_step(tmp_path):
    cfg = BiLSTMConfig(vocab_size=30, embed_dim=8, hidden_size=4, mlp_hidden=6)
    sig = export_cli.signature("bilstm", cfg, batch=3, seq=5)
    model = BiLSTMClassifier(cfg)
    variables = model.init(jax.random.key(0), **sig.inputs)
    path = tmp_path / "m.onnx"
    export(export_cli.output_fields(model.apply), variables, sig.inputs, str(path), dynamic_axes=sig.dynamic_axes)
    b, s, e, h = 2, 9, cfg.embed_dim, cfg.hidden_size
    feeds = export_cli.signature("bilstm", cfg, batch=b, seq=s, seed=1).inputs
    counts = matmul_flops(str(path), feeds)
    projections = 2 * (2 * b * s * e * 4 * h)      # both directions' input projections, hoisted out of the loop
    recurrence = s * 2 * (2 * b * h * 4 * h)       # per step: h @ W_hh of both directions (one batched MatMul)
    head = 2 * b * (2 * h) * cfg.mlp_hidden + 2 * b * cfg.mlp_hidden * cfg.num_labels  # mlp and classifier
    assert counts["by_format"] == {"int8": 0, "fp8": 0, "float": projections + recurrence + head}
