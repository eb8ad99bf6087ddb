"""A tiny synthetic-task config (hidden 32, 2 layers, one length bucket) for fast end-to-end runs."""

import subprocess
import sys

import numpy as np

from experiments.configs import finetune
from tests.multidevice import REPO, device_env

TINY = {
    "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2, "model.intermediate_size": 64,
    "max_length": 16,  # one bucket: one compilation per step function
    "synthetic_size": 256, "batch_size": 16, "eval_batch_size": 32, "num_train_steps": 24,
    "log_every_steps": 4, "eval_every_steps": 12, "checkpoint.every_steps": 4, "checkpoint.keep": 2,
    "progress_bar": "off",
}


def tiny_config(**overrides):
    """The synthetic config with :data:`TINY` and ``overrides`` ("a.b" keys written as a__b) applied."""
    config = finetune.get_config("synthetic")
    for key, value in {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def dev_argmax(model, params, task) -> tuple[np.ndarray, np.ndarray]:
    """(argmax predictions, labels) of a Transformer classifier over the real rows of ``task.dev``, computed
    directly with ``model.apply`` (independently of the evaluation code under test)."""
    preds, labels = [], []
    for batch in task.dev.batches(32, drop_remainder=False):
        out = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"])
        keep = batch["example_weight"] > 0
        preds.append(np.argmax(out.logits, -1)[keep])
        labels.append(batch["labels"][keep])
    return np.concatenate(preds), np.concatenate(labels)


def tiny_job(config, teacher_dir, steps: int):
    """A job config that starts from the saved tiny teacher -- distill.py's teacher, or the model that
    theseus.py, l0.py and qat.py compress (``model_dir``) -- set for a ``steps``-step run on the tiny task of
    :data:`TINY`, evaluated and checkpointed once at the end; returns ``config``."""
    for key in ("max_length", "synthetic_size", "batch_size", "eval_batch_size", "log_every_steps",
                "progress_bar"):
        config[key] = TINY[key]
    if config.job == "distill":
        config.teacher_dir = teacher_dir
    else:
        config.model_dir = teacher_dir
    config.num_train_steps = config.eval_every_steps = config.checkpoint.every_steps = steps
    return config


def tiny_flags(**overrides) -> list[str]:
    """``--config...`` flags for experiments.main with :data:`TINY` and ``overrides`` applied."""
    values = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ["--config=experiments/configs/finetune.py:synthetic"] + [f"--config.{k}={v}" for k, v in values.items()]


def run_main(workdir, devices: int, timeout: int = 300, **overrides) -> subprocess.CompletedProcess:
    """Runs ``python -m experiments.main`` to completion; fails with its output on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-m", "experiments.main", f"--workdir={workdir}",
                           *tiny_flags(**overrides)], cwd=REPO, env=device_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"experiments.main failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return proc
