"""Gradual magnitude pruning (``config.magnitude``; Zhu & Gupta 2017, on BERT: Gordon et al. 2020).

The smallest-magnitude weights of the matched kernels (``magnitude.pattern``; by default every Transformer
attention and FFN kernel, ranked together with ``scope="global"`` or per weight with ``"layer"``) are set to
zero, the sparsity rising from ``initial_sparsity`` to ``final_sparsity`` along the cubic schedule
``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3`` between ``t_0 = begin_fraction`` and
``t_1 = end_fraction`` of the run's steps, the masks recomputed every ``frequency`` steps and held in between.
The masks live in the model optimizer's state (:func:`compression.pruning.magnitude.gradual_magnitude_pruning`,
chained after AdamW), so they are checkpointed and a resumed run continues the same schedule; ``t`` counts
optimizer updates (a float16 step skipped for a non-finite gradient does not advance it). The steps after
``t_1`` fine-tune the pruned model (the masks keep pruned weights at zero).

Unstructured zeros keep every matmul its size: the saved model is a dense model with zeros (as small as its
compressed file, no faster without sparse kernels). Results (``results.json``'s ``magnitude``): the target,
the schedule's steps, and the exported model's measured ``sparsity`` over the matched weights.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from absl import logging

from compression.pruning import magnitude
from experiments.techniques.base import Exported, Run, Technique


def section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.final_sparsity = 0.0  # fraction of the matched weights zeroed at the end, in [0, 1); > 0 turns pruning on
    s.initial_sparsity = 0.0  # the schedule's sparsity at its first step
    s.begin_fraction = 0.0  # share of the run's steps before pruning starts
    s.end_fraction = 0.7  # share of the run's steps at which final_sparsity is reached (the rest fine-tunes)
    s.frequency = 50  # steps between mask updates (Zhu & Gupta's delta t)
    s.power = 3.0  # exponent of the schedule (3: prune fast early, slowly near the end)
    s.pattern = magnitude.DEFAULT_PATTERN  # regex over slash-joined parameter paths of the pruned kernels
    s.scope = "global"  # "global": one threshold over all matched weights; "layer": each weight to the sparsity
    return s


CONSTRAINTS = {"final_sparsity": dict(min=0.0, max=0.999), "initial_sparsity": dict(min=0.0, max=0.999),
               "begin_fraction": dict(min=0.0, max=1.0), "end_fraction": dict(min=0.0, max=1.0),
               "frequency": dict(min=1), "power": dict(min=0.0), "scope": dict(choices=("global", "layer"))}


def _check(config, family: str) -> list[str]:
    c, problems = config.magnitude, []
    if c.initial_sparsity > c.final_sparsity:
        problems.append(f"config.magnitude.initial_sparsity={c.initial_sparsity} is above "
                        f"final_sparsity={c.final_sparsity}: the schedule only prunes more")
    if c.end_fraction <= c.begin_fraction:
        problems.append(f"config.magnitude.end_fraction={c.end_fraction} must be after "
                        f"begin_fraction={c.begin_fraction}")
    if family != "transformer" and c.pattern == magnitude.DEFAULT_PATTERN:
        problems.append(f"config.magnitude.pattern is the Transformer default; the trained model is a {family}: "
                        "name its kernels (regex over parameter paths)")
    if config.get("theseus") is not None and config.theseus.enabled:
        problems.append("config.magnitude with config.theseus.enabled: the pattern would prune the frozen "
                        "predecessor too; prune the successor after replacement (a stage on the theseus model)")
    if config.export != "last":
        problems.append(f"config.export={config.export!r} with config.magnitude: an early best step is not at "
                        "the final sparsity; set export='last'")
    return problems


def schedule_steps(c, total_steps: int) -> tuple[int, int]:
    """``(begin_step, end_step)`` of the schedule in optimizer updates (``end_step`` >= ``begin_step`` + 1)."""
    begin = round(c.begin_fraction * total_steps)
    return begin, max(begin + 1, round(c.end_fraction * total_steps))


def matched_sparsity(params, pattern: str) -> tuple[int, int]:
    """``(zeros, total)`` over the weights ``pattern`` matches."""
    weights = [np.asarray(w) for w in magnitude.matched_weights(params, pattern).values()]
    return sum(int((w == 0).sum()) for w in weights), sum(w.size for w in weights)


def _setup(run: Run) -> None:
    c = run.config.magnitude
    magnitude.matched_weights(run.tree["model"], c.pattern)  # a pattern that matches nothing fails here
    begin, end = schedule_steps(c, run.total_steps)
    run.model_updates.append(magnitude.gradual_magnitude_pruning(
        c.final_sparsity, begin, end, c.frequency, initial_sparsity=c.initial_sparsity, power=c.power,
        pattern=c.pattern, scope=c.scope))
    run.results["magnitude"] = {"target": c.final_sparsity, "begin_step": begin, "end_step": end}

    def measure(exported: Exported) -> None:
        zeros, total = matched_sparsity(exported.params, c.pattern)
        record = run.results["magnitude"]
        record.update(sparsity=zeros / total, pruned_weights=zeros, matched_weights=total)
        logging.info("magnitude pruning: %d of %d matched weights are zero (%.2f%%; target %.2f%%)", zeros, total,
                     100 * zeros / total, 100 * c.final_sparsity)

    run.finalizers.append(measure)


TECHNIQUE = Technique("magnitude", section=section, constraints=CONSTRAINTS,
                      active=lambda c: c.magnitude.final_sparsity > 0, check=_check, setup=_setup)
