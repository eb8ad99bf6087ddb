"""Magnitude pruning (after Gordon et al. 2020, "Compressing BERT"): unstructured or block masks on weights.

A study tool: it zeroes weights but the dense matmuls stay the same size, so it gives no dense speed (sparse
kernels would be needed). One-shot (:func:`magnitude_masks`) or gradual with the polynomial schedule of Zhu &
Gupta (:func:`gradual_magnitude_pruning`, an optax transformation chained after the optimizer: the masks follow
:func:`polynomial_sparsity` and are applied after each update, so pruned weights stay zero).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

DEFAULT_PATTERN = r"(query|key|value|qkv|attention/output|intermediate|layer_\d+/output)/kernel$"


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def polynomial_sparsity(step, final: float, begin_step: int, end_step: int, initial: float = 0.0,
                        power: float = 3.0):
    """s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^power, clipped to [t_0, t_1]."""
    if not 0.0 <= final < 1.0 or not 0.0 <= initial <= final:
        raise ValueError(f"sparsities must satisfy 0 <= initial <= final < 1, got {initial}, {final}")
    if end_step <= begin_step:
        raise ValueError("end_step must be after begin_step")
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - begin_step) / (end_step - begin_step), 0.0, 1.0)
    return final + (initial - final) * (1.0 - progress) ** power


def _block_scores(w: jax.Array, block: tuple[int, int]) -> jax.Array:
    rows, cols = block
    if w.ndim != 2 or w.shape[0] % rows or w.shape[1] % cols:
        raise ValueError(f"block {block} does not tile a weight of shape {w.shape}")
    r, c = w.shape[0] // rows, w.shape[1] // cols
    return jnp.abs(w.astype(jnp.float32)).reshape(r, rows, c, cols).mean(axis=(1, 3))


def matched_weights(params, pattern: str = DEFAULT_PATTERN) -> dict[str, jax.Array]:
    """``{slash-joined path: weight}`` of the parameters ``pattern`` matches; ValueError when it matches none."""
    regex = re.compile(pattern)
    matched = {_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(params) if regex.search(_path(k))}
    if not matched:
        raise ValueError(f"pattern {pattern!r} matches no parameter")
    return matched


def _threshold(scores: jax.Array, sparsity) -> jax.Array:
    """The k-th smallest score, k = floor(sparsity * n) (-inf for k = 0): scores above it are kept. Works for a
    traced ``sparsity`` (a sort, not a partition, so k may be a tracer)."""
    flat = scores.ravel()
    k = jnp.floor(jnp.asarray(sparsity, jnp.float32) * flat.size).astype(jnp.int32)
    kth = jnp.sort(flat)[jnp.maximum(k - 1, 0)]
    return jnp.where(k == 0, -jnp.inf, kth)


def magnitude_masks(params, sparsity, pattern: str = DEFAULT_PATTERN, block: tuple[int, int] = (1, 1),
                    scope: str = "global"):
    """0/1 masks (float32, same tree as ``params``; ``None`` leaves for unmatched weights) removing the smallest
    weights. Jittable in ``params`` and ``sparsity`` (the pattern, block and scope are static).

    Args:
      sparsity: fraction of matched weights set to zero, in [0, 1) (a Python float is checked; a traced value
        is the caller's to keep in range).
      pattern: regex over slash-joined parameter paths choosing the pruned weights.
      block: (rows, cols) blocks scored by mean |w| and pruned whole; (1, 1) is unstructured.
      scope: "global" ranks all matched weights together, "layer" prunes each weight to ``sparsity``.
    """
    if isinstance(sparsity, (int, float)) and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    scores = {p: _block_scores(v, block) for p, v in matched_weights(params, pattern).items()}
    if scope == "global":
        global_t = _threshold(jnp.concatenate([s.ravel() for s in scores.values()]), sparsity)
    masks = {}
    for p, s in scores.items():
        keep = (s > (global_t if scope == "global" else _threshold(s, sparsity))).astype(jnp.float32)
        masks[p] = jnp.kron(keep, jnp.ones(block, jnp.float32))
    return jax.tree_util.tree_map_with_path(lambda k, v: masks.get(_path(k)), params)


class GradualPruningState(NamedTuple):
    """count: int32 [] (updates so far); masks: the current 0/1 masks (float32, same tree as the params, an
    empty dict where a weight is not pruned)."""

    count: jax.Array
    masks: Any


def gradual_magnitude_pruning(final_sparsity: float, begin_step: int, end_step: int, frequency: int,
                              initial_sparsity: float = 0.0, power: float = 3.0, pattern: str = DEFAULT_PATTERN,
                              scope: str = "global") -> optax.GradientTransformation:
    """Gradual magnitude pruning (Zhu & Gupta 2017) as an optax transformation chained after an optimizer.

    At update ``t`` (counted by this transformation) with ``begin_step <= t <= end_step`` and ``t - begin_step``
    a multiple of ``frequency`` (and at ``end_step``), the masks are recomputed from the updated weights at
    the sparsity :func:`polynomial_sparsity` gives for ``t``; every update, the updated weights are multiplied
    by the current masks, so pruned weights stay zero (their optimizer moments keep moving; the mask wins).
    The sparsity never decreases, so a weight once pruned (now zero, the smallest magnitude) stays pruned.
    The masks are recomputed inside ``lax.cond``: the sort over the matched weights runs on pruning steps
    only. Needs ``params`` in ``update``.
    """
    polynomial_sparsity(0, final_sparsity, begin_step, end_step, initial_sparsity, power)  # checks the ranges
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")

    def masks_of(params, sparsity):
        masks = magnitude_masks(params, sparsity, pattern, scope=scope)
        return jax.tree.map(lambda m: {} if m is None else m, masks, is_leaf=lambda x: x is None)

    def init(params):
        return GradualPruningState(jnp.zeros([], jnp.int32), masks_of(params, 0.0))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("gradual_magnitude_pruning needs the params in update()")
        t = state.count
        new = jax.tree.map(lambda p, u: p + u, params, updates)
        due = (t >= begin_step) & (t <= end_step) & (((t - begin_step) % frequency == 0) | (t == end_step))
        sparsity = polynomial_sparsity(t, final_sparsity, begin_step, end_step, initial_sparsity, power)
        masks = lax.cond(due, lambda: masks_of(new, sparsity), lambda: state.masks)
        # ``masks`` has ``params`` as a prefix: each leaf meets its mask, or ``{}`` where it is not pruned
        masked = jax.tree.map(lambda n, m: n if isinstance(m, dict) else n * m.astype(n.dtype), new, masks)
        return (jax.tree.map(lambda m, p: m - p, masked, params),
                GradualPruningState(t + 1, masks))

    return optax.GradientTransformation(init, update)


def apply_masks(params, masks):
    """params * masks where a mask exists (``None`` mask leaves keep the weight)."""
    return jax.tree.map(lambda p, m: p if m is None else p * m.astype(p.dtype), params, masks,
                        is_leaf=lambda x: x is None)


def sparsity_of(masks) -> float:
    """Fraction of masked weights that are zero."""
    zeros = total = 0
    for m in jax.tree.leaves(masks):
        zeros += int((np.asarray(m) == 0).sum())
        total += np.asarray(m).size
    return zeros / max(total, 1)
