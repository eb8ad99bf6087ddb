"""Structured and unstructured pruning: site masks, head importance, L0 gates, LayerDrop, magnitude, compaction.

Zeroing weights gives no dense speed; only removing whole heads, FFN units or layers does. The masks and gates
here act at the sites models place (:mod:`compression.sites`), and :mod:`compression.pruning.compaction`
turns the resulting masks into a smaller dense model that runs faster.
"""
