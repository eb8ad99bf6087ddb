"""Sites: identity modules that models place at prunable / gateable structure points.

A model never knows which compression is applied to it. Instead it calls a :class:`Site` at every point where
a transform may want to act: the per-head attention context, the FFN intermediate activations, the hidden
units entering a layer, a whole layer's output (for LayerDrop and module replacement). Without any transform
a site returns its input unchanged, so the model computes exactly what it would without sites.

Transforms find sites through ``flax.linen.intercept_methods`` (see :mod:`compression.transform`): an
interceptor sees ``context.module`` being a ``Site`` and reads ``kind``, ``axis`` and ``num_units``.

Kinds (the ``SITE_KINDS`` tuple):

* ``"heads"``  x: [batch, seq, heads, head_dim]; units along ``axis=-2`` (one per attention head).
* ``"ffn"``    x: [batch, seq, ffn]; units along ``axis=-1`` (FFN intermediate activations).
* ``"hidden"`` x: [..., hidden]; units along ``axis=-1`` (input dimensions of a layer, LSTM hidden units).
* ``"layer"``  x: a layer's output, ``skip`` its input; a transform may return ``skip`` instead of ``x``
  (LayerDrop, Theseus). Units: one (the whole layer).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

SITE_KINDS = ("heads", "ffn", "hidden", "layer")


class Site(nn.Module):
    """Identity at a structure point; see the module docstring for the kinds and shapes.

    Attributes:
      kind: one of ``SITE_KINDS``.
      axis: axis of ``x`` that holds the units a transform masks or gates.
    """

    kind: str
    axis: int = -1

    def __post_init__(self):
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; known kinds: {', '.join(SITE_KINDS)}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Any, skip: Any = None) -> Any:
        """Returns ``x`` unchanged. ``skip`` is the layer input for ``kind='layer'`` sites, else ``None``."""
        del skip
        return x


ISLAND_KINDS = ("softmax", "attention_scores", "layernorm", "logits")


class Island(nn.Module):
    """A float32 island: runs ``fn`` on float32 copies of its array inputs.

    Models call ``Island(kind)(fn, *xs)`` where low precision is known to break: softmax and its
    normalisation, attention-score accumulation, LayerNorm statistics, and the final logits (losses are taken
    in float32). By default the result is cast back to the dtype of ``xs[0]``; for ``kind='logits'`` it stays
    float32. In a float32 model an island is a no-op. The precision transform (:mod:`compression.precision`)
    intercepts islands to switch each kind off for ablations.
    """

    kind: str

    def __post_init__(self):
        if self.kind not in ISLAND_KINDS:
            raise ValueError(f"unknown island kind {self.kind!r}; known kinds: {', '.join(ISLAND_KINDS)}")
        super().__post_init__()

    @nn.compact
    def __call__(self, fn, *xs):
        # "At least float32": float64 inputs (x64 tests) keep their precision.
        wide = jnp.promote_types(xs[0].dtype, jnp.float32)
        out_dtype = wide if self.kind == "logits" else xs[0].dtype
        out = fn(*[x.astype(jnp.promote_types(x.dtype, jnp.float32)) if jnp.issubdtype(x.dtype, jnp.floating)
                   else x for x in xs])
        return out.astype(out_dtype)
