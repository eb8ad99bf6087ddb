"""Attention-head importance and iterative head pruning after Michel et al. (2019), "Are Sixteen Heads Really
Better than One?".

The importance of head h is the expected absolute sensitivity of the loss to a mask on its output,
I_h = sum over batches |d L / d xi_h| evaluated at xi = 1 (one ``jax.grad`` over the ``"masks"`` collection
that :func:`compression.pruning.site_masks.site_masks` adds at the ``heads`` sites). Following the reference
code, scores may be normalised per layer by their L2 norm before ranking globally. Iterative pruning removes
the least important fraction of the remaining heads, re-estimating importance each round, and records the
metric after each round (the curve of metric vs fraction of heads pruned).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from compression.pruning.site_masks import MASKS, masks_by_path, unflatten


@functools.partial(jax.jit, static_argnums=0)
def _mask_grads(loss_fn: Callable, variables: dict, batch) -> dict:
    """d loss / d masks; variables are an argument (not closed over), so rounds reuse one compilation."""
    return jax.grad(lambda m: loss_fn({**variables, MASKS: m}, batch))(variables[MASKS])


def head_importance(loss_fn: Callable, variables: dict, batches: Iterable, *, normalize_per_layer: bool = True,
                    jit: bool = True) -> dict[str, np.ndarray]:
    """Accumulated |dL/d mask| per head.

    Args:
      loss_fn: ``loss_fn(variables, batch) -> scalar`` running the masked model (the wrapped apply).
      variables: model variables including the ``"masks"`` collection (heads sites).
      batches: iterable of batches; each contributes |gradient of its mean loss|.
      normalize_per_layer: divide each layer's scores by their L2 norm (the reference default).

    Returns:
      {site path: [heads] float64 scores}; heads already masked to 0 keep their (meaningless) score, callers
      rank only the remaining ones.
    """
    if MASKS not in variables:
        raise ValueError("variables have no 'masks' collection: init them with site_masks('heads') first")

    grad_fn = _mask_grads if jit else _mask_grads.__wrapped__
    total = None
    count = 0
    for batch in batches:
        g = jax.tree.map(lambda a: np.abs(np.asarray(a, np.float64)), grad_fn(loss_fn, variables, batch))
        total = g if total is None else jax.tree.map(np.add, total, g)
        count += 1
    if count == 0:
        raise ValueError("head importance needs at least one batch")
    scores = masks_by_path(total)
    if normalize_per_layer:
        scores = {p: s / (np.linalg.norm(s) + 1e-20) for p, s in scores.items()}
    return scores


@dataclasses.dataclass
class PruningStep:
    """One point of the pruning curve."""

    fraction_pruned: float
    heads_pruned: int
    metric: float
    masks: dict[str, np.ndarray]


def prune_least_important(masks: dict[str, np.ndarray], scores: dict[str, np.ndarray], count: int,
                          keep_one_per_layer: bool = True) -> dict[str, np.ndarray]:
    """Zeros the ``count`` lowest-scoring remaining heads (global ranking).

    With ``keep_one_per_layer`` the last head of a layer is never removed (removing a whole layer is an
    explicit, separate decision); without it, emptying a layer is an error naming the layer.
    """
    masks = {p: np.array(m, np.float32) for p, m in masks.items()}
    candidates = sorted((float(scores[p][h]), p, h) for p, m in masks.items() for h in np.flatnonzero(m > 0))
    removed = 0
    for _, path, h in candidates:
        if removed == count:
            break
        if masks[path].sum() <= 1:
            if keep_one_per_layer:
                continue
            raise ValueError(f"pruning would remove every head of {path}; keep one or remove the layer explicitly")
        masks[path][h] = 0.0
        removed += 1
    return masks


def iterative_head_pruning(loss_fn: Callable, metric_fn: Callable[[dict], float], variables: dict,
                           batches_fn: Callable[[], Iterable], *, fraction_per_round: float = 0.1,
                           max_fraction: float = 0.5, normalize_per_layer: bool = True) -> list[PruningStep]:
    """Michel et al.'s iterative pruning: estimate, drop ``fraction_per_round`` of all heads, re-estimate.

    Args:
      loss_fn: ``loss_fn(variables, batch) -> scalar`` on the masked model.
      metric_fn: ``metric_fn(variables) -> float`` (e.g. dev accuracy) of the masked model.
      variables: with a ``"masks"`` collection at the heads sites.
      batches_fn: returns a fresh iterable of importance batches each round.
      fraction_per_round: fraction of the total head count removed per round.
      max_fraction: stop once this fraction of heads is pruned.

    Returns: the curve, starting with the unpruned model (fraction 0).
    """
    if not 0 < fraction_per_round < 1 or not 0 < max_fraction < 1:
        raise ValueError("fraction_per_round and max_fraction must be in (0, 1)")
    masks = {p: np.asarray(m, np.float32) for p, m in masks_by_path(variables[MASKS]).items()}
    total = sum(m.size for m in masks.values())
    per_round = max(1, int(round(fraction_per_round * total)))
    curve = [PruningStep(0.0, 0, float(metric_fn(variables)), masks)]
    rounds = int(np.ceil(max_fraction * total / per_round))
    for _ in tqdm(range(rounds), desc="head pruning", leave=False):
        current = {**variables, MASKS: jax.tree.map(jnp.asarray, unflatten(masks))}
        scores = head_importance(loss_fn, current, batches_fn(), normalize_per_layer=normalize_per_layer)
        pruned = total - int(sum(m.sum() for m in masks.values()))
        count = min(per_round, int(np.floor(max_fraction * total)) - pruned)
        if count <= 0:
            break
        masks = prune_least_important(masks, scores, count)
        current = {**variables, MASKS: jax.tree.map(jnp.asarray, unflatten(masks))}
        pruned = total - int(sum(m.sum() for m in masks.values()))
        curve.append(PruningStep(pruned / total, pruned, float(metric_fn(current)), masks))
    return curve
