"""The distillation job (``registry.run`` of distill.py configs) and the distillation technique
(``experiments.techniques.distill``) on tiny synthetic teachers: students train, teacher logits are the
teacher's, the KD losses match hand computations, bad input fails before training. Token tasks: the CNN-LSTM
student distils a tiny NER teacher word by word (first sub-token alignment, padding masked, per-word
normalisation)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from experiments.configs import distill as distill_configs
from experiments.data import IGNORE, Split, load_task
from experiments.data.features import encode_tagged
from experiments.data.vocab import CharVocab, WordVocab
from experiments.jobs import distill, registry, runner
from experiments.runtime import config_validation, evaluation, trainer
from experiments.techniques import distill as kd

STUDENT_TINY = {"synthetic_size": 256, "batch_size": 16, "eval_batch_size": 32, "num_train_steps": 16,
                "log_every_steps": 4, "eval_every_steps": 8, "checkpoint.every_steps": 8, "max_length": 16,
                "progress_bar": "off"}


@pytest.fixture
def teacher_dir(tiny_teacher_dir):
    return tiny_teacher_dir


def _config(student: str, teacher_dir: str, base_task: str = "synthetic", **overrides):
    config = distill_configs.get_config(f"{base_task},{student}")
    for key, value in {**STUDENT_TINY, **overrides}.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    config.teacher_dir = teacher_dir
    return config


def _nothing_written(workdir) -> bool:
    """The run stopped before writing anything: no workdir."""
    return not workdir.exists()


class _Out:
    def __init__(self, logits):
        self.logits = logits


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_teacher_logits_are_the_teachers_eval_outputs(teacher_dir):
    model, _, params = models.load(teacher_dir)
    task = load_task("synthetic", None, tokenizer=teacher_dir, max_length=16, synthetic_size=256)
    logits = kd.teacher_logits(model.apply, params, task.train, batch_size=48, progress_bar="off")
    assert logits.shape == (len(task.train), 2)
    for i in (0, 100, len(task.train) - 1):  # one example at a time, unpadded
        ids = task.train.features.ragged["input_ids"].rows[i][None]
        ref = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.ones_like(ids),
                          token_type_ids=jnp.zeros_like(ids)).logits
        np.testing.assert_allclose(logits[i], np.asarray(ref[0]), atol=1e-4)


def test_kd_loss_equals_hand_computation():
    """Hinton preset (T=4, 0.9 KL*T^2 + 0.1 CE) on fixed logits, against numpy; rows without a gold label
    (``has_label`` 0: transfer rows) enter the soft term only."""
    s = np.array([[1.0, -1.0], [0.5, 0.2]], np.float32)
    t = np.array([[2.0, 0.0], [-1.0, 1.0]], np.float32)
    labels = np.array([0, 1])

    loss_fn = kd.sequence_loss(kd.preset_of(distill_configs.get_config("synthetic,transformer3")))
    batch = {"attention_mask": np.ones((2, 4), np.int32), "labels": labels, "has_label": np.ones(2, np.int32),
             "example_weight": np.ones(2, np.float32)}
    loss, weight, metrics = loss_fn(_Out(jnp.asarray(s)), jnp.asarray(t), batch)

    pt, ps = _softmax(t / 4), _softmax(s / 4)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)) * 16
    ce_rows = -np.log(_softmax(s))[np.arange(2), labels]
    np.testing.assert_allclose(float(loss), 0.9 * kl + 0.1 * np.mean(ce_rows), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["teacher_agreement"]), 0.5)
    assert float(weight) == 2.0

    unlabeled_second = {**batch, "has_label": np.array([1, 0], np.int32)}
    loss, _, _ = loss_fn(_Out(jnp.asarray(s)), jnp.asarray(t), unlabeled_second)
    np.testing.assert_allclose(float(loss), 0.9 * kl + 0.1 * ce_rows[0], rtol=1e-5)


@pytest.mark.parametrize("student, preset", [("transformer3_pkd", "pkd"), ("transformer3_tinybert", "tinybert")])
def test_intermediate_layer_students_need_a_live_teacher_and_a_transformer(student, preset):
    """PKD / TinyBERT match hidden states (and attention): ``auto`` resolves to the live teacher; the logit cache
    and non-Transformer students are refused by the combination check, before any work."""
    c = distill_configs.get_config(f"synthetic,{student}")
    assert (c.job, c.distill.preset, c.student.family, c.student.num_layers) == ("distill", preset, "transformer", 3)
    c.teacher_dir = "/models/teacher"
    assert kd.needs_intermediate(kd.preset_of(c)) and kd.teacher_mode(c) == "live"
    runner.check_techniques(c, "transformer")
    c.distill.teacher = "cached"
    with pytest.raises(config_validation.ConfigError,
                       match=r"(?s)^this combination cannot run.*logit cache holds logits only"):
        runner.check_techniques(c, "transformer")
    c.distill.teacher = "auto"
    with pytest.raises(config_validation.ConfigError, match=r"(?s)^this combination cannot run.*Transformer "
                                                            r"student only, the trained model is a bilstm"):
        runner.check_techniques(c, "bilstm")


UNLABELED_TEXTS = ["the quokka was truly great", "i think the plot felt boring"]


@pytest.mark.parametrize("student", ["transformer3", "bilstm"])
def test_students_train_and_save_a_model(teacher_dir, tmp_path, student):
    overrides = {"student.num_layers": 1}
    if student == "bilstm":  # the transfer set: training split + augmented rows + an unlabeled file
        (tmp_path / "unlabeled.txt").write_text("\n".join(UNLABELED_TEXTS) + "\n")
        overrides = {"augment.n_per_example": 1, "transfer_file": str(tmp_path / "unlabeled.txt")}
    result = registry.run(_config(student, teacher_dir, **overrides), str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 16 and saved["final"]["step"] == 16
    assert saved["job"] == "distill" and saved["techniques"] == ["distill"]
    assert saved["distill"]["preset"] == ("hinton" if student == "transformer3" else "tang")
    assert saved["distill"]["teacher"] == "cached" and saved["distill"]["teacher_dir"] == teacher_dir
    extra = models.read_meta(tmp_path / "model")["extra"]
    assert (extra["distilled_from"], extra["student_family"], extra["transfer_examples"]) == (
        teacher_dir, saved["family"], result["transfer_examples"])
    n_train = len(load_task("synthetic", synthetic_size=256, selection="auto").train)  # less the held-out rows
    model, cfg, params = models.load(tmp_path / "model")
    assert cfg.family == ("transformer" if student == "transformer3" else "bilstm")
    if student == "transformer3":
        assert cfg.num_layers == 1 and result["transfer_examples"] == n_train
    else:
        assert result["transfer_examples"] > n_train + 2  # the augmented and unlabeled rows joined
        assert WordVocab.load(tmp_path / "model" / "word_vocab.json").encode(["quokka"])[0] > 1  # file words: known
        # The unlabeled rows come last, with the teacher's logits on their text.
        cached = np.load(tmp_path / "teacher_logits.npz")["logits"]
        assert cached.shape == (result["transfer_examples"], 2)
        teacher, _, t_params = models.load(teacher_dir)
        tok = load_task("synthetic", None, tokenizer=teacher_dir, max_length=16, synthetic_size=256).tokenizer
        for row, text in zip(cached[-2:], UNLABELED_TEXTS):
            ids = jnp.asarray([[tok.cls_id, *tok.pieces([text])[0], tok.sep_id]])
            ref = teacher.apply({"params": t_params}, ids, attention_mask=jnp.ones_like(ids),
                                token_type_ids=jnp.zeros_like(ids)).logits[0]
            np.testing.assert_allclose(row, np.asarray(ref), atol=1e-4)
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
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        registry.run(_config("bilstm", teacher_dir, transfer_file=str(tmp_path / "absent.txt")),
                                     str(tmp_path / "d"))
    (tmp_path / "u.txt").write_text("some text\n")
    with pytest.raises(config_validation.ConfigError, match="transfer_file.*preset is 'none'"):
        registry.run(_config("bilstm_nokd", teacher_dir, transfer_file=str(tmp_path / "u.txt")),
                                     str(tmp_path / "e"))
    with pytest.raises(config_validation.ConfigError, match="temperature"):
        registry.run(_config("transformer3", teacher_dir, **{"distill.temperature": 0.0, "student.num_layers": 1}),
                                     str(tmp_path / "a"))
    with pytest.raises(ValueError, match="label sets differ|outputs"):
        registry.run(_config("transformer3", teacher_dir, task="synthetic_pair"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="cannot be initialised"):
        registry.run(_config("transformer3", teacher_dir, **{"student.num_layers": 5}),
                                     str(tmp_path / "c"))
    assert all(_nothing_written(tmp_path / n) for n in "abcde")


def test_cached_teacher_logits_are_reused_only_for_the_same_key(tmp_path):
    path, calls = str(tmp_path / "t.npz"), []

    def compute(value):
        calls.append(value)
        return np.full((3, 2), value, np.float32)

    assert kd.cached_teacher_logits(path, "a", lambda: compute(1.0), (3, 2))[0, 0] == 1.0
    assert kd.cached_teacher_logits(path, "a", lambda: compute(2.0), (3, 2))[0, 0] == 1.0  # cached
    assert kd.cached_teacher_logits(path, "b", lambda: compute(3.0), (3, 2))[0, 0] == 3.0  # other rows
    assert kd.cached_teacher_logits(path, "b", lambda: compute(4.0), (4, 2))[0, 0] == 4.0  # other shape
    assert calls == [1.0, 3.0, 4.0]


def test_transfer_key_changes_with_the_rows_and_the_teachers_weights(teacher_dir, tiny_ner_teacher_dir, tmp_path):
    """Keyed by the weights, not the path: a copied teacher keeps the key, one changed weight does not."""
    import shutil
    task = load_task("synthetic", None, tokenizer=teacher_dir, max_length=16, synthetic_size=256)
    params = models.load(teacher_dir)[2]
    key = kd.transfer_key(params, [task.train])
    shutil.copytree(teacher_dir, tmp_path / "moved")
    assert kd.transfer_key(models.load(str(tmp_path / "moved"))[2], [task.train]) == key
    assert kd.transfer_key(params, [task.train.select(np.arange(1, len(task.train)))]) != key
    assert kd.transfer_key(models.load(tiny_ner_teacher_dir)[2], [task.train]) != key
    nudged = jax.tree.map(np.array, params)
    nudged["classifier"]["bias"][0] += 1e-3
    assert kd.transfer_key(nudged, [task.train]) != key


# -- token tasks: the CNN-LSTM tagger student --------------------------------------------------------------

# Tiny and fast; a high learning rate without dropout so that 8 steps already find some entities (span F1 > 0
# makes the reload check below discriminate).
TAGGER_TINY = {"num_train_steps": 8, "eval_every_steps": 8, "checkpoint.every_steps": 8, "student.embed_dim": 16,
               "student.hidden_size": 16, "student.char_embed_dim": 8, "student.char_filters": 8,
               "student.max_word_chars": 8, "student.dropout_rate": 0.0, "optimizer.learning_rate": 0.03}


def test_token_kd_loss_is_per_real_word_masks_padding_and_trains_only_the_student():
    rng = np.random.default_rng(0)
    b, w, c = 3, 5, 4
    mask = (np.arange(w)[None] < np.array([[5], [3], [2]])).astype(np.int32)
    weight = np.array([1.0, 1.0, 0.0], np.float32)  # the last row is an eval-style padding row
    labels = np.where(mask > 0, rng.integers(0, c, (b, w)), -100).astype(np.int32)
    s = rng.normal(size=(b, w, c)).astype(np.float32)
    t = rng.normal(size=(b, w, c)).astype(np.float32)
    batch = {"word_ids": np.ones((b, w), np.int32), "char_ids": np.ones((b, w, 3), np.int32), "word_mask": mask,
             "labels": labels, "example_weight": weight, "has_label": np.ones(b, np.int32)}
    preset = kd.preset_of(distill_configs.get_config("synthetic_ner,cnn_lstm"))  # distilbert: T 2, 0.5 / 0.5
    tagger_loss = kd.tagger_loss(preset)

    def loss_fn(student_logits, teacher_logits):
        return tagger_loss(_Out(student_logits), teacher_logits, batch)

    loss, n, metrics = loss_fn(jnp.asarray(s), jnp.asarray(t))
    real = (mask * weight[:, None]) > 0  # 5 + 3 real words; the zero-weight row counts nothing
    pt, ps = _softmax(t[real] / 2), _softmax(s[real] / 2)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)) * 4
    ce = np.mean(-np.log(_softmax(s[real]))[np.arange(real.sum()), labels[real]])
    np.testing.assert_allclose(float(loss), 0.5 * kl + 0.5 * ce, rtol=1e-5)
    assert float(n) == 8.0
    agree = (s.argmax(-1) == t.argmax(-1))[real]
    np.testing.assert_allclose(float(metrics["teacher_agreement"]), np.mean(agree), rtol=1e-6)

    # Teacher logits at padded words (and in the zero-weight row) do not change the loss.
    noisy = np.where(real[..., None], t, rng.normal(scale=100.0, size=t.shape)).astype(np.float32)
    loss_noisy, _, _ = loss_fn(jnp.asarray(s), jnp.asarray(noisy))
    assert float(loss_noisy) == float(loss)

    # Gradients reach the student only, and only through real words.
    g_s, g_t = jax.grad(lambda sl, tl: loss_fn(sl, tl)[0], argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    assert not np.any(np.asarray(g_t))
    g_s = np.asarray(g_s)
    assert np.all(np.abs(g_s[real]).sum(-1) > 0) and not np.any(g_s[~real])

    # Without KD (distill.preset "none": the technique is off, the runner's gold-label loss): gold-tag
    # cross-entropy over the same real words, normalised by their count.
    ce_only, ce_weight, _ = trainer.cross_entropy_terms(jnp.asarray(s), batch)
    np.testing.assert_allclose(float(ce_only), ce, rtol=1e-5)
    assert float(ce_weight) == 8.0


class _PairTokenizer:
    """Splits every word into 2-character pieces ("york" -> "yo", "rk"), ids 4 and up."""

    cls_id, sep_id, pad_id, unk_id = 2, 3, 0, 1

    def pieces(self, texts):
        return [[4 + i for i in range(0, len(t), 2)] for t in texts]


def test_word_logits_are_the_first_subtokens():
    logits = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    starts = np.array([[1, 2, 4, 0], [1, 3, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)
    out = kd.first_subtoken_logits(logits, starts, mask)
    np.testing.assert_array_equal(out[0, :3], logits[0, [1, 2, 4]])
    np.testing.assert_array_equal(out[1, :2], logits[1, [1, 3]])
    assert not out[0, 3].any() and not out[1, 2:].any()

    # Through the data encoding and teacher_logits: [CLS] ne w yo rk is bi g [SEP] -> words start at 1, 3, 5, 6.
    tokens = [["new", "york", "is", "big"], ["ok"]]
    feats = encode_tagged("hand", tokens, [np.zeros(4, np.int32), np.zeros(1, np.int32)],
                          tokenizer=_PairTokenizer(), word_vocab=None, char_vocab=None, max_length=16)
    split = Split("hand", labels=[np.zeros(4), np.zeros(1)], features=feats, buckets=(16,), tokens=tokens)

    def position_teacher(variables, input_ids, **kwargs):  # logit c at sub-token s is 10 * s + c
        pos = jnp.arange(input_ids.shape[1], dtype=jnp.float32)[None, :, None]
        return _Out(jnp.broadcast_to(10 * pos + jnp.arange(3.0), input_ids.shape + (3,)))

    word_logits = kd.teacher_logits(position_teacher, {}, split, batch_size=2, progress_bar="off",
                                         word_level=True)
    assert word_logits.shape == (2, 16, 3)
    np.testing.assert_array_equal(word_logits[0, :4, 0], [10, 30, 50, 60])
    np.testing.assert_array_equal(word_logits[1, :1, 0], [10])
    assert not word_logits[0, 4:].any() and not word_logits[1, 1:].any()


@pytest.mark.parametrize("student", ["cnn_lstm", "cnn_lstm_nokd"])
def test_cnn_lstm_student_distils_a_token_teacher(tiny_ner_teacher_dir, tmp_path, student):
    config = _config(student, tiny_ner_teacher_dir, base_task="synthetic_ner", **TAGGER_TINY)
    result = registry.run(config, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 8 and "span_f1" in saved["final"] and result["student_family"] == "cnn_lstm"
    model, cfg, params = models.load(tmp_path / "model")
    assert cfg.family == "cnn_lstm" and cfg.max_chars_per_token == 8 and cfg.num_labels == 7

    if student == "cnn_lstm_nokd":  # gold tags only; the cache and reload checks below run once (compile time)
        assert not (tmp_path / "teacher_logits.npz").exists()
        return

    task = load_task("synthetic_ner", None, tokenizer=tiny_ner_teacher_dir, max_length=16, synthetic_size=256,
                     word_vocab=WordVocab.load(tmp_path / "model" / "word_vocab.json"), selection="auto",
                     char_vocab=CharVocab.load(tmp_path / "model" / "char_vocab.json"), max_word_chars=8)
    # The cache holds the teacher's logits at each word's first sub-token, zeros past the sentence.
    cached = np.load(tmp_path / "teacher_logits.npz")["logits"]
    assert cached.shape == (len(task.train), 16, 7)
    teacher, _, t_params = models.load(tiny_ner_teacher_dir)
    row = task.train.features.ragged
    ids = jnp.asarray(row["input_ids"].rows[5][None])
    ref = teacher.apply({"params": t_params}, ids, attention_mask=jnp.ones_like(ids),
                        token_type_ids=jnp.zeros_like(ids)).logits[0]
    n_words = len(row["word_start_index"].rows[5])
    np.testing.assert_allclose(cached[5, :n_words], np.asarray(ref)[row["word_start_index"].rows[5]], atol=1e-4)
    assert not cached[5, n_words:].any()

    # The reloaded student reproduces the job's dev span F1 on word-level tags.
    preds, labels, weights = [], [], []
    for logits, batch in evaluation.dev_logits(model.apply, {"params": params}, task,
                                               ("word_ids", "char_ids", "word_mask")):
        preds.append(logits.argmax(-1))
        labels.append(batch["word_labels"])
        weights.append(batch["example_weight"])
    reloaded = evaluation.task_metrics(task, preds, labels, np.concatenate(weights))
    exported = saved["best"] if saved["exported_step"] == saved["best"]["step"] else saved["final"]
    for key in ("span_f1", "token_accuracy"):
        assert reloaded[key] == pytest.approx(exported[key], abs=1e-6)


def test_unlabeled_sentences_join_a_token_task_without_gold_tags(tiny_ner_teacher_dir, tmp_path):
    """A transfer file's sentences are split into words, tagged by the teacher (first sub-token logits, after
    the training rows), enter the student's vocabularies, and carry no gold tags (IGNORE everywhere)."""
    lines = ["the quokka opened an office in paris .", "Zurich was nice"]
    (tmp_path / "unlabeled.txt").write_text("\n".join(lines) + "\n")
    config = _config("cnn_lstm", tiny_ner_teacher_dir, base_task="synthetic_ner", transfer_file=str(
        tmp_path / "unlabeled.txt"), **TAGGER_TINY)
    result = registry.run(config, str(tmp_path / "run"))
    n_train = len(load_task("synthetic_ner", None, synthetic_size=256, selection="auto").train)  # held-out rows out
    assert result["transfer_examples"] == n_train + 2
    words = WordVocab.load(tmp_path / "run" / "model" / "word_vocab.json")
    assert words.encode(["quokka", "zurich"]).min() > 1  # in the vocabulary (1 = unknown)
    assert "Z" in CharVocab.load(tmp_path / "run" / "model" / "char_vocab.json").units

    cached = np.load(tmp_path / "run" / "teacher_logits.npz")["logits"]
    assert cached.shape == (n_train + 2, 16, 7)
    teacher, _, t_params = models.load(tiny_ner_teacher_dir)
    tok = load_task("synthetic_ner", None, tokenizer=tiny_ner_teacher_dir, max_length=16,
                    synthetic_size=256).tokenizer
    for row, line in zip(cached[-2:], lines):
        pieces = tok.pieces(line.split())
        starts = np.cumsum([1] + [len(p) for p in pieces[:-1]])
        ids = jnp.asarray([[tok.cls_id, *[i for p in pieces for i in p], tok.sep_id]])
        ref = teacher.apply({"params": t_params}, ids, attention_mask=jnp.ones_like(ids),
                            token_type_ids=jnp.zeros_like(ids)).logits[0]
        np.testing.assert_allclose(row[:len(pieces)], np.asarray(ref)[starts], atol=1e-4)
        assert not row[len(pieces):].any()

    # Built the way the job builds it: gold tags on the training rows only.
    task = load_task("synthetic_ner", None, tokenizer=tiny_ner_teacher_dir, max_length=16, synthetic_size=256,
                     word_vocab=words, char_vocab=CharVocab.load(tmp_path / "run" / "model" / "char_vocab.json"),
                     selection="auto", max_word_chars=8)
    raw = distill._read_transfer_file(config, task)
    train = distill._transfer_split(task, [distill._unlabeled_split(task, raw, 8)], tagger=True)
    for batch in train.batches(64, drop_remainder=False):
        real = batch["example_weight"] > 0
        labelled = (batch["labels"] != IGNORE).any(-1)
        np.testing.assert_array_equal(labelled[real], batch["has_label"][real] == 1)
        assert (batch["example_index"][real][batch["has_label"][real] == 0] >= n_train).all()


def test_token_task_bad_input_fails_before_training(tiny_ner_teacher_dir, tmp_path):
    def run(student, name, teacher=tiny_ner_teacher_dir, base_task="synthetic_ner", **overrides):
        config = _config(student, teacher, base_task=base_task, **{**TAGGER_TINY, **overrides})
        registry.run(config, str(tmp_path / name))

    with pytest.raises(ValueError, match="token task.*CNN-LSTM tagger"):
        run("bilstm", "bilstm", base_task="synthetic", task="synthetic_ner")
    with pytest.raises(ValueError, match="sequence task.*CNN-LSTM student tags words"):
        run("cnn_lstm", "sequence", task="synthetic")
    with pytest.raises(config_validation.ConfigError, match="augment"):
        run("cnn_lstm", "augment", **{"augment.n_per_example": 1})

    def edited_teacher(name, **changes):  # the tiny NER teacher with its saved metadata changed
        path = tmp_path / name
        shutil.copytree(tiny_ner_teacher_dir, path)
        meta = json.loads((path / "config.json").read_text())
        meta["extra"].update(changes)
        (path / "config.json").write_text(json.dumps(meta))
        return str(path)

    names = list(models.read_meta(tiny_ner_teacher_dir)["extra"]["label_names"])
    names[1], names[2] = names[2], names[1]  # same tags, another order: the logits would mean other tags
    with pytest.raises(ValueError, match="label sets differ"):
        run("cnn_lstm", "labels", teacher=edited_teacher("swapped", label_names=names))
    with pytest.raises(ValueError, match="fine-tuned on a sequence task"):
        run("cnn_lstm", "kind", teacher=edited_teacher("sequence_teacher", kind="sequence"))
    assert all(_nothing_written(tmp_path / n) for n in ("bilstm", "sequence", "augment", "labels", "kind"))


def test_a_labelled_sample_keeps_gold_labels_on_those_rows_only(teacher_dir, tmp_path):
    """``labelled.examples``: the gold-label baseline trains on a seeded sample of the training rows; the KD arm
    with ``labelled.rest="transfer"`` has the same rows labelled and every other training row teacher-labelled
    (Hinton et al.'s few-label setting; XtremeDistil's labels plus transfer text)."""
    all_rows = load_task("synthetic", None, synthetic_size=256, selection="auto").train.texts
    prepare = lambda student, name, **o: runner.prepare(registry.JOBS["distill"], _config(
        student, teacher_dir, **{"labelled.examples": 40, "student.num_layers": 1, **o}), str(tmp_path / name))
    kd_run = prepare("transformer3", "kd", **{"labelled.rest": "transfer"})
    gold_run = prepare("transformer3_nokd", "gold")
    has_label = kd_run.train.features.scalars["has_label"]
    labelled = [t for t, h in zip(kd_run.train.texts, has_label) if h]
    assert len(gold_run.train) == 40 and labelled == gold_run.train.texts  # the same sample in both arms
    assert sorted(kd_run.train.texts) == sorted(all_rows) and has_label.sum() == 40
    assert set(gold_run.train.texts) <= set(all_rows)
    assert prepare("transformer3_nokd", "seed1", seed=1).train.texts != gold_run.train.texts
    bilstm = prepare("bilstm_nokd", "bilstm")  # a word-level student's vocabulary: the sampled rows' words only
    words = {w for t in bilstm.train.texts for w in t.lower().split()}
    assert set(bilstm.task.word_vocab.units) - words <= set(bilstm.task.word_vocab.units[:4])
    with pytest.raises(config_validation.ConfigError, match="labelled.rest='transfer'"):
        prepare("transformer3_nokd", "bad", **{"labelled.rest": "transfer"})
