"""BERT-of-Theseus (``config.theseus``; Xu et al. 2020): compress a Transformer by progressive module replacement.

The trained model's layers (the predecessor) are grouped into as many modules as the successor has layers;
each module gets a successor layer (a copy of a predecessor layer, optionally with fewer key/value heads:
multi-query / grouped-query attention, Shazeer 2019). While training, each module independently runs its
successor with probability ``p(t)`` (:mod:`compression.theseus`), and only successor layers train (the
predecessor's parameters are cut from the gradient and frozen in the optimizer, as in the reference
implementation). Phase one ends when ``p`` reaches 1; the successor then trains alone.

The replacement schedule: ``constant`` keeps ``p = replacing_rate`` for the first ``replacing_fraction`` of the
steps, then 1; ``linear`` is the curriculum ``p = min(1, k t + replacing_rate)`` with ``k`` chosen so that ``p``
reaches 1 after ``replacing_fraction`` of the steps. ``p(t)`` is computed on the host from the global step and
travels with each batch as ``replace_prob`` float32 [B], so a resumed run continues the same schedule.

Evaluation and the saved ``model/`` are the successor alone (:func:`models.theseus.extract_successor`): a plain
Transformer that every later stage loads with ``models.load``.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from compression import theseus
from experiments.techniques.base import Exported, Run, Technique
from models import theseus as theseus_models

SCHEDULES = ("constant", "linear")
INITS = ("first", "every_other")
PROB = "replace_prob"  # batch key of p(step), float32 [B]
# Only successor layers train; every other model parameter is frozen in the optimizer (no update, no decay).
FROZEN_REGEX = r"^(?!.*(^|/)successor(/|$))"


def section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.enabled = False  # on: replace the trained model's layers by a smaller successor, module by module
    s.successor_layers = 3  # successor depth; the predecessor's depth must divide into this many modules
    s.num_kv_heads = 0  # successor key/value heads; 0: as many as query heads (1: multi-query attention)
    s.init = "every_other"  # successor layer i starts from predecessor layer i*k ("every_other") or i ("first")
    s.schedule = "linear"  # "constant" | "linear" replacement probability schedule
    s.replacing_rate = 0.3  # constant: p; linear: p at step 0 (b)
    s.replacing_fraction = 0.5  # share of the steps before p reaches 1 (then the successor trains alone)
    return s


CONSTRAINTS = {"successor_layers": dict(min=1), "num_kv_heads": dict(min=0), "init": dict(choices=INITS),
               "schedule": dict(choices=SCHEDULES), "replacing_rate": dict(min=0.0, max=1.0),
               "replacing_fraction": dict(min=0.0, max=1.0)}


def replacement_schedule(t, total_steps: int):
    """The configured ``p(step)`` (``t``: ``config.theseus``) over a run of ``total_steps`` steps."""
    phase_one = max(1, round(t.replacing_fraction * total_steps))
    if t.schedule == "constant":
        return theseus.make_schedule("constant", rate=t.replacing_rate, replacing_steps=phase_one)
    return theseus.make_schedule("linear", k=(1.0 - t.replacing_rate) / phase_one, b=t.replacing_rate)


def init_layers(predecessor_layers: int, successor_layers: int, init: str) -> tuple[int, ...]:
    """Predecessor layers that initialise successor layers 0..n-1: the first ones (the reference
    implementation) or every k-th (0, k, 2k, ...; k = predecessor/successor depth)."""
    stride = predecessor_layers // successor_layers if init == "every_other" else 1
    return tuple(range(0, stride * successor_layers, stride))


def _freeze_predecessor(apply_fn):
    """``apply_fn`` whose non-successor parameters are cut from the gradient (no wasted backward pass)."""

    def apply(variables, *args, **kwargs):
        return apply_fn({**variables, "params": theseus.freeze(variables["params"], theseus_models.trainable)},
                        *args, **kwargs)

    return apply


def _check(config, family: str) -> list[str]:
    if family != "transformer":
        return [f"config.theseus.enabled: module replacement swaps Transformer layers; the trained model is a "
                f"{family}"]
    return []


def _setup(run: Run) -> None:
    t = run.config.theseus
    pred_cfg = run.model_cfg
    theseus.check_grouping(pred_cfg.num_layers, t.successor_layers)
    source_layers = init_layers(pred_cfg.num_layers, t.successor_layers, t.init)
    succ_cfg = theseus_models.successor_from_predecessor(pred_cfg, t.successor_layers,
                                                         num_kv_heads=t.num_kv_heads or None,
                                                         init_layers=source_layers)
    run.tree["model"] = theseus_models.init_from_predecessor(pred_cfg, run.tree["model"], succ_cfg,
                                                             init_layers=source_layers)
    run.model = theseus_models.theseus_model(pred_cfg, succ_cfg)
    run.wrappers.append(_freeze_predecessor)
    run.freeze_regex.append(FROZEN_REGEX)
    run.rng_streams.append(theseus.THESEUS_RNG)
    schedule = replacement_schedule(t, run.total_steps)
    run.batch_fields.append(lambda batch, step: {
        PROB: np.full(len(batch["example_weight"]), float(schedule(step)), np.float32)})
    run.apply_kwargs.append(lambda batch, train: {"mode": "mixed", "replace_prob": batch[PROB][0]} if train else {})
    run.loss_terms.append(lambda tree, batch: (0.0, {PROB: batch[PROB][0]}))  # logged with the train metrics
    run.results["theseus"] = {"schedule": t.schedule, "replacing_rate": t.replacing_rate,
                              "replacing_fraction": t.replacing_fraction, "successor_layers": t.successor_layers,
                              "num_kv_heads": t.num_kv_heads or None, "init_layers": list(source_layers)}

    def extract(exported: Exported) -> None:
        exported.model_cfg, exported.params = theseus_models.extract_successor(pred_cfg, succ_cfg, exported.params)

    run.finalizers.append(extract)


TECHNIQUE = Technique("theseus", section=section, constraints=CONSTRAINTS, active=lambda c: c.theseus.enabled,
                      check=_check, setup=_setup)
