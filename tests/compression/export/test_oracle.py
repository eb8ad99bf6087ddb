"""Differential test against jax2onnx (a test-only oracle, skipped when not installed): both converters'
graphs give the same logits in onnxruntime."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression.export import export
from tests.compression.export.conftest import CONSTRAINTS, batch, make_model, ort_run


def test_matches_jax2onnx(tmp_path):
    jax2onnx = pytest.importorskip("jax2onnx")
    import onnxruntime as ort

    model, variables = make_model(num_layers=2)
    feeds = batch(2, 6, seed=4)
    path = tmp_path / "ours.onnx"
    export(lambda v, **kw: model.apply(v, **kw).logits, variables, feeds, str(path), dim_constraints=CONSTRAINTS)
    try:
        theirs = jax2onnx.to_onnx(lambda ids, mask: model.apply(variables, ids, mask).logits,
                                  [jax.ShapeDtypeStruct((2, 6), jnp.int32)] * 2)
    finally:
        jax.clear_caches()  # jax2onnx patches jnp while tracing
    sess = ort.InferenceSession(theirs.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    (reference,) = sess.run(None, dict(zip(names, feeds.values())))
    (ours,) = ort_run(path, feeds)
    assert np.abs(reference).max() > 0
    np.testing.assert_allclose(ours, reference, atol=1e-5)
