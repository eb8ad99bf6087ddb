"""Knowledge distillation: losses with explicit normalisation, recipes (presets), layer maps, projections,
and Tang et al.'s data augmentation for building transfer sets.

See :mod:`.losses` for the normalisation conventions and :mod:`.presets` for what each recipe reproduces.
"""

from compression.distillation import augment, layer_maps
from compression.distillation.losses import (attention_score_mse, combined, cross_entropy, hidden_cosine,
                                             hidden_mse, kd_loss, logit_mse, pkd_loss)
from compression.distillation.presets import PRESETS, TERMS, Preset, distill_loss, get_preset
from compression.distillation.projections import Projection, apply_projection, init_projection, project

__all__ = [
    "PRESETS", "TERMS", "Preset", "Projection", "apply_projection", "attention_score_mse", "augment", "combined",
    "cross_entropy", "distill_loss", "get_preset", "hidden_cosine", "hidden_mse", "init_projection", "kd_loss",
    "layer_maps", "logit_mse", "pkd_loss", "project",
]
