"""Run length and settings every training job derives from its config (experiments.loop)."""

import ml_collections
import pytest

from experiments import loop
from experiments.config_validation import ConfigError
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
