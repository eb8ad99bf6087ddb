"""Named distillation recipes with each reference implementation's normalisation, and the loss they define.

A :class:`Preset` is data: temperature, the soft-target loss and its reduction, whether ``T^2`` multiplies
it, the weight of every term, the intermediate losses' reductions and the default layer map.
:func:`distill_loss` turns a preset and the two models' outputs into ``(loss, aux)``::

    preset = get_preset("pkd", temperature=5.0)
    loss, aux = distill_loss(preset, student_out, teacher_out, batch)   # aux: each term, unweighted

The total is ``sum_term weight_term * term`` over the terms ``kd`` (soft targets), ``ce`` (hard labels),
``cos`` (DistilBERT's cosine on the last hidden states), ``hidden`` (TinyBERT's hidden/embedding MSE),
``attention`` (TinyBERT's attention-score MSE) and ``pkd`` (Patient KD). A term whose weight is 0 is not
computed, so a logits-only preset needs no hidden states. ``temperature=`` and ``weights=`` arguments
override the preset per call and may be traced values (schedules inside a jitted step).

What each preset reproduces (see each ``note``; the reference code was read, not copied):

* ``hinton``: KL on softened logits x T^2, mean over the batch. Hinton et al. fix no values; they report
  best results with a much lower weight on the hard-label term: T = 4, kd 0.9, ce 0.1.
* ``distilbert``: the task-specific distillation of the DistilBERT scripts (``run_squad_w_distillation``):
  ``KLDivLoss(batchmean)`` x T^2 (which the distiller calls ``loss_ce``), T = 2, ``alpha_ce`` 0.5 on it and
  0.5 on the task's cross-entropy.
* ``distilbert_mlm``: the pre-training distiller: the same KL x T^2 over the attention-mask-selected tokens
  (batchmean = per selected token), ``alpha_ce`` 5, ``alpha_mlm`` 2 (the ``ce`` term on MLM labels),
  ``alpha_cos`` 1 (cosine on the last hidden states), T = 2.
* ``tinybert``: ``soft_cross_entropy`` (``.mean()`` over B x C, no T^2, T = 1) + attention-score MSE +
  hidden-state MSE through ``W_h`` including the embeddings (``mean_all``: TinyBERT's ``MSELoss()`` counts
  padded positions in the denominator), summed over uniformly mapped layers, all weights 1. TinyBERT trains
  these in two stages: ``tinybert_intermediate`` (attention + hidden) then ``tinybert_prediction`` (soft
  CE); ``tinybert`` is their sum.
* ``pkd`` / ``pkd_last``: ``alpha * T^2 * KLDivLoss()(mean over B x C) + (1 - alpha) * CE + beta * patience``
  with the patience loss PKD's code computes (``F.mse_loss`` of normalised [CLS] states: mean over
  B x layers x H), PKD-skip / PKD-last maps. T = 10, alpha = 0.5, beta = 100 (from PKD's grid).
* ``tang``: MSE on raw logits, ``||z_T - z_S||^2`` per example averaged over the batch (the paper's
  equation), distillation only (alpha = 0: the augmented transfer set has no gold labels).
* ``textbrewer``: TextBrewer's ``DistillationConfig`` defaults: soft CE (sum over classes, mean over the
  batch), no T^2, T = 4, ``kd_loss_weight`` 1, ``hard_label_weight`` 0.

Departures from the references, on purpose: padding never enters any term. DistilBERT, TextBrewer and the
losses here select real tokens; TinyBERT counts padded positions in its denominators (kept, via
``mean_all``) and compares padded rows' values (dropped: noise for the student).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from compression.distillation import layer_maps, losses
from compression.distillation.projections import ProjectionLike, apply_projection

TERMS = ("kd", "ce", "cos", "hidden", "attention", "pkd")
KD_KINDS = ("kl", "soft_ce", "mse")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A distillation recipe. Weights multiply the unweighted terms returned in ``aux``."""

    name: str
    temperature: float  # T > 0 for the softened losses (ignored by kd_kind="mse")
    kd_kind: Literal["kl", "soft_ce", "mse"]  # soft-target loss: KL, soft cross-entropy, or logit MSE
    t_squared: bool  # multiply the softened loss by T^2
    kd_reduction: str  # see compression.distillation.losses: batchmean | mean | sum
    kd_weight: float  # weight of the soft-target term
    ce_weight: float  # weight of the hard-label cross-entropy
    cos_weight: float = 0.0  # DistilBERT cosine loss on the last hidden states
    hidden_weight: float = 0.0  # hidden-state (and embedding) MSE over mapped layers, summed
    hidden_reduction: str = "mean"  # mean | mean_all | batchmean | sum
    attention_weight: float = 0.0  # attention-score MSE over mapped layers, summed
    attention_reduction: str = "mean"  # mean | mean_all | sum
    attention_heads: Literal["match", "average"] = "match"
    pkd_weight: float = 0.0  # PKD's beta
    pkd_reduction: str = "mean"  # mean (PKD code) | batchmean (paper, TextBrewer) | sum
    pkd_normalize: bool = True  # L2-normalise the [CLS] states
    layer_map: str = "uniform"  # default map for intermediate terms: uniform | skip | last
    match_embeddings: bool = False  # include 0 -> 0 (embedding outputs) in the hidden-state term
    note: str = ""  # what the preset reproduces

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature <= 0:
            raise ValueError(f"preset {self.name!r}: temperature must be > 0, got {self.temperature!r}")
        if self.kd_kind not in KD_KINDS:
            raise ValueError(f"preset {self.name!r}: unknown kd_kind {self.kd_kind!r}; allowed: "
                             f"{', '.join(KD_KINDS)}")
        if self.kd_kind == "mse" and self.t_squared:
            raise ValueError(f"preset {self.name!r}: kd_kind='mse' uses no temperature; t_squared must be False")
        allowed = {"kd_reduction": ("batchmean", "mean", "sum"),
                   "hidden_reduction": losses.REDUCTIONS,
                   "attention_reduction": ("mean", "mean_all", "sum"),
                   "pkd_reduction": ("batchmean", "mean", "sum"),
                   "attention_heads": ("match", "average"),
                   "layer_map": layer_maps.KINDS}
        for field, values in allowed.items():
            if getattr(self, field) not in values:
                raise ValueError(f"preset {self.name!r}: unknown {field}={getattr(self, field)!r}; "
                                 f"allowed: {', '.join(values)}")
        for term in TERMS:
            w = getattr(self, f"{term}_weight")
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"preset {self.name!r}: {term}_weight must be a finite number >= 0, got {w!r}")

    @property
    def weights(self) -> dict[str, float]:
        """``{term: weight}`` for every term."""
        return {term: getattr(self, f"{term}_weight") for term in TERMS}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("hinton", temperature=4.0, kd_kind="kl", t_squared=True, kd_reduction="batchmean",
           kd_weight=0.9, ce_weight=0.1,
           note="Hinton et al. 2015: KL x T^2, low weight on hard labels"),
    Preset("distilbert", temperature=2.0, kd_kind="kl", t_squared=True, kd_reduction="batchmean",
           kd_weight=0.5, ce_weight=0.5,
           note="DistilBERT task distillation: KLDivLoss(batchmean) x T^2, alpha_ce 0.5, task CE 0.5, T 2"),
    Preset("distilbert_mlm", temperature=2.0, kd_kind="kl", t_squared=True, kd_reduction="batchmean",
           kd_weight=5.0, ce_weight=2.0, cos_weight=1.0,
           note="DistilBERT pre-training distiller: alpha_ce 5, alpha_mlm 2, alpha_cos 1, T 2"),
    Preset("tinybert", temperature=1.0, kd_kind="soft_ce", t_squared=False, kd_reduction="mean",
           kd_weight=1.0, ce_weight=0.0, hidden_weight=1.0, hidden_reduction="mean_all",
           attention_weight=1.0, attention_reduction="mean_all", layer_map="uniform", match_embeddings=True,
           note="TinyBERT: soft CE mean over B x C, no T^2; attention-score and hidden MSE (mean_all), "
                "uniform map with embeddings; both stages summed"),
    Preset("tinybert_intermediate", temperature=1.0, kd_kind="soft_ce", t_squared=False, kd_reduction="mean",
           kd_weight=0.0, ce_weight=0.0, hidden_weight=1.0, hidden_reduction="mean_all",
           attention_weight=1.0, attention_reduction="mean_all", layer_map="uniform", match_embeddings=True,
           note="TinyBERT stage 1 (intermediate-layer distillation): attention + hidden MSE"),
    Preset("tinybert_prediction", temperature=1.0, kd_kind="soft_ce", t_squared=False, kd_reduction="mean",
           kd_weight=1.0, ce_weight=0.0,
           note="TinyBERT stage 2 (prediction-layer distillation): soft CE mean over B x C"),
    Preset("pkd", temperature=10.0, kd_kind="kl", t_squared=True, kd_reduction="mean",
           kd_weight=0.5, ce_weight=0.5, pkd_weight=100.0, pkd_reduction="mean", layer_map="skip",
           note="Patient KD (PKD-skip): alpha T^2 KLDivLoss(mean) + (1-alpha) CE + beta MSE(normalised CLS)"),
    Preset("pkd_last", temperature=10.0, kd_kind="kl", t_squared=True, kd_reduction="mean",
           kd_weight=0.5, ce_weight=0.5, pkd_weight=100.0, pkd_reduction="mean", layer_map="last",
           note="Patient KD (PKD-last)"),
    Preset("tang", temperature=1.0, kd_kind="mse", t_squared=False, kd_reduction="batchmean",
           kd_weight=1.0, ce_weight=0.0,
           note="Tang et al. 2019: ||z_T - z_S||^2 per example, batch mean, distillation only"),
    Preset("textbrewer", temperature=4.0, kd_kind="soft_ce", t_squared=False, kd_reduction="batchmean",
           kd_weight=1.0, ce_weight=0.0,
           note="TextBrewer DistillationConfig defaults: kd_ce_loss, T 4, kd weight 1, hard-label weight 0"),
)}


def get_preset(name: str, **overrides) -> Preset:
    """The named preset, with fields replaced by ``overrides`` (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"unknown distillation preset {name!r}; known: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown preset field(s) {unknown}; fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------------------
# The loss a preset defines


def _field(out: Any, name: str):
    """``out.name`` for model outputs, ``out[name]`` for mappings; a bare array is the logits."""
    if isinstance(out, Mapping):
        return out.get(name)
    if isinstance(out, (jax.Array, np.ndarray)):
        return out if name == "logits" else None
    return getattr(out, name, None)


def _is_zero(w) -> bool:
    return not isinstance(w, jax.core.Tracer) and float(np.asarray(w)) == 0.0


def _projection_for(projections, layer: int):
    """One shared projection, or the one of ``layer`` from a per-layer mapping ``{student_layer: proj}``."""
    if isinstance(projections, Mapping) and projections and all(isinstance(k, int) for k in projections):
        if layer not in projections:
            raise ValueError(f"no projection for student layer {layer}; given for layers {sorted(projections)}")
        return projections[layer]
    return projections


def _needs(out: Any, name: str, who: str, term: str, preset: Preset, hint: str):
    value = _field(out, name)
    if value is None:
        raise ValueError(f"preset {preset.name!r}, term {term!r}: the {who} output has no {name}; {hint}")
    return value


def _layer_pairs(preset: Preset, layer_map, n_student: int, n_teacher: int) -> dict[int, int]:
    if layer_map is None:
        return layer_maps.build(preset.layer_map, n_student, n_teacher, include_embeddings=preset.match_embeddings)
    return layer_maps.validate(layer_map, n_student, n_teacher)


def distill_loss(preset: Preset, student_out: Any, teacher_out: Any, batch: Mapping[str, Any], *,
                 layer_map: Mapping[int, int] | None = None,
                 projections: ProjectionLike | Mapping[int, ProjectionLike] | None = None,
                 mask_key: str = "attention_mask", temperature=None,
                 weights: Mapping[str, Any] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The preset's weighted loss and each unweighted term.

    Args:
      preset: a :class:`Preset`.
      student_out, teacher_out: model outputs with ``logits`` ([B, C] or [B, S, C]) and, for intermediate
        terms, ``hidden_states`` (L + 1 arrays [B, S, H], embeddings first) and ``attention_scores`` (L
        arrays [B, N, S, S]) -- :class:`models.transformer.TransformerOutput`, the LSTM outputs, a mapping
        with those keys, or (teacher only) a bare logits array, e.g. precomputed. Teacher values get no
        gradient.
      batch: ``labels`` (int [B] or [B, S], -100 = ignore) for the ``ce`` term; ``batch[mask_key]``
        ([B, S], 1 = real token) for token-level logits and intermediate terms; optional
        ``example_weight`` [B] (0 for padding rows), applied to every term.
      layer_map: student -> teacher hidden-state indices (see :mod:`compression.distillation.layer_maps`);
        default: the preset's ``layer_map`` kind for the two depths.
      projections: student -> teacher width map for ``hidden`` (and ``cos``/``pkd``): one shared (TinyBERT's
        ``W_h``) or ``{student_layer: projection}``. Needed only when widths differ.
      mask_key: the batch key of the token mask (``"word_mask"`` for word-level LSTM taggers).
      temperature: overrides ``preset.temperature``; may be traced (temperature schedules).
      weights: ``{term: weight}`` overriding the preset's weights; may be traced (weight schedules).

    Returns: ``(loss, aux)``: float32 scalar, and ``{term: unweighted value}`` for every computed term.
    """
    if not isinstance(preset, Preset):
        raise TypeError(f"preset must be a Preset (see get_preset), got {type(preset).__name__}")
    w = preset.weights
    if weights is not None:
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown} in weights; terms: {', '.join(TERMS)}")
        w.update(weights)
    temp = preset.temperature if temperature is None else temperature
    losses.check_temperature(temp)
    active = [term for term in TERMS if not _is_zero(w[term])]
    if not active:
        raise ValueError(f"preset {preset.name!r}: every term has weight 0")

    s_logits = _field(student_out, "logits")
    t_logits = _field(teacher_out, "logits")
    example_weight = batch.get("example_weight")
    token_mask = batch.get(mask_key)
    if token_mask is not None and example_weight is not None:
        token_mask = jnp.asarray(token_mask, jnp.float32) * jnp.asarray(example_weight, jnp.float32)[:, None]

    def output_mask(logits):
        if logits.ndim == 2:
            return example_weight
        if token_mask is None:
            raise ValueError(f"token-level logits {tuple(logits.shape)} need a token mask: batch[{mask_key!r}] "
                             "is missing (set mask_key)")
        return token_mask

    def intermediate_mask(term):
        if token_mask is None:
            raise ValueError(f"preset {preset.name!r}, term {term!r} needs the token mask batch[{mask_key!r}] "
                             "(1 = real token); it is missing (set mask_key)")
        return token_mask

    aux: dict[str, jax.Array] = {}
    if "kd" in active:
        if s_logits is None or t_logits is None:
            raise ValueError(f"preset {preset.name!r}: the kd term needs student and teacher logits")
        s_logits, t_logits = jnp.asarray(s_logits), jnp.asarray(t_logits)
        mask = output_mask(s_logits)
        if preset.kd_kind == "mse":
            aux["kd"] = losses.logit_mse(s_logits, t_logits, mask, reduction=preset.kd_reduction)
        else:
            aux["kd"] = losses.kd_loss(s_logits, t_logits, temp, kind=preset.kd_kind, t_squared=preset.t_squared,
                                       reduction=preset.kd_reduction, mask=mask)
    if "ce" in active:
        if "labels" not in batch:
            raise ValueError(f"preset {preset.name!r}: the ce term (weight {w['ce']}) needs batch['labels']; "
                             "for unlabeled transfer data set ce_weight=0")
        logits = jnp.asarray(_needs(student_out, "logits", "student", "ce", preset, "the model has no head"))
        mask = output_mask(logits) if logits.ndim == 2 else token_mask
        aux["ce"] = losses.cross_entropy(logits, batch["labels"], mask)

    need_hidden = [t for t in ("cos", "hidden", "pkd") if t in active]
    if need_hidden or "attention" in active:
        hint = "call the model with output_hidden_states=True"
        if need_hidden:
            s_hs = _needs(student_out, "hidden_states", "student", need_hidden[0], preset, hint)
            t_hs = _needs(teacher_out, "hidden_states", "teacher", need_hidden[0], preset, hint)
            n_s, n_t = len(s_hs) - 1, len(t_hs) - 1
        if "attention" in active:
            hint = "call the model with output_attentions=True"
            s_sc = _needs(student_out, "attention_scores", "student", "attention", preset, hint)
            t_sc = _needs(teacher_out, "attention_scores", "teacher", "attention", preset, hint)
            if need_hidden and (len(s_sc), len(t_sc)) != (n_s, n_t):
                raise ValueError(f"attention_scores cover {len(s_sc)} student / {len(t_sc)} teacher layers but "
                                 f"hidden_states {n_s} / {n_t}")
            n_s, n_t = len(s_sc), len(t_sc)
        if any(t in active for t in ("hidden", "attention", "pkd")):
            pairs = _layer_pairs(preset, layer_map, n_s, n_t)

    if "cos" in active:
        aux["cos"] = losses.hidden_cosine(s_hs[-1], t_hs[-1], intermediate_mask("cos"),
                                          projection=_projection_for(projections, n_s))
    if "hidden" in active:
        mask = intermediate_mask("hidden")
        if not pairs:
            raise ValueError(f"preset {preset.name!r}: the layer map {pairs} matches no hidden states")
        aux["hidden"] = sum(losses.hidden_mse(s_hs[m], t_hs[n], _projection_for(projections, m), mask,
                                              reduction=preset.hidden_reduction) for m, n in pairs.items())
    if "attention" in active:
        mask = intermediate_mask("attention")
        att_pairs = {m: n for m, n in pairs.items() if m >= 1 and n >= 1}
        if not att_pairs:
            raise ValueError(f"preset {preset.name!r}: the layer map {pairs} matches no attention layers")
        aux["attention"] = sum(
            losses.attention_score_mse(s_sc[m - 1], t_sc[n - 1], mask, reduction=preset.attention_reduction,
                                       heads=preset.attention_heads) for m, n in att_pairs.items())
    if "pkd" in active:
        pkd_pairs = {m: n for m, n in pairs.items() if m >= 1}
        if not pkd_pairs:
            raise ValueError(f"preset {preset.name!r}: the layer map {pairs} matches no intermediate layers "
                             f"(a {n_s}-layer student has none under PKD's '{preset.layer_map}' map)")
        s_cls = [apply_projection(_projection_for(projections, m), s_hs[m][:, 0]) for m in pkd_pairs]
        t_cls = [t_hs[n][:, 0] for n in pkd_pairs.values()]
        aux["pkd"] = losses.pkd_loss(s_cls, t_cls, example_weight, reduction=preset.pkd_reduction,
                                     normalize=preset.pkd_normalize)
    loss = sum(w[term] * aux[term] for term in active)
    return jnp.asarray(loss, jnp.float32), aux
