"""Head pruning of a fine-tuned Transformer to a dev-metric budget, then compaction (Michel et al. 2019).

Launch (also a recipe stage, ``kind = "prune"``)::

    python -m experiments.main --config=experiments/configs/prune.py:sst2 --workdir=/tmp/pruned \\
        --config.model_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2

The job form of ``experiments.tools.prune``: the iterative importance curve (importance from training
examples), the largest pruned fraction within ``max_drop`` points of the unpruned dev metric, the model
compacted into ``WORKDIR/model``.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune


def get_config(task: str = "synthetic") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "prune"  # experiments/jobs/stages.py
    c.task = task  # the task the model was fine-tuned on
    c.data_dir = finetune._optional_str(finetune.default_data_dir(task))  # its data folder; None when generated
    c.synthetic_size = 2000  # training examples of a generated task
    c.seed = 0  # the importance examples' sample
    c.model_dir = finetune._optional_str(None)  # the fine-tuned Transformer (DIR/model); required
    c.max_drop = 1.0  # largest dev-metric drop allowed, in points
    c.step = 0.1  # fraction of all heads removed per round
    c.max_fraction = 0.5  # end of the curve
    c.importance_examples = 1024  # training examples for the importance estimate per round
    return c


CONSTRAINTS = {"job": dict(choices=("prune",)), "synthetic_size": dict(min=2), "seed": dict(min=0),
               "max_drop": dict(min=0.0), "step": dict(min=1e-3, max=1.0), "max_fraction": dict(min=0.0, max=0.999),
               "importance_examples": dict(min=1)}
