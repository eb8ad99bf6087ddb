"""The general-distillation job (``config.job = "general_distill"``): distil a pretrained teacher into a smaller
student on raw text, before any task (task-agnostic distillation), and save the student as a model directory that
fine-tuning (``finetune``, ``multitask``) and task distillation (``distill``'s ``student.model_dir``) start from like
a pretrained checkpoint (a fresh task head is initialised there).

Teacher (``config.teacher_dir``): a Hugging Face BERT checkpoint (default: all-MiniLM-L6-v2, which has no MLM
head) or a Transformer model directory. Student (``config.student``): any depth, width, head count and FFN size
(default TinyBERT-4's: 4 layers, hidden 312, 12 heads, FFN 1200) with the teacher's vocabulary and tokenizer,
initialised at random or from the teacher's layers (every other, or the first; the shapes must then agree).

Objectives (``config.objective``), each a :mod:`compression.distillation` preset with its paper's normalisation:

* ``tinybert`` (TinyBERT's general distillation, ``tinybert_intermediate``): attention-score MSE over matched
  layers (pre-softmax scores, masked entries zeroed) plus hidden-state MSE including the embedding output (layer
  0), both over every element (TinyBERT's ``MSELoss()``), through one learned projection ``W_h`` from the student's
  width to the teacher's when they differ; uniform layer map (student layer m <- teacher layer m * L_T / L_S).
  The student has no MLM head; its inputs are masked as TinyBERT's pregenerated data is (``mlm.rate``).
* ``distilbert`` (DistilBERT's distiller, ``distilbert_mlm``): ``alpha_ce`` 5 x KL(teacher || student) of the
  MLM distributions at T = 2, times T^2, mean over predicted positions (``kd``); ``alpha_mlm`` 2 x the student's
  own MLM cross-entropy on the masked tokens (``mlm``: an MLM head tied to its word embeddings); ``alpha_cos`` 1 x
  the cosine loss on the last hidden states over real tokens (``cos``, through ``W_h`` when widths differ,
  where DistilBERT itself requires equal widths). A teacher without an MLM head (MiniLM) gives no soft targets:
  the ``kd`` term is dropped, the run logs so and records it (``results.json``, the model's metadata).

Data (:mod:`experiments.data.corpus`): the corpus (``config.corpus``: a text file or folder, local or ``gs://``,
or ``hf:NAME...``) is tokenised once into a fingerprinted shard set of packed sequences (``config.cache_dir``,
default ``WORKDIR/corpus``) with a held-out part; every process reads each global batch in the seeded epoch order
and masks it (:mod:`experiments.data.mlm`: dynamic masking, a fresh mask from (seed, step), 80/10/10, optional
frequency smoothing), then keeps its own rows, so the data position is the checkpointed (epoch, batch) and a
resumed run reads and masks exactly what an uninterrupted one does.

Evaluation (every ``eval_every_steps`` and at the end, and once on the initial student: ``results.json``'s
``heldout_at_start``): the objective's terms on the held-out sequences (at most ``eval_sequences``, masked once
with a fixed seed), averaged over equal-size batches, and with an MLM head the masked-token accuracy.

Techniques: bfloat16 / float16 compute (``config.precision``, ``config.loss_scale``), pmap or shard_map
(``config.parallelism``), multi-host runs and ``gs://`` paths come from the runner; the compression techniques of
the task jobs (distill, qat, l0, magnitude, layerdrop, theseus) have no section here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

import models
from compression import precision
from compression.distillation import losses, presets
from compression.pruning.compaction import keep_layers
from experiments.data import corpus as corpus_lib
from experiments.data import mlm
from experiments.jobs.train import is_saved_model
from experiments.runtime import evaluation, fingerprint, single_process, trainer
from experiments.runtime.config_validation import ConfigError
from experiments.runtime.parallel import AXIS
from experiments.techniques import distill as distill_technique
from experiments.techniques.base import Feed, Run
from models import hf, storage
from models.tokenization import Tokenizer
from models.transformer import Transformer, TransformerConfig

OBJECTIVES = {"tinybert": "tinybert_intermediate", "distilbert": "distilbert_mlm"}
TEACHER, PROJECTION = distill_technique.TEACHER, distill_technique.PROJECTION
EVAL_STREAM = 1  # mlm.step_rng stream of the fixed held-out masks (training masks: stream 0)
TERM_NAMES = {"kd": "kd", "ce": "mlm", "cos": "cos", "hidden": "hidden", "attention": "attention"}


# -- checks before any work ----------------------------------------------------------------------------------

def check_config(config) -> None:
    """The checks that need no data or model: a teacher and a corpus that exist (ConfigError otherwise)."""
    problems = []
    if not config.teacher_dir:
        problems.append("config.teacher_dir is required: a BERT checkpoint or a Transformer model directory")
    elif not storage.is_dir(config.teacher_dir):
        problems.append(f"config.teacher_dir={config.teacher_dir!r} is not a directory")
    spec = (config.corpus or "").strip()
    if not spec:
        problems.append("config.corpus is required: a text file or folder (one document or sentence a line), or "
                        "hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]")
    elif not spec.startswith(corpus_lib.HF_PREFIX) and not storage.exists(spec):
        problems.append(f"config.corpus={spec!r} does not exist")
    if config.objective == "distilbert" and config.mlm.rate <= 0:
        problems.append("config.objective='distilbert' trains an MLM: config.mlm.rate must be > 0")
    if problems:
        raise ConfigError("this general distillation cannot run:\n  " + "\n  ".join(problems))


# -- teacher, objective and student ----------------------------------------------------------------------------

def load_teacher(teacher_dir: str) -> tuple[TransformerConfig, dict]:
    """``(config, params)`` of the teacher: a saved Transformer, or a BERT checkpoint with its own head."""
    if is_saved_model(teacher_dir):
        _, cfg, params = models.load(teacher_dir)
        evaluation.require_transformer(teacher_dir, cfg, "teacher", "general distillation")
        return cfg, params
    return hf.load_bert(teacher_dir, head="auto")


def objective_preset(config, teacher_has_mlm: bool) -> tuple[presets.Preset, list[str]]:
    """The objective's preset with the config's overrides (``loss.*``, -1 = the preset's), and notes on what
    was changed for this teacher (a teacher without an MLM head gives no soft targets)."""
    loss = config.loss
    overrides = {field: loss[key] for key, field in (("temperature", "temperature"), ("kd_weight", "kd_weight"),
                                                      ("mlm_weight", "ce_weight"), ("cos_weight", "cos_weight"),
                                                      ("hidden_weight", "hidden_weight"),
                                                      ("attention_weight", "attention_weight")) if loss[key] != -1.0}
    try:
        preset = presets.get_preset(OBJECTIVES[config.objective], **overrides)
    except ValueError as e:
        raise ConfigError(f"config.loss: {e}") from e
    notes = []
    if preset.kd_weight and not teacher_has_mlm:
        if loss.kd_weight > 0:
            raise ConfigError(f"config.loss.kd_weight={loss.kd_weight}: the teacher {config.teacher_dir} has no MLM "
                              "head, so there are no soft MLM targets; set it to 0 (or -1)")
        preset = dataclasses.replace(preset, kd_weight=0.0)
        notes.append("the teacher has no MLM head: DistilBERT's soft-target term (alpha_ce) is dropped; the student "
                     "learns from its own MLM loss (MLM head tied to its embeddings) and the cosine on the last "
                     "hidden states")
    if not any(preset.weights.values()):
        raise ConfigError(f"config.loss: every term of objective {config.objective!r} has weight 0")
    if preset.ce_weight and config.mlm.rate <= 0:
        raise ConfigError("config.loss: the MLM term needs masked tokens; config.mlm.rate must be > 0")
    return preset, notes


def build_student(s, teacher_cfg: TransformerConfig, teacher_params: dict, head: str, key) -> tuple[
        TransformerConfig, dict]:
    """The student of ``config.student`` (``s``) with ``head`` ("none" or "mlm"), the teacher's vocabulary and
    position table, initialised at random or from the teacher's layers (every other / the first ones, with its
    embeddings and, for an MLM student of an MLM teacher, its MLM head)."""
    cfg = TransformerConfig(
        vocab_size=teacher_cfg.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
        intermediate_size=s.intermediate_size, max_position_embeddings=teacher_cfg.max_position_embeddings,
        type_vocab_size=teacher_cfg.type_vocab_size, layer_norm_eps=teacher_cfg.layer_norm_eps,
        hidden_dropout_rate=s.dropout_rate, attention_dropout_rate=s.dropout_rate, head=head,
        pad_token_id=teacher_cfg.pad_token_id)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"config.student: {e}") from e
    params = jax.jit(Transformer(cfg).init)(key, jnp.zeros((1, 8), jnp.int32))["params"]
    if s.init == "random":
        return cfg, params
    theirs = {"hidden_size": teacher_cfg.hidden_size, "num_heads": teacher_cfg.heads(0),
              "intermediate_size": teacher_cfg.ffn_size(0)}
    differ = [f"student.{k}={s[k]} (teacher {v})" for k, v in theirs.items() if s[k] != v]
    if differ or s.num_layers > teacher_cfg.num_layers:
        raise ConfigError(f"config.student.init={s.init!r} copies teacher layers, so the shapes must agree: "
                          f"{', '.join(differ) or f'student.num_layers={s.num_layers} > {teacher_cfg.num_layers}'}; "
                          "use student.init='random' for another shape")
    stride = max(teacher_cfg.num_layers // s.num_layers, 1) if s.init == "every_other" else 1
    _, kept = keep_layers(teacher_cfg, teacher_params, tuple(range(0, stride * s.num_layers, stride)))
    copied = {"embeddings": kept["embeddings"], "encoder": kept["encoder"]}
    if head == "mlm" and "mlm" in teacher_params:
        copied["mlm"] = teacher_params["mlm"]
    for name, tree in copied.items():
        if jax.tree.structure(tree) != jax.tree.structure(params[name]):
            raise ConfigError(f"config.student.init={s.init!r}: the teacher's {name} parameters do not fit the "
                              "student (fused QKV or pruned layers?); use student.init='random'")
    return cfg, {**params, **copied}


# -- the loss ---------------------------------------------------------------------------------------------------

def objective_loss(preset: presets.Preset, layer_map: dict[int, int] | None, teacher_apply, teacher_kwargs: dict,
                   kd_all: bool = False):
    """``task_loss(out, tree, batch, extras) -> (loss, weight, metrics)`` of general distillation.

    The teacher (frozen, ``extras["teacher"]``) runs on the same masked inputs (its MLM head, for the ``kd`` term, on
    the same slots). ``kd_all``: the slots are every position (``mlm_slot_mask`` marks the real tokens), else the
    masked ones. The batch holds ``input_ids``,
    ``attention_mask``, ``token_type_ids``, ``example_weight`` and, for a student with an MLM head,
    ``mlm_positions``/``mlm_labels`` int32 [B, P] (the prediction slots; the student's logits are [B, P, V] there).
    Terms (unweighted, as ``loss_<term>`` metrics): ``kd`` KL x T^2 of the MLM distributions over the slots that
    hold a real token (all real tokens or the masked ones, as the batch's slots are), ``mlm`` the student's
    cross-entropy on the masked tokens (mean over them), and the intermediate terms of
    :func:`compression.distillation.presets.distill_loss` (``cos``, ``hidden``, ``attention``) with
    ``tree["projection"]`` when widths differ. ``mlm_accuracy``: the student's masked-token accuracy. The weight is
    the number of sequences.
    """
    intermediate = {t: preset.weights[t] for t in ("cos", "hidden", "attention") if preset.weights[t]}

    def loss_fn(out, tree, batch, extras):
        ew = batch["example_weight"].astype(jnp.float32)
        t_kwargs = dict(teacher_kwargs, **({"mlm_positions": batch["mlm_positions"]} if preset.kd_weight else {}))
        t_out = trainer.model_outputs(teacher_apply, lax.stop_gradient(extras[TEACHER]), {}, batch, train=False,
                                      **t_kwargs)
        t_out = jax.tree.map(lambda x: x.astype(jnp.float32), t_out)
        terms = {}
        loss = jnp.zeros((), jnp.float32)
        if intermediate:
            masks = {"attention_mask": batch["attention_mask"], "example_weight": ew}
            weights = {t: preset.weights[t] if t in intermediate else 0.0 for t in presets.TERMS}
            loss, terms = presets.distill_loss(preset, out, t_out, masks, layer_map=layer_map,
                                               projections=tree.get(PROJECTION), weights=weights)
        metrics = {}
        if "mlm_labels" in batch:
            labels = batch["mlm_labels"]
            predicted = (labels != mlm.IGNORE).astype(jnp.float32) * ew[:, None]
            if preset.ce_weight:
                terms["ce"] = losses.cross_entropy(out.logits, labels, ew[:, None] * jnp.ones_like(predicted))
                loss = loss + preset.ce_weight * terms["ce"]
            if preset.kd_weight:
                slots = batch["mlm_slot_mask"].astype(jnp.float32) * ew[:, None] if kd_all else predicted
                terms["kd"] = losses.kd_loss(out.logits, t_out.logits, preset.temperature, kind=preset.kd_kind,
                                             t_squared=preset.t_squared, reduction=preset.kd_reduction, mask=slots)
                loss = loss + preset.kd_weight * terms["kd"]
            correct = (jnp.argmax(out.logits, -1) == labels).astype(jnp.float32) * predicted
            metrics["mlm_accuracy"] = jnp.sum(correct) / jnp.maximum(jnp.sum(predicted), 1.0)
        metrics.update({f"loss_{TERM_NAMES[k]}": v for k, v in terms.items()})
        return loss, jnp.sum(ew), metrics

    return loss_fn


# -- batches ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Masker:
    """Turns packed sequences into model batches: attention mask, masking (:mod:`experiments.data.mlm`) and, for
    an MLM student, the prediction slots (``slots`` per sequence; with ``kd_all`` every position is a slot, so the
    soft-target term covers every real token as DistilBERT's does)."""

    special_ids: np.ndarray
    mask_id: int | None
    random_ids: np.ndarray
    rate: float
    mask_fraction: float
    random_fraction: float
    token_weights: np.ndarray | None
    slots: int | None
    kd_all: bool

    def __call__(self, ids: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        b, length = ids.shape
        attention = np.arange(length)[None, :] < lengths[:, None]
        maskable = attention & ~np.isin(ids, self.special_ids)
        if self.rate > 0:
            inputs, labels = mlm.mask_tokens(ids, maskable, rng, mask_id=self.mask_id, random_ids=self.random_ids,
                                             rate=self.rate, mask_fraction=self.mask_fraction,
                                             random_fraction=self.random_fraction, token_weights=self.token_weights)
        else:
            inputs, labels = ids.astype(np.int32), np.full(ids.shape, mlm.IGNORE, np.int32)
        batch = {"input_ids": inputs, "attention_mask": attention.astype(np.int32),
                 "token_type_ids": np.zeros_like(inputs), "example_weight": np.ones(b, np.float32)}
        if self.slots is not None:
            if self.kd_all:
                batch["mlm_positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
                batch["mlm_labels"], batch["mlm_slot_mask"] = labels, attention.astype(np.int32)
            else:
                batch["mlm_positions"], batch["mlm_labels"] = mlm.prediction_slots(labels, self.slots)
                batch["mlm_slot_mask"] = (batch["mlm_labels"] != mlm.IGNORE).astype(np.int32)
        return batch


def _host_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a global batch (every process reads and masks the whole batch)."""
    local = len(batch["example_weight"]) // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    return {k: v[rows] for k, v in batch.items()}


def _digest_files(files) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def shard_set(config, workdir: str, tokenizer: Tokenizer) -> corpus_lib.ShardSet:
    """The corpus's shard set (:func:`experiments.data.corpus.prepare`): built by process 0 while the others poll
    its completion (a long build outlasts no barrier, :mod:`experiments.runtime.single_process`), then opened by
    all (a process whose cache folder is not shared builds its own copy, the same bytes)."""
    spec = config.corpus.strip()
    cache_root = config.cache_dir or os.path.join(workdir, "corpus")
    source = spec if spec.startswith(corpus_lib.HF_PREFIX) else fingerprint.content_digest(spec)
    inputs = {"corpus": source, "tokenizer": _digest_files(models.io.tokenizer_files(config.teacher_dir))}
    kwargs = dict(inputs=inputs, max_length=config.max_length, pack=config.pack,
                  heldout_fraction=config.heldout_fraction, shard_sequences=config.shard_sequences)
    build = lambda: corpus_lib.prepare(spec, cache_root, tokenizer, **kwargs)  # noqa: E731
    shards = single_process.run_on_process_0("general_distill_corpus", build, workdir)
    return shards if shards is not None else build()


# -- the job ---------------------------------------------------------------------------------------------------

def build(config, workdir: str, key) -> Run:
    """The run of a general distillation: teacher, student, objective, and the corpus as the run's feed."""
    teacher_cfg, teacher_params = load_teacher(config.teacher_dir)
    if config.max_length > teacher_cfg.max_position_embeddings:
        raise ConfigError(f"config.max_length={config.max_length} exceeds the teacher's position table "
                          f"({teacher_cfg.max_position_embeddings})")
    preset, notes = objective_preset(config, teacher_cfg.head == "mlm")
    for note in notes:
        logging.warning("general distillation: %s", note)
    head = "mlm" if preset.ce_weight or preset.kd_weight else "none"
    s = config.student
    student_cfg, params = build_student(s, teacher_cfg, teacher_params, head, key)
    if preset.attention_weight and student_cfg.heads(0) != teacher_cfg.heads(0):
        raise ConfigError(f"config.student.num_heads={s.num_heads}: TinyBERT's attention loss matches head to head; "
                          f"the teacher has {teacher_cfg.heads(0)} (or set config.loss.attention_weight=0)")
    layer_map = None
    if preset.hidden_weight or preset.attention_weight:
        layer_map = distill_technique.parse_layer_map(config.layer_map, preset, s.num_layers, teacher_cfg.num_layers)

    tokenizer = Tokenizer.from_dir(config.teacher_dir)
    specials = tokenizer.special_ids()
    if config.mlm.rate > 0 and specials.get("mask_token") is None:
        raise ConfigError(f"config.mlm.rate={config.mlm.rate}: the tokenizer of {config.teacher_dir} has no "
                          f"{tokenizer.special_tokens['mask_token']!r} token to mask with")
    if tokenizer.vocab_size > teacher_cfg.vocab_size:
        raise ConfigError(f"the tokenizer of {config.teacher_dir} has {tokenizer.vocab_size} ids, the teacher's "
                          f"embeddings {teacher_cfg.vocab_size}")
    shards = shard_set(config, workdir, tokenizer)
    train, heldout = shards.split("train"), shards.split("heldout")
    if len(train) < config.batch_size:
        raise ConfigError(f"the corpus's training part has {len(train)} sequences, fewer than one batch of "
                          f"config.batch_size={config.batch_size}")
    n_eval = min(len(heldout), config.eval_sequences) // config.eval_batch_size * config.eval_batch_size
    if n_eval == 0:
        raise ConfigError(f"the corpus's held-out part has {len(heldout)} sequences, fewer than one batch of "
                          f"config.eval_batch_size={config.eval_batch_size}; raise config.heldout_fraction or lower "
                          "config.eval_batch_size")
    steps_per_epoch = len(train) // config.batch_size
    total_steps = config.num_train_steps if config.num_train_steps > 0 else max(
        1, int(np.ceil(config.num_epochs * steps_per_epoch)))

    special = np.asarray(sorted({i for i in specials.values() if i is not None}), np.int32)
    m = config.mlm
    weights = None
    if m.smoothing > 0:
        weights = mlm.smoothed_weights(shards.token_counts(), m.smoothing, special)
    kd_all = bool(preset.kd_weight) and config.loss.kd_positions == "all"
    masker = Masker(special_ids=special, mask_id=specials.get("mask_token"),
                    random_ids=np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32), special),
                    rate=m.rate, mask_fraction=m.mask_fraction, random_fraction=m.random_fraction,
                    token_weights=weights, slots=mlm.max_predictions(config.max_length, m.rate) if head == "mlm"
                    else None, kd_all=kd_all)

    def batches(epoch: int, start_batch: int):
        for b in range(start_batch, steps_per_epoch):
            positions = train.epoch_positions(config.seed, epoch, b * config.batch_size, config.batch_size)
            ids, lengths = train.rows(positions)
            yield _host_rows(masker(ids, lengths, mlm.step_rng(config.seed, epoch * steps_per_epoch + b)))

    eval_batches = []
    for i in range(n_eval // config.eval_batch_size):
        ids, lengths = heldout.rows(np.arange(i * config.eval_batch_size, (i + 1) * config.eval_batch_size))
        eval_batches.append(masker(ids, lengths, mlm.step_rng(config.seed, i, stream=EVAL_STREAM)))

    teacher = Transformer(teacher_cfg)
    dtype = jnp.bfloat16 if config.teacher_precision == "bfloat16" else jnp.float32
    teacher_apply = precision.policy(config.teacher_precision).wrap(teacher.apply)
    output_kwargs = {"output_hidden_states": bool(preset.hidden_weight or preset.cos_weight),
                     "output_attentions": bool(preset.attention_weight)}
    teacher_kwargs = {k: v for k, v in output_kwargs.items() if v}

    metric_names = ["loss"] + [f"loss_{TERM_NAMES[t]}" for t in ("kd", "ce", "cos", "hidden", "attention")
                               if preset.weights[t]] + (["mlm_accuracy"] if head == "mlm" else [])
    recorded = {"objective": config.objective, "preset": preset.name, "teacher_dir": config.teacher_dir,
                "corpus": config.corpus, "shard_set": shards.fingerprint, "weights": preset.weights,
                "temperature": preset.temperature, "teacher_has_mlm_head": teacher_cfg.head == "mlm",
                "projection": student_cfg.hidden_size != teacher_cfg.hidden_size and bool(
                    preset.hidden_weight or preset.cos_weight),
                "layer_map": {str(k): v for k, v in (layer_map or {}).items()}, "notes": notes,
                "corpus_sequences": {"train": len(train), "heldout": len(heldout), "evaluated": n_eval}}
    feed = Feed(name=config.corpus, batches=batches, metric_names=metric_names,
                describe=f"{config.corpus} ({shards.describe()}; {steps_per_epoch} steps per epoch)",
                make_evaluate=lambda run, par: _make_evaluate(run, par, eval_batches),
                model_extra={})
    run = Run(config=config, workdir=workdir, task=None, model_task=None, train=None, teacher_rows=[],
              family="transformer", model_cfg=student_cfg, model=Transformer(student_cfg),
              inputs=evaluation.TRANSFORMER_INPUTS, tree={"model": params}, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps, key=key, tokenizer_dir=config.teacher_dir,
              metadata={"distilled_from": config.teacher_dir}, feed=feed)
    run.extras[TEACHER] = precision.cast_floating(teacher_params, dtype)
    run.output_kwargs.update({k: v for k, v in output_kwargs.items() if v})
    if head == "mlm":
        run.apply_kwargs.append(lambda batch, train_: {"mlm_positions": batch["mlm_positions"]})
    if recorded["projection"]:
        distill_technique.add_projection(run, student_cfg.hidden_size, teacher_cfg.hidden_size)
    run.task_loss = objective_loss(preset, layer_map, teacher_apply, teacher_kwargs, kd_all)
    run.fingerprints.update({"teacher": fingerprint.params_fingerprint(teacher_params), "corpus": shards.fingerprint})
    run.results["general_distill"] = recorded
    logging.info("general distillation: %s (%s) from %s into %d layers x %d (%d heads, FFN %d, init %s, head %s); "
                 "weights %s; layer map %s", config.objective, preset.name, config.teacher_dir, s.num_layers,
                 s.hidden_size, s.num_heads, s.intermediate_size, s.init, head,
                 {k: v for k, v in preset.weights.items() if v}, layer_map)
    return run


def _make_evaluate(run: Run, par, eval_batches: list[dict]):
    """The held-out evaluation (see the module docstring); also records the initial student's in
    ``results.json`` (``heldout_at_start``)."""
    apply_fn = run.apply_fn()

    def eval_step(state, batch):
        kwargs = dict(run.output_kwargs)
        for fn in run.apply_kwargs:
            kwargs.update(fn(batch, False))
        out = trainer.model_outputs(apply_fn, state.params["model"], run.variables(state.params, state.extras), batch,
                                    train=False, **kwargs)
        loss, _, metrics = run.task_loss(out, state.params, batch, state.extras)
        return {k: lax.pmean(v, AXIS) for k, v in {"loss": loss, **metrics}.items()}

    compiled = par.compile(eval_step)

    def evaluate(dstate) -> dict:
        sums: dict[str, float] = {}
        for batch in eval_batches:
            out = par.unreplicate(compiled(dstate, par.shard_batch(_host_rows(batch))))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / len(eval_batches) for k, v in sums.items()}

    initial = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=run.tree, opt_state={},
                                 rng=jax.random.key(0), epoch=jnp.zeros((), jnp.int32),
                                 batch_in_epoch=jnp.zeros((), jnp.int32), extras=run.extras)
    start = evaluate(par.replicate(initial))
    run.results["heldout_at_start"] = start
    logging.info("held-out at start: %s", "  ".join(f"{k} {v:.4f}" for k, v in start.items()))
    return evaluate
