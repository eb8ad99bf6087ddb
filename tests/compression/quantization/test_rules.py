"""Rule resolution per module class (weight axes), exclusions, Embed tables, and what the hooks compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import quantization as q
from compression.quantization.rules import trace_targets

ALL_TYPES = ("Dense", "DenseGeneral", "Conv", "Einsum", "Embed")


class Zoo(nn.Module):
    """One module of each quantizable class. ids [B, S] int, x [B, S, 4]."""

    @nn.compact
    def __call__(self, ids, x):
        emb = nn.Embed(7, 4, name="embed")
        e = emb(ids)  # [B, S, 4]
        h = nn.DenseGeneral((2, 3), name="general")(x + e)  # kernel [4, 2, 3]
        h = nn.Einsum((6, 5), "bsf,fo->bso", name="einsum")(h.reshape(*h.shape[:2], 6))  # kernel [6, 5]
        h = nn.Conv(4, (3,), name="conv")(h)  # kernel [3, 5, 4]
        h = nn.Dense(4, name="dense")(h)
        return emb.attend(h)  # [B, S, 7]


@pytest.fixture(scope="module")
def zoo():
    model = Zoo()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 7, (2, 5)), jnp.int32)
    x = jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)
    return model, jax.jit(model.init)(jax.random.key(0), ids, x), ids, x


def test_weight_axes_per_module_class(zoo):
    model, variables, ids, x = zoo
    targets = trace_targets(model.apply, variables, ids, x, rules=(q.QuantRule(module_types=ALL_TYPES),))
    got = {(t.name, t.method): (t.weight_axes, t.input_index, t.weight_index) for t in targets}
    assert got == {
        ("embed", "__call__"): ((0,), None, 0),  # table rows; integer ids are not quantized
        ("general", "__call__"): ((-2, -1), 0, 1),  # the features axes
        ("einsum", "__call__"): ((1,), 0, 1),  # "o": in the output, not in the input
        ("conv", "__call__"): ((-1,), 0, 1),
        ("dense", "__call__"): ((-1,), 0, 1),
        ("embed", "attend"): ((0,), 0, 1),  # rows are the outputs of attend
    }
    per_tensor = trace_targets(model.apply, variables, ids, x, rules=(q.QuantRule(per_channel=False),))
    assert all(t.weight_axes is None for t in per_tensor)


def test_default_rules_leave_embeddings_float(zoo):
    model, variables, ids, x = zoo
    names = {t.name for t in trace_targets(model.apply, variables, ids, x)}
    assert names == {"general", "einsum", "conv", "dense"}


def test_embed_and_einsum_hooks_compute_fake_quantized_weights(zoo):
    model, variables, ids, x = zoo
    rules = (q.QuantRule("embed", inputs=False, module_types=("Embed",)), q.QuantRule("einsum", weights=True,
                                                                                      inputs=False),
             q.QuantRule(".*", weights=False, inputs=False, module_types=ALL_TYPES))  # everything else: float
    apply = q.fake_quant(rules).wrap(model.apply)
    _, state = apply(variables, ids, x, mutable=["intermediates"], capture_intermediates=True)
    table = variables["params"]["embed"]["embedding"]
    expected_rows = q.QArray.quantize(table, axis=0).dequantize()
    np.testing.assert_allclose(state["intermediates"]["embed"]["__call__"][0], expected_rows[ids], rtol=1e-6)
    # the Einsum: input float (inputs=False), kernel per output column
    p = variables["params"]
    h_in = state["intermediates"]["general"]["__call__"][0].reshape(2, 5, 6)
    w = q.QArray.quantize(p["einsum"]["kernel"], axis=1).dequantize()
    np.testing.assert_allclose(state["intermediates"]["einsum"]["__call__"][0],
                               jnp.einsum("bsf,fo->bso", h_in, w) + p["einsum"]["bias"], rtol=1e-5, atol=1e-6)
    # the exclusion rule kept the Dense in float
    conv_out = state["intermediates"]["conv"]["__call__"][0]
    np.testing.assert_allclose(state["intermediates"]["dense"]["__call__"][0],
                               conv_out @ p["dense"]["kernel"] + p["dense"]["bias"], rtol=1e-5, atol=1e-6)


def test_exclusion_rule_counts_as_a_match(zoo):
    model, variables, ids, x = zoo
    rules = (q.QuantRule("dense", weights=False, inputs=False), q.QuantRule(".*"))
    out = q.calibrate(model.apply, variables, [(ids, x)], rules)
    assert "dense" not in out["quant"] and "conv" in out["quant"]


def test_share_group_must_name_an_ancestor(zoo):
    model, variables, ids, x = zoo
    rule = q.QuantRule(r"^(de)nse$", share_input_scale_group=1)  # "de" is no module path
    with pytest.raises(ValueError, match="not the path of an ancestor"):
        trace_targets(model.apply, variables, ids, x, rules=(rule, q.QuantRule(".*", required=False)))


def test_rules_must_be_quant_rules():
    with pytest.raises(TypeError, match="QuantRule"):
        q.fake_quant(rules=("dense",))
    with pytest.raises(ValueError, match="no quantization rules"):
        q.fake_quant(rules=())
    with pytest.raises(ValueError, match="scales mode"):
        q.fake_quant(scales="adaptive")


def test_embed_attend_query_is_calibrated(zoo):
    model, variables, ids, x = zoo
    out = q.calibrate(model.apply, variables, [(ids, x)], (q.QuantRule(module_types=ALL_TYPES),))
    assert set(out["quant"]["embed"]) == {"input_scale"}  # attend's query; lookups have no float input
    _, state = model.apply(variables, ids, x, mutable=["intermediates"], capture_intermediates=True)
    query = state["intermediates"]["dense"]["__call__"][0]  # calibration observes the float model
    np.testing.assert_allclose(out["quant"]["embed"]["input_scale"], np.abs(query).max() / 127, rtol=1e-5)
