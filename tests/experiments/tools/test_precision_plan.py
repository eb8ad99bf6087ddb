"""experiments.tools.precision_plan on a tiny Transformer and the synthetic task: sensitivities measured on the
selection split (one checked against fake_quant directly), the chosen plan within its budget there, the report's
rows, the saved plan and scales, and the plan's ONNX file with its FLOPs by format; quant_eval's FP8 and plan
rows."""

import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

import models
from compression import quantization as q
from experiments.data import load_task
from experiments.jobs.train import _word_level_tokenizer
from experiments.runtime import evaluation, selection
from experiments.techniques import qat
from experiments.runtime import cli
from experiments.tools import precision_plan, quant_eval
from models.transformer import Transformer, TransformerConfig
from tests.multidevice import REPO

SIZE, MAX_LEN, HELD_OUT = 200, 16, 40
ARGS = ["--calib_examples=32", "--batch_size=16", f"--synthetic_size={SIZE}"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision_plan")
    probe = types.SimpleNamespace(data_dir=None, max_length=MAX_LEN, seed=0, synthetic_size=SIZE, selection="holdout",
                                  selection_size=HELD_OUT)
    tok = _word_level_tokenizer("synthetic", probe, str(root / "tokenizer"))
    cfg = TransformerConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_position_embeddings=MAX_LEN, hidden_dropout_rate=0.0,
                            attention_dropout_rate=0.0, num_labels=2, initializer_range=1.0)
    params = jax.jit(Transformer(cfg).init)(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
    held_out = load_task("synthetic", None, tokenizer=str(root / "tokenizer"), max_length=MAX_LEN,
                         synthetic_size=SIZE, selection=HELD_OUT)  # as a training job records its holdout
    models.save(root / "model", "transformer", cfg, params, tokenizer_dir=root / "tokenizer",
                extra={"task": "synthetic", "max_length": MAX_LEN, "selection": selection.record(held_out)})
    return str(root / "model")


def _run(*args):
    return precision_plan.run(cli.parse(precision_plan.define_flags, list(args)))


def test_plan_within_budget_with_its_measurements(model_dir, tmp_path, capsys):
    out = tmp_path / "plan"
    report = _run(f"--model_dir={model_dir}", f"--out={out}", "--budget=1", *ARGS)
    printed = capsys.readouterr().out
    assert report["selection"]["split"] == "holdout" and report["selection"]["examples"] > 0
    plan = qat.load_plan(str(out / qat.PLAN_FILE))
    names = [s.name for s in plan.sites]
    assert names == ["encoder/layer_0/attention", "encoder/layer_0/attention/output", "encoder/layer_0/intermediate",
                     "encoder/layer_0/output", "pooler/dense", "classifier"]
    record = plan.record
    for site in names:  # every measurement, and the sensitivity made of them
        for fmt in ("int8", "fp8"):
            m = record["sites"][site][fmt]
            assert m["alone"]["kl"] >= 0 and m["all_but"]["kl"] >= 0
            assert m["sensitivity"] == pytest.approx(
                m["alone"]["kl"] + max(0.0, record["all_quantized"][fmt]["kl"] - m["all_but"]["kl"]))
    # the chooser accepted only plans within the budget on the selection split
    choice = record["choice"]
    accepted = [e for e in choice["evaluations"] if e["floats"] == choice["floats"]]
    assert choice["floats"] == len(names) or (accepted and accepted[0]["metric"] >= record["float_metric"] - 0.01)
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows)[:3] == ["float32", "int8", "fp8"] and rows["float32"]["low_precision_flops"] == 0.0
    assert rows["int8"]["low_precision_flops"] == rows["fp8"]["low_precision_flops"] == 1.0
    if "plan" in rows:
        flops = plan.flops()
        low = (flops["int8"] + flops["fp8"]) / sum(flops.values())
        assert rows["plan"]["low_precision_flops"] == pytest.approx(low)
        assert (out / qat.QUANT_STATE_FILE).exists()
    assert f"plan (holdout split, {report['selection']['examples']} examples, budget 1.0 points):" in printed

    # one measurement checked directly: the last site alone in FP8, through fake_quant and its own rule
    model, _, params, task = evaluation.load_model_task(model_dir, synthetic_size=SIZE, with_selection=True)
    inputs = evaluation.TRANSFORMER_INPUTS
    calib = quant_eval.calibration_batches(task, inputs, 32, 16, 0)
    rule = (q.QuantRule(r"^classifier$", format="fp8"),)
    keyed = evaluation.batch_apply(model.apply, inputs)
    v = q.calibrate(keyed, {"params": params}, calib, rule)
    ref = evaluation.dev_predictions(model.apply, {"params": params}, task, inputs, 16, keep_logits=True,
                                     split=task.selection)
    got = evaluation.dev_predictions(q.fake_quant(rule).wrap(model.apply), v, task, inputs, 16, keep_logits=True,
                                     split=task.selection)
    alone = record["sites"]["classifier"]["fp8"]["alone"]
    assert alone["kl"] == pytest.approx(precision_plan.kl_divergence(ref, got), rel=1e-6, abs=1e-12)
    assert alone["metric"] == pytest.approx(got.metrics(task)["accuracy"])


def test_everything_low_precision_under_a_wide_budget_and_the_export(model_dir, tmp_path):
    out = tmp_path / "plan"
    report = _run(f"--model_dir={model_dir}", f"--out={out}", "--budget=100", "--formats=fp8", "--export", *ARGS)
    assert set(report["plan"].values()) == {"fp8"}
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["plan"]["low_precision_flops"] == 1.0
    assert rows["plan"]["accuracy"] == pytest.approx(rows["fp8"]["accuracy"])  # the same model, the same scales
    flops = report["onnx_matmul_flops"]
    assert flops["by_format"]["int8"] == 0 and flops["nodes"] == {"int8": 0, "fp8": 8, "float": 2}
    parity = json.loads((out / "onnx" / "parity.json").read_text())
    assert parity["files"]["model_plan.onnx"]["opset"] == 19 and parity["plan"]["flops"]["float"] == 0
    # the saved plan drives quant_eval's plan row: the same dev figure
    payload = quant_eval.run(cli.parse(quant_eval.define_flags, [
        f"--model_dir={model_dir}", f"--plan={out / qat.PLAN_FILE}", "--formats=int8,fp8", "--calibrators=max",
        "--calib_examples=32", "--batch_size=16", f"--synthetic_size={SIZE}"]))
    qrows = {r["variant"]: r for r in payload["rows"]}
    assert list(qrows) == ["float32", "ptq:max", "int8:max", "fp8:max", "plan"]
    assert qrows["plan"]["accuracy"] == pytest.approx(rows["plan"]["accuracy"])
    assert qrows["fp8:max"]["accuracy"] == pytest.approx(rows["fp8"]["accuracy"])
    assert qrows["plan"]["low_precision_flops"] == 1.0 and payload["choice_fp8"]["chosen"] == "max"


def test_bad_flags_fail_when_parsed(model_dir, tmp_path):
    ok = [f"--model_dir={model_dir}", f"--out={tmp_path / 'out'}"]
    for args, match in ((["--formats=int8,int4"], "flag --formats=.*must be"),
                        (["--fp8_calibrator=entropy"], "flag --fp8_calibrator=entropy: must name a calibrator of FP8"),
                        (["--budget=-1"], "flag --budget=-1")):
        with pytest.raises(Exception, match=match):
            cli.parse(precision_plan.define_flags, [*ok, *args])


def test_help_lists_every_flag():
    fv = flags.FlagValues()
    precision_plan.define_flags(fv)
    out = subprocess.run([sys.executable, "-m", "experiments.tools.precision_plan", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    assert not [n for n in fv if f"--{n}" not in out.stdout and f"--[no]{n}" not in out.stdout]
