"""Knowledge distillation (``config.distill``) from a fine-tuned teacher, for every training job and student.

The loss is a :mod:`compression.distillation` preset (``none``: gold labels only, the baseline every figure is
compared with) between the trained model (the student) and the teacher ``config.teacher_dir`` (a Transformer
model directory written by fine-tuning). The teacher reaches the step one of two ways (``distill.teacher``):

* ``cached``: its eval-mode logits over the training rows (the teacher's view of them: the training split, plus
  augmented and unlabeled transfer rows of the distillation job) are computed once and cached in
  ``workdir/teacher_logits.npz`` under a fingerprint of the teacher and the rows; each batch carries
  ``teacher_logits`` for its rows, so a step costs only the student's forward and backward. Logit presets only.
* ``live``: the teacher runs inside the jitted step (eval mode, frozen: its parameters travel in
  ``TrainState.extras``, so checkpoints carry them and no gradient reaches them; ``teacher_precision``
  ``bfloat16`` halves their memory and runs it under the bfloat16 policy). Presets with intermediate terms
  (PKD's patience loss, TinyBERT's hidden-state and attention-score MSE, DistilBERT's cosine) need it: the
  teacher's hidden states and attention scores are never cached. Transformer students only (they read the
  teacher's inputs).
* ``auto`` (default): ``live`` when the preset needs more than logits, else ``cached``.

Intermediate terms pair student and teacher layers by ``distill.layer_map`` (default the preset's kind:
TinyBERT's uniform map with embeddings, PKD's skip map; for a 3-layer student of a 6-layer teacher every other
teacher layer). A student narrower than its teacher (TinyBERT-4, or any student of general distillation) compares
its hidden states through a learned projection to the teacher's width, TinyBERT's ``W_h``, one shared by every
matched layer: it trains beside the model under ``tree["projection"]`` (the model's optimizer settings) and is not
saved with the model. Attention scores need equal head counts.

Rows without a gold label (``has_label`` 0: augmented and unlabeled transfer rows) never enter the gold-label
term. Token tasks (the CNN-LSTM tagger): the teacher's logits at each word's first sub-token, cached word-level
float32 [N, max_length, C]; soft and gold terms are means over real words (``word_mask``).
"""

from __future__ import annotations

import hashlib
import io
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import models
from compression import precision
from compression.distillation import layer_maps, losses, presets, projections
from experiments.data import Split
from experiments.runtime import evaluation, fingerprint, observe, trainer
from experiments.runtime.config_validation import ConfigError
from experiments.techniques.base import Run, Technique
from models import storage

TEACHER = "teacher"  # TrainState.extras key of a live teacher's frozen params
PROJECTION = "projection"  # trainable-tree key of the learned student -> teacher width map (TinyBERT's W_h)
MODES = ("auto", "cached", "live")
INTERMEDIATE_TERMS = ("cos", "hidden", "attention", "pkd")


def section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.preset = "none"  # compression.distillation preset (hinton, distilbert, tinybert, pkd, tang...), or "none"
    s.temperature = -1.0  # softening temperature; -1: the preset's
    s.kd_weight = -1.0  # weight of the soft-target term; -1: the preset's
    s.ce_weight = -1.0  # weight of the gold-label term (rows without a gold label never count); -1: the preset's
    s.teacher = "auto"  # "cached" logits | "live" teacher in the step | "auto": live only for intermediate terms
    s.teacher_precision = "float32"  # live teacher: "float32" | "bfloat16" (params stored and run in bfloat16)
    s.layer_map = ""  # intermediate terms: "" (the preset's), "uniform" | "skip" | "last", or "1:2,2:4,3:6"
    return s


CONSTRAINTS = {"preset": dict(choices=("none",) + tuple(presets.PRESETS)), "teacher": dict(choices=MODES),
               "teacher_precision": dict(choices=("float32", "bfloat16"))}


def teacher_dir_of(config) -> str | None:
    """``config.teacher_dir``, or else the model the run starts from (``model_dir``: L0 pruning, Theseus and QAT
    of a fine-tuned model distil from that model as it was)."""
    return config.teacher_dir or config.get("model_dir")


def preset_of(config) -> presets.Preset | None:
    """The configured preset with the config's overrides, or None for ``"none"``."""
    d = config.distill
    if d.preset == "none":
        return None
    overrides = {k: v for k, v in (("temperature", d.temperature), ("kd_weight", d.kd_weight),
                                   ("ce_weight", d.ce_weight)) if v != -1.0}
    try:
        return presets.get_preset(d.preset, **overrides)
    except ValueError as e:
        raise ConfigError(f"config.distill: {e}") from e


def needs_intermediate(preset: presets.Preset) -> bool:
    """Whether the preset has a term on hidden states or attention maps (only a live teacher provides them)."""
    return any(preset.weights[t] for t in INTERMEDIATE_TERMS)


def teacher_mode(config) -> str:
    """``"live"`` or ``"cached"`` (``auto`` resolved)."""
    mode = config.distill.teacher
    if mode == "auto":
        preset = preset_of(config)
        return "live" if preset is not None and needs_intermediate(preset) else "cached"
    return mode


def parse_layer_map(text: str, preset: presets.Preset, n_student: int, n_teacher: int) -> dict[int, int]:
    """``config.distill.layer_map`` as student -> teacher hidden-state indices, validated against both depths."""
    text = text.strip()
    if not text:
        return layer_maps.build(preset.layer_map, n_student, n_teacher, include_embeddings=preset.match_embeddings)
    if text in layer_maps.KINDS:
        return layer_maps.build(text, n_student, n_teacher, include_embeddings=preset.match_embeddings)
    try:
        pairs = {int(s): int(t) for s, t in (p.split(":") for p in text.split(","))}
    except ValueError:
        raise ConfigError(f"config.distill.layer_map={text!r}: give a kind {list(layer_maps.KINDS)} or pairs "
                          "'student:teacher,...' of hidden-state indices (0 = embeddings)") from None
    try:
        return layer_maps.validate(pairs, n_student, n_teacher)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.distill.layer_map={text!r}: {e}") from e


# -- cached teacher logits -------------------------------------------------------------------------------

def first_subtoken_logits(logits, word_start_index, word_mask):
    """Word-level teacher logits: each word's logits at its first sub-token.

    Args:
      logits: float [B, S, C], the teacher's per-sub-token logits.
      word_start_index: int32 [B, W], the position in the sub-token row of each word's first sub-token
        (the data's ``word_start_index``; 0 past the sentence).
      word_mask: int [B, W], 1 = real word.

    Returns: float [B, W, C] (``logits``' dtype), zeros at padded words.
    """
    xp = jnp if isinstance(logits, jax.Array) else np
    picked = xp.take_along_axis(logits, word_start_index[..., None], axis=1)
    return xp.where(word_mask[..., None] > 0, picked, xp.zeros((), picked.dtype))


def teacher_logits(teacher_apply, teacher_params, split: Split, batch_size: int = 128,
                   progress_bar: str = "auto", word_level: bool = False) -> np.ndarray:
    """The teacher's eval-mode logits over ``split`` in its order: float32 [N, C] for sequence tasks, or
    [N, L, C] for token tasks padded to the largest bucket L -- per sub-token, or per word (each word's first
    sub-token, :func:`first_subtoken_logits`) with ``word_level``."""
    keys = evaluation.TRANSFORMER_INPUTS + (("word_start_index", "word_mask") if word_level else ())

    @jax.jit
    def forward(params, batch):
        inputs = {k: batch[k] for k in evaluation.TRANSFORMER_INPUTS}
        logits = trainer.model_outputs(teacher_apply, params, {}, inputs, train=False).logits.astype(jnp.float32)
        if word_level:
            logits = first_subtoken_logits(logits, batch["word_start_index"], batch["word_mask"])
        return logits

    out = []
    bar = observe.Progress(split.num_batches(batch_size, drop_remainder=False), 0, progress_bar)
    for batch in split.batches(batch_size, shuffle=False, drop_remainder=False):
        logits = np.asarray(forward(teacher_params, {k: batch[k] for k in keys}))
        if logits.ndim == 3:
            logits = np.pad(logits, ((0, 0), (0, split.buckets[-1] - logits.shape[1]), (0, 0)))
        out.append(logits[batch["example_weight"] > 0])
        bar.update(1)
    bar.close()
    return np.concatenate(out)


def transfer_key(teacher_params, splits: list[Split]) -> str:
    """A fingerprint of the teacher's weights and of the teacher inputs of ``splits``: cached logits are reused
    only for the same teacher (whatever its path) over the same rows."""
    h = hashlib.sha256(fingerprint.params_fingerprint(teacher_params).encode())
    for split in splits:
        for name in ("input_ids", "token_type_ids", "word_start_index"):
            if name in split.features.ragged:
                h.update(name.encode())
                for row in split.features.ragged[name].rows:
                    h.update(np.ascontiguousarray(row, np.int32).tobytes() + b";")
    return h.hexdigest()


def cached_teacher_logits(path: str, key: str, compute, shape: tuple[int, ...]) -> np.ndarray:
    """Loads ``path`` if it holds logits of ``shape`` for ``key`` (:func:`transfer_key`), else computes them
    with ``compute()`` and writes them atomically."""
    if storage.exists(path):
        with np.load(io.BytesIO(storage.read_bytes(path))) as cached:
            old_key = str(cached["key"]) if "key" in cached.files else None
            if old_key == key and cached["logits"].shape == tuple(shape):
                return cached["logits"]
            logging.warning("%s holds logits of shape %s for %s; this run needs %s for teacher/transfer set %s: "
                            "recomputing", path, cached["logits"].shape, old_key and old_key[:12], tuple(shape),
                            key[:12])
    logits = compute()
    if observe.is_writer():
        with storage.atomic_file(path) as tmp:
            np.savez(tmp, logits=logits, key=np.array(key))
    return logits


# -- the loss --------------------------------------------------------------------------------------------

def sequence_loss(preset: presets.Preset, layer_map: dict[int, int] | None = None):
    """``task_loss(out, teacher_out, batch, projection=None) -> (loss, weight, metrics)`` for one label per
    example.

    ``teacher_out``: the teacher's logits float32 [B, C] (cached) or its outputs (live). ``projection``: the
    student -> teacher width map of the hidden-state terms (params dict), when the widths differ. Rows with
    ``has_label`` 0 never enter the gold-label term; the weight is the batch's example-weight sum.
    """

    def loss_fn(out, teacher_out, batch, projection=None):
        weight = batch["example_weight"]
        masks = {k: batch[k] for k in ("example_weight", "attention_mask") if k in batch}
        loss, terms = presets.distill_loss(preset, out, teacher_out, masks, layer_map=layer_map,
                                           projections=projection, weights={"ce": 0.0})
        if preset.ce_weight:
            gold = jnp.where(batch["has_label"] > 0, batch["labels"], losses.IGNORE_INDEX)
            terms["ce"] = losses.cross_entropy(out.logits, gold, weight)
            loss = loss + preset.ce_weight * terms["ce"]
        w = jnp.sum(weight)
        t_logits = getattr(teacher_out, "logits", teacher_out)  # outputs (live, intermediate) or logits
        agree = (jnp.argmax(out.logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
        metrics = {**{f"loss_{k}": v for k, v in terms.items()},
                   "teacher_agreement": jnp.sum(agree * weight) / jnp.maximum(w, 1e-12)}
        return loss, w, metrics

    return loss_fn


def tagger_loss(preset: presets.Preset):
    """Token-level ``task_loss(out, teacher_logits, batch)`` for a word-level tagger (the CNN-LSTM).

    The batch holds ``word_mask`` int32 [B, W], ``labels`` int32 [B, W] (-100 past the sentence),
    ``example_weight`` float32 [B] and ``teacher_logits`` float32 [B, W, C]. The preset's soft-target and
    gold-label terms are means over the real words (``word_mask`` x ``example_weight``), so padded positions
    never count whatever the teacher's values there; the weight is that word count, so devices combine per word.
    """

    def loss_fn(out, teacher_logits_, batch):
        loss, terms = presets.distill_loss(
            preset, out, teacher_logits_, {k: batch[k] for k in ("labels", "word_mask", "example_weight")},
            mask_key="word_mask")
        real = batch["word_mask"].astype(jnp.float32) * batch["example_weight"][:, None]
        n = jnp.sum(real)
        agree = (jnp.argmax(out.logits, -1) == jnp.argmax(teacher_logits_, -1)).astype(jnp.float32)
        metrics = {**{f"loss_{k}": v for k, v in terms.items()},
                   "teacher_agreement": jnp.sum(agree * real) / jnp.maximum(n, 1e-12)}
        return loss, n, metrics

    return loss_fn


# -- the component -----------------------------------------------------------------------------------------

def _check(config, family: str) -> list[str]:
    d = config.distill
    if d.preset not in presets.PRESETS:
        return []  # the constraint on config.distill.preset names it
    problems = []
    try:
        preset_of(config)  # the overrides (temperature, weights) make a valid preset
    except ConfigError as e:
        problems.append(str(e))
    if not teacher_dir_of(config):
        problems.append(f"config.distill.preset={d.preset!r} needs config.teacher_dir (a fine-tuned Transformer "
                        "model directory; runs that start from model_dir default to it)")
    preset = presets.PRESETS[d.preset]
    if needs_intermediate(preset):
        terms = [t for t in INTERMEDIATE_TERMS if preset.weights[t]]
        if family != "transformer":
            problems.append(f"config.distill.preset={d.preset!r} matches hidden states / attention maps "
                            f"({terms}): a Transformer student only, the trained model is a {family}")
        if d.teacher == "cached":
            problems.append(f"config.distill.preset={d.preset!r} has intermediate terms {terms}: the logit cache "
                            "holds logits only; set config.distill.teacher='live' (or 'auto')")
        if config.get("theseus") is not None and config.theseus.enabled:
            problems.append(f"config.distill.preset={d.preset!r} with config.theseus.enabled: the mixed Theseus "
                            "model has no per-layer outputs; use a logit preset (hinton, distilbert) with Theseus")
    elif d.teacher == "live" and family != "transformer":
        problems.append(f"config.distill.teacher='live' runs the teacher on the student's inputs: a Transformer "
                        f"student only, the trained model is a {family}; use 'cached'")
    if d.layer_map.strip() and not needs_intermediate(preset):
        problems.append(f"config.distill.layer_map={d.layer_map!r}: preset {d.preset!r} has no intermediate term")
    return problems


def _check_layer_map(preset: presets.Preset, layer_map: dict[int, int], n_student: int) -> None:
    """ConfigError before training when a weighted intermediate term would find no layer pair."""
    usable = {"hidden": layer_map, "cos": {n_student: 0},
              "attention": {m: n for m, n in layer_map.items() if m >= 1 and n >= 1},
              "pkd": {m: n for m, n in layer_map.items() if m >= 1}}
    empty = [t for t in INTERMEDIATE_TERMS if preset.weights[t] and not usable[t]]
    if empty:
        raise ConfigError(f"config.distill: preset {preset.name!r} terms {empty} find no layer pair in the map "
                          f"{layer_map} for a {n_student}-layer student (PKD's skip map needs >= 2 student layers); "
                          "set config.distill.layer_map")


def add_projection(run: Run, student_width: int, teacher_width: int) -> None:
    """Adds TinyBERT's learned map ``W_h`` [student_width -> teacher_width] to the trainable tree under
    :data:`PROJECTION`, with the model's optimizer settings (schedule, weight decay, clipping over its own
    parameters); it is not part of the saved model."""
    run.tree[PROJECTION] = projections.init_projection(jax.random.fold_in(run.key, 0x5052), student_width,
                                                       teacher_width)
    opt = run.config.optimizer.to_dict()
    opt["freeze_regex"] = ""  # the model's frozen paths are model paths
    run.optimizers[PROJECTION], _ = trainer.optimizer_from_config(ml_collections.ConfigDict(opt), run.tree[PROJECTION],
                                                                  run.total_steps)
    logging.info("distillation: student width %d, teacher width %d: hidden states compared through a learned "
                 "projection (TinyBERT's W_h)", student_width, teacher_width)


def load_teacher(run: Run):
    """(teacher module, config, params) of ``config.teacher_dir``, checked against the run's task."""
    teacher_dir = teacher_dir_of(run.config)
    teacher, teacher_cfg, params = models.load(teacher_dir)
    evaluation.require_transformer(teacher_dir, teacher_cfg, "teacher", "distillation")
    meta = models.read_meta(teacher_dir).get("extra", {})
    evaluation.check_fine_tuned_for(teacher_dir, teacher_cfg, meta, run.task, "teacher")
    return teacher, teacher_cfg, params, meta


def _setup(run: Run) -> None:
    config, preset = run.config, preset_of(run.config)
    teacher, teacher_cfg, teacher_params, meta = load_teacher(run)
    teacher_dir = teacher_dir_of(config)
    run.fingerprints["teacher"] = fingerprint.params_fingerprint(teacher_params)
    tagger = run.family == "cnn_lstm"
    mode = teacher_mode(config)
    layer_map = None
    if needs_intermediate(preset):
        if preset.attention_weight and run.model_cfg.heads(0) != teacher_cfg.heads(0):
            raise ConfigError(f"config.distill.preset={preset.name!r}: the student has {run.model_cfg.heads(0)} "
                              f"attention heads and the teacher {teacher_cfg.heads(0)}; TinyBERT's attention loss "
                              "matches head to head")
        widths = (run.model_cfg.hidden_size, teacher_cfg.hidden_size)
        if widths[0] != widths[1] and any(preset.weights[t] for t in ("hidden", "cos", "pkd")):
            add_projection(run, *widths)
        layer_map = parse_layer_map(config.distill.layer_map, preset, run.model_cfg.num_layers,
                                    teacher_cfg.num_layers)
        _check_layer_map(preset, layer_map, run.model_cfg.num_layers)
        run.output_kwargs["output_hidden_states"] = True
        run.output_kwargs["output_attentions"] = bool(preset.attention_weight)
    loss = tagger_loss(preset) if tagger else sequence_loss(preset, layer_map)

    def has_label(batch, step):
        rows = len(batch["example_weight"])
        return {"has_label": batch["has_label"] if "has_label" in batch else np.ones(rows, np.int32)}

    run.batch_fields.append(has_label)
    if mode == "cached":
        splits = run.teacher_rows
        n = sum(len(x) for x in splits)
        shape = (n, run.task.train.buckets[-1], run.task.num_labels) if tagger else (n, run.task.num_labels)
        logits = cached_teacher_logits(
            os.path.join(run.workdir, "teacher_logits.npz"), transfer_key(teacher_params, splits),
            lambda: np.concatenate([teacher_logits(teacher.apply, teacher_params, x, progress_bar=config.progress_bar,
                                                   word_level=tagger) for x in splits]), shape)

        def cached(batch, step):
            rows = logits[batch["example_index"]]  # token tasks: [B, max_length, C] -> the batch's width
            return {"teacher_logits": rows[:, :batch["word_mask"].shape[1]] if tagger else rows}

        run.batch_fields.append(cached)
        run.task_loss = lambda out, tree, batch, extras: loss(out, batch["teacher_logits"], batch)
    else:
        dtype = jnp.bfloat16 if config.distill.teacher_precision == "bfloat16" else jnp.float32
        run.extras[TEACHER] = precision.cast_floating(teacher_params, dtype)
        teacher_apply = precision.policy(config.distill.teacher_precision).wrap(teacher.apply)
        teacher_kwargs = dict(run.output_kwargs)

        def live(out, tree, batch, extras):
            t_out = trainer.model_outputs(teacher_apply, jax.lax.stop_gradient(extras[TEACHER]), {}, batch,
                                          train=False, **teacher_kwargs)
            t_out = jax.tree.map(lambda x: x.astype(jnp.float32), t_out)
            return loss(out, t_out if layer_map is not None else t_out.logits, batch, tree.get(PROJECTION))

        run.task_loss = live
    run.results["distill"] = {"preset": preset.name, "teacher_dir": teacher_dir, "teacher": mode,
                              "teacher_eval": meta.get("eval", {}),
                              **({"layer_map": {str(k): v for k, v in layer_map.items()}} if layer_map else {})}
    logging.info("distillation: preset %s from %s (%s teacher)", preset.name, teacher_dir, mode)


TECHNIQUE = Technique("distill", section=section, constraints=CONSTRAINTS,
                      active=lambda c: c.distill.preset != "none", check=_check, setup=_setup)
