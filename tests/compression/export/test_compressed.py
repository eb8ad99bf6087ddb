"""Compressed Transformers export with fp32 parity: a compacted model (heads and FFN units pruned, a
different number of heads per layer) and a multi-query-attention Theseus successor. Both are checked
against the JAX model they came from, not only against themselves."""

import jax
import numpy as np
import onnx

from compression.export import export
from compression.pruning import compaction
from compression.pruning.site_masks import MASKS, masks_by_path, site_masks, unflatten
from models import theseus
from models.transformer import Transformer
from tests.compression.export.conftest import CONSTRAINTS, batch, make_model, ort_run


def _head_reshapes(model: onnx.ModelProto) -> list[int]:
    """Number of heads of every canonical attention block, read from its [0, 0, N, D] head reshapes."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    heads = []
    for n in model.graph.node:
        if n.op_type == "Softmax":
            heads.append(None)
        shape = inits.get(n.input[1]) if n.op_type == "Reshape" else None
        is_head_reshape = shape is not None and shape.shape == (4,) and shape[0] == 0 and shape[1] == 0
        if is_head_reshape and heads and heads[-1] is None:
            heads[-1] = int(shape[2])
    return heads


def test_compacted_transformer_matches_the_masked_original(tmp_path):
    model, variables = make_model(num_layers=2, num_heads=4, intermediate_size=12)
    ids = batch(2, 5)["input_ids"]
    t = site_masks("heads|ffn")
    variables = t.init(jax.random.key(1), variables, model.apply, ids)
    flat = masks_by_path(variables[MASKS])
    flat["encoder/layer_0/attention/heads_site"] = np.array([1.0, 0.0, 1.0, 0.5], np.float32)
    flat["encoder/layer_1/attention/heads_site"] = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
    flat["encoder/layer_1/ffn_site"] = np.array([0.0] * 7 + [1.0] * 4 + [0.7], np.float32)
    masks = unflatten(flat)
    cfg2, params2 = compaction.compact(model.config, variables["params"], *compaction.layer_masks(masks))
    assert cfg2.num_heads == (3, 1) and cfg2.intermediate_size == (12, 5)

    path = tmp_path / "compacted.onnx"
    report = export(Transformer(cfg2).apply, {"params": params2}, batch(2, 5), str(path), dim_constraints=CONSTRAINTS)
    assert report.max_abs_diff("logits") <= 1e-4
    # each layer is still the canonical attention subgraph, with its own head count
    assert _head_reshapes(onnx.load(str(path))) == [3, 1]
    feeds = batch(3, 7, seed=5)
    masked = jax.jit(lambda v, kw: t.wrap(model.apply)(v, **kw).logits)({**variables, MASKS: masks}, feeds)
    np.testing.assert_allclose(ort_run(path, feeds)[0], masked, atol=1e-4)


def test_multi_query_successor(tmp_path):
    pred, pred_vars = make_model(num_layers=2, num_heads=4)
    succ_cfg = theseus.successor_from_predecessor(pred.config, num_layers=1, num_kv_heads=1)
    params = theseus.init_from_predecessor(pred.config, jax.tree.map(np.asarray, pred_vars["params"]), succ_cfg)
    cfg, succ_params = theseus.extract_successor(pred.config, succ_cfg, params)
    assert cfg.kv_heads(0) == 1 and succ_params["encoder"]["layer_0"]["attention"]["key"]["kernel"].shape == (16, 4)
    succ = Transformer(cfg)
    path = tmp_path / "mqa.onnx"
    report = export(succ.apply, {"params": succ_params}, batch(2, 5), str(path), dim_constraints=CONSTRAINTS)
    assert report.max_abs_diff("logits") <= 1e-4
    feeds = batch(4, 3, seed=2)
    want = jax.jit(lambda v, kw: succ.apply(v, **kw).logits)({"params": succ_params}, feeds)
    np.testing.assert_allclose(ort_run(path, feeds)[0], want, atol=1e-4)
