"""distill_and_evaluate on a tiny synthetic teacher: students train, teacher logits are the teacher's,
the KD loss matches a hand computation, bad input fails before training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from experiments import config_validation, distill, evaluation, trainer
from experiments.configs import distill as distill_configs
from experiments.data import load_task
from experiments.data.vocab import WordVocab

STUDENT_TINY = {"synthetic_size": 256, "batch_size": 16, "eval_batch_size": 32, "num_train_steps": 16,
                "log_every_steps": 4, "eval_every_steps": 8, "checkpoint.every_steps": 8, "max_length": 16,
                "progress_bar": "off"}


@pytest.fixture
def teacher_dir(tiny_teacher_dir):
    return tiny_teacher_dir


def _config(student: str, teacher_dir: str, **overrides):
    config = distill_configs.get_config(f"synthetic,{student}")
    for key, value in {**STUDENT_TINY, **overrides}.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    config.teacher_dir = teacher_dir
    return config


def test_teacher_logits_are_the_teachers_eval_outputs(teacher_dir):
    model, _, params = models.load(teacher_dir)
    task = load_task("synthetic", None, tokenizer=teacher_dir, max_length=16, synthetic_size=256)
    logits = distill.teacher_logits(model.apply, params, task.train, batch_size=48, progress_bar="off")
    assert logits.shape == (len(task.train), 2)
    for i in (0, 100, len(task.train) - 1):  # one example at a time, unpadded
        ids = task.train.features.ragged["input_ids"].rows[i][None]
        ref = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.ones_like(ids),
                          token_type_ids=jnp.zeros_like(ids)).logits
        np.testing.assert_allclose(logits[i], np.asarray(ref[0]), atol=1e-4)


def test_kd_loss_equals_hand_computation():
    """Hinton preset (T=4, 0.9 KL*T^2 + 0.1 CE) on fixed logits, against numpy."""
    s = np.array([[1.0, -1.0], [0.5, 0.2]], np.float32)
    t = np.array([[2.0, 0.0], [-1.0, 1.0]], np.float32)
    labels = np.array([0, 1])

    def apply_fn(variables, *a, **k):
        return type("Out", (), {"logits": variables["params"]["s"]})()

    loss_fn = distill.distillation_loss(apply_fn, distill._preset(distill_configs.get_config("synthetic,transformer3")))
    batch = {"input_ids": np.zeros((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int32),
             "token_type_ids": np.zeros((2, 4), np.int32), "labels": labels, "has_label": np.ones(2, np.int32),
             "example_weight": np.ones(2, np.float32), "teacher_logits": t}
    loss, aux = loss_fn({"s": jnp.asarray(s)}, batch, jax.random.key(0), {})

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    pt, ps = softmax(t / 4), softmax(s / 4)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)) * 16
    ce = np.mean(-np.log(softmax(s))[np.arange(2), labels])
    np.testing.assert_allclose(float(loss), 0.9 * kl + 0.1 * ce, rtol=1e-5)
    np.testing.assert_allclose(float(aux.metrics["teacher_agreement"]), 0.5)


@pytest.mark.parametrize("student", ["transformer3", "bilstm"])
def test_students_train_and_save_a_model(teacher_dir, tmp_path, student):
    overrides = {"student.num_layers": 1} if student == "transformer3" else {"augment.n_per_example": 1}
    result = distill.distill_and_evaluate(_config(student, teacher_dir, **overrides), str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 16 and saved["final"]["step"] == 16
    n_train = len(load_task("synthetic", synthetic_size=256).train)
    model, cfg, params = models.load(tmp_path / "model")
    assert cfg.family == ("transformer" if student == "transformer3" else "bilstm")
    if student == "transformer3":
        assert cfg.num_layers == 1 and result["transfer_examples"] == n_train
    else:
        assert result["transfer_examples"] > n_train  # the augmented rows joined the transfer set
        assert (tmp_path / "model" / "word_vocab.json").is_file()
    assert (tmp_path / "teacher_logits.npz").is_file()
    # The saved student reproduces its reported accuracy on the dev set.
    task = load_task("synthetic", None, tokenizer=teacher_dir, max_length=16, synthetic_size=256,
                     word_vocab=None if student == "transformer3" else
                     WordVocab.load(tmp_path / "model" / "word_vocab.json"))
    inputs = evaluation.model_inputs(task, cfg.family)
    correct, n = 0, 0
    for batch in task.dev.batches(64):
        out = trainer.model_outputs(model.apply, params, {}, {k: batch[k] for k in inputs}, train=False)
        w = batch["example_weight"] > 0
        correct += int(np.sum((np.asarray(out.logits).argmax(-1) == batch["labels"])[w]))
        n += int(w.sum())
    exported = saved["best"] if saved["exported_step"] == saved["best"]["step"] else saved["final"]
    assert correct / n == pytest.approx(exported["accuracy"], abs=1e-6)


def test_bad_input_fails_before_training(teacher_dir, tmp_path):
    with pytest.raises(config_validation.ConfigError, match="temperature"):
        distill.distill_and_evaluate(_config("transformer3", teacher_dir, **{"distill.temperature": 0.0}),
                                     str(tmp_path / "a"))
    with pytest.raises(ValueError, match="label sets differ|outputs"):
        distill.distill_and_evaluate(_config("transformer3", teacher_dir, task="synthetic_pair"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="cannot be initialised"):
        distill.distill_and_evaluate(_config("transformer3", teacher_dir, **{"student.num_layers": 5}),
                                     str(tmp_path / "c"))
    assert not (tmp_path / "a" / "checkpoints").exists()
