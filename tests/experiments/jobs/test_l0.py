"""L0 pruning (``config.l0``: hard-concrete gates on heads and FFN units, Lagrangian targets): the technique's
helpers, and the l0.py preset of the fine-tuning job on the tiny teacher."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from compression.pruning import l0 as l0_gates
from compression.pruning.site_masks import masks_by_path, unflatten
from experiments.configs import l0 as l0_configs
from experiments.data import load_task
from experiments.jobs import registry
from experiments.runtime import config_validation, evaluation, trainer
from experiments.techniques import l0
from models.bilstm import BiLSTMConfig
from tests.experiments.tiny import TINY, tiny_job

STEPS = 8


def _config(teacher_dir, arg="synthetic", **l0_fields):
    """A short run of the job's defaults, except that every gate starts closed: drop_init 0.95 puts log_alpha at
    -2.94, below the -2.40 where the deterministic gate reaches 0, and 8 Adam steps at 0.05 cannot reopen one;
    so every layer goes through the all-closed path (one inert head and FFN unit kept) deterministically.
    (The tiny teacher is a fixed point of its loss: all its gates move together, so partial closure is tested on
    hand-set gates below.) The expected sparsity (about 0.79 at the start) stays above the targets."""
    c = tiny_job(l0_configs.get_config(arg), teacher_dir, STEPS)
    c.l0.drop_init = 0.95
    c.l0.gate_learning_rate = 0.05
    for k, v in l0_fields.items():
        c.l0[k] = v
    return c


def _run(teacher_dir, tmp_path_factory, arg):
    workdir = tmp_path_factory.mktemp("l0")
    return registry.run(_config(teacher_dir, arg), str(workdir)), workdir


@pytest.fixture(scope="module")
def nokd_run(tiny_teacher_dir, tmp_path_factory):
    """(results, workdir) of the job on gold labels."""
    return _run(tiny_teacher_dir, tmp_path_factory, "synthetic,nokd")


@pytest.fixture(scope="module")
def kd_run(tiny_teacher_dir, tmp_path_factory):
    """(results, workdir) of the job with Hinton KD from the tiny teacher."""
    return _run(tiny_teacher_dir, tmp_path_factory, "synthetic")


def _tiny_task(teacher_dir):
    return load_task("synthetic", None, tokenizer=teacher_dir, max_length=TINY["max_length"], seed=0,
                     synthetic_size=TINY["synthetic_size"])


def test_target_ramp_by_hand():
    # 10 steps, warm-up fraction 0.3 -> 3 steps: r = 0, 1/3, 2/3, then 1.
    assert [l0.target_ramp(s, 3) for s in range(5)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert l0.target_ramp(0, 0) == 1.0


def test_multipliers_ascend_and_gates_descend_by_hand():
    """Sparsity 0.2 against a target 0.5 (gap -0.3): dP/dlambda_1 = -0.3, dP/dlambda_2 = 0.09, so one Adam ascent
    step of size 0.1 gives lambda_1 = -0.1, lambda_2 = +0.1 (Adam's first step moves each by the learning
    rate, in the sign of its gradient); the penalty grows to 0.1 * 0.3 + 0.1 * 0.09 = 0.039. The next step
    pushes log_alpha down (sparsity up); the model is untouched by the penalty."""
    # every unit's P(open) = sigmoid(a - beta log(-gamma / zeta)) = 0.8, i.e. expected sparsity 0.2
    a = math.log(0.8 / 0.2) + l0_gates.BETA * math.log(-l0_gates.GAMMA / l0_gates.ZETA)
    gates = {"layer_0": {"ffn_site": {"log_alpha": jnp.full((4,), a)},
                         "attention": {"heads_site": {"log_alpha": jnp.full((2,), a)}}}}
    tree = {"model": {"w": jnp.ones((2,))}, "gates": gates, "lambdas": l0.init_lambdas()}
    targets = {"ffn": 0.5, "heads": 0.5}
    opt = ml_collections.ConfigDict({"learning_rate": 0.1, "schedule": "constant", "warmup_fraction": 0.0,
                                     "weight_decay": 0.0, "no_decay_regex": "", "freeze_regex": "",
                                     "grad_clip_norm": 1.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8})
    cfg = ml_collections.ConfigDict({"gate_learning_rate": 0.1, "lambda_learning_rate": 0.1,
                                     "max_abs_log_alpha": 4.6})
    # as the runner composes them: the model's AdamW on tree["model"], the technique's optimizers on its parts
    model_tx, _ = trainer.optimizer_from_config(opt, tree["model"], total_steps=10)
    tx = trainer.by_key({"model": model_tx, **l0.gate_optimizers(cfg)})
    state = tx.init(tree)

    def penalty(t):
        return l0.sparsity_penalty(t["gates"], t["lambdas"], targets)[0]

    _, metrics = l0.sparsity_penalty(gates, tree["lambdas"], targets)
    assert float(metrics["expected_sparsity_ffn"]) == pytest.approx(0.2, abs=1e-6)
    grad_fn, update_fn = jax.jit(jax.grad(penalty)), jax.jit(tx.update)
    for step in range(2):
        grads = grad_fn(tree)
        if step == 0:
            assert float(grads["lambdas"]["ffn"]["lambda_1"]) == pytest.approx(-0.3, abs=1e-6)
            assert float(grads["lambdas"]["ffn"]["lambda_2"]) == pytest.approx(0.09, abs=1e-6)
        updates, state = update_fn(grads, state, tree)
        tree = jax.tree.map(lambda p, u: p + u, tree, updates)
        if step == 0:
            for kind in ("ffn", "heads"):
                assert float(tree["lambdas"][kind]["lambda_1"]) == pytest.approx(-0.1, rel=1e-4)
                assert float(tree["lambdas"][kind]["lambda_2"]) == pytest.approx(0.1, rel=1e-4)
            assert float(penalty(tree)) == pytest.approx(2 * 0.039, rel=1e-4)
            np.testing.assert_array_equal(tree["gates"]["layer_0"]["ffn_site"]["log_alpha"], np.float32(a))
    assert np.all(np.asarray(tree["gates"]["layer_0"]["ffn_site"]["log_alpha"]) < a - 0.05)
    np.testing.assert_array_equal(tree["model"]["w"], 1.0)


def test_compaction_of_a_layer_with_every_head_closed_matches_the_gated_model(tiny_teacher_dir):
    """Layer 0: both heads closed (one is kept, inert), FFN half closed; layer 1: a head at 0.5, FFN open. The
    compacted plain Transformer reproduces the gated model's logits."""
    model, cfg, params = models.load(tiny_teacher_dir)
    t = l0_gates.l0_gates("heads|ffn")
    gates = l0.initial_gates(t, model.apply, params, 0.5)
    assert masks_by_path(gates).keys() == {f"encoder/layer_{i}/{site}" for i in range(2)
                                           for site in ("attention/heads_site", "ffn_site")}
    f = cfg.ffn_size(0)
    gates = unflatten({"encoder/layer_0/attention/heads_site": jnp.array([-6.0, -3.0]),  # gates 0, 0
                       "encoder/layer_0/ffn_site": jnp.where(jnp.arange(f) % 2 == 0, -6.0, 6.0),  # 0, 1, 0, 1, ...
                       "encoder/layer_1/attention/heads_site": jnp.array([0.0, 6.0]),  # 0.5, 1
                       "encoder/layer_1/ffn_site": jnp.full((cfg.ffn_size(1),), 6.0)}, "log_alpha")
    assert l0.achieved_sparsity(l0.gate_summary(gates)[0]) == {"ffn": 0.25, "heads": 0.5}
    new_cfg, new_params, inert = l0.compact_gated(cfg, params, gates)
    assert inert == ["layer_0/head_1"]  # the larger log_alpha
    assert [new_cfg.heads(i) for i in range(2)] == [1, 2]
    assert [new_cfg.ffn_size(i) for i in range(2)] == [f // 2, cfg.ffn_size(1)]
    ids = jnp.asarray(np.random.default_rng(0).integers(5, cfg.vocab_size, (3, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, 9:].set(0)
    logits = jax.jit(lambda apply, v: apply(v, ids, attention_mask=mask).logits, static_argnums=0)
    want = logits(t.wrap(model.apply), {"params": params, l0_gates.GATES: gates})
    got = logits(models.model_class("transformer")(new_cfg).apply, {"params": new_params})
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("mode", ["nokd", "kd"])
def test_job_prunes_compacts_and_saves_a_plain_transformer(request, tiny_teacher_dir, mode):
    """Both modes run; the saved model is a smaller plain Transformer whose dev metrics equal the gated model's
    final (deterministic-gate) evaluation; targets ramp as configured and the multipliers ascend."""
    results, workdir = request.getfixturevalue(f"{mode}_run")
    with open(workdir / "results.json") as f:
        results_json = json.load(f)
    assert results_json["steps"] == STEPS and results_json["job"] == "l0"
    if mode == "kd":  # Hinton KD from the unpruned model (l0.py links teacher_dir to model_dir)
        assert results_json["techniques"] == ["l0", "distill"]
        assert results_json["distill"]["preset"] == "hinton"
        assert results_json["distill"]["teacher_dir"] == tiny_teacher_dir
    else:
        assert results_json["techniques"] == ["l0"] and "distill" not in results_json
    saved = results_json["l0"]
    assert models.read_meta(workdir / "model")["extra"]["l0"] == saved
    assert saved["targets"] == {"ffn": 0.5, "heads": 0.3} and saved["warmup_steps"] == 2
    assert os.path.exists(workdir / "teacher_logits.npz") == (mode == "kd")
    model, cfg, params = models.load(workdir / "model")
    teacher_params = models.load(tiny_teacher_dir)[2]
    assert saved["achieved_sparsity"] == {"ffn": 1.0, "heads": 1.0}
    assert sorted(u.rsplit("_", 1)[0] for u in saved["inert_units_kept"]) == [
        "layer_0/ffn", "layer_0/head", "layer_1/ffn", "layer_1/head"]
    assert (cfg.num_layers, saved["heads_per_layer"], saved["ffn_per_layer"]) == (2, [1, 1], [1, 1])
    assert [cfg.heads(i) for i in range(2)] == [1, 1] and [cfg.ffn_size(i) for i in range(2)] == [1, 1]
    assert saved["params_before"] == sum(np.size(x) for x in jax.tree.leaves(teacher_params))
    assert saved["params_after"] == sum(np.size(x) for x in jax.tree.leaves(params)) < saved["params_before"]
    assert saved["compacted_matches_gated"] is True
    metrics = evaluation.dev_metrics(model.apply, {"params": params}, _tiny_task(tiny_teacher_dir),
                                     evaluation.TRANSFORMER_INPUTS)
    assert metrics == pytest.approx({k: results["final"][k] for k in metrics})
    assert saved["compacted"] == pytest.approx(metrics)
    # warm-up round(0.3 * 8) = 2 steps: the ramp is 0, 0.5, 1, 1 over the first log window (4 steps), then 1
    with open(workdir / "metrics.jsonl") as f:
        train = [r for r in map(json.loads, f) if "lambda_1_ffn" in r]
    assert [r["target_ffn"] for r in train] == pytest.approx([0.5 * 2.5 / 4, 0.5])
    assert [r["target_heads"] for r in train] == pytest.approx([0.3 * 2.5 / 4, 0.3])
    # s - t > 0 throughout: lambda_1 ascends to > 0 (pushing gates open), lambda_2 (gradient (s - t)^2) too
    for kind in ("ffn", "heads"):
        assert all(r[f"expected_sparsity_{kind}"] > r[f"target_{kind}"] for r in train)
        assert 0.0 < train[0][f"lambda_1_{kind}"] < train[1][f"lambda_1_{kind}"] < saved["lambdas"][kind]["lambda_1"]
        assert saved["lambdas"][kind]["lambda_2"] > 0.0
    assert ("loss_kd" in train[0]) == (mode == "kd")


def test_target_of_one_fails_before_work(tiny_teacher_dir, tmp_path):
    with pytest.raises(config_validation.ConfigError, match=r"config.l0.target_ffn=1.0 is above the maximum 0.999"):
        registry.run(_config(tiny_teacher_dir, target_ffn=1.0), str(tmp_path / "w"))
    with pytest.raises(config_validation.ConfigError, match=r"config.l0.target_heads=-0.1 is below the minimum 0.0"):
        registry.run(_config(tiny_teacher_dir, target_heads=-0.1), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_a_model_that_is_not_a_transformer_fails_before_work(tiny_teacher_dir, tmp_path):
    """model_dir (the model to prune) holds a BiLSTM: refused with its family named, before any training."""
    # the family is all the check needs: placeholder weights keep the test cheap
    models.save(tmp_path / "bilstm", "bilstm", BiLSTMConfig(vocab_size=30), {"w": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="holds a 'bilstm' model; this job trains Transformers"):
        registry.run(_config(str(tmp_path / "bilstm")), str(tmp_path / "w"))
    # The family is known once model_dir is read: the workdir exists by then (with the run's lock file), but
    # nothing was written into it.
    assert not os.path.exists(tmp_path / "w")


def test_config_argument():
    assert l0_configs.get_config("sst2,nokd").distill.preset == "none"
    c = l0_configs.get_config("sst2")
    assert c.job == "l0" and c.distill.preset == "hinton" and c.l0.target_ffn == 0.5 and c.export == "last"
    assert c.l0.enabled and c.model_dir is None
    with pytest.raises(ValueError, match="the optional second part is 'nokd'"):
        l0_configs.get_config("sst2,kd")
