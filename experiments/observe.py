"""What a run tells its user: progress bar, log lines, metrics.jsonl, TensorBoard events, results.json.

Only process 0 writes files and logs metrics; the other processes of a multi-host run stay quiet.
TensorBoard event files are written with tensorboardX, so TensorFlow is not needed.
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from experiments.trainer import path_str


def is_writer() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0


class _DropLibraryInfo(logging_std.Filter):
    """Drops INFO/DEBUG records logged from inside the given packages (Orbax logs every save step by step)."""

    def __init__(self, packages: tuple[str, ...]):
        super().__init__()
        self._markers = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

    def filter(self, record) -> bool:
        return record.levelno >= logging_std.WARNING or not any(m in record.pathname for m in self._markers)


def quiet_library_logs(packages: tuple[str, ...] = ("orbax",)) -> None:
    """Keeps warnings but drops routine INFO logs of ``packages`` from the absl log (idempotent)."""
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, _DropLibraryInfo) for f in absl_logger.filters):
        absl_logger.addFilter(_DropLibraryInfo(packages))


def parameter_overview(params: Any, max_rows: int = 60) -> str:
    """A table of parameter paths, shapes, dtypes and sizes, and the total count.

    Rows beyond ``max_rows`` are summarised in one line so that a deep model does not flood the log.
    """
    rows = [(path_str(p), tuple(np.shape(x)), str(np.result_type(x)), int(np.prod(np.shape(x))))
            for p, x in jax.tree_util.tree_leaves_with_path(params)]
    total = sum(r[3] for r in rows)
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'name':<{width}}  {'shape':<18} {'dtype':<9} {'size':>12}"]
    for name, shape, dtype, size in rows[:max_rows]:
        lines.append(f"{name:<{width}}  {str(shape):<18} {dtype:<9} {size:>12,}")
    if len(rows) > max_rows:
        rest = rows[max_rows:]
        lines.append(f"... {len(rest)} more arrays, {sum(r[3] for r in rest):,} parameters")
    lines.append(f"total: {len(rows)} arrays, {total:,} parameters")
    return "\n".join(lines)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without dragging in PyTorch.

    tensorboardX tries ``import torch`` at import time only to accept torch tensors, which we never pass;
    with the optional torch extra installed that costs seconds and hundreds of MB per process, so the
    import is hidden from it (and restored right after) unless torch is already loaded.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tensorboardX's import
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends records to ``workdir/metrics.jsonl`` and scalars to TensorBoard event files.

    Each JSONL line is ``{"step": N, "split": "train"|"eval", <metric>: value, ...}``. On resume from step
    ``resume_step``, records written after it by the interrupted run are dropped first (from the JSONL file,
    and through tensorboardX's ``purge_step`` from TensorBoard), so the files describe one trajectory.
    """

    def __init__(self, workdir: str, *, resume_step: int | None = None):
        self.enabled = is_writer()
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run in a reused workdir starts a fresh log
        self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"),
                                 purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: _finite_or_none(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def write_text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, f"```\n{text}\n```", 0)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar over training steps when stderr is a terminal (``mode="auto"``), else nothing."""

    def __init__(self, total: int, initial: int, mode: str = "auto"):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"progress mode must be auto|on|off, got {mode!r}")
        show = is_writer() and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        self._bar = None
        if show:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def log_line(step: int, total: int, metrics: Mapping[str, float]) -> None:
    """One INFO line: ``step 120/2105 loss 0.3412 lr 4.1e-05 examples/s 812.3 tokens/s 24,310``."""
    if not is_writer():
        return
    parts = [f"step {step}/{total}"]
    for key, fmt in (("loss", "{:.4f}"), ("learning_rate", "{:.3g}"), ("examples_per_s", "{:.1f}"),
                     ("tokens_per_s", "{:,.0f}")):
        if key in metrics:
            label = {"learning_rate": "lr", "examples_per_s": "examples/s", "tokens_per_s": "tokens/s"}.get(key, key)
            parts.append(f"{label} {fmt.format(metrics[key])}")
    logging.info("  ".join(parts))


def write_results(workdir: str, *, final: Mapping[str, float], best: Mapping[str, float], steps: int,
                  wall_time_s: float, extra: Mapping[str, Any] | None = None) -> str:
    """Writes ``workdir/results.json``: ``{"final", "best", "steps", "wall_time_s", ...extra}``."""
    path = os.path.join(workdir, "results.json")
    if is_writer():
        record = {"final": dict(final), "best": dict(best), "steps": int(steps), "wall_time_s": float(wall_time_s)}
        record.update(extra or {})
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, path)
    return path
