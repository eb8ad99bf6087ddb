"""Precision policies and dynamic loss scaling in the trainer: skipped steps, device agreement, checkpoints,
float16 training against float32 end to end, start-up checks."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compression import loss_scale, precision
from experiments.jobs import registry
from experiments.runtime import config_validation, loop, trainer
from experiments.runtime.checkpointing import Checkpointer
from experiments.runtime.parallel import DataParallel
from tests.experiments.tiny import tiny_config
from tests.multidevice import run_with_devices


def _batch(weights):
    b = len(weights)
    return {"input_ids": np.zeros((b, 4), np.int32), "attention_mask": np.ones((b, 4), np.int32),
            "token_type_ids": np.zeros((b, 4), np.int32), "labels": np.zeros((b,), np.int32),
            "example_weight": np.asarray(weights, np.float32)}


def _linear_loss(params, batch, rng, extras):
    """loss = sum(w) * mean(example_weight): the gradient is mean(example_weight) per entry, so an inf
    example weight is an inf gradient (the overflow a float16 model produces)."""
    del rng, extras
    return jnp.sum(params["w"]) * jnp.mean(batch["example_weight"]), trainer.LossAux(weight=jnp.float32(1.0))


def test_train_step_skips_overflow_and_lowers_scale():
    tx = optax.adam(0.1)  # stateful: its moments must be kept on a skipped step too
    par = DataParallel("pmap", devices=jax.devices()[:1])
    step = par.compile(trainer.make_train_step(_linear_loss, tx, steps_per_epoch=10))
    ds = loss_scale.dynamic_scale(init_scale=1024.0, growth_interval=5)
    state = par.replicate(trainer.TrainState.create({"w": jnp.array([1.0, -2.0])}, tx, jax.random.key(0),
                                                    dynamic_scale=ds))
    state, m = step(state, par.shard_batch(_batch([1.0, 3.0])))
    host = par.unreplicate(state)
    m = par.unreplicate(m)
    # Adam's first step moves every entry by lr against the gradient's sign (gradient 2 > 0).
    np.testing.assert_allclose(host.params["w"], [0.9, -2.1], rtol=1e-6)
    assert float(m["skipped"]) == 0.0 and float(m["loss_scale"]) == 1024.0 and float(m["grad_norm"]) > 0
    assert int(host.dynamic_scale.fin_steps) == 1 and float(host.dynamic_scale.scale) == 1024.0

    new, m = step(state, par.shard_batch(_batch([np.inf, 1.0])))
    new, m = par.unreplicate(new), par.unreplicate(m)
    assert float(m["skipped"]) == 1.0 and float(m["loss_scale"]) == 1024.0
    for a, b in zip(jax.tree.leaves((host.params, host.opt_state)), jax.tree.leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert float(new.dynamic_scale.scale) == 512.0 and int(new.dynamic_scale.fin_steps) == 0
    assert (int(new.step), int(new.batch_in_epoch)) == (2, 2)  # the batch is consumed all the same


def test_train_step_without_scale_is_unchanged_by_the_option():
    """The same finite step with and without a loss scale of 2**15 gives the same update (exact powers of 2)."""
    tx = optax.sgd(0.5)
    par = DataParallel("pmap", devices=jax.devices()[:1])
    step = par.compile(trainer.make_train_step(_linear_loss, tx, steps_per_epoch=10))
    params = {"w": jnp.array([1.0, -2.0])}
    batch = par.shard_batch(_batch([1.0, 2.0]))
    plain, m_plain = step(par.replicate(trainer.TrainState.create(params, tx, jax.random.key(0))), batch)
    scaled, m_scaled = step(par.replicate(trainer.TrainState.create(
        params, tx, jax.random.key(0), dynamic_scale=loss_scale.dynamic_scale())), batch)
    np.testing.assert_array_equal(par.unreplicate(plain).params["w"], [1.0 - 0.75, -2.0 - 0.75])
    np.testing.assert_array_equal(par.unreplicate(scaled).params["w"], par.unreplicate(plain).params["w"])
    assert "loss_scale" not in m_plain and float(par.unreplicate(m_scaled)["loss"]) == pytest.approx(-1.5)


def test_devices_agree_to_skip_under_pmap():
    run_with_devices("""
import jax, jax.numpy as jnp, numpy as np, optax
from compression import loss_scale
from experiments.runtime import trainer
from experiments.runtime.parallel import DataParallel

def loss_fn(params, batch, rng, extras):
    return jnp.sum(params["w"]) * jnp.mean(batch["example_weight"]), trainer.LossAux(
        weight=jnp.sum(jnp.isfinite(batch["example_weight"]).astype(jnp.float32)))

def batch(weights):
    b = len(weights)
    return {"input_ids": np.zeros((b, 2), np.int32), "attention_mask": np.ones((b, 2), np.int32),
            "token_type_ids": np.zeros((b, 2), np.int32), "labels": np.zeros(b, np.int32),
            "example_weight": np.asarray(weights, np.float32)}

tx = optax.sgd(1.0)
par = DataParallel("pmap")
assert par.num_devices == 2
step = par.compile(trainer.make_train_step(loss_fn, tx, steps_per_epoch=5))
state = par.replicate(trainer.TrainState.create({"w": jnp.zeros(2)}, tx, jax.random.key(0),
                                                dynamic_scale=loss_scale.dynamic_scale(init_scale=64.0)))
# Device 0 gets [1, 3] (finite), device 1 gets [inf, 1]: both skip, both halve the scale.
new, m = step(state, par.shard_batch(batch([1.0, 3.0, np.inf, 1.0])))
np.testing.assert_array_equal(np.asarray(new.params["w"]), np.zeros((2, 2)))
assert np.asarray(new.dynamic_scale.scale).tolist() == [32.0, 32.0]
assert np.asarray(m["skipped"]).tolist() == [1.0, 1.0]
# Control, all finite: device means 2 and 3 with equal weights -> gradient 2.5 on both devices.
new, m = step(state, par.shard_batch(batch([1.0, 3.0, 2.0, 4.0])))
np.testing.assert_allclose(np.asarray(new.params["w"]), np.full((2, 2), -2.5))
assert np.asarray(new.dynamic_scale.scale).tolist() == [64.0, 64.0]
assert np.asarray(m["skipped"]).tolist() == [0.0, 0.0]
print("ok")
""", n=2)


def test_loss_scale_state_checkpoints_with_the_train_state(tmp_path):
    tx = optax.adam(0.1)
    ds = loss_scale.dynamic_scale(init_scale=256.0, growth_interval=7).replace(
        scale=jnp.asarray(64.0, jnp.float32), fin_steps=jnp.asarray(5, jnp.int32))
    state = trainer.TrainState.create({"w": jnp.arange(3.0)}, tx, jax.random.key(0), dynamic_scale=ds)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, jax.tree.map(lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                              else np.asarray(x), state))
    template = trainer.TrainState.create({"w": jnp.zeros(3)}, tx, jax.random.key(1),
                                         dynamic_scale=loss_scale.dynamic_scale(init_scale=256.0, growth_interval=7))
    restored = ckpt.restore(3, template)[0]
    assert float(restored.dynamic_scale.scale) == 64.0 and int(restored.dynamic_scale.fin_steps) == 5
    assert restored.dynamic_scale.growth_interval == 7
    assert "dynamic_scale/scale" in ckpt.read_meta(3)["paths"]
    ckpt.close()
    # Without loss scaling the field adds no leaves: earlier checkpoints keep their structure.
    plain = trainer.TrainState.create({"w": jnp.zeros(3)}, tx, jax.random.key(1))
    assert len(jax.tree.leaves(plain)) == len(jax.tree.leaves(template)) - 2


def test_skipped_steps_are_tolerated_until_the_minimum_scale(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    inf, nan = float("inf"), float("nan")
    loop._check_window([(1, {"loss": inf, "grad_norm": inf, "skipped": 1.0, "loss_scale": 4.0})], ckpt,
                        str(tmp_path), minimum_scale=1.0)  # skipped, scale can still drop: keep going
    with pytest.raises(loop.NonFiniteLossError, match="grad_norm is nan at step 2 with the loss scale at its "
                                                       "minimum 1.0: stopping"):
        loop._check_window([(2, {"loss": 0.5, "grad_norm": nan, "skipped": 1.0, "loss_scale": 1.0})], ckpt,
                            str(tmp_path), minimum_scale=1.0)
    with pytest.raises(loop.NonFiniteLossError, match="loss is nan at step 3: stopping"):
        loop._check_window([(3, {"loss": nan, "grad_norm": 1.0})], ckpt, str(tmp_path))
    ckpt.close()


def test_log_summary_averages_the_steps_taken():
    window = [(1, {"loss": 1.0, "grad_norm": 2.0, "skipped": 0.0, "loss_scale": 8.0, "learning_rate": 0.1,
                   "examples": 4.0, "tokens": 9.0}),
              (2, {"loss": float("inf"), "grad_norm": float("inf"), "skipped": 1.0, "loss_scale": 8.0,
                   "learning_rate": 0.2, "examples": 4.0, "tokens": 9.0}),
              (3, {"loss": 3.0, "grad_norm": 4.0, "skipped": 0.0, "loss_scale": 4.0, "learning_rate": 0.3,
                   "examples": 4.0, "tokens": 9.0})]
    assert loop._summarize(window) == {"loss": 2.0, "grad_norm": 3.0, "learning_rate": 0.3,
                                        "skipped_steps": 1.0, "loss_scale": 4.0}
    plain = [(1, {"loss": 1.0, "grad_norm": 2.0, "learning_rate": 0.1, "examples": 4.0, "tokens": 9.0}),
             (2, {"loss": 2.0, "grad_norm": 5.0, "learning_rate": 0.2, "examples": 4.0, "tokens": 9.0})]
    assert loop._summarize(plain) == {"loss": 1.5, "grad_norm": 3.5, "learning_rate": 0.2}


# -- end to end ------------------------------------------------------------------------------------------
# Float16 against float32 accuracy on the full synthetic task is experiments/tools/precision_train.py's job (minutes);
# compression/loss_scale's tests check float16 training step for step against float32 on a tiny task.


def test_float16_run_with_loss_scaling_end_to_end(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", precision.PrecisionWarning)  # loss-scaled: no float16 warning
        results = registry.run(tiny_config(precision="float16", loss_scale__dynamic=True,
                                                 loss_scale__growth_interval=5), str(tmp_path))
    assert np.isfinite(results["final"]["loss"]) and 0.0 <= results["final"]["accuracy"] <= 1.0
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert [t["step"] for t in train] == [4, 8, 12, 16, 20, 24]
    assert all(np.isfinite(t["loss"]) and np.isfinite(t["grad_norm"]) for t in train)
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=0.1)
    # growth_interval 5 from 2**15: each window of 4 steps logs the scale in use; skipped steps halve it.
    scales = [t["loss_scale"] for t in train]
    assert all(s >= 1.0 and np.log2(s) == int(np.log2(s)) for s in scales)
    skipped = sum(t["skipped_steps"] for t in train)
    assert skipped < 24 and (skipped > 0 or max(scales) > 2.0 ** 15)  # it adapted one way or the other
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    meta = ckpt.read_meta(24)
    ckpt.close()
    assert "dynamic_scale/scale" in meta["paths"] and "dynamic_scale/fin_steps" in meta["paths"]
    assert {d for p, d in zip(meta["paths"], meta["dtypes"]) if p.startswith("params/")} == {"float32"}


def test_float16_without_loss_scaling_warns_before_work(tmp_path):
    # A freeze_regex that matches no parameter stops the run when the optimizer is built, after the techniques
    # are set up and before the first step: the warning must already have been given.
    with pytest.warns(precision.PrecisionWarning, match="float16 training configured without loss scaling"):
        with pytest.raises(ValueError, match="freeze_regex '\\^no_such_parameter\\$' matches no parameter"):
            registry.run(tiny_config(precision="float16", optimizer__freeze_regex="^no_such_parameter$"),
                         str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"precision": "half"}, "config.precision='half' is not allowed; allowed: ['float32', 'fp32', 'bfloat16'"),
    ({"loss_scale__dynamic": True, "loss_scale__minimum_scale": 1e9},
     "this combination cannot run:\n  config.loss_scale.minimum_scale=1000000000.0 is above init_scale=32768.0"),
])
def test_bad_precision_config_fails_before_any_work(tmp_path, overrides, message):
    workdir = tmp_path / "never_created"
    with pytest.raises(config_validation.ConfigError) as e:
        registry.run(tiny_config(**overrides), str(workdir))
    assert message in str(e.value)
    assert not workdir.exists()
