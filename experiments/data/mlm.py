"""Masked-language-model inputs: which tokens a batch predicts, and what the model reads in their place.

:func:`mask_tokens` follows BERT's masking and the DistilBERT distiller's ``prepare_batch_mlm`` (read, not copied):

* a fraction ``rate`` (0.15) of each sequence's maskable tokens is chosen, without replacement: ``floor(rate * m +
  u)`` of its ``m`` maskable tokens with ``u`` uniform in [0, 1), an unbiased rounding of ``rate * m``;
* the choice is uniform over the maskable tokens, or proportional to ``token_weights[id]``: DistilBERT's
  frequency-smoothed masking gives token ``v`` the weight ``max(count_v, 1) ** -smoothing``
  (:func:`smoothed_weights`, smoothing 0.7), so rare tokens are predicted more often than frequent ones;
* each chosen token is replaced by ``[MASK]`` with probability ``mask_fraction`` (0.8), by a random token with
  probability ``random_fraction`` (0.1), and kept otherwise (BERT's 80/10/10 rule);
* special tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[MASK]``, ``[UNK]``) and padding are never chosen;
* labels hold the original id at chosen positions and -100 elsewhere.

Departures, on purpose. DistilBERT draws the count over the whole batch (``ceil(rate * tokens in the batch)``);
here it is drawn per sequence, so that every sequence has at most ``ceil(rate * max_length)`` predictions and the
MLM head runs on a fixed number of gathered positions per sequence (:func:`prediction_slots`; BERT's
``max_predictions_per_seq``) instead of the whole vocabulary at every position. The random replacement is drawn
among the non-special ids (DistilBERT and BERT draw from the whole vocabulary, so a ``[PAD]`` or ``[CLS]`` can
appear mid-sentence).

Masking is dynamic: the caller draws a fresh mask each time a sequence is read, from a generator seeded by
(seed, step) (:func:`step_rng`), so a resumed run draws the masks an uninterrupted one draws, whatever the
number of processes (each process masks the whole global batch and keeps its rows).

Weighted sampling without replacement uses the Efraimidis-Spirakis keys ``u ** (1 / w)`` (``log(u) / w``; the
largest ``n`` of a sequence win), which equals drawing one token at a time with probability proportional to its
weight among those not drawn yet, as ``torch.multinomial(..., replacement=False)`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

IGNORE = -100  # label of positions that are not predicted
SPECIAL_NAMES = ("cls", "sep", "pad", "mask", "unk")


def smoothed_weights(counts: np.ndarray, smoothing: float, special_ids: Sequence[int]) -> np.ndarray:
    """Per-vocabulary-id masking weights ``max(count, 1) ** -smoothing`` (float64 [V]), 0 at ``special_ids``.

    ``smoothing`` 0 gives uniform weights (BERT); DistilBERT uses 0.7.
    """
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    w = np.maximum(np.asarray(counts, np.float64), 1.0) ** -float(smoothing)
    w[np.asarray(list(special_ids), np.int64)] = 0.0
    return w


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator of the masks of global step ``step`` (``stream`` separates uses, e.g. held-out masks)."""
    return np.random.default_rng([int(seed), int(stream), int(step)])


def max_predictions(max_length: int, rate: float) -> int:
    """The most predictions a sequence of ``max_length`` tokens gets (its [CLS] and a [SEP] are never chosen)."""
    return max(1, math.ceil(rate * max(max_length - 2, 1) - 1e-9))


def mask_tokens(ids: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                random_ids: np.ndarray, rate: float = 0.15, mask_fraction: float = 0.8,
                random_fraction: float = 0.1, token_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Masks a batch for masked-language modelling (see the module docstring).

    Args:
      ids: int [B, S] token ids.
      maskable: bool [B, S], True where a token may be chosen (real, non-special tokens).
      rng: the draws' generator (:func:`step_rng`).
      mask_id: the ``[MASK]`` id.
      random_ids: int [K], the ids a random replacement is drawn from (uniformly).
      rate: the expected fraction of each sequence's maskable tokens that is chosen.
      mask_fraction, random_fraction: of the chosen tokens, the share replaced by ``[MASK]`` and by a random
        id; the rest is kept as it is.
      token_weights: float [V] choice weights by id (:func:`smoothed_weights`); None: uniform.

    Returns: ``(inputs int32 [B, S], labels int32 [B, S])``: the ids the model reads, and the original id at the
    chosen positions (-100 elsewhere).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1.0 + 1e-9:
        raise ValueError(f"mask_fraction={mask_fraction} and random_fraction={random_fraction} must be >= 0 and "
                         "sum to at most 1 (the rest is kept unchanged)")
    ids = np.asarray(ids)
    maskable = np.asarray(maskable, bool)
    if ids.shape != maskable.shape or ids.ndim != 2:
        raise ValueError(f"ids {ids.shape} and maskable {maskable.shape} must be the same [B, S] shape")
    weight = maskable.astype(np.float64)
    if token_weights is not None:
        weight = weight * np.asarray(token_weights, np.float64)[ids]
    u, v = rng.random(ids.shape), rng.random(ids.shape)
    count = np.floor(rate * maskable.sum(1) + rng.random(len(ids))).astype(np.int64)
    count = np.minimum(count, (weight > 0).sum(1))
    replacement = np.asarray(random_ids)[rng.integers(0, len(random_ids), ids.shape)]
    with np.errstate(divide="ignore"):
        keys = np.where(weight > 0, np.log(np.maximum(u, 1e-300)) / np.where(weight > 0, weight, 1.0), -np.inf)
    order = np.argsort(-keys, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(ids.shape[1])[None, :].repeat(len(ids), 0), axis=1)
    chosen = rank < count[:, None]
    labels = np.where(chosen, ids, IGNORE).astype(np.int32)
    inputs = np.where(chosen & (v < mask_fraction), mask_id, ids)
    inputs = np.where(chosen & (v >= mask_fraction) & (v < mask_fraction + random_fraction), replacement, inputs)
    return inputs.astype(np.int32), labels


def prediction_slots(labels: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """The predicted positions of each sequence gathered into ``slots`` fixed slots, in position order.

    Args:
      labels: int [B, S] from :func:`mask_tokens` (-100 where nothing is predicted).
      slots: slots per sequence (:func:`max_predictions`); a sequence with more predictions is an error.

    Returns: ``(positions int32 [B, slots], labels int32 [B, slots])``; unused slots point at position 0 with
    label -100.
    """
    labels = np.asarray(labels)
    chosen = labels != IGNORE
    most = int(chosen.sum(1).max(initial=0))
    if most > slots:
        raise ValueError(f"a sequence has {most} predictions, more than its {slots} slots")
    # stable sort puts chosen positions first, in position order
    order = np.argsort(~chosen, axis=1, kind="stable")[:, :slots]
    used = np.take_along_axis(chosen, order, axis=1)
    positions = np.where(used, order, 0).astype(np.int32)
    return positions, np.where(used, np.take_along_axis(labels, order, axis=1), IGNORE).astype(np.int32)
