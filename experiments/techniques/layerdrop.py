"""LayerDrop (``config.layerdrop``; Fan et al. 2019) for Transformer training jobs.

Each layer is skipped with probability ``rate`` in training (its own RNG stream, drawn per step and device);
evaluation runs every layer. A model trained this way can be pruned on load: the run also reports the dev
metrics of the trained model cut to layers 0, 2, 4, ... (``results.json``'s ``pruned_every_other``, the
paper's every-other strategy).
"""

from __future__ import annotations

import ml_collections
from absl import logging

import models
from compression.pruning import compaction, layerdrop
from experiments.runtime import evaluation
from experiments.techniques.base import Exported, Run, Technique


def section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.rate = 0.0  # probability of skipping each layer in training; > 0 also reports every-other pruning
    return s


def _check(config, family: str) -> list[str]:
    if family != "transformer":
        return [f"config.layerdrop.rate={config.layerdrop.rate}: LayerDrop skips Transformer layers; the trained "
                f"model is a {family}"]
    return []


def _setup(run: Run) -> None:
    run.wrappers.append(layerdrop.layerdrop(run.config.layerdrop.rate).wrap)
    run.rng_streams.append(layerdrop.LAYERDROP_RNG)

    def report_every_other(exported: Exported) -> None:
        cfg = exported.model_cfg
        if cfg.num_layers < 2:
            return
        half_cfg, half = compaction.keep_layers(cfg, exported.params, layerdrop.every_other(cfg.num_layers))
        metrics = evaluation.dev_metrics(models.model_class("transformer")(half_cfg).apply, {"params": half},
                                         exported.run.model_task, exported.run.inputs)
        exported.run.results["pruned_every_other"] = metrics
        logging.info("pruned on load to every other layer: %s", metrics)

    run.finalizers.append(report_every_other)


TECHNIQUE = Technique("layerdrop", section=section, constraints={"rate": dict(min=0.0, max=0.99)},
                      active=lambda c: c.layerdrop.rate > 0, check=_check, setup=_setup)
