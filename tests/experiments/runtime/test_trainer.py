"""Schedules, optimizer masks, losses and the per-device train step against hand-computed values."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.runtime import trainer
from experiments.runtime.parallel import DataParallel


@pytest.mark.parametrize("kind, expected", [
    # lr 1, 10 steps, 2 warmup: 0 -> 1 over steps 0..2, then decay over 8 steps.
    ("linear", {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5, 10: 0.0}),
    ("cosine", {1: 0.5, 2: 1.0, 6: 0.5 * (1 + np.cos(np.pi * 4 / 8)), 10: 0.0}),
    ("constant", {1: 0.5, 2: 1.0, 9: 1.0}),
])
def test_schedules(kind, expected):
    s = trainer.make_schedule(1.0, 10, 2, kind)
    for step, value in expected.items():
        assert float(s(step)) == pytest.approx(value, abs=1e-6), (kind, step)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        trainer.make_schedule(1.0, 10, 2, "exp")
    with pytest.raises(ValueError, match="warmup_steps"):
        trainer.make_schedule(1.0, 10, 11)


PARAMS = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}}


def _one_update(tx, grads, params=PARAMS):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_weight_decay_mask_by_regex():
    tx = trainer.make_optimizer(PARAMS, schedule=optax.constant_schedule(0.1), weight_decay=0.5,
                                no_decay_regex=r"(^|/)(bias|scale)$")
    new = _one_update(tx, jax.tree.map(jnp.zeros_like, PARAMS))
    # Zero gradients: only decoupled decay moves parameters, p -= lr * wd * p = 1 - 0.05.
    np.testing.assert_allclose(new["dense"]["kernel"], 0.95, rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["bias"], 1.0)
    np.testing.assert_array_equal(new["norm"]["scale"], 1.0)


def test_freeze_by_regex():
    tx = trainer.make_optimizer(PARAMS, schedule=optax.constant_schedule(0.1), freeze_regex=r"^dense/")
    new = _one_update(tx, jax.tree.map(jnp.ones_like, PARAMS))
    np.testing.assert_array_equal(new["dense"]["kernel"], 1.0)
    np.testing.assert_array_equal(new["dense"]["bias"], 1.0)
    assert float(new["norm"]["scale"][0]) < 1.0
    with pytest.raises(ValueError, match="matches no parameter"):
        trainer.make_optimizer(PARAMS, schedule=optax.constant_schedule(0.1), freeze_regex="^nothing")
    with pytest.raises(ValueError, match="freezes every parameter"):
        trainer.make_optimizer(PARAMS, schedule=optax.constant_schedule(0.1), freeze_regex=".")


def test_gradient_clipping_by_global_norm():
    # b1 = b2 = 0 and eps = 1 make Adam's update g / (|g| + 1), so the clipped size shows through.
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([6.0, 8.0])}  # global norm 10
    kw = dict(schedule=optax.constant_schedule(1.0), b1=0.0, b2=0.0, eps=1.0)
    clipped = _one_update(trainer.make_optimizer(params, grad_clip_norm=1.0, **kw), grads, params)
    np.testing.assert_allclose(clipped["w"], [-0.6 / 1.6, -0.8 / 1.8], rtol=1e-6)
    free = _one_update(trainer.make_optimizer(params, grad_clip_norm=0.0, **kw), grads, params)
    np.testing.assert_allclose(free["w"], [-6 / 7, -8 / 9], rtol=1e-6)


def _fake_apply(variables, input_ids, **kwargs):
    del input_ids, kwargs
    return types.SimpleNamespace(logits=variables["params"]["logits"])


def _batch(labels, weights):
    labels = np.asarray(labels, np.int32)
    b = labels.shape[0]
    return {"input_ids": np.zeros((b, 4), np.int32), "attention_mask": np.ones((b, 4), np.int32),
            "token_type_ids": np.zeros((b, 4), np.int32), "labels": labels,
            "example_weight": np.asarray(weights, np.float32)}


def test_classification_loss_sequence_by_hand():
    logits = jnp.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])  # softmax [0.25, 0.75]
    loss_fn = trainer.classification_loss(_fake_apply)
    loss, aux = loss_fn({"logits": logits}, _batch([1, 0], [1.0, 1.0]), jax.random.key(0), {})
    assert float(loss) == pytest.approx((-np.log(0.75) - np.log(0.25)) / 2, rel=1e-6)
    assert float(aux.weight) == 2.0
    assert float(aux.metrics["train_accuracy"]) == pytest.approx(0.5)
    loss, aux = loss_fn({"logits": logits}, _batch([1, 0], [1.0, 0.0]), jax.random.key(0), {})
    assert float(loss) == pytest.approx(-np.log(0.75), rel=1e-6)
    assert float(aux.weight) == 1.0


def test_classification_loss_token_ignores_positions():
    logits = jnp.zeros((1, 3, 2)).at[0, :, 1].set(np.log(3.0))
    batch = _batch([[1, -100, 0]], [1.0])
    loss, aux = trainer.classification_loss(_fake_apply)({"logits": logits}, batch, jax.random.key(0), {})
    assert float(loss) == pytest.approx((-np.log(0.75) - np.log(0.25)) / 2, rel=1e-6)
    assert float(aux.weight) == 2.0
    preds, loss_sum, weight_sum = trainer.classification_predict(_fake_apply)({"logits": logits}, {}, batch)
    np.testing.assert_array_equal(preds, [[1, 1, 1]])
    assert float(loss_sum) == pytest.approx(-np.log(0.75) - np.log(0.25), rel=1e-6)
    assert float(weight_sum) == 2.0


def test_train_step_rng_data_position_and_update():
    """One device: the step folds (step, device) into the key, rolls the epoch, applies the update."""
    seen = []

    def loss_fn(params, batch, rng, extras):
        loss = jnp.sum(params["w"] * jnp.mean(batch["example_weight"]))  # d loss / d w = 1
        return loss, trainer.LossAux(weight=jnp.float32(1.0), metrics={"u": jax.random.uniform(rng)})

    params = {"w": jnp.zeros(3)}
    tx = optax.sgd(0.5)
    key = jax.random.key(7)
    par = DataParallel("pmap", devices=jax.devices()[:1])
    step = par.compile(trainer.make_train_step(loss_fn, tx, steps_per_epoch=3), donate_state=True)
    state = par.replicate(trainer.TrainState.create(params, tx, key))
    batch = par.shard_batch(_batch([0, 1], [1.0, 1.0]))
    for _ in range(4):
        state, m = step(state, batch)
        seen.append(par.unreplicate(m))
    host = par.unreplicate(state)
    np.testing.assert_allclose(host.params["w"], -0.5 * 4)  # four SGD steps of lr 0.5 on gradient 1
    assert (int(host.step), int(host.epoch), int(host.batch_in_epoch)) == (4, 1, 1)
    for t, m in enumerate(seen):
        expected = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, t), 0))
        assert float(m["u"]) == pytest.approx(float(expected))
        assert float(m["examples"]) == 2.0 and float(m["tokens"]) == 8.0


def test_train_state_needs_typed_key():
    with pytest.raises(TypeError, match="typed key"):
        trainer.TrainState.create({"w": jnp.zeros(1)}, optax.sgd(0.1), jax.random.PRNGKey(0))


def test_regex_mask_paths():
    mask = trainer.regex_mask(r"(^|/)bias$", PARAMS)
    assert mask == {"dense": {"kernel": False, "bias": True}, "norm": {"scale": False}}
