"""A tiny fine-tuning run on the generated task (``tests/experiments/tiny.py``), long enough to be killed, taken
over and cut off by a store outage mid-way: an ``experiments.main`` config file for
``tests/launch/test_bucket_workdir.py``."""

from tests.experiments.tiny import tiny_config


def get_config():
    return tiny_config(num_train_steps=100, eval_every_steps=50, checkpoint__every_steps=10, log_every_steps=10)
