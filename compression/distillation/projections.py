"""Learned projections from the student's width to the teacher's (TinyBERT's ``W_h``).

When a student is narrower than its teacher (TinyBERT-4: 312 against 768), hidden states and embeddings
are compared after a learned linear map ``h_S @ W + b`` of shape [H_S, H_T]. TinyBERT shares one map across
all matched layers (its ``fit_dense``); TextBrewer learns one per matched pair. Both are supported: the
losses take one projection, and :func:`compression.distillation.presets.distill_loss` takes one shared
projection or one per student layer.

A projection is either a parameter dict ``{"kernel": [H_S, H_T], "bias": [H_T]}`` (``"bias"`` optional) --
the ``params`` of :class:`Projection`, to be trained with the student's parameters -- or any callable
``[..., H_S] -> [..., H_T]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ProjectionLike = Mapping[str, Any] | Callable[[jax.Array], jax.Array]


def project(params: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """``x @ kernel + bias`` in float32. x: [..., H_S]; kernel: [H_S, H_T]; bias: [H_T] -> [..., H_T]."""
    if "kernel" not in params:
        raise ValueError(f"a projection parameter dict needs a 'kernel' [H_S, H_T]; got keys {sorted(params)}")
    kernel = jnp.asarray(params["kernel"], jnp.float32)
    if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
        raise ValueError(f"projection kernel shape {tuple(kernel.shape)} does not map the student width "
                         f"{x.shape[-1]} (expected [{x.shape[-1]}, H_T])")
    y = jnp.asarray(x, jnp.float32) @ kernel
    if params.get("bias") is not None:
        bias = jnp.asarray(params["bias"], jnp.float32)
        if bias.shape != (kernel.shape[1],):
            raise ValueError(f"projection bias shape {tuple(bias.shape)} does not match kernel "
                             f"{tuple(kernel.shape)}")
        y = y + bias
    return y


def apply_projection(projection: ProjectionLike | None, x: jax.Array) -> jax.Array:
    """Applies a parameter dict (see :func:`project`) or a callable; ``None`` returns ``x`` unchanged."""
    if projection is None:
        return x
    if isinstance(projection, Mapping):
        return project(projection, x)
    if callable(projection):
        return projection(x)
    raise TypeError(f"projection must be a parameter dict or a callable, got {type(projection).__name__}")


class Projection(nn.Module):
    """A learned map from the student width to ``features`` (the teacher width).

    Call: x [..., H_S] -> [..., features], float32. Its ``params`` are ``{"kernel", "bias"}``, the dict the
    losses accept directly. ``kernel_init`` defaults to LeCun normal (TinyBERT uses BERT's normal(0.02); a
    unit-scale start keeps the projected states on the teacher's scale from the first step).
    """

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        params = {"kernel": self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)}
        if self.use_bias:
            params["bias"] = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return project(params, x)


def init_projection(key: jax.Array, in_features: int, out_features: int, *, use_bias: bool = True) -> dict:
    """Parameters of a fresh :class:`Projection` [in_features -> out_features] as a plain dict."""
    if in_features < 1 or out_features < 1:
        raise ValueError(f"projection widths must be >= 1, got {in_features} -> {out_features}")
    variables = Projection(out_features, use_bias=use_bias).init(key, jnp.zeros((1, in_features), jnp.float32))
    return dict(variables["params"])
