"""Precision plans: sites and their FLOPs by hand, a plan's rules against hand-written ones, switched fake
quantization against fake_quant (one compilation for every assignment), and the chooser on a hand-worked example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import quantization as q
from compression.quantization.plans import PrecisionPlan, Site, choose_plan, find_sites, switch_variables, \
    switched_fake_quant
from tests.compression.export.conftest import batch, make_model

SITES = ["encoder/layer_0/attention", "encoder/layer_0/attention/output", "encoder/layer_0/intermediate",
         "encoder/layer_0/output", "pooler/dense", "classifier"]


@pytest.fixture(scope="module")
def tiny():
    model, variables = make_model()  # hidden 16, 2 heads, FFN 24, one layer, 2 labels
    calib = [batch(4, 8, seed=s) for s in range(2)]
    return model, variables, calib


def test_sites_and_flops_by_hand(tiny):
    model, variables, _ = tiny
    sites = find_sites(model.apply, variables, **batch(1, 10))
    assert [s.name for s in sites] == SITES
    assert sites[0].modules == tuple(f"encoder/layer_0/attention/{m}" for m in ("query", "key", "value"))
    s, h, f = 10, 16, 24
    assert [x.flops for x in sites] == [3 * 2 * s * h * h, 2 * s * h * h, 2 * s * h * f, 2 * s * f * h, 2 * h * h,
                                        2 * h * 2]


def test_plan_rules_equal_hand_written_rules(tiny):
    model, variables, calib = tiny
    sites = find_sites(model.apply, variables, **calib[0])
    plan = PrecisionPlan.uniform(sites, "int8", calibrators={"int8": "percentile:99", "fp8": "mse"}).with_formats(
        {"encoder/layer_0/attention": "fp8", "encoder/layer_0/intermediate": "float"}, note="by hand")
    assert plan.record == {"note": "by hand"}
    hand = (q.QuantRule(r"^(encoder/layer_0/attention)/(query|key|value)$", share_input_scale_group=1,
                        format="fp8", calibrator="mse"),
            q.QuantRule(r"intermediate", weights=False, inputs=False),
            q.QuantRule(r".*", calibrator="percentile:99"))
    v_plan = q.calibrate(model.apply, variables, calib, plan.rules())
    v_hand = q.calibrate(model.apply, variables, calib, hand)
    assert jax.tree.structure(v_plan["quant"]) == jax.tree.structure(v_hand["quant"])
    assert "intermediate" not in v_plan["quant"]["encoder"]["layer_0"]  # a float site has no scale
    for a, b in zip(jax.tree.leaves(v_plan["quant"]), jax.tree.leaves(v_hand["quant"])):
        assert float(a) == float(b)
    ids = batch(3, 8, seed=9)
    np.testing.assert_array_equal(q.fake_quant(plan.rules()).wrap(model.apply)(v_plan, **ids).logits,
                                  q.fake_quant(hand).wrap(model.apply)(v_hand, **ids).logits)
    assert plan.flops() == {"int8": sum(x.flops for x in sites[1:] if x.name != "encoder/layer_0/intermediate"),
                            "fp8": sites[0].flops, "float": sites[2].flops}
    back = PrecisionPlan.from_dict(plan.to_dict())
    assert back == plan and back.rules() == plan.rules()


def test_plan_errors():
    sites = [Site("a", ("a",), 10), Site("b", ("b",), 20)]
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        PrecisionPlan(sites, {"a": "int8"})
    with pytest.raises(ValueError, match="formats must be among"):
        PrecisionPlan(sites, {"a": "int4", "b": "int8"})
    with pytest.raises(ValueError, match="calibrator 'entropy' does not calibrate the fp8 format"):
        PrecisionPlan.uniform(sites, "fp8", calibrators={"int8": "max", "fp8": "entropy"})
    with pytest.raises(ValueError, match="not a precision plan"):
        PrecisionPlan.from_dict({"version": 0})


def test_switched_fake_quant_equals_fake_quant_without_recompiling(tiny):
    model, variables, calib = tiny
    sites = find_sites(model.apply, variables, **calib[0])
    stats = q.collect_statistics(model.apply, variables, calib)
    int8, fp8 = stats.scales(), stats.scales(format="fp8")
    switched = switched_fake_quant().wrap(model.apply)
    run = jax.jit(lambda v, kw: switched(v, **kw).logits)
    ids = batch(3, 8, seed=4)
    mixed = PrecisionPlan.uniform(sites, "int8").with_formats(
        {"encoder/layer_0/attention": "fp8", "encoder/layer_0/output": "fp8", "pooler/dense": "float"})
    for plan in (PrecisionPlan.uniform(sites, "float"), PrecisionPlan.uniform(sites, "fp8"),
                 PrecisionPlan.uniform(sites, "int8"), mixed):
        got = run(switch_variables(variables, plan.formats, int8, fp8), ids)
        if plan.flops()["float"] == sum(site.flops for site in sites):
            want = model.apply(variables, **ids).logits
        else:
            calibrated = q.calibrate(model.apply, variables, calib, plan.rules())
            want = q.fake_quant(plan.rules()).wrap(model.apply)(calibrated, **ids).logits
        if plan.flops()["int8"] == 0:
            np.testing.assert_array_equal(got, want)  # the same float and FP8 operations
        else:  # fake_quant multiplies int8 grids exactly (grid_dot): float32 rounding apart
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert run._cache_size() == 1  # one compilation for every assignment


def test_choose_plan_hand_worked():
    """Four sites. Start: each in its less sensitive format, int8 on a tie: A fp8 (0.2 < 0.8), B int8 (0.4 tie),
    C int8 (0.9 < 1.2), D int8 (0.1 < 0.3). Damage per FLOP: C 0.9/300 = 0.003, A 0.2/100 = 0.002,
    B 0.4/400 = 0.001, D 0.1/200 = 0.0005: the demotion order is C, A, B, D.

    The metric (here additive, reference 90, budget 0.5: accept >= 89.5) loses A-fp8 0.1, B-int8 0.3, C-int8 0.6,
    D-int8 0.05. k = 0 floats: 90 - 1.05 = 88.95, rejected; bisection over (0, 4]: k = 2 (C, A float):
    90 - 0.35 = 89.65 accepted; k = 1 (C float): 90 - 0.45 = 89.55 accepted. Chosen: C float, A fp8, B and D
    int8: 700 of 1000 FLOPs stay in low precision."""
    sites = [Site("A", ("A",), 100), Site("B", ("B",), 400), Site("C", ("C",), 300), Site("D", ("D",), 200)]
    sensitivity = {"A": {"int8": 0.8, "fp8": 0.2}, "B": {"int8": 0.4, "fp8": 0.4}, "C": {"int8": 0.9, "fp8": 1.2},
                   "D": {"int8": 0.1, "fp8": 0.3}}
    loss = {("A", "fp8"): 0.1, ("B", "int8"): 0.3, ("C", "int8"): 0.6, ("D", "int8"): 0.05}

    def evaluate(formats):
        return 90.0 - sum(loss.get((s, f), 0.0) for s, f in formats.items())

    formats, record = choose_plan(sites, sensitivity, evaluate, reference=90.0, budget=0.5)
    assert formats == {"A": "fp8", "B": "int8", "C": "float", "D": "int8"}
    assert record["start"] == {"A": "fp8", "B": "int8", "C": "int8", "D": "int8"}
    assert record["order"] == ["C", "A", "B", "D"] and record["floats"] == 1
    assert [(e["floats"], e["accepted"]) for e in record["evaluations"]] == [(0, False), (2, True), (1, True)]
    np.testing.assert_allclose([e["metric"] for e in record["evaluations"]], [88.95, 89.65, 89.55])
    plan = PrecisionPlan(sites, formats)
    assert plan.flops() == {"int8": 600, "fp8": 100, "float": 300}
    # a budget every all-low-precision plan meets keeps everything low; a zero budget here needs all four float
    assert choose_plan(sites, sensitivity, evaluate, reference=90.0, budget=2.0)[1]["floats"] == 0
    assert choose_plan(sites, sensitivity, evaluate, reference=90.0, budget=0.0)[0] == dict.fromkeys("ABCD", "float")
    # int8 only: A starts in int8 too
    only = choose_plan(sites, sensitivity, evaluate, reference=90.0, budget=0.5, formats=("int8",))[1]
    assert only["start"]["A"] == "int8"
    with pytest.raises(ValueError, match="no sensitivity for sites \\['D'\\]"):
        choose_plan(sites, {k: v for k, v in sensitivity.items() if k != "D"}, evaluate, reference=90.0, budget=0.5)
