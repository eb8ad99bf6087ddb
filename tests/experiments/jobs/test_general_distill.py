"""General distillation (experiments/jobs/general_distill.py): the objectives against a numpy hand computation, a
smoke run of the job on a generated corpus, resume of the data position, the student fine-tuned and task-distilled
like a pretrained checkpoint (a fresh head), and TinyBERT's two stages as a recipe."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import load_file
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

import models
from compression.distillation import presets
from experiments.configs import general_distill as general_configs
from experiments.configs import recipe as recipe_configs
from experiments.data import load_task
from experiments.jobs import general_distill, registry, runner
from experiments.tools import report
from models.io import tree_equal
from models.transformer import Transformer, TransformerConfig
from tests.experiments.tiny import TINY, tiny_config, tiny_job
from tests.multidevice import run_with_devices

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    """Raw text: the generated task's training sentences, twice in a seeded order (about 500 lines)."""
    texts = load_task("synthetic", synthetic_size=256, word_vocab="build").train.texts
    order = np.random.default_rng(0).permutation(2 * len(texts)) % len(texts)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(f"{texts[i]} {texts[(i + 7) % len(texts)]}" if i % 3 else texts[i] for i in order))
    return str(path)


@pytest.fixture(scope="module")
def mlm_teacher_dir(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 Transformer with an MLM head over the generated task's words plus [MASK]; random
    weights (the tests need an MLM teacher, not a good one)."""
    out = tmp_path_factory.mktemp("mlm_teacher")
    words = SPECIALS + tuple(load_task("synthetic", synthetic_size=256, word_vocab="build").word_vocab.units[2:])
    tok = tokenizers.Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(out / "tokenizer.json"))
    cfg = TransformerConfig(vocab_size=len(words), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                            max_position_embeddings=32, head="mlm")
    params = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    models.save(out / "model", "transformer", cfg, params, tokenizer_dir=out)
    return str(out / "model")


def tiny_general(teacher_dir: str, corpus: str, profile: str = "tinybert", **overrides):
    """A general-distillation config for seconds-long runs: a 2-layer, hidden-16 student, 16-token sequences."""
    config = general_configs.get_config(profile)
    values = {"teacher_dir": teacher_dir, "corpus": corpus, "max_length": 16, "student.num_layers": 2,
              "student.hidden_size": 16, "student.num_heads": 2, "student.intermediate_size": 32,
              "student.init": "random", "batch_size": 8, "eval_batch_size": 8, "eval_sequences": 16,
              "heldout_fraction": 0.1, "num_train_steps": 6, "eval_every_steps": 3, "checkpoint.every_steps": 3,
              "log_every_steps": 3, "progress_bar": "off", "optimizer.learning_rate": 1e-3,
              **{k.replace("__", "."): v for k, v in overrides.items()}}
    for key, value in values.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


# -- the objectives against numpy ----------------------------------------------------------------------------

def _np(x):
    return np.asarray(x, np.float64)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _outputs_and_batch():
    """A 2-layer hidden-16 MLM student and a 4-layer hidden-24 MLM teacher (same heads) on a batch with padding,
    masked positions in 4 prediction slots."""
    t_cfg = TransformerConfig(vocab_size=40, hidden_size=24, num_layers=4, num_heads=2, intermediate_size=32,
                              max_position_embeddings=16, head="mlm", hidden_dropout_rate=0.0,
                              attention_dropout_rate=0.0)
    s_cfg = t_cfg.replace(hidden_size=16, num_layers=2)
    t_params = jax.jit(Transformer(t_cfg).init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    s_params = jax.jit(Transformer(s_cfg).init)(jax.random.key(2), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 40, (3, 10)).astype(np.int32)
    attention = np.ones((3, 10), np.int32)
    attention[1, 6:] = attention[2, 8:] = 0
    ids[attention == 0] = 0
    positions = np.array([[1, 3, 5, 0], [2, 4, 0, 0], [1, 2, 3, 7]], np.int32)
    labels = np.array([[7, 8, 9, -100], [10, 11, -100, -100], [12, 13, 14, 15]], np.int32)
    batch = {"input_ids": ids, "attention_mask": attention, "token_type_ids": np.zeros_like(ids),
             "example_weight": np.ones(3, np.float32), "mlm_positions": positions, "mlm_labels": labels,
             "mlm_slot_mask": (labels != -100).astype(np.int32)}
    projection = {"kernel": rng.normal(size=(16, 24)).astype(np.float32),
                  "bias": rng.normal(size=24).astype(np.float32)}
    return (s_cfg, s_params), (t_cfg, t_params), batch, projection


def test_objectives_equal_a_numpy_hand_computation():
    (s_cfg, s_params), (t_cfg, t_params), batch, proj = _outputs_and_batch()
    kw = dict(attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
              output_hidden_states=True, output_attentions=True)
    s_apply = jax.jit(Transformer(s_cfg).apply, static_argnames=("output_hidden_states", "output_attentions"))
    t_apply = jax.jit(Transformer(t_cfg).apply, static_argnames=("output_hidden_states", "output_attentions"))
    s_out = s_apply({"params": s_params}, batch["input_ids"], mlm_positions=batch["mlm_positions"], **kw)
    t_full = t_apply({"params": t_params}, batch["input_ids"], **kw)
    s_full = s_apply({"params": s_params}, batch["input_ids"], **kw)
    pos = batch["mlm_positions"]
    # the MLM head on gathered positions computes the full head's logits there
    np.testing.assert_allclose(s_out.logits, np.take_along_axis(_np(s_full.logits), pos[..., None], 1), atol=1e-5)
    tree, extras = {"model": s_params, "projection": proj}, {"teacher": t_params}
    mask = _np(batch["attention_mask"])
    layer_map = {0: 0, 1: 2, 2: 4}  # uniform, 4 -> 2 layers, with the embeddings

    def hidden(m, n):  # TinyBERT: MSE through W_h over every element (padding counted, its values zeroed)
        d = (_np(s_out.hidden_states[m]) @ _np(proj["kernel"]) + _np(proj["bias"]) - _np(t_full.hidden_states[n]))
        return np.sum(d ** 2 * mask[..., None]) / d.size

    def attention(m, n):  # pre-softmax scores, entries with a padded query or key zeroed, over every entry
        d = _np(s_out.attention_scores[m - 1]) - _np(t_full.attention_scores[n - 1])
        return np.sum(d ** 2 * (mask[:, None, :, None] * mask[:, None, None, :])) / d.size

    # TinyBERT's general distillation
    tiny = presets.get_preset("tinybert_intermediate")
    loss, weight, metrics = jax.jit(general_distill.objective_loss(
        tiny, layer_map, Transformer(t_cfg).apply, {"output_hidden_states": True, "output_attentions": True}))(
        s_out, tree, {k: v for k, v in batch.items() if not k.startswith("mlm")}, extras)
    expect_hidden = sum(hidden(m, n) for m, n in layer_map.items())
    expect_attention = sum(attention(m, n) for m, n in layer_map.items() if m)
    assert float(metrics["loss_hidden"]) == pytest.approx(expect_hidden, rel=1e-5)
    assert float(metrics["loss_attention"]) == pytest.approx(expect_attention, rel=1e-5)
    assert float(loss) == pytest.approx(expect_hidden + expect_attention, rel=1e-5) and float(weight) == 3.0

    # DistilBERT's distiller: 5 KL x T^2 (T = 2) over the slots + 2 MLM CE on masked tokens + 1 cosine
    labels = batch["mlm_labels"]
    predicted = labels != -100
    s_logits = _np(s_out.logits)
    t_logits = np.take_along_axis(_np(t_full.logits), pos[..., None], 1)
    ce = -np.take_along_axis(_log_softmax(s_logits), np.where(predicted, labels, 0)[..., None], -1)[..., 0]
    expect_mlm = ce[predicted].mean()
    log_pt, log_ps = _log_softmax(t_logits / 2), _log_softmax(s_logits / 2)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    expect_kd = kl[predicted].mean() * 4
    h_s = _np(s_out.hidden_states[-1]) @ _np(proj["kernel"]) + _np(proj["bias"])
    h_t = _np(t_full.hidden_states[-1])
    cos = (h_s * h_t).sum(-1) / np.sqrt(((h_s ** 2).sum(-1) + 1e-12) * ((h_t ** 2).sum(-1) + 1e-12))
    expect_cos = (1 - cos)[mask > 0].mean()
    dbert = presets.get_preset("distilbert_mlm")
    loss, _, metrics = jax.jit(general_distill.objective_loss(dbert, None, Transformer(t_cfg).apply,
                                                              {"output_hidden_states": True}))(s_out, tree, batch, extras)
    assert float(metrics["loss_mlm"]) == pytest.approx(expect_mlm, rel=1e-5)
    assert float(metrics["loss_kd"]) == pytest.approx(expect_kd, rel=1e-4)  # a small KL: float32 cancellation
    assert float(metrics["loss_cos"]) == pytest.approx(expect_cos, rel=1e-5)
    assert float(loss) == pytest.approx(5 * expect_kd + 2 * expect_mlm + expect_cos, rel=1e-5)
    accuracy = (s_logits.argmax(-1) == labels)[predicted].mean()
    assert float(metrics["mlm_accuracy"]) == pytest.approx(accuracy)
    # DistilBERT's default: the soft targets over every real token (all positions are slots)
    every = dict(batch, mlm_positions=np.broadcast_to(np.arange(10, dtype=np.int32), (3, 10)).copy(),
                 mlm_labels=np.full((3, 10), -100, np.int32), mlm_slot_mask=batch["attention_mask"])
    for row in range(3):
        every["mlm_labels"][row, pos[row][predicted[row]]] = labels[row][predicted[row]]
    s_all = s_apply({"params": s_params}, batch["input_ids"], mlm_positions=every["mlm_positions"], **kw)
    _, _, metrics = jax.jit(general_distill.objective_loss(dbert, None, Transformer(t_cfg).apply,
                                                           {"output_hidden_states": True}, kd_all=True))(
        s_all, tree, every, extras)
    kl_all = (np.exp(_log_softmax(_np(t_full.logits) / 2)) * (_log_softmax(_np(t_full.logits) / 2)
                                                             - _log_softmax(_np(s_full.logits) / 2))).sum(-1)
    assert float(metrics["loss_kd"]) == pytest.approx(kl_all[mask > 0].mean() * 4, rel=1e-4)
    assert float(metrics["loss_mlm"]) == pytest.approx(expect_mlm, rel=1e-5)


def test_distilbert_objective_without_a_teacher_mlm_head_drops_the_soft_targets(mlm_teacher_dir, corpus_file):
    config = tiny_general(mlm_teacher_dir, corpus_file, "distilbert")
    preset, notes = general_distill.objective_preset(config, teacher_has_mlm=False)
    assert (preset.kd_weight, preset.ce_weight, preset.cos_weight) == (0.0, 2.0, 1.0) and "no MLM head" in notes[0]
    preset, notes = general_distill.objective_preset(config, teacher_has_mlm=True)
    assert (preset.kd_weight, preset.temperature, notes) == (5.0, 2.0, [])
    config.loss.kd_weight = 3.0
    with pytest.raises(Exception, match="no MLM head"):
        general_distill.objective_preset(config, teacher_has_mlm=False)


# -- the job ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tinybert_run(mlm_teacher_dir, corpus_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("general_tinybert")
    return registry.run(tiny_general(mlm_teacher_dir, corpus_file), str(workdir)), str(workdir)


def test_tinybert_run_reports_held_out_losses_and_saves_a_headless_student(tinybert_run):
    results, workdir = tinybert_run
    assert results["steps"] == 6 and results["job"] == "general_distill"
    for when in (results["heldout_at_start"], results["final"]):
        assert set(when) >= {"loss", "loss_attention", "loss_hidden"} and np.isfinite(when["loss"])
    assert results["final"]["loss"] < results["heldout_at_start"]["loss"]
    record = results["general_distill"]
    assert record["projection"] and record["layer_map"] == {"0": 0, "1": 1, "2": 2} and record["notes"] == []
    evals = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [e["step"] for e in evals if "loss_hidden" in e and "learning_rate" not in e] == [3, 6]
    _, cfg, params = models.load(os.path.join(workdir, "model"))
    assert (cfg.head, cfg.hidden_size, cfg.num_layers) == ("none", 16, 2)
    assert set(params) == {"embeddings", "encoder"}  # no head, no projection
    assert os.path.isfile(os.path.join(workdir, "model", "tokenizer.json"))
    assert len(os.listdir(os.path.join(workdir, "corpus"))) == 1  # one fingerprinted shard set
    assert report.collect([workdir]) == []  # a pretrained body has no task figure: no report row


def test_finetuning_the_student_adds_a_fresh_head(tinybert_run, mlm_teacher_dir, tmp_path):
    _, workdir = tinybert_run
    student_dir = os.path.join(workdir, "model")
    _, _, student = models.load(student_dir)
    config = tiny_config(model_dir=student_dir, num_train_steps=2)
    run = runner.prepare(registry.get("finetune"), config, str(tmp_path))
    params = run.tree["model"]
    assert run.model_cfg.head == "sequence" and run.model_cfg.num_labels == 2
    assert set(params) == {"embeddings", "encoder", "pooler", "classifier"}
    assert tree_equal({k: params[k] for k in ("embeddings", "encoder")}, student)  # the body as distilled
    assert params["classifier"]["kernel"].shape == (16, 2) and float(jnp.abs(params["classifier"]["bias"]).sum()) == 0


def test_distilbert_run_with_an_mlm_teacher_trains_all_three_terms(mlm_teacher_dir, corpus_file, tmp_path):
    config = tiny_general(mlm_teacher_dir, corpus_file, "distilbert", student__init="every_other",
                          student__hidden_size=32, student__intermediate_size=64, student__num_layers=1,
                          num_train_steps=4, eval_every_steps=4, checkpoint__every_steps=4)
    results = registry.run(config, str(tmp_path))
    final = results["final"]
    assert set(final) >= {"loss_kd", "loss_mlm", "loss_cos", "mlm_accuracy"}
    assert not results["general_distill"]["projection"]  # the teacher's width: no W_h
    _, cfg, params = models.load(tmp_path / "model")
    assert cfg.head == "mlm" and "mlm" in params
    _, _, teacher = models.load(mlm_teacher_dir)
    assert not tree_equal(params["encoder"]["layer_0"], teacher["encoder"]["layer_0"])  # trained from it


def test_a_killed_run_resumes_its_data_position_to_the_uninterrupted_parameters(mlm_teacher_dir, corpus_file,
                                                                              tmp_path):
    """10 steps over a corpus of 4 batches per epoch (3 epochs, masks drawn per step); the run killed after its
    step-6 checkpoint (later checkpoints, model and results gone) resumes at epoch 1, batch 2 and ends with the
    uninterrupted run's parameters, bit for bit."""
    lines = open(corpus_file).read().splitlines()[:40]
    (tmp_path / "small.txt").write_text("\n".join(lines) + "\n")
    config = tiny_general(mlm_teacher_dir, str(tmp_path / "small.txt"), heldout_fraction=0.2, num_train_steps=10,
                          eval_every_steps=0, checkpoint__every_steps=2, checkpoint__keep=10)
    run = runner.prepare(registry.get("general_distill"), config, str(tmp_path / "probe"))
    assert run.steps_per_epoch == 4
    whole = list(run.feed.batches(1, 0))
    tail = list(run.feed.batches(1, 2))  # what a run resumed at epoch 1, batch 2 reads
    assert len(tail) == 2 and all(np.array_equal(a[k], b[k]) for a, b in zip(whole[2:], tail) for k in a)
    assert not np.array_equal(whole[0]["input_ids"], list(run.feed.batches(2, 0))[0]["input_ids"])

    reference = tmp_path / "reference"
    registry.run(config, str(reference))
    killed = tmp_path / "killed"
    shutil.copytree(reference, killed)
    for step in os.listdir(killed / "checkpoints"):
        if step.isdigit() and int(step) > 6:
            shutil.rmtree(killed / "checkpoints" / step)
    shutil.rmtree(killed / "model")
    os.remove(killed / "results.json")
    resumed = registry.run(config, str(killed))
    assert resumed["steps"] == 10
    a, b = load_file(reference / "model" / "params.safetensors"), load_file(killed / "model" / "params.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_tinybert_pipeline_as_a_recipe_general_then_task_distillation(tiny_teacher_dir, corpus_file, tmp_path):
    """Stage 1 distils the (tiny) teacher on raw text into a narrower student (unmasked: its word-level vocabulary
    has no [MASK]); stage 2 distils the task into that student (TinyBERT preset, through a learned projection)."""
    config = recipe_configs.get_config("tinybert")
    config.task = "synthetic"
    config.data_dir = None
    config.stages = "general,student"
    general = tiny_general(tiny_teacher_dir, corpus_file, mlm__rate=0.0, num_train_steps=4, eval_every_steps=4)
    general.job = "general_distill"
    with config.unlocked():
        config.general.config = general
    config.general.source = ""
    config.student.source = "general"
    student = tiny_job(config.student.config, tiny_teacher_dir, steps=4)
    student.synthetic_size = TINY["synthetic_size"]
    config.report.enabled = False
    results = registry.run(config, str(tmp_path))
    assert results["student"]["final"]["accuracy"] >= 0.0
    saved = models.read_meta(tmp_path / "student" / "model")
    assert saved["config"]["hidden_size"] == 16 and saved["config"]["head"] == "sequence"
    assert saved["extra"]["student_init"] == str(tmp_path / "general" / "model")
    assert saved["extra"]["distill"]["preset"] == "tinybert"


def test_bfloat16_compute_and_shard_map_apply_to_the_job(mlm_teacher_dir, corpus_file, tmp_path):
    config = tiny_general(mlm_teacher_dir, corpus_file, precision="bfloat16", teacher_precision="bfloat16",
                          parallelism="shard_map", num_train_steps=2, eval_every_steps=2, checkpoint__every_steps=2)
    results = registry.run(config, str(tmp_path))
    assert results["techniques"] == ["loss_scale"] and results["precision"] == "bfloat16"
    assert results["parallelism"] == "shard_map" and np.isfinite(results["final"]["loss"])
    _, _, params = models.load(tmp_path / "model")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # float32 master weights


def test_two_devices_end_where_one_device_does(mlm_teacher_dir, corpus_file, tmp_path):
    """The same run (no dropout: each device draws its own) on 1 CPU device here and on 2 under pmap in a
    subprocess: TinyBERT's terms are means over equal per-device shares, so the updates agree."""
    overrides = dict(student__dropout_rate=0.0, cache_dir=str(tmp_path / "cache"), num_train_steps=4,
                     eval_every_steps=4, checkpoint__every_steps=4)
    registry.run(tiny_general(mlm_teacher_dir, corpus_file, **overrides), str(tmp_path / "one"))
    run_with_devices(f"""
        from experiments.jobs import registry
        from tests.experiments.jobs.test_general_distill import tiny_general
        registry.run(tiny_general({mlm_teacher_dir!r}, {corpus_file!r}, **{overrides!r}), {str(tmp_path / "two")!r})
        """, n=2)
    one, two = (load_file(tmp_path / d / "model" / "params.safetensors") for d in ("one", "two"))
    assert json.load(open(tmp_path / "two" / "results.json"))["num_devices"] == 2
    assert one.keys() == two.keys() and max(float(np.max(np.abs(one[k] - two[k]))) for k in one) < 1e-5
