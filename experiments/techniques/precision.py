"""Compute precision (``config.precision``) and dynamic loss scaling (``config.loss_scale``) for every training job.

bfloat16 / float16 compute with float32 master weights and float32 islands (softmax, attention scores,
LayerNorm, logits, loss): :func:`compression.precision.policy`, the outermost wrapper of the model, so every
other technique's arithmetic runs in the chosen precision too. float16 should train with dynamic loss scaling
(:func:`compression.loss_scale.dynamic_scale`): the scale travels in ``TrainState.dynamic_scale``; a step with
non-finite gradients is skipped and lowers the scale.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from compression import loss_scale, precision
from compression.precision import POLICY_NAMES
from experiments.techniques.base import Run, Technique


def section() -> ml_collections.ConfigDict:
    """``config.loss_scale`` (``config.precision`` is a top-level string of every training config)."""
    s = ml_collections.ConfigDict()
    s.dynamic = False  # on: scale the loss, skip steps with non-finite gradients; float16 warns without
    s.init_scale = 32768.0  # the first scale (2**15)
    s.growth_interval = 2000  # finite steps in a row before the scale doubles
    s.minimum_scale = 1.0  # the scale never drops below this; a skipped step there stops the run
    return s


CONSTRAINTS = {"init_scale": dict(min=1.0), "growth_interval": dict(min=1), "minimum_scale": dict(min=1e-30)}
PRECISION_CONSTRAINT = dict(choices=tuple(POLICY_NAMES))


def _check(config, family: str) -> list[str]:
    ls = config.loss_scale
    if ls.dynamic and ls.minimum_scale > ls.init_scale:
        return [f"config.loss_scale.minimum_scale={ls.minimum_scale} is above init_scale={ls.init_scale}"]
    return []


def _setup(run: Run) -> None:
    config = run.config
    precision.check_loss_scaling(config.precision, config.loss_scale.dynamic)  # float16 without it: warns
    run.wrappers.append(precision.policy(config.precision).wrap)
    ls = config.loss_scale
    if ls.dynamic:
        run.dynamic_scale = loss_scale.dynamic_scale(init_scale=ls.init_scale, growth_interval=ls.growth_interval,
                                                     minimum_scale=ls.minimum_scale)
    run.results["precision"] = config.precision


TECHNIQUE = Technique("loss_scale", section=section, constraints=CONSTRAINTS,
                      active=lambda c: (jnp.dtype(precision.dtype_from_name(c.precision)) != jnp.float32
                                         or c.loss_scale.dynamic),
                      check=_check, setup=_setup)
