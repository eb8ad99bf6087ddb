"""Shared fixtures: one tiny synthetic teacher per test process, reused by the stage tests."""

import pytest

from experiments.train import train_and_evaluate
from tests.experiments.tiny import tiny_config


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """``DIR/model`` of a 2-layer, 2-head, hidden-32 Transformer fine-tuned 48 steps on the synthetic task."""
    workdir = tmp_path_factory.mktemp("tiny_teacher")
    train_and_evaluate(tiny_config(num_train_steps=48), str(workdir))
    return str(workdir / "model")
