"""Techniques as config components of the training jobs: the runner's composed step against steps written by
hand, the live teacher against the cached logits, and every combination or field the runner refuses.

The composed loss is the runner's (:func:`experiments.jobs.runner.make_loss` over the run that
:func:`experiments.jobs.runner.prepare` builds from a config). The references never touch the runner: the
logit-KD loss is written from its formula in numpy; the chained step (L0 gates + fake-quant QAT + bfloat16 +
TinyBERT from a live teacher) is assembled directly from the library transforms, with the gates' Lagrangian
written from the hard-concrete formula.
"""

import logging
import math
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from compression import precision
from compression import quantization as q
from compression.distillation import layer_maps, presets
from compression.pruning import l0 as l0_gates
from experiments.configs import distill as distill_configs
from experiments.configs import l0 as l0_configs
from experiments.configs import theseus as theseus_configs
from experiments.jobs import registry, runner
from experiments.runtime.config_validation import ConfigError
from experiments.techniques import qat as qat_technique
from tests.experiments.tiny import tiny_config, tiny_job
from tests.multidevice import REPO

RNG = jax.random.key(7)


def _first_batch(run):
    return next(runner.train_batches(run)(0, 0))


def _run(config, workdir):
    return runner.prepare(registry.JOBS[config.job], config, str(workdir))


def test_logit_kd_alone_equals_the_formula(tiny_teacher_dir, tmp_path):
    """Hinton KD from cached logits: 0.9 T^2 KL(p_T || p_S) + 0.1 CE, T = 4, written in numpy."""
    config = tiny_job(distill_configs.get_config("synthetic,transformer3"), tiny_teacher_dir, 4)
    config.student.num_layers = 1
    config.student.init = "random"  # a student far from the (nearly uniform) tiny teacher
    run = _run(config, tmp_path)
    head = run.tree["model"]["classifier"]
    # sharpen the student's logits so that the KL term is sizeable against the cross-entropy
    run.tree = {**run.tree, "model": {**run.tree["model"], "classifier": {**head, "kernel": 20.0 * head["kernel"]}}}
    batch = _first_batch(run)
    loss, aux = runner.make_loss(run)(run.tree, batch, RNG, run.extras)

    teacher, _, t_params = models.load(tiny_teacher_dir)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    t_logits = np.asarray(teacher.apply({"params": t_params}, inputs[0], attention_mask=inputs[1],
                                        token_type_ids=inputs[2]).logits, np.float64)
    np.testing.assert_allclose(batch["teacher_logits"], t_logits, rtol=1e-5, atol=1e-5)  # the cache is the teacher
    s_logits = np.asarray(run.model.apply({"params": run.tree["model"]}, inputs[0], attention_mask=inputs[1],
                                          token_type_ids=inputs[2], train=True, rngs={"dropout": RNG}).logits,
                          np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    T = 4.0
    log_pt, log_ps = log_softmax(t_logits / T), log_softmax(s_logits / T)
    kd = T * T * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), -1))
    ce = -np.mean(log_softmax(s_logits)[np.arange(len(s_logits)), batch["labels"]])
    assert kd > 1e-4 and ce > 0.1
    np.testing.assert_allclose(float(loss), 0.9 * kd + 0.1 * ce, rtol=1e-5)
    np.testing.assert_allclose(float(aux.weight), len(s_logits))


def test_live_teacher_step_equals_the_cached_logit_step(tiny_teacher_dir, tmp_path):
    """For a logit-only preset the teacher in the step gives the loss and gradients of the cached logits."""
    runs = {}
    for mode in ("cached", "live"):
        config = tiny_job(distill_configs.get_config("synthetic,transformer3"), tiny_teacher_dir, 4)
        config.student.num_layers = 1
        config.student.init = "random"
        config.distill.teacher = mode
        runs[mode] = _run(config, tmp_path / mode)
    assert "teacher" in runs["live"].extras and "teacher" not in runs["cached"].extras
    out = {}
    for mode, run in runs.items():
        batch = _first_batch(run)
        assert ("teacher_logits" in batch) == (mode == "cached")
        grad_fn = jax.value_and_grad(lambda tree: runner.make_loss(run)(tree, batch, RNG, run.extras)[0])
        out[mode] = grad_fn(run.tree)
    np.testing.assert_allclose(out["live"][0], out["cached"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["live"][1]), jax.tree.leaves(out["cached"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chained_components_equal_the_step_assembled_by_hand(tiny_teacher_dir, tmp_path):
    """One config: L0 gates on heads and FFN + TinyBERT from the live teacher + QAT + bfloat16. The runner's
    loss and gradients equal a step assembled from the library transforms directly, with the Lagrangian written
    from the hard-concrete formula (P(open) = sigmoid(log_alpha - beta log(-gamma / zeta)))."""
    config = tiny_job(l0_configs.get_config("synthetic"), tiny_teacher_dir, 8)
    config.distill.preset = "tinybert"
    config.qat.enabled = True
    config.qat.calibration_batches = 2
    config.precision = "bfloat16"
    run = _run(config, tmp_path)
    assert len(run.wrappers) == 3 and "teacher" in run.extras  # gates, fake quant, bf16 policy; a live teacher
    batch = _first_batch(run)
    ramp = float(batch["sparsity_ramp"][0])
    assert 0.0 <= ramp <= 1.0
    # Spread the gates so that every one takes gradient from both the task loss and the Lagrangian.
    leaves, treedef = jax.tree.flatten(run.tree["gates"])
    gates = jax.tree.unflatten(treedef, [jnp.linspace(-1.5, 1.5, x.size, dtype=jnp.float32) for x in leaves])
    lambdas = {k: {"lambda_1": jnp.float32(0.7), "lambda_2": jnp.float32(1.3)} for k in ("ffn", "heads")}
    tree = {**run.tree, "gates": gates, "lambdas": lambdas}

    teacher, t_cfg, t_params = models.load(tiny_teacher_dir)
    quant = run.variables(tree, run.extras)[q.QUANT]
    student_apply = precision.policy("bfloat16").wrap(
        q.fake_quant(qat_technique.RULES, scales="fixed").wrap(l0_gates.l0_gates("heads|ffn").wrap(run.model.apply)))
    preset = presets.get_preset("tinybert")
    layer_map = layer_maps.build("uniform", run.model_cfg.num_layers, t_cfg.num_layers, include_embeddings=True)
    shift = (2.0 / 3.0) * math.log(0.1 / 1.1)  # beta * log(-gamma / zeta)
    dropout_key, gate_key = jax.random.split(RNG, 2)

    def by_hand(tree):
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        s_out = student_apply({"params": tree["model"], l0_gates.GATES: tree["gates"], q.QUANT: quant}, ids,
                              attention_mask=mask, token_type_ids=types, train=True,
                              rngs={"dropout": dropout_key, l0_gates.GATES_RNG: gate_key}, output_hidden_states=True,
                              output_attentions=True)
        t_out = teacher.apply({"params": t_params}, ids, attention_mask=mask, token_type_ids=types,
                              output_hidden_states=True, output_attentions=True)
        task, _ = presets.distill_loss(preset, s_out, jax.tree.map(lambda x: x.astype(jnp.float32), t_out),
                                       {"example_weight": batch["example_weight"], "attention_mask": mask},
                                       layer_map=layer_map, weights={"ce": 0.0})
        penalty = 0.0
        for kind, site in (("ffn", "ffn_site"), ("heads", "heads_site")):
            alphas = [a for p, a in jax.tree_util.tree_leaves_with_path(tree["gates"])
                      if site in jax.tree_util.keystr(p)]
            expected_open = sum(jnp.sum(jax.nn.sigmoid(a - shift)) for a in alphas)
            gap = 1.0 - expected_open / sum(a.size for a in alphas) - config.l0[f"target_{kind}"] * ramp
            lam = tree["lambdas"][kind]
            penalty = penalty + lam["lambda_1"] * gap + lam["lambda_2"] * gap * gap
        return task + penalty

    composed = jax.jit(jax.value_and_grad(lambda t: runner.make_loss(run)(t, batch, RNG, run.extras)[0]))
    loss_c, grads_c = composed(tree)
    loss_h, grads_h = jax.jit(jax.value_and_grad(by_hand))(tree)
    assert float(loss_c) > 0.01
    np.testing.assert_allclose(loss_c, loss_h, rtol=1e-5)
    for key in ("model", "gates", "lambdas"):
        leaves_c, leaves_h = jax.tree.leaves(grads_c[key]), jax.tree.leaves(grads_h[key])
        assert len(leaves_c) == len(leaves_h)
        for a, b in zip(leaves_c, leaves_h):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads_c["gates"]))


def test_theseus_component_is_the_mixed_model_at_the_scheduled_probability(tiny_teacher_dir, tmp_path):
    """Theseus alone: cross-entropy of the predecessor/successor mix with p(step) from the linear curriculum,
    the module choices drawn from their own stream; gradients reach successor layers only."""
    from compression import theseus as theseus_lib
    config = tiny_job(theseus_configs.get_config("synthetic,linear"), tiny_teacher_dir, 8)
    config.theseus.successor_layers = 1
    run = _run(config, tmp_path)
    batch = _first_batch(run)
    p0 = config.theseus.replacing_rate  # the curriculum's value at step 0
    np.testing.assert_allclose(batch["replace_prob"], p0)
    dropout_key, swap_key = jax.random.split(RNG, 2)

    def by_hand(params):
        out = run.model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                              token_type_ids=batch["token_type_ids"], train=True, mode="mixed", replace_prob=p0,
                              rngs={"dropout": dropout_key, theseus_lib.THESEUS_RNG: swap_key})
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], 1))

    loss_c = runner.make_loss(run)(run.tree, batch, RNG, run.extras)[0]
    np.testing.assert_allclose(loss_c, by_hand(run.tree["model"]), rtol=1e-5)
    # At p = 1 every module runs its successor: the gradient reaches successor layers, never the predecessor's.
    certain = {**batch, "replace_prob": np.ones_like(batch["replace_prob"])}
    grads_c = jax.grad(lambda m: runner.make_loss(run)({"model": m}, certain, RNG, run.extras)[0])(run.tree["model"])
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads_c)}
    assert any(np.any(g != 0) for k, g in flat.items() if "successor" in k)
    assert all(np.all(g == 0) for k, g in flat.items() if "predecessor" in k)


def _matched_zeros(params) -> tuple[int, int]:
    """(zeros, size) over the attention and FFN kernels, found by their paths here (not by the technique)."""
    zeros = total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("/kernel") and any(part in name for part in ("/attention/", "/intermediate/", "/output/")) \
                and "/layer_" in name and "pooler" not in name:
            leaf = np.asarray(leaf)
            zeros, total = zeros + int((leaf == 0).sum()), total + leaf.size
    return zeros, total


def test_magnitude_pruning_reaches_its_sparsity_and_resumes_exactly(tmp_path, caplog):
    """Gradual magnitude pruning in a fine-tuning run: the saved model has floor(0.5 n) zero attention and FFN
    weights (the global target, reached at step 12 of 24 and held), results.json measures the same, and a run
    resumed from step 16's checkpoint ends with the same parameters: the masks, recomputed last at step 12,
    come back from the optimizer state (fresh all-ones masks would let steps 16-24 revive pruned weights)."""
    config = tiny_config(magnitude__final_sparsity=0.5, magnitude__frequency=4, magnitude__end_fraction=0.5,
                         export="last", checkpoint__keep=8)
    workdir = tmp_path / "run"
    results = registry.run(config, str(workdir))
    _, _, params = models.load(str(workdir / "model"))
    zeros, total = _matched_zeros(params)
    assert total > 1000 and zeros == math.floor(0.5 * total)
    assert results["magnitude"]["sparsity"] == zeros / total and results["magnitude"]["end_step"] == 12
    assert results["techniques"] == ["magnitude"]

    for name in ("model", "results.json"):
        path = workdir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 16:
            shutil.rmtree(step_dir)
    with caplog.at_level(logging.INFO):
        registry.run(config, str(workdir))
    assert "resumed from checkpoint step 16" in caplog.text
    _, _, resumed = models.load(str(workdir / "model"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


# -- what the runner refuses before any work ---------------------------------------------------------------

def _distill(student="transformer3", task="synthetic", **changes):
    c = distill_configs.get_config(f"{task},{student}")
    c.teacher_dir = "/nonexistent/teacher"
    for key, value in changes.items():
        node = c
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


def _l0(**changes):
    c = l0_configs.get_config("synthetic")
    c.model_dir = "/nonexistent/model"
    for key, value in changes.items():
        section, field = key.split(".") if "." in key else (None, key)
        (c[section] if section else c)[field] = value
    return c


BAD_COMBINATIONS = {
    "theseus with a BiLSTM": (_distill("bilstm", **{"theseus.enabled": True}), "module replacement swaps Transformer"),
    "L0 on a BiLSTM": (_distill("bilstm", **{"l0.enabled": True, "export": "last"}), "L0 gates sit on Transformer"),
    "LayerDrop on the CNN-LSTM": (_distill("cnn_lstm", task="synthetic_ner", **{"layerdrop.rate": 0.3}),
                                  "LayerDrop skips Transformer layers"),
    "TinyBERT into a BiLSTM": (_distill("bilstm", **{"distill.preset": "tinybert"}), "a Transformer student only"),
    "TinyBERT from cached logits": (_distill(**{"distill.preset": "tinybert", "distill.teacher": "cached"}),
                                    "the logit cache holds logits only"),
    "PKD with Theseus": (_l0(**{"l0.enabled": False, "theseus.enabled": True, "distill.preset": "pkd"}),
                         "the mixed Theseus model has no per-layer outputs"),
    "a live teacher for a BiLSTM": (_distill("bilstm", **{"distill.teacher": "live"}), "use 'cached'"),
    "L0 with Theseus": (_l0(**{"theseus.enabled": True}), "gate the successor after replacement"),
    "L0 with LayerDrop": (_l0(**{"layerdrop.rate": 0.2}), "use one or the other"),
    "L0 exporting the best step": (_l0(export="best"), "only the last step meets the sparsity targets"),
    "a layer map without an intermediate term": (_distill(**{"distill.layer_map": "1:2"}), "has no intermediate"),
    "distillation without a teacher": (_distill(teacher_dir=None), "needs config.teacher_dir"),
    "magnitude pruning with Theseus": (_l0(**{"l0.enabled": False, "theseus.enabled": True,
                                              "magnitude.final_sparsity": 0.5}), "would prune the frozen predecessor"),
    "magnitude pruning of a BiLSTM by the Transformer pattern": (
        _distill("bilstm", **{"magnitude.final_sparsity": 0.5, "export": "last"}), "name its kernels"),
    "magnitude pruning exporting the best step": (_distill(**{"magnitude.final_sparsity": 0.5, "export": "best"}),
                                                  "not at the final sparsity"),
}


@pytest.mark.parametrize("name", list(BAD_COMBINATIONS))
def test_bad_combination_is_refused_before_any_work(name, tmp_path):
    config, message = BAD_COMBINATIONS[name]
    workdir = tmp_path / "run"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="this combination cannot run") as err:
        registry.run(config, str(workdir))
    assert message in str(err.value)
    assert time.perf_counter() - start < 5.0  # no data, model or teacher was loaded (their paths do not exist)
    assert not workdir.exists()


BAD_FIELDS = {  # (field, value, message)
    "unknown field": ("optimizer.learnin_rate", 1e-4, "did you mean config.optimizer.learning_rate"),
    "wrong type": ("batch_size", "32", "config.batch_size must be a int"),
    "below the minimum": ("optimizer.learning_rate", -1.0, "below the minimum"),
    "above the maximum": ("l0.target_ffn", 1.5, "above the maximum"),
    "not a choice": ("distill.preset", "hintonn", "is not allowed"),
    "NaN": ("optimizer.learning_rate", float("nan"), "not a finite number"),
    "infinity": ("num_epochs", float("inf"), "not a finite number"),
}


@pytest.mark.parametrize("job", ["finetune", "distill", "theseus", "l0", "qat", "multitask", "prune", "quantize"])
@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_every_bad_field_class_is_named_for_every_job(job, case, tmp_path):
    field, value, message = BAD_FIELDS[case]
    config = registry.JOBS[job].module.get_config()
    *path, leaf = field.split(".")
    node = config
    for part in path:
        if part not in node:
            pytest.skip(f"{job} has no section {part}")
        node = node[part]
    if case != "unknown field" and leaf not in node:
        pytest.skip(f"{job} has no field {field}")
    with config.unlocked():
        if case == "wrong type":
            node._fields[leaf] = value  # what a hand-built config can hold (ConfigDict's setter refuses it)
        else:
            node[leaf] = value
    with pytest.raises(ConfigError, match="invalid config") as err:
        registry.run(config, str(tmp_path / "run"))
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_unknown_override_on_the_command_line_names_the_field():
    proc = subprocess.run([sys.executable, "-m", "experiments.main", "--workdir=/nonexistent/run",
                           "--config=experiments/configs/distill.py:synthetic,transformer3",
                           "--config.distill.presett=pkd"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown config field config.distill.presett (did you mean config.distill.preset?)" in proc.stderr
