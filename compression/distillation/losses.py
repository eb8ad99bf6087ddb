"""Distillation losses: pure functions of model outputs with explicit normalisation and masking.

Every loss computes in float32, applies ``jax.lax.stop_gradient`` to the teacher's arrays (gradients
reach the student only, whatever the caller does), and takes an optional ``mask`` over its row axes
(1 = counts, 0 = padding; floats act as weights): [B] for per-example outputs, [B, S] for per-token ones.
Masked entries never enter the loss, whatever their values.

Normalisation is an explicit ``reduction`` argument, because the reference implementations disagree and
porting a recipe with the wrong one silently rescales its loss weights:

* ``"sum"``: the sum over every counted element;
* ``"batchmean"``: the sum divided by the number of counted rows (examples, or tokens for [B, S, C]
  inputs) -- PyTorch's ``KLDivLoss(reduction="batchmean")``, as in DistilBERT and Hinton et al.;
* ``"mean"``: the sum divided by the number of counted elements (rows x feature size) -- PyTorch's
  elementwise ``"mean"``: TinyBERT's ``soft_cross_entropy`` (``.mean()`` over B x C), PKD's
  ``KLDivLoss()`` (default ``"mean"``), ``nn.MSELoss()``;
* ``"mean_all"``: the sum divided by every element, masked ones included -- TinyBERT's attention and
  hidden-state MSE, which zero (or keep) padded entries but still count them in the denominator. With a
  mask this keeps TinyBERT's per-entry weight; without padding it equals ``"mean"``.

The temperature-softened losses (Hinton et al.) are ``kind="kl"``, ``KL(p_T || p_S) = sum_c p_T,c (log
p_T,c - log p_S,c)``, or ``kind="soft_ce"``, ``-sum_c p_T,c log p_S,c``, with ``p = softmax(z / T)``. They
differ by the teacher's entropy, a constant for the student, so their gradients are equal; their values
(what gets logged) are not. ``t_squared=True`` multiplies by ``T^2`` (Hinton et al., DistilBERT, PKD) so that
the gradient magnitude does not shrink as ``1/T^2``; TinyBERT and TextBrewer do not.

Token-level distillation for taggers (Izsak et al.) is the same call on [B, S, C] logits with a [B, S]
token mask.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from compression.distillation.projections import ProjectionLike, apply_projection

Reduction = Literal["sum", "batchmean", "mean", "mean_all"]
REDUCTIONS = ("sum", "batchmean", "mean", "mean_all")
KD_KINDS = ("kl", "soft_ce")
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------
# Checks and reductions


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_temperature(temperature) -> None:
    """Raises if a concrete temperature is not a positive finite scalar (traced ones pass: schedules)."""
    if not _is_concrete(temperature):
        return
    t = np.asarray(temperature)
    if t.ndim != 0:
        raise ValueError(f"temperature must be a scalar, got shape {t.shape}")
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be > 0, got {float(t)}")


def _check_reduction(reduction: str, allowed: Sequence[str], what: str) -> None:
    if reduction not in allowed:
        raise ValueError(f"{what}: unknown reduction {reduction!r}; allowed: {', '.join(allowed)}")


def _check_same_shape(student: jax.Array, teacher: jax.Array, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")


def _check_logits(student: jax.Array, teacher: jax.Array, what: str) -> None:
    if student.ndim < 2:
        raise ValueError(f"{what}: logits must be [B, C] or [B, S, C], got student shape {tuple(student.shape)}")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"{what}: teacher and student label sets differ: student logits have "
                         f"{student.shape[-1]} classes (shape {tuple(student.shape)}), teacher logits "
                         f"{teacher.shape[-1]} (shape {tuple(teacher.shape)})")
    _check_same_shape(student, teacher, what)


def _row_mask(mask, row_shape: tuple[int, ...], what: str) -> jax.Array:
    """The mask as float32 of ``row_shape`` (ones when ``None``)."""
    if mask is None:
        return jnp.ones(row_shape, jnp.float32)
    mask = jnp.asarray(mask)
    if mask.shape != row_shape:
        raise ValueError(f"{what}: mask shape {tuple(mask.shape)} does not match the row axes "
                         f"{tuple(row_shape)} of the inputs")
    return mask.astype(jnp.float32)


def _safe_div(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count``, 0 when nothing is counted."""
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def _reduce(values: jax.Array, row_weight: jax.Array, reduction: str) -> jax.Array:
    """Reduces per-element ``values`` [*rows, *features] under ``row_weight`` [*rows] (see module doc)."""
    extra = values.ndim - row_weight.ndim
    w = row_weight.reshape(row_weight.shape + (1,) * extra)
    total = jnp.sum(jnp.where(w > 0, values, 0.0) * w)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return _safe_div(total, jnp.sum(row_weight))
    if reduction == "mean":
        per_row = int(np.prod(values.shape[row_weight.ndim:], dtype=np.int64))
        return _safe_div(total, jnp.sum(row_weight) * per_row)
    return total / values.size  # mean_all


def _teacher(x) -> jax.Array:
    """Teacher arrays: float32, no gradient."""
    return jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))


def _student(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _squared_error(s, t, row_weight, *, reduction):
    return _reduce((s - t) ** 2, row_weight, reduction)


# ---------------------------------------------------------------------------------------------------------
# Output-layer losses


def kd_loss(student_logits, teacher_logits, temperature, *, kind: Literal["kl", "soft_ce"] = "kl",
            t_squared: bool, reduction: Reduction = "batchmean", mask=None) -> jax.Array:
    """Soft-target loss on temperature-softened logits (Hinton et al.); see the module doc.

    Args:
      student_logits, teacher_logits: [B, C] or [B, S, C] (same shape, same label set).
      temperature: T > 0; a Python number or a (possibly traced, for schedules) scalar.
      kind: ``"kl"`` (KL(p_T || p_S); DistilBERT, PKD, Hinton) or ``"soft_ce"`` (TinyBERT, TextBrewer).
      t_squared: multiply by T^2 (DistilBERT, PKD, Hinton) or not (TinyBERT, TextBrewer). No default: say it.
      reduction: ``"batchmean"`` (sum over classes, mean over counted rows), ``"mean"`` (also over classes),
        ``"sum"``.
      mask: [B] or [B, S] (the row axes), 1 = counts.

    Returns: float32 scalar.
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kd_loss: unknown kind {kind!r}; allowed: {', '.join(KD_KINDS)}")
    if not isinstance(t_squared, bool):
        raise TypeError(f"kd_loss: t_squared must be True or False, got {t_squared!r}")
    _check_reduction(reduction, ("sum", "batchmean", "mean"), "kd_loss")
    check_temperature(temperature)
    s, t = _student(student_logits), _teacher(teacher_logits)
    _check_logits(s, t, "kd_loss")
    return _kd_core(s, t, jnp.asarray(temperature, jnp.float32), _row_mask(mask, s.shape[:-1], "kd_loss"),
                    kind=kind, t_squared=t_squared, reduction=reduction)


@functools.partial(jax.jit, static_argnames=("kind", "t_squared", "reduction"))
def _kd_core(s, t, temp, row_weight, *, kind, t_squared, reduction):
    log_p_s = jax.nn.log_softmax(s / temp, axis=-1)
    log_p_t = jax.nn.log_softmax(t / temp, axis=-1)
    p_t = jnp.exp(log_p_t)
    per_class = p_t * (log_p_t - log_p_s) if kind == "kl" else -p_t * log_p_s
    loss = _reduce(per_class, row_weight, reduction)
    return loss * temp ** 2 if t_squared else loss


def logit_mse(student_logits, teacher_logits, mask=None, *, reduction: Reduction = "mean") -> jax.Array:
    """Squared error between raw logits, no temperature (Tang et al.; XtremeDistil).

    Args:
      student_logits, teacher_logits: [B, C] or [B, S, C].
      mask: [B] or [B, S], 1 = counts.
      reduction: ``"mean"`` (over counted rows x classes: ``nn.MSELoss()``, Keras ``mse``),
        ``"batchmean"`` (sum over classes, mean over rows: Tang et al.'s ``||z_T - z_S||^2`` per example, and
        DistilBERT's ``alpha_mse`` term), ``"sum"``.

    Returns: float32 scalar.
    """
    _check_reduction(reduction, ("sum", "batchmean", "mean"), "logit_mse")
    s, t = _student(student_logits), _teacher(teacher_logits)
    _check_logits(s, t, "logit_mse")
    return _squared_error(s, t, _row_mask(mask, s.shape[:-1], "logit_mse"), reduction=reduction)


def cross_entropy(logits, labels, mask=None, *, reduction: Literal["mean", "sum"] = "mean",
                  ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Hard-label cross-entropy. logits [B, C] / [B, S, C]; labels int [B] / [B, S].

    Labels equal to ``ignore_index`` (-100: padding, continuation sub-tokens) and rows with mask 0 do not
    count. ``"mean"`` divides by the counted rows (``F.cross_entropy``'s default), ``"sum"`` does not.
    """
    _check_reduction(reduction, ("sum", "mean"), "cross_entropy")
    logits = _student(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 2 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: labels shape {tuple(labels.shape)} must equal the logits' row axes "
                         f"{tuple(logits.shape[:-1])} (logits shape {tuple(logits.shape)})")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"cross_entropy: labels must be integers, got {labels.dtype}")
    if _is_concrete(labels):
        lab = np.asarray(labels)
        lab = lab[lab != ignore_index]
        if lab.size and (lab.min() < 0 or lab.max() >= logits.shape[-1]):
            raise ValueError(f"cross_entropy: labels outside [0, {logits.shape[-1]}): min {lab.min()}, "
                             f"max {lab.max()} (ignore_index={ignore_index})")
    return _cross_entropy_core(logits, labels, _row_mask(mask, labels.shape, "cross_entropy"),
                               ignore_index=ignore_index, reduction="batchmean" if reduction == "mean" else "sum")


@functools.partial(jax.jit, static_argnames=("ignore_index", "reduction"))
def _cross_entropy_core(logits, labels, row_weight, *, ignore_index, reduction):
    valid = labels != ignore_index
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return _reduce(nll, row_weight * valid.astype(jnp.float32), reduction)


def combined(kd, ce, alpha) -> jax.Array:
    """``alpha * kd + (1 - alpha) * ce`` (Hinton et al.; PKD's ``alpha``; DistilBERT fine-tuning at 0.5)."""
    if _is_concrete(alpha) and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"combined: alpha must be in [0, 1], got {float(alpha)}")
    return alpha * kd + (1.0 - alpha) * ce


# ---------------------------------------------------------------------------------------------------------
# Intermediate-layer losses


def _check_hidden(student: jax.Array, teacher: jax.Array, what: str) -> None:
    if student.shape[:-1] == teacher.shape[:-1] and student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"{what}: student width {student.shape[-1]} != teacher width {teacher.shape[-1]} "
                         f"(student shape {tuple(student.shape)}, teacher shape {tuple(teacher.shape)}); "
                         "pass a projection (TinyBERT's W_h) to map the student to the teacher's width")
    _check_same_shape(student, teacher, what)


def hidden_mse(student_h, teacher_h, projection: ProjectionLike | None = None, mask=None, *,
               reduction: Reduction = "mean") -> jax.Array:
    """MSE between hidden states (or embeddings), through a learned projection when widths differ (TinyBERT).

    Args:
      student_h: [B, S, H_S] (or [B, H_S]); teacher_h: [B, S, H_T] (or [B, H_T]).
      projection: maps H_S -> H_T (see :mod:`compression.distillation.projections`); needed iff the
        widths differ.
      mask: [B, S] (or [B]), 1 = real token.
      reduction: ``"mean"`` (over counted tokens x H_T; TextBrewer's ``hid_mse_loss`` with a mask),
        ``"mean_all"`` (over all B x S x H_T; TinyBERT, whose ``MSELoss()`` counts padded positions),
        ``"batchmean"`` (sum over H_T, mean over tokens), ``"sum"``.

    Returns: float32 scalar.
    """
    _check_reduction(reduction, REDUCTIONS, "hidden_mse")
    s, t = _student(student_h), _teacher(teacher_h)
    if s.ndim not in (2, 3):
        raise ValueError(f"hidden_mse: hidden states must be [B, S, H] or [B, H], got student shape "
                         f"{tuple(s.shape)}")
    s = apply_projection(projection, s)
    _check_hidden(s, t, "hidden_mse")
    return _squared_error(s, t, _row_mask(mask, s.shape[:-1], "hidden_mse"), reduction=reduction)


def hidden_cosine(student_h, teacher_h, mask=None, *, projection: ProjectionLike | None = None,
                  reduction: Literal["mean", "sum"] = "mean", eps: float = 1e-12) -> jax.Array:
    """DistilBERT's cosine embedding loss with target 1: ``1 - cos(h_S, h_T)`` per counted token.

    Args:
      student_h, teacher_h: [B, S, H] (or [B, H]); DistilBERT uses the last layer's states.
      mask: [B, S] (or [B]), 1 = real token (DistilBERT selects tokens with the attention mask).
      reduction: ``"mean"`` over counted tokens (``CosineEmbeddingLoss(reduction="mean")``) or ``"sum"``.
      eps: added to both squared norms, as PyTorch does, so zero vectors give cos = 0.

    Returns: float32 scalar.
    """
    _check_reduction(reduction, ("sum", "mean"), "hidden_cosine")
    s, t = _student(student_h), _teacher(teacher_h)
    s = apply_projection(projection, s)
    _check_hidden(s, t, "hidden_cosine")
    return _cosine_core(s, t, _row_mask(mask, s.shape[:-1], "hidden_cosine"), eps=eps,
                        reduction="batchmean" if reduction == "mean" else "sum")


@functools.partial(jax.jit, static_argnames=("eps", "reduction"))
def _cosine_core(s, t, row_weight, *, eps, reduction):
    cos = jnp.sum(s * t, -1) / jnp.sqrt((jnp.sum(s * s, -1) + eps) * (jnp.sum(t * t, -1) + eps))
    return _reduce(1.0 - cos, row_weight, reduction)


def attention_score_mse(student_scores, teacher_scores, mask=None, *,
                        reduction: Literal["mean", "mean_all", "sum"] = "mean",
                        heads: Literal["match", "average"] = "match", mask_queries: bool = True) -> jax.Array:
    """TinyBERT's attention loss: MSE between pre-softmax attention scores, padded entries zeroed.

    The scores are those of :class:`models.transformer.TransformerOutput` (``attention_scores``: scaled by
    1/sqrt(D), before the padding mask is added). TinyBERT's scores already hold the additive mask and it
    zeroes entries below -100 on both sides, i.e. the padded *keys*; here the mask does that explicitly.

    Args:
      student_scores, teacher_scores: [B, N, S, S] (batch, heads, query, key).
      mask: [B, S], 1 = real token. Entry (q, k) counts iff both q and k are real (``mask_queries=True``);
        with ``mask_queries=False`` only padded keys are zeroed and padded query rows count, exactly as in
        TinyBERT (whose padded query rows are the pad token's attention, noise for the student).
      reduction: ``"mean"`` over counted entries (N x sum_b len_b^2 with a mask: TextBrewer's
        ``att_mse_loss``), ``"mean_all"`` over all B x N x S x S entries (TinyBERT's ``MSELoss()`` after
        zeroing), ``"sum"``.
      heads: ``"match"``: head h of the student against head h of the teacher (TinyBERT: same head count);
        ``"average"``: average the scores over heads on each side first, so students with fewer heads can
        learn the teacher's mean attention pattern (TextBrewer's ``att_mse_sum`` sums over heads; the mean
        is the same up to a constant factor per side). N is then 1 in the reductions.

    Returns: float32 scalar.
    """
    _check_reduction(reduction, ("sum", "mean", "mean_all"), "attention_score_mse")
    if heads not in ("match", "average"):
        raise ValueError(f"attention_score_mse: unknown heads={heads!r}; allowed: match, average")
    s, t = _student(student_scores), _teacher(teacher_scores)
    if s.ndim != 4 or t.ndim != 4 or s.shape[-1] != s.shape[-2]:
        raise ValueError(f"attention_score_mse: scores must be [B, N, S, S], got student shape "
                         f"{tuple(s.shape)}, teacher shape {tuple(t.shape)}")
    same_but_heads = (s.shape[0], *s.shape[2:]) == (t.shape[0], *t.shape[2:])
    if heads == "match" and same_but_heads and s.shape[1] != t.shape[1]:
        raise ValueError(f"attention_score_mse: the student has {s.shape[1]} heads and the teacher "
                         f"{t.shape[1]} (student shape {tuple(s.shape)}, teacher shape {tuple(t.shape)}); "
                         "use heads='average' or a student with the teacher's head count")
    if not same_but_heads:
        _check_same_shape(s, t, "attention_score_mse")
    m = _row_mask(mask, (s.shape[0], s.shape[2]), "attention_score_mse")
    return _attention_core(s, t, m, reduction=reduction, average_heads=heads == "average",
                           mask_queries=mask_queries)


@functools.partial(jax.jit, static_argnames=("reduction", "average_heads", "mask_queries"))
def _attention_core(s, t, m, *, reduction, average_heads, mask_queries):
    if average_heads:
        s, t = s.mean(axis=1, keepdims=True), t.mean(axis=1, keepdims=True)
    pair = (m[:, :, None] if mask_queries else jnp.ones_like(m)[:, :, None]) * m[:, None, :]  # [B, Sq, Sk]
    values = jnp.moveaxis((s - t) ** 2, 1, -1)  # [B, Sq, Sk, N]: rows are (query, key) pairs
    return _reduce(values, pair, reduction)


def pkd_loss(student_cls_states, teacher_cls_states, mask=None, *,
             reduction: Literal["mean", "batchmean", "sum"] = "mean", normalize: bool = True,
             projection: ProjectionLike | None = None, eps: float = 1e-12) -> jax.Array:
    """Patient KD: squared distance between L2-normalised [CLS] states of mapped intermediate layers.

    Args:
      student_cls_states, teacher_cls_states: [B, L, H] (L mapped layer pairs, stacked on axis 1, the
        layout of PKD's ``patience`` tensors) or a sequence of L arrays [B, H].
      mask: [B], 1 = real example.
      reduction: ``"mean"``: over counted examples x L x H, as PKD's released code does
        (``F.mse_loss`` over the [B, L, H] patience tensor; its beta grid 10..1000 is tuned for this);
        ``"batchmean"``: summed over layers and units, mean over examples -- the paper's equation
        (sum over layers of ``||h_S/|h_S| - h_T/|h_T|||^2``) and TextBrewer's ``pkd_loss`` summed over
        matches; ``"sum"``. The two conventions differ by a factor L x H: porting PKD's beta needs "mean".
      normalize: L2-normalise each state (PKD's ``--normalize_patience``; the paper's loss). ``False``
        compares raw states.
      projection: optional map of the student width to the teacher's (TextBrewer allows one).
      eps: floor on the norm (``F.normalize``).

    Returns: float32 scalar.
    """
    _check_reduction(reduction, ("sum", "batchmean", "mean"), "pkd_loss")

    def stack(x):
        if isinstance(x, (list, tuple)):
            if not x:
                raise ValueError("pkd_loss: no layers to match (empty sequence of [CLS] states)")
            return jnp.stack([jnp.asarray(a, jnp.float32) for a in x], axis=1)
        return jnp.asarray(x, jnp.float32)

    s, t = stack(student_cls_states), jax.lax.stop_gradient(stack(teacher_cls_states))
    if s.ndim != 3 or t.ndim != 3:
        raise ValueError(f"pkd_loss: [CLS] states must be [B, L, H] or L arrays [B, H], got student shape "
                         f"{tuple(s.shape)}, teacher shape {tuple(t.shape)}")
    s = apply_projection(projection, s)
    _check_hidden(s, t, "pkd_loss")
    return _pkd_core(s, t, _row_mask(mask, s.shape[:1], "pkd_loss"), normalize=normalize, eps=eps,
                     reduction=reduction)


@functools.partial(jax.jit, static_argnames=("normalize", "eps", "reduction"))
def _pkd_core(s, t, row_weight, *, normalize, eps, reduction):
    if normalize:
        s = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), eps)
        t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), eps)
    return _reduce((s - t) ** 2, row_weight, reduction)
