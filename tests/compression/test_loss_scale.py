"""Dynamic loss scaling: skipped steps on overflow, growth, float16 underflow rescue, pmap agreement,
checkpointing inside a TrainState."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from compression import loss_scale, precision
from tests.multidevice import run_with_devices


def _linear_loss(params, batch, rng):
    """loss = sum(w * x): the gradient w.r.t. w is x itself, so an inf in x is an inf gradient."""
    del rng
    return jnp.sum(params["w"] * batch), {"n": batch.size}


def _step(growth_interval=3, init_scale=8.0, lr=0.5):
    opt = optax.sgd(lr)
    step = jax.jit(loss_scale.loss_scaled_step(_linear_loss, opt))
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    return step, params, opt.init(params), loss_scale.dynamic_scale(init_scale=init_scale,
                                                                    growth_interval=growth_interval)


def test_finite_step_is_the_plain_update():
    step, params, opt_state, ds = _step()
    x = jnp.array([0.25, -1.0, 2.0])
    new, _, ds2, metrics, aux = step(params, opt_state, ds, x, jax.random.key(0))
    np.testing.assert_allclose(new["w"], np.array([1.0, -2.0, 3.0]) - 0.5 * np.array([0.25, -1.0, 2.0]))
    assert float(metrics["loss"]) == pytest.approx(0.25 + 2.0 + 6.0)  # unscaled loss
    assert bool(metrics["grads_finite"]) and float(metrics["loss_scale"]) == 8.0
    assert int(ds2.fin_steps) == 1 and float(ds2.scale) == 8.0 and aux["n"] == 3


def test_overflow_skips_step_and_lowers_scale():
    opt = optax.adam(0.1)  # a stateful optimizer: its state must be kept too
    step = jax.jit(loss_scale.loss_scaled_step(_linear_loss, opt))
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    opt_state = opt.init(params)
    ds = loss_scale.dynamic_scale(init_scale=1024.0, growth_interval=3)
    params, opt_state, ds, _, _ = step(params, opt_state, ds, jnp.ones(3), jax.random.key(0))
    assert int(ds.fin_steps) == 1

    bad = jnp.array([1.0, jnp.inf, 0.5])
    new, new_opt, ds2, metrics, _ = step(params, opt_state, ds, bad, jax.random.key(1))
    assert not bool(metrics["grads_finite"])
    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((new, new_opt))):
        np.testing.assert_array_equal(a, b)
    assert float(ds2.scale) == 512.0 and int(ds2.fin_steps) == 0


def test_scale_grows_after_run_of_finite_steps():
    # Flax's convention: with growth_interval=N the (N+1)-th finite step in a row doubles the scale.
    step, params, opt_state, ds = _step(growth_interval=3, init_scale=8.0)
    x = jnp.ones(3)
    scales = []
    for i in range(4):
        params, opt_state, ds, _, _ = step(params, opt_state, ds, x, jax.random.key(i))
        scales.append(float(ds.scale))
    assert scales == [8.0, 8.0, 8.0, 16.0]
    assert int(ds.fin_steps) == 0
    # A non-finite step in the middle of a run restarts it.
    params, opt_state, ds, _, _ = step(params, opt_state, ds, x, jax.random.key(5))
    params, opt_state, ds, _, _ = step(params, opt_state, ds, x * jnp.nan, jax.random.key(6))
    assert float(ds.scale) == 8.0 and int(ds.fin_steps) == 0
    for i in range(3):
        params, opt_state, ds, _, _ = step(params, opt_state, ds, x, jax.random.key(7 + i))
    assert float(ds.scale) == 8.0


def test_scale_never_below_minimum():
    ds = loss_scale.dynamic_scale(init_scale=2.0, minimum_scale=1.0)
    step = jax.jit(loss_scale.loss_scaled_step(_linear_loss, optax.sgd(0.1)))
    params = {"w": jnp.ones(3)}
    opt_state = optax.sgd(0.1).init(params)
    for i in range(3):
        params, opt_state, ds, _, _ = step(params, opt_state, ds, jnp.full(3, jnp.inf), jax.random.key(i))
    assert float(ds.scale) == 1.0


def test_loss_scaling_rescues_float16_underflow():
    """d/dw of 1e-4 * sum(float16(w) * x) with x = 1e-4 is 1e-8 per entry: below float16's smallest
    subnormal (6e-8) it flushes to zero; with the loss scaled by 2**15 it survives (3.3e-4)."""
    x = jnp.full((4,), 1e-4, jnp.float32)

    def loss_fn(params, batch, rng):
        del rng
        y = params["w"].astype(jnp.float16) * batch.astype(jnp.float16)
        return (1e-4 * jnp.sum(y.astype(jnp.float32))), None

    params = {"w": jnp.ones(4)}
    unscaled = jax.jit(jax.grad(lambda p: loss_fn(p, x, None)[0]))(params)
    assert float(jnp.max(jnp.abs(unscaled["w"]))) == 0.0
    step = jax.jit(loss_scale.loss_scaled_step(loss_fn, optax.sgd(1e4)))
    new, _, _, metrics, _ = step(params, optax.sgd(1e4).init(params), loss_scale.dynamic_scale(init_scale=2.0 ** 15),
                                 x, jax.random.key(0))
    assert bool(metrics["grads_finite"])
    # Gradient 1e-8 (float16 rounding of 1e-8 * 2**15 is within 0.1%), times lr 1e4: w moves by 1e-4.
    np.testing.assert_allclose(new["w"], 1.0 - 1e-4, rtol=0, atol=2e-7)


def test_rejects_non_float32_loss():
    def loss_fn(params, batch, rng):
        return jnp.sum(params["w"].astype(jnp.float16) * batch.astype(jnp.float16)), None

    step = loss_scale.loss_scaled_step(loss_fn, optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="float32 scalar loss.*float16"):
        step(params, optax.sgd(0.1).init(params), loss_scale.dynamic_scale(), jnp.ones(2), jax.random.key(0))


@pytest.mark.parametrize("kwargs,match", [
    ({"init_scale": 0.0}, "init_scale"), ({"growth_interval": 0}, "growth_interval"),
    ({"growth_factor": 1.0}, "growth_factor"), ({"backoff_factor": 1.0}, "backoff_factor"),
    ({"minimum_scale": 1e9}, "minimum_scale")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        loss_scale.dynamic_scale(**kwargs)


def test_float16_training_tracks_float32():
    """A tiny Transformer learns a parity-of-first-token task in float16 with loss scaling step for step
    like float32 (Adam, full batch), and the float16 model warns only when trained outside the step."""
    from models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=30, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                            max_position_embeddings=8, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
    model = Transformer(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 30, size=(32, 6)), jnp.int32)
    labels = (ids[:, 0] % 2).astype(jnp.int32)
    params0 = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    opt = optax.adam(1e-2)

    def make_loss(name):
        apply = precision.policy(name).wrap(model.apply)

        def loss_fn(p, batch, key):
            logits = apply({"params": p}, batch[0], train=True, rngs={"dropout": key}).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), logits

        return loss_fn

    losses, accuracy = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", precision.PrecisionWarning)
        for name in ("float32", "fp16"):
            step = jax.jit(loss_scale.loss_scaled_step(make_loss(name), opt))
            p, o, ds = params0, opt.init(params0), loss_scale.dynamic_scale()
            losses[name] = []
            for i in range(25):
                p, o, ds, metrics, logits = step(p, o, ds, (ids, labels), jax.random.key(i))
                assert bool(metrics["grads_finite"])
                losses[name].append(float(metrics["loss"]))
            accuracy[name] = float(jnp.mean(jnp.argmax(logits, -1) == labels))
            assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))
    assert losses["float32"][0] == pytest.approx(np.log(2), abs=0.01) and losses["float32"][-1] < 0.05
    np.testing.assert_allclose(losses["fp16"], losses["float32"], atol=0.01)
    assert accuracy["fp16"] == accuracy["float32"] == 1.0
    with pytest.warns(precision.PrecisionWarning):
        jax.make_jaxpr(jax.grad(lambda p: make_loss("fp16")(p, (ids, labels), jax.random.key(1))[0]))(params0)


def test_state_checkpoints_in_a_train_state(tmp_path):
    import orbax.checkpoint as ocp
    from flax.training.dynamic_scale import DynamicScale

    class State(train_state.TrainState):
        dynamic_scale: DynamicScale

    params = {"w": jnp.arange(3.0)}
    ds = loss_scale.dynamic_scale(init_scale=256.0, growth_interval=7)
    ds = ds.replace(scale=jnp.asarray(64.0, jnp.float32), fin_steps=jnp.asarray(5, jnp.int32))
    state = State.create(apply_fn=None, params=params, tx=optax.sgd(0.1), dynamic_scale=ds)
    assert [x.dtype for x in jax.tree.leaves(ds)] == [jnp.int32, jnp.float32]

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", state)
    ckpt.wait_until_finished()
    fresh = State.create(apply_fn=None, params=jax.tree.map(jnp.zeros_like, params), tx=optax.sgd(0.1),
                         dynamic_scale=loss_scale.dynamic_scale(init_scale=256.0, growth_interval=7))
    restored = ckpt.restore(tmp_path / "ckpt", fresh)
    assert float(restored.dynamic_scale.scale) == 64.0 and int(restored.dynamic_scale.fin_steps) == 5
    assert restored.dynamic_scale.growth_interval == 7
    np.testing.assert_array_equal(restored.params["w"], params["w"])


def test_pmap_devices_agree_to_skip():
    run_with_devices("""
import jax, jax.numpy as jnp, numpy as np, optax
from compression import loss_scale
assert jax.local_device_count() == 2

def loss_fn(params, batch, rng):
    return jnp.sum(params["w"] * batch), None

opt = optax.sgd(0.5)
step = jax.pmap(loss_scale.loss_scaled_step(loss_fn, opt, axis_name="batch"), axis_name="batch")
rep = lambda t: jax.tree.map(lambda a: jnp.stack([a, a]), t)
params = {"w": jnp.array([1.0, 2.0])}
state = (rep(params), rep(opt.init(params)), rep(loss_scale.dynamic_scale(init_scale=64.0)))
keys = jax.random.split(jax.random.key(0), 2)

# Device 0 sees finite data, device 1 an inf: both skip, both lower the scale.
p, o, ds, m, _ = step(*state, jnp.array([[1.0, 1.0], [jnp.inf, 1.0]]), keys)
np.testing.assert_array_equal(p["w"], [[1.0, 2.0], [1.0, 2.0]])
assert m["grads_finite"].tolist() == [False, False]
assert ds.scale.tolist() == [32.0, 32.0] and ds.fin_steps.tolist() == [0, 0]

# Control: finite everywhere -> both take the step with the gradient averaged over devices.
p, o, ds, m, _ = step(*state, jnp.array([[1.0, 3.0], [3.0, 1.0]]), keys)
np.testing.assert_allclose(p["w"], [[0.0, 1.0], [0.0, 1.0]])
assert m["grads_finite"].tolist() == [True, True] and m["loss"].tolist() == [6.0, 6.0]
print("ok")
""", n=2)
