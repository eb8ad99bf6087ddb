"""The multi-task teacher job on two generated tasks: per-task models, batch order, head isolation, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers
from tokenizers import models as tok_models
from tokenizers import normalizers, pre_tokenizers

import models
from experiments.configs import multitask as multitask_config
from experiments.data import load_task
from experiments.jobs import multitask, registry
from experiments.runtime import metrics, trainer
from experiments.runtime.config_validation import ConfigError
from experiments.runtime.parallel import DataParallel
from models.transformer import Transformer, TransformerConfig
from tests.experiments.tiny import dev_argmax

TASKS = ("synthetic", "synthetic_pair")
SIZE, MAX_LEN = 128, 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random sequence-head Transformer (hidden 32, 1 layer) with a word-level tokenizer over both
    tasks' train words, saved as a model directory: the run's ``model_dir``."""
    out = tmp_path_factory.mktemp("mt_base")
    words = sorted({w for t in TASKS
                    for w in load_task(t, word_vocab="build", synthetic_size=SIZE).word_vocab.units[2:]})
    vocab = {w: i for i, w in enumerate(("[PAD]", "[UNK]", "[CLS]", "[SEP]") + tuple(words))}
    tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(tokenizers.Regex(r"\w+(?:'\w+)*|'\w+|[^\w\s]"), behavior="isolated")])
    tok.save(str(out / "tokenizer.json"))
    cfg = TransformerConfig(vocab_size=len(vocab), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            max_position_embeddings=32, num_labels=2)
    params = jax.jit(Transformer(cfg).init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    models.save(out / "model", "transformer", cfg, params, tokenizer_dir=out, extra={"max_length": 32})
    return str(out / "model")


def tiny_config(model_dir: str, steps: int = 10):
    c = multitask_config.get_config(",".join(TASKS))
    c.model_dir = model_dir
    c.max_length, c.synthetic_size, c.batch_size, c.eval_batch_size = MAX_LEN, SIZE, 16, 32
    c.num_train_steps = c.eval_every_steps = c.checkpoint.every_steps = steps
    c.log_every_steps, c.progress_bar = 5, "off"
    return c


@pytest.fixture(scope="module")
def tiny_run(base_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mt_run")
    return workdir, registry.run(tiny_config(base_dir), str(workdir))


def test_job_is_registered(base_dir, tmp_path):
    """The registry runs it (experiments.main and recipes go through registry.run) without the training runner,
    validates its config against the reference for the same tasks, and knows where it writes the first model."""
    job = registry.get("multitask")
    assert job.build is None and job.run_fn is not None and job.config_module == "experiments.configs.multitask"
    config = tiny_config(base_dir)
    job.validate(config)
    assert job.model_dir(str(tmp_path), config) == str(tmp_path / "model_synthetic")


def test_run_exports_one_model_per_task_reproducing_its_dev_metrics(tiny_run):
    workdir, returned = tiny_run
    assert returned["model_dirs"] == {t: str(workdir / f"model_{t}") for t in TASKS}
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 10 and results["tasks"] == list(TASKS)
    assert returned["final"] == results["final"]
    firsts = []
    for name in TASKS:
        model_dir = workdir / f"model_{name}"
        model, cfg, params = models.load(model_dir)
        meta = models.read_meta(model_dir)["extra"]
        task = load_task(name, tokenizer=str(model_dir), max_length=MAX_LEN, synthetic_size=SIZE)
        assert meta["task"] == name and meta["label_names"] == list(task.label_names)
        assert cfg.num_labels == task.num_labels
        preds, labels = dev_argmax(model, params, task)
        assert len(labels) == len(task.dev)
        reported = results["final"][name]
        assert reported["accuracy"] == pytest.approx(float(np.mean(preds == labels)), abs=1e-6)
        assert reported["f1"] == pytest.approx(metrics.classification_metrics(preds, labels, 2)["f1"], abs=1e-6)
        firsts.append(reported["accuracy"])
    assert results["final"]["headline"] == pytest.approx(np.mean(firsts))

    # One shared encoder, two different heads.
    flat = [models.io.flatten_params(models.load(workdir / f"model_{t}")[2]) for t in TASKS]
    assert set(flat[0]) == set(flat[1])
    head = [k for k in flat[0] if k.startswith("classifier")]
    assert len(head) == 2
    for key in flat[0]:
        same = np.array_equal(flat[0][key], flat[1][key])
        assert same != (key in head), key


@pytest.mark.parametrize("sizes", [(64, 40)])
def test_train_batch_order_covers_every_batch_once_and_resumes(sizes):
    tasks = [load_task(t, word_vocab="build", synthetic_size=n) for t, n in zip(TASKS, sizes)]
    inputs = ("word_ids", "word_mask", "labels", "example_weight")
    batches = multitask.make_train_batches(tasks, 8, seed=3, inputs=inputs)
    full = list(batches(1, 0))
    assert len(full) == 8 + 5
    order = [int(b[multitask.TASK_ID][0]) for b in full]
    assert all((b[multitask.TASK_ID] == t).all() for b, t in zip(full, order))
    assert order.count(0) == 8 and order.count(1) == 5 and order != sorted(order)
    # Independently: each task's batches are its own epoch-1 shuffle, each exactly once, in order.
    for i, task in enumerate(tasks):
        own = list(task.train.batches(8, shuffle=True, seed=3, epoch=1, drop_remainder=True))
        got = [b for b, t in zip(full, order) if t == i]
        assert len(got) == len(own)
        for g, o in zip(got, own):
            assert all(np.array_equal(g[k], o[k]) for k in inputs)
    same = lambda a, b: len(a) == len(b) and all(  # noqa: E731
        all(np.array_equal(x[k], y[k]) for k in (*inputs, multitask.TASK_ID)) for x, y in zip(a, b))
    assert same(list(batches(1, 0)), full)  # deterministic
    for start in (1, 4, 9, 13):  # resuming at (epoch, start_batch) gives the rest of the same epoch
        assert same(list(batches(1, start)), full[start:])
    other_epoch = [int(b[multitask.TASK_ID][0]) for b in batches(2, 0)]
    other_seed = [int(b[multitask.TASK_ID][0]) for b in multitask.make_train_batches(tasks, 8, 4, inputs)(1, 0)]
    assert other_epoch != order or other_seed != order


def _step_setup(num_labels=(2, 3)):
    cfg = TransformerConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                            max_position_embeddings=16, num_labels=sum(num_labels), hidden_dropout_rate=0.0,
                            attention_dropout_rate=0.0)
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)

    def batch(task: int, n: int = 8):
        return {"input_ids": rng.integers(4, 40, (n, 12)).astype(np.int32),
                "attention_mask": np.ones((n, 12), np.int32), "token_type_ids": np.zeros((n, 12), np.int32),
                "labels": rng.integers(0, num_labels[task], n).astype(np.int32),
                "example_weight": np.ones(n, np.float32), multitask.TASK_ID: np.full(n, task, np.int32)}

    return model, params, batch


def test_loss_is_the_task_heads_cross_entropy_and_its_gradient_stays_in_that_head():
    model, params, batch = _step_setup()
    b = batch(1)
    loss_fn = multitask.multitask_loss(model.apply, (2, 3))
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, b, jax.random.key(0), {})
    logits = np.asarray(jax.jit(model.apply)({"params": params}, b["input_ids"]).logits)[:, 2:5]  # task 1's block
    expected = np.mean(-np.asarray(jax.nn.log_softmax(logits))[np.arange(8), b["labels"]])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    g = grads["classifier"]
    assert not np.any(np.asarray(g["kernel"])[:, :2]) and not np.any(np.asarray(g["bias"])[:2])
    assert np.all(np.abs(np.asarray(g["bias"])[2:]) > 0)
    assert np.any(np.asarray(grads["encoder"]["layer_0"]["output"]["kernel"]))


def test_a_step_on_task_a_leaves_task_b_head_and_its_adam_moments_unchanged():
    model, params, batch = _step_setup()
    tx = trainer.make_optimizer(params, schedule=optax.constant_schedule(1e-2), weight_decay=0.1)
    par = DataParallel("pmap")
    b_batch, a_batch = batch(1), batch(0)

    def run(step_fn):
        state = trainer.TrainState.create(params, tx, jax.random.key(0))
        step = par.compile(step_fn)
        after_b, _ = step(par.replicate(state), par.shard_batch(b_batch))
        after_b = par.unreplicate(after_b)
        after_a = par.unreplicate(step(par.replicate(after_b), par.shard_batch(a_batch))[0])
        return after_b, after_a

    def b_cols(tree):  # task B's columns of every classifier leaf (params, Adam mu and nu)
        return [np.asarray(x)[..., 2:5] for p, x in jax.tree_util.tree_leaves_with_path(tree)
                if trainer.path_str(p).endswith(("classifier/kernel", "classifier/bias"))]

    after_b, after_a = run(multitask.make_multitask_step(model.apply, (2, 3), tx, steps_per_epoch=10))
    before, after = b_cols((after_b.params, after_b.opt_state)), b_cols((after_a.params, after_a.opt_state))
    assert len(before) == 6  # kernel and bias of params, mu and nu
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    kernel = lambda s: np.asarray(s.params["classifier"]["kernel"])  # noqa: E731
    assert not np.allclose(kernel(after_b)[:, :2], kernel(after_a)[:, :2])  # task A's head trained
    enc = lambda s: np.asarray(s.params["encoder"]["layer_0"]["output"]["kernel"])  # noqa: E731
    assert not np.allclose(enc(after_b), enc(after_a))  # so did the shared encoder
    assert np.array_equal(kernel(after_b)[:, 2:5], kernel(after_a)[:, 2:5])

    # Why this can fail: after the B step, B's Adam moments are non-zero, so a plain AdamW step (zero gradient
    # for B) would still move B's head by momentum, and by weight decay in any case.
    assert all(np.any(x != 0) for x in before[2:])


def _bad(config, tmp_path, match):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        registry.run(config, str(workdir))
    assert not workdir.exists()  # raised before any work


def test_bad_task_lists_raise_config_errors_before_training(base_dir, tmp_path):
    for arg in ("synthetic", "synthetic,synthetic", "synthetic,synthetic_ner", "synthetic,nope"):
        with pytest.raises(ValueError):
            multitask_config.get_config(arg)
    # config.tasks overridden on a valid config (--config.tasks=...): the job's ConfigError names the problem
    for tasks, match in (("synthetic", "at least 2"), ("synthetic,synthetic", "repeats"),
                         ("synthetic,synthetic_ner", "token"), ("synthetic,nope", "unknown task 'nope'")):
        c = tiny_config(base_dir)
        c.tasks = tasks
        _bad(c, tmp_path, match)
    assert os.listdir(tmp_path) == []


def test_bad_inputs_raise_before_training(base_dir, tmp_path):
    c = tiny_config(base_dir)
    c.tasks = "synthetic,mrpc"
    _bad(c, tmp_path, "missing field config.data_dirs.mrpc")
    del c.data_dirs["synthetic_pair"]
    c.data_dirs.mrpc = None
    _bad(c, tmp_path, "data_dirs.mrpc is not set")
    c.data_dirs.mrpc = str(tmp_path / "no_such_dir")
    _bad(c, tmp_path, "is not a directory")
    c = tiny_config(str(tmp_path / "no_model"))
    _bad(c, tmp_path, "model_dir")
    c = tiny_config(base_dir)
    c.checkpoint.best_metric = "synthetic/span_f1"
    _bad(c, tmp_path, "best_metric")
    assert os.listdir(tmp_path) == []
