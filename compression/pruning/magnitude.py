"""Magnitude pruning (after Gordon et al. 2020, "Compressing BERT"): unstructured or block masks on weights.

A study tool: it zeroes weights but the dense matmuls stay the same size, so it gives no dense speed (sparse
kernels would be needed). One-shot (:func:`magnitude_masks`) or gradual with the polynomial schedule of Zhu &
Gupta (:func:`polynomial_sparsity`); :func:`apply_masks` is applied after each optimizer update in the train
step so pruned weights stay zero.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

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


def _block_scores(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    rows, cols = block
    if w.ndim != 2 or w.shape[0] % rows or w.shape[1] % cols:
        raise ValueError(f"block {block} does not tile a weight of shape {w.shape}")
    r, c = w.shape[0] // rows, w.shape[1] // cols
    return np.abs(w).reshape(r, rows, c, cols).mean(axis=(1, 3))


def magnitude_masks(params, sparsity: float, pattern: str = DEFAULT_PATTERN, block: tuple[int, int] = (1, 1),
                    scope: str = "global"):
    """0/1 masks (same tree as ``params``; ``None`` leaves for unmatched weights) removing the smallest weights.

    Args:
      sparsity: fraction of matched weights set to zero, in [0, 1).
      pattern: regex over slash-joined parameter paths choosing the pruned weights.
      block: (rows, cols) blocks scored by mean |w| and pruned whole; (1, 1) is unstructured.
      scope: "global" ranks all matched weights together, "layer" prunes each weight to ``sparsity``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    regex = re.compile(pattern)
    leaves = {_path(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    matched = {p: v for p, v in leaves.items() if regex.search(p)}
    if not matched:
        raise ValueError(f"pattern {pattern!r} matches no parameter")
    scores = {p: _block_scores(v, block) for p, v in matched.items()}

    def threshold(values: np.ndarray) -> float:
        k = int(np.floor(sparsity * values.size))
        return -np.inf if k == 0 else np.partition(values.ravel(), k - 1)[k - 1]

    global_t = threshold(np.concatenate([s.ravel() for s in scores.values()])) if scope == "global" else None
    masks = {}
    for p, s in scores.items():
        t = global_t if scope == "global" else threshold(s)
        keep = (s > t).astype(np.float32)
        masks[p] = np.kron(keep, np.ones(block, np.float32))

    return jax.tree_util.tree_map_with_path(lambda k, v: masks.get(_path(k)), params)


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
