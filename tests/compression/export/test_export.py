"""export(): fp32 and fp16 parity on tiny Transformers (every head, compressed variants), dynamic axes,
and the failures: unsupported primitive, NaN parameter, failed gate, bad arguments."""

import os

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from jax import lax

from compression.export import ExportError, ParityError, Tolerance, converter, export
from tests.compression.export.conftest import CONSTRAINTS, batch, jax_outputs, make_model, ort_run


def _export(model, variables, path, **kw):
    return export(model.apply, variables, batch(2, 5), str(path), dim_constraints=CONSTRAINTS, **kw)


def _check_other_sizes(path, model, variables, atol=1e-4, rtol=0.0):
    """Independent of the export's own gate: onnxruntime vs JAX at sizes never traced."""
    for b, s in ((3, 7),):
        feeds = batch(b, s, seed=b + s)
        got, want = ort_run(path, feeds), jax_outputs(model, variables, feeds)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=atol + rtol * np.abs(w).max(), rtol=0)


@pytest.mark.parametrize("overrides", [
    {"head": "sequence", "num_layers": 2},
    {"head": "token"},
    {"head": "mlm"},
    {"fused_qkv": True},
], ids=["sequence", "token", "mlm", "fused_qkv"])
def test_fp32_parity(tmp_path, overrides):
    model, variables = make_model(**overrides)
    path = tmp_path / "model_fp32.onnx"
    report = _export(model, variables, path)
    assert os.path.exists(path) and not os.path.exists(str(path) + ".partial")
    assert report.max_abs_diff("logits") <= 1e-4
    levels = {c.level for c in report.comparisons}
    assert levels == {"ORT_DISABLE_ALL", "ORT_ENABLE_ALL"}
    # the gate's second input set: batch + 1, sequence halved
    assert {c.shapes["input_ids"] for c in report.comparisons} == {(2, 5), (3, 2)}
    _check_other_sizes(path, model, variables)


def test_dynamic_axes_are_named(tmp_path, tiny):
    model, variables = tiny
    path = tmp_path / "m.onnx"
    _export(model, variables, path)
    g = onnx.load(str(path)).graph
    for i in g.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in g.output}
    assert outs["logits"] == ["batch", 2]
    assert outs["last_hidden_state"] == ["batch", "sequence", 16]


def test_int64_ids_input(tmp_path, tiny):
    model, variables = tiny
    feeds = {k: v.astype(np.int64) for k, v in batch(2, 5).items()}
    path = tmp_path / "m.onnx"
    export(model.apply, variables, feeds, str(path), dim_constraints=CONSTRAINTS)
    g = onnx.load(str(path)).graph
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    got = ort_run(path, {k: v.astype(np.int64) for k, v in batch(3, 4).items()})
    np.testing.assert_allclose(got[0], jax_outputs(model, variables, batch(3, 4))[0], atol=1e-4)


def _float_inputs_of(model: onnx.ModelProto, op_type: str) -> set:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return {types[i] for n in inferred.graph.node if n.op_type == op_type for i in n.input if i}


def test_fp16_variant(tmp_path):
    model, variables = make_model(num_layers=2, head="mlm")
    p32, p16 = tmp_path / "model_fp32.onnx", tmp_path / "model_fp16.onnx"
    _export(model, variables, p32)
    report = _export(model, variables, p16, precision="fp16")
    m = onnx.load(str(p16))
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert _float_inputs_of(m, "LayerNormalization") == {F32}
    assert _float_inputs_of(m, "Softmax") == {F32}
    assert _float_inputs_of(m, "MatMul") == {F16}
    inits = {t.name: t.data_type for t in m.graph.initializer}
    assert inits["params/encoder/layer_0/attention/query/kernel"] == F16
    assert inits["params/embeddings/word_embeddings/embedding"] == F16
    assert inits["params/encoder/layer_0/attention_norm/scale"] == F32
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [F32, F32]
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [onnx.TensorProto.INT32] * 2
    weight_bytes = lambda p: sum(len(t.raw_data) for t in onnx.load(str(p)).graph.initializer)
    assert weight_bytes(p16) < 0.55 * weight_bytes(p32)
    assert 0 < report.max_abs_diff() <= 1e-2 + 1e-2 * 5
    _check_other_sizes(p16, model, variables, atol=1e-2, rtol=1e-2)


_custom = jex.core.Primitive("my_custom_op")
_custom.def_impl(lambda x: x)
_custom.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))


class _Block(nn.Module):
    op: str

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4, name="proj")(x)
        return _custom.bind(y) if self.op == "custom" else jnp.cumsum(y, axis=-1)


class _Net(nn.Module):
    op: str

    @nn.compact
    def __call__(self, x):
        return _Block(self.op, name="block")(x)


@pytest.mark.parametrize("op,prim", [("custom", "my_custom_op"), ("cumsum", "cumsum")])
def test_unsupported_primitive_names_primitive_and_module(tmp_path, op, prim):
    net = _Net(op)
    x = np.ones((2, 3), np.float32)
    variables = net.init(jax.random.key(0), x)
    with pytest.raises(ExportError, match=rf"primitive '{prim}' from module '_Net/block'"):
        export(net.apply, variables, [x], str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []


def test_nan_parameter_is_named(tmp_path, tiny):
    model, variables = tiny
    bad = jax.tree.map(np.array, variables)
    bad["params"]["encoder"]["layer_0"]["intermediate"]["kernel"][1, 2] = np.nan
    bad["params"]["pooler"]["dense"]["bias"][0] = np.inf
    with pytest.raises(ExportError, match=r"params/encoder/layer_0/intermediate/kernel \(1 NaN.*"
                                          r"params/pooler/dense/bias \(0 NaN, 1 inf"):
        _export(model, bad, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_failed_parity_gate_leaves_nothing(tmp_path, tiny, monkeypatch):
    model, variables = tiny
    # a wrong lowering (tanh as sigmoid, in the pooler) must be caught by the onnxruntime-vs-JAX gate
    monkeypatch.setitem(converter.LOWERINGS, "tanh", lambda ctx, op, x: ctx.graph.op("Sigmoid", [x]))
    with pytest.raises(ParityError, match=r"logits at ORT_DISABLE_ALL on .*max \|diff\|"):
        _export(model, variables, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_tensorrt_gate_rejects_unsupported_ops(tmp_path):
    x = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    with pytest.raises(ParityError, match=r"TensorRT gate failed: ops outside the TensorRT allow-list: Mod"):
        export(lambda v, x: lax.rem(x, 4.0), {}, [x], str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []


def test_tolerance_is_per_precision_and_overridable(tmp_path, tiny):
    model, variables = tiny
    with pytest.raises(ParityError):
        _export(model, variables, tmp_path / "m.onnx", tolerance=Tolerance(atol=-1.0, rtol=0.0))
    assert os.listdir(tmp_path) == []


def test_dynamic_size_comparison_needs_constraints(tmp_path, tiny):
    model, variables = tiny
    with pytest.raises(ExportError, match=r"dim_constraints=\('sequence <= 512',\)"):
        export(model.apply, variables, batch(2, 5), str(tmp_path / "m.onnx"))


@pytest.mark.parametrize("kwargs,message", [
    ({"precision": "bf16"}, "unknown precision 'bf16'"),
    ({"opset": 13}, "opset 13 outside 17-20"),
    ({"precision": "int8"}, "needs quant="),
    ({"dynamic_axes": {"ids": ("batch",)}}, r"unknown inputs \['ids'\]"),
])
def test_bad_arguments(tmp_path, tiny, kwargs, message):
    model, variables = tiny
    with pytest.raises(ExportError, match=message):
        _export(model, variables, tmp_path / "m.onnx", **kwargs)
    with pytest.raises(ExportError, match="must end with .onnx"):
        _export(model, variables, tmp_path / "m.bin")
    assert os.listdir(tmp_path) == []


def test_positional_inputs_and_static_axes(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    w = np.arange(3, dtype=np.float32) - 1
    report = export(lambda v, a, b: jnp.tanh(a * v["w"]) + b.sum(), {"w": w}, [x, x[:, :1]], str(tmp_path / "m.onnx"),
                    dynamic_axes={"input_0": ("batch", None), "input_1": (None, None)})
    assert report.inputs == {"input_0": ("float32", ["batch", 3]), "input_1": ("float32", [2, 1])}
    got = ort_run(tmp_path / "m.onnx", {"input_0": np.ones((4, 3), np.float32), "input_1": x[:, :1]})[0]
    np.testing.assert_allclose(got, np.tanh(np.ones((4, 3)) * w) + x[:, 0].sum(), rtol=1e-6)


def test_structure_gate_rejects_invalid_graphs(tmp_path):
    from compression.export.parity import check_structure
    node = onnx.helper.make_node("Add", ["x", "missing"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    path = tmp_path / "bad.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ParityError, match="structure gate failed"):
        check_structure(str(path))
