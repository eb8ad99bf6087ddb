"""Compression techniques as config components of every training job (see :mod:`.base` for the interface).

:data:`TECHNIQUES` is the one list the runner reads, in the order the techniques set up: the model's own
structure first (Theseus swaps the model, L0 gates its units, magnitude pruning zeroes weights), then
LayerDrop, then quantization-aware training (calibrated on the model as those left it), then the precision
policy (the outermost wrapper, so every other technique's arithmetic runs in that precision), then distillation
(the loss). Adding a technique: write its
module here (a ``section()``, ``CONSTRAINTS`` and a ``TECHNIQUE``) and add it to this list; every training job's
config then gets its section.
"""

from experiments.techniques import distill, l0, layerdrop, magnitude, precision, qat, theseus
from experiments.techniques.base import Exported, Run, Technique

TECHNIQUES: tuple[Technique, ...] = (theseus.TECHNIQUE, l0.TECHNIQUE, magnitude.TECHNIQUE, layerdrop.TECHNIQUE,
                                     qat.TECHNIQUE, precision.TECHNIQUE, distill.TECHNIQUE)

__all__ = ["TECHNIQUES", "Exported", "Run", "Technique"]
