"""Masks at sites: the shared mechanism under head importance and mask-based pruning.

``site_masks("heads|ffn")`` is a Transform that multiplies the units of every matching site by a mask held in
the ``"masks"`` collection: ``masks/<site path>/mask`` of shape [units] (all ones at init). Gradients with
respect to that collection are the head-importance scores of Michel et al.; setting entries to 0 prunes.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from compression.sites import SITE_KINDS, Site
from compression.transform import Transform, intercepting

MASKS = "masks"


def broadcast_to_axis(values, x, axis: int):
    """Reshapes a [units] vector so that it broadcasts against ``x`` along ``axis``, in ``x``'s dtype."""
    shape = [1] * x.ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape).astype(x.dtype)


def kind_pattern(kinds: str) -> re.Pattern:
    """A regex over site kinds, e.g. ``"heads|ffn"``; raises on a kind no model places."""
    for k in kinds.split("|"):
        if k not in SITE_KINDS:
            raise ValueError(f"unknown site kind {k!r} in {kinds!r}; known kinds: {', '.join(SITE_KINDS)}")
    return re.compile(f"^({kinds})$")


def is_site_call(context, pattern: re.Pattern) -> bool:
    """True when an interceptor ``context`` is a call of a Site whose kind matches ``pattern``."""
    module = context.module
    return isinstance(module, Site) and context.method_name == "__call__" and bool(pattern.match(module.kind))


def site_masks(kinds: str = "heads|ffn", collection: str = MASKS) -> Transform:
    """Multiplies the units of the sites whose kind matches ``kinds`` by ``collection`` masks (ones at init)."""
    pattern = kind_pattern(kinds)
    if pattern.match("layer"):
        raise ValueError("layer sites are dropped (LayerDrop) or removed (compaction), not masked")

    def interceptor(next_fun, args, kwargs, context):
        if not is_site_call(context, pattern):
            return next_fun(*args, **kwargs)
        module, x = context.module, args[0]
        mask = module.variable(collection, "mask", lambda: jnp.ones((x.shape[module.axis],), jnp.float32))
        return next_fun(x * broadcast_to_axis(mask.value, x, module.axis), *args[1:], **kwargs)

    return intercepting(f"site_masks[{kinds}]", interceptor, collections=(collection,))


def masks_by_path(collection_tree: dict, prefix: str = "") -> dict[str, jnp.ndarray]:
    """Flattens a masks/gates collection to {site path: [units] array} (``.../heads_site`` -> values)."""
    out = {}
    for name, value in collection_tree.items():
        path = f"{prefix}/{name}" if prefix else name
        if isinstance(value, dict):
            out.update(masks_by_path(value, path))
        else:
            out[prefix] = value
    return out


def unflatten(by_path: dict[str, jnp.ndarray], leaf_name: str = "mask") -> dict:
    """Inverse of :func:`masks_by_path`."""
    tree: dict = {}
    for path, value in by_path.items():
        node = tree
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node[leaf_name] = value
    return tree

