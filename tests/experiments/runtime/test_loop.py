"""Run length and settings every training job derives from its config, and what a resume refuses or warns
about (experiments.runtime.loop)."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.runtime import checkpointing, loop, trainer
from experiments.runtime.config_validation import ConfigError
from experiments.runtime.fingerprint import FingerprintMismatchError
from experiments.runtime.parallel import DataParallel
from experiments.configs import finetune
from experiments.data import load_task


def _split(n: int):
    return load_task("synthetic", max_length=16, word_vocab="build", synthetic_size=(n, 8)).train


def _config(batch_size, num_epochs=1.0, num_train_steps=-1):
    return ml_collections.ConfigDict({"batch_size": batch_size, "num_epochs": num_epochs,
                                      "num_train_steps": num_train_steps})


def test_run_length_counts_full_batches():
    train = _split(100)  # 3 full batches of 32 per epoch; the last 4 examples wait for the next epoch
    assert loop.run_length(_config(32), train) == (3, 3)
    assert loop.run_length(_config(32, num_epochs=1.5), train) == (3, 5)  # ceil(4.5)
    assert loop.run_length(_config(32, num_train_steps=7), train) == (3, 7)  # steps win over epochs


@pytest.mark.parametrize("config", [_config(101), _config(32, num_epochs=0.0)])
def test_run_length_refuses_a_run_without_steps(config):
    with pytest.raises(ConfigError, match="no training steps: synthetic/train has 100 examples"):
        loop.run_length(config, _split(100))


def test_settings_from_config_read_the_common_fields():
    c = finetune.get_config("synthetic")
    c.checkpoint.keep, c.eval_every_steps, c.progress_bar = 5, 7, "off"
    s = loop.LoopSettings.from_config(c, total_steps=30, steps_per_epoch=10, headline_metric="accuracy",
                                      minimum_loss_scale=2.0)
    assert (s.total_steps, s.steps_per_epoch, s.keep, s.eval_every_steps, s.progress_bar) == (30, 10, 5, 7, "off")
    assert (s.checkpoint_every_steps, s.best_metric, s.export) == (c.checkpoint.every_steps,
                                                                    c.checkpoint.best_metric, c.export)
    assert s.minimum_loss_scale == 2.0


# -- resume: fingerprints, run length, corrupt checkpoints ------------------------------------------------

def _fit(workdir, total_steps, fingerprint=None, **kwargs):
    """``loop.fit`` of w [3] under SGD(lr 0.5) on a loss with gradient 1: after ``t`` steps w = -0.5 t
    exactly; 4 batches per epoch, a checkpoint every 2 steps, no eval metric but a constant one at the end."""

    def loss_fn(params, batch, rng, extras):
        del rng, extras
        return jnp.sum(params["w"]) * jnp.mean(batch["example_weight"]), trainer.LossAux(weight=jnp.float32(1.0))

    tx = optax.sgd(0.5)
    batch = {"input_ids": np.zeros((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int32),
             "example_weight": np.ones(2, np.float32)}
    settings = loop.LoopSettings(total_steps=total_steps, steps_per_epoch=4, log_every_steps=1, eval_every_steps=0,
                                 checkpoint_every_steps=2, async_save=False, export="last", progress_bar="off")
    state = loop.host_state(trainer.TrainState.create({"w": jnp.zeros(3)}, tx, jax.random.key(0)))
    return loop.fit(str(workdir), par=DataParallel("pmap", devices=jax.devices()[:1]), state=state,
                    train_step=trainer.make_train_step(loss_fn, tx, steps_per_epoch=4), settings=settings,
                    train_batches=lambda epoch, start: (batch for _ in range(start, 4)),
                    evaluate=lambda dstate: {"accuracy": 1.0}, fingerprint=fingerprint, **kwargs)


def _saved_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_resume_with_a_changed_fingerprint_stops_before_training_unless_allowed(tmp_path, caplog):
    fp = {"seed": 0, "optimizer.learning_rate": 0.5, "num_train_steps": 4}
    result = _fit(tmp_path, 4, fp)
    np.testing.assert_array_equal(result.params["w"], [-2.0] * 3)
    changed = dict(fp, **{"optimizer.learning_rate": 0.25, "num_train_steps": 6})
    with pytest.raises(FingerprintMismatchError, match=r"checkpoint step 4 .*different config(.|\n)*"
                                                       r"num_train_steps: 4 -> 6\n  optimizer.learning_rate: "
                                                       r"0.5 -> 0.25"):
        _fit(tmp_path, 6, changed)
    assert _saved_steps(tmp_path) == [2, 4]  # nothing trained
    with caplog.at_level(logging.WARNING):
        result = _fit(tmp_path, 6, changed, allow_changed=True)
    assert "resuming checkpoint step 4" in caplog.text and "optimizer.learning_rate: 0.5 -> 0.25" in caplog.text
    assert result.steps == 6
    np.testing.assert_array_equal(result.params["w"], [-3.0] * 3)  # resumed at w = -2, two more steps
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.read_meta(6)["user"]["fingerprint"] == changed  # the run goes on under the new config
    ckpt.close()


def test_a_shorter_run_never_hands_on_the_longer_runs_model(tmp_path):
    _fit(tmp_path, 6, {"num_train_steps": 6})
    with pytest.raises(FingerprintMismatchError, match="num_train_steps: 6 -> 4"):
        _fit(tmp_path, 4, {"num_train_steps": 4})
    with pytest.raises(ConfigError, match="checkpoint step 6 .* is past this run's 4 steps"):
        _fit(tmp_path, 4)  # no fingerprint, or changes allowed: still refused
    with pytest.raises(ConfigError, match="past this run's 4 steps"):
        _fit(tmp_path, 4, {"num_train_steps": 4}, allow_changed=True)


def test_every_checkpoint_corrupt_warns_restarts_and_keeps_the_old_metrics(tmp_path, caplog):
    _fit(tmp_path, 4)
    old_log = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in old_log.splitlines()] == [1, 2, 3, 4, 4]  # 4 train, 1 eval
    for step in (2, 4):
        meta = tmp_path / "checkpoints" / str(step) / "meta" / "metadata"
        meta.write_text(meta.read_text()[:20])  # torn JSON
    with caplog.at_level(logging.WARNING):
        result = _fit(tmp_path, 4)
    assert "every checkpoint in" in caplog.text and "is corrupt (steps [2, 4]" in caplog.text
    assert "starting from step 0" in caplog.text
    np.testing.assert_array_equal(result.params["w"], [-2.0] * 3)  # retrained from w = 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("metrics.jsonl.old-")]
    assert len(aside) == 1 and aside[0].read_text() == old_log
    assert f"moved it to {aside[0]}" in caplog.text


def test_sigterm_saves_and_stops_then_the_rerun_finishes_the_same_trajectory(tmp_path):
    """A preemption notice (SIGTERM) mid-run: the step in flight finishes, a checkpoint is saved, fit returns
    ``preempted_at_step``; the same call again resumes there and ends at w = -0.5 x total steps."""
    import signal

    sent = []

    def batches_then_sigterm(epoch, start):
        for i in range(start, 4):
            if epoch == 0 and i == 3 and not sent:  # while step 3's batch is being fetched
                sent.append(True)
                os.kill(os.getpid(), signal.SIGTERM)
            yield {"input_ids": np.zeros((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int32),
                   "example_weight": np.ones(2, np.float32)}

    def fit(train_batches):
        def loss_fn(params, batch, rng, extras):
            return jnp.sum(params["w"]) * jnp.mean(batch["example_weight"]), trainer.LossAux(weight=jnp.float32(1.0))

        tx = optax.sgd(0.5)
        settings = loop.LoopSettings(total_steps=8, steps_per_epoch=4, log_every_steps=1, eval_every_steps=0,
                                     checkpoint_every_steps=100, async_save=False, export="last", progress_bar="off")
        state = loop.host_state(trainer.TrainState.create({"w": jnp.zeros(3)}, tx, jax.random.key(0)))
        return loop.fit(str(tmp_path), par=DataParallel("pmap", devices=jax.devices()[:1]), state=state,
                        train_step=trainer.make_train_step(loss_fn, tx, steps_per_epoch=4), settings=settings,
                        train_batches=train_batches, evaluate=lambda dstate: {"accuracy": 1.0})

    first = fit(batches_then_sigterm)
    assert first.preempted_at_step == 4 and _saved_steps(tmp_path) == [4]  # no periodic save before step 100
    second = fit(batches_then_sigterm)
    assert second.preempted_at_step is None and second.steps == 8
    np.testing.assert_array_equal(second.params["w"], np.full(3, -4.0, np.float32))
