"""LayerDrop (Fan et al. 2019): structured dropout of whole layers in training, pruning to any depth on load.

The transform intercepts ``layer`` sites, which models call as ``Site("layer")(output, skip=input)``. When the
``"layerdrop"`` RNG stream is passed to apply, each layer is dropped with probability ``rate`` (its input
passes through unchanged); without the stream every layer runs. The choice is a ``jnp.where`` on traced
values, so sampled patterns never retrace. As in the paper, kept layers are not rescaled: the expected output
is (1 - rate) * layer(x) + rate * x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from compression.pruning.site_masks import is_site_call, kind_pattern
from compression.transform import Transform, intercepting

LAYERDROP_RNG = "layerdrop"


def layerdrop(rate: float) -> Transform:
    """Drops each layer with probability ``rate`` in training (``"layerdrop"`` RNG given)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"LayerDrop rate must be in [0, 1), got {rate}")
    pattern = kind_pattern("layer")

    def interceptor(next_fun, args, kwargs, context):
        if not is_site_call(context, pattern) or not context.module.has_rng(LAYERDROP_RNG):
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        skip = kwargs.get("skip", args[1] if len(args) > 1 else None)
        if skip is None:
            raise ValueError(f"layer site {'/'.join(context.module.path)} was called without skip=layer input")
        drop = jax.random.bernoulli(context.module.make_rng(LAYERDROP_RNG), rate)
        return jnp.where(drop, skip, out)

    return intercepting(f"layerdrop[{rate}]", interceptor)


def every_other(num_layers: int, keep_first: bool = True) -> tuple[int, ...]:
    """Layer indices of the "every other layer" strategy of the paper (0, 2, 4, ... or 1, 3, 5, ...)."""
    return tuple(range(0 if keep_first else 1, num_layers, 2))
