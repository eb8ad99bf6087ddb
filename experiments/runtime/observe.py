"""What a run tells its user: progress bar, log lines, metrics.jsonl, TensorBoard events, results.json.

Only process 0 writes files and logs metrics; the other processes of a multi-host run stay quiet. The workdir may
be local or in a bucket (``gs://``, :mod:`models.storage`); an object cannot be appended to, so there
``metrics.jsonl`` is rewritten whole at each record (a few kB: one record per log or eval step).
TensorBoard event files are written with tensorboardX, so TensorFlow is not needed; in a bucket through the path
layer too (:class:`_StoreRecordWriter`: tensorboardX's own ``gs://`` writer bypasses the store retries and uploads
again when garbage-collected).
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from experiments.runtime.trainer import path_str
from models import storage


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
    else:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tensorboardX's import
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    from tensorboardX import record_writer
    record_writer.register_writer_factory("gs", _StoreRecordWriter)
    return SummaryWriter


class _StoreRecordWriter:
    """tensorboardX's record writer (and its factory) for ``gs://`` event files on the path layer: an object
    cannot be appended to, so each flush uploads the file whole, with the store's retries; an unchanged file is
    not uploaded again."""

    def __init__(self, path: str):
        self.path, self.buffer, self._flushed = path, bytearray(), 0

    @classmethod
    def open(cls, path: str) -> "_StoreRecordWriter":
        return cls(path)

    @staticmethod
    def directory_check(path: str) -> None:  # a bucket needs no directories
        del path

    def write(self, data: bytes) -> None:
        self.buffer += data

    def flush(self) -> None:
        if len(self.buffer) != self._flushed:
            with storage.atomic_file(self.path) as tmp:
                tmp.write_bytes(bytes(self.buffer))
            self._flushed = len(self.buffer)

    def close(self) -> None:
        self.flush()


def _read_records(path: str) -> list[tuple[int, str]]:
    """The parseable records of a metrics.jsonl file as (step, line ending in a newline); unparseable lines
    (a torn last line is what a kill mid-write leaves) are dropped with a warning naming the file and line."""
    out = []
    for number, raw in enumerate(storage.read_bytes(path).splitlines(keepends=True), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            step = int(record["step"])
        except (ValueError, TypeError, KeyError) as e:  # JSON and UTF-8 errors are ValueErrors
            logging.warning("%s:%d: dropping an unreadable record (%s: %.80r), e.g. torn by a kill",
                            path, number, type(e).__name__, raw)
            continue
        out.append((step, raw.decode("utf-8").rstrip("\n") + "\n"))
    return out


def _set_aside(path: str) -> str:
    """Renames ``path`` to ``path.old-<timestamp>`` (a fresh suffix if taken); returns the new name."""
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    dest = f"{path}.old-{stamp}"
    while storage.exists(dest):
        n += 1
        dest = f"{path}.old-{stamp}-{n}"
    storage.move(path, dest)
    return dest


class MetricWriter:
    """Appends records to ``workdir/metrics.jsonl`` and scalars to TensorBoard event files.

    Each JSONL line is ``{"step": N, "split": "train"|"eval", <metric>: value, ...}``. On resume from step
    ``resume_step``, records written after it by the interrupted run are dropped first (from the JSONL file,
    and through tensorboardX's ``purge_step`` from TensorBoard), so the files describe one trajectory;
    unreadable lines (torn by a kill) are dropped with a warning. A run that starts from step 0 in a workdir
    that already has a metrics.jsonl (a reused workdir, or every checkpoint corrupt) moves it aside to
    ``metrics.jsonl.old-<timestamp>`` with a warning rather than deleting a record of work.
    """

    def __init__(self, workdir: str, *, resume_step: int | None = None):
        self.enabled = is_writer()
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._lines: list[str] | None = [] if storage.is_remote(workdir) else None  # an object's whole text
        if not self.enabled:
            return
        storage.makedirs(workdir)
        if resume_step is not None and storage.exists(self.path):
            kept = [line for step, line in _read_records(self.path) if step <= resume_step]
            storage.write_text(self.path, "".join(kept))
            if self._lines is not None:
                self._lines = kept
        elif resume_step is None and storage.exists(self.path):
            old = _set_aside(self.path)
            logging.warning("starting from step 0 in %s, which already holds a metrics log: moved it to %s",
                            workdir, old)
        self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"),
                                 purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: _finite_or_none(v) for k, v in metrics.items()})
        if self._lines is None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self._lines.append(json.dumps(record) + "\n")
            storage.write_text(self.path, "".join(self._lines))
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


def write_json(path: str, record: Mapping[str, Any]) -> None:
    """Writes ``record`` to ``path`` atomically (readers see the old file or the whole new one)."""
    with storage.atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=2)


def write_results(workdir: str, *, final: Mapping[str, float], best: Mapping[str, float], steps: int,
                  wall_time_s: float, extra: Mapping[str, Any] | None = None) -> str:
    """Writes ``workdir/results.json`` atomically: ``{"final", "best", "steps", "wall_time_s", ...extra}``.

    ``extra`` should carry the run's ``"fingerprint"`` (the dict given to :func:`experiments.runtime.loop.fit`),
    so that a finished run says which config produced it.
    """
    path = os.path.join(workdir, "results.json")
    if is_writer():
        record = {"final": dict(final), "best": dict(best), "steps": int(steps), "wall_time_s": float(wall_time_s)}
        record.update(extra or {})
        write_json(path, record)
    return path


def read_results(workdir: str) -> dict | None:
    """The parsed ``workdir/results.json``; ``None`` when it is missing, or unreadable (truncated, garbled:
    then with a warning naming it), so that such a run counts as not finished and is run again."""
    path = os.path.join(workdir, "results.json")
    if not storage.exists(path):
        return None
    try:
        record = json.loads(storage.read_bytes(path))
    except ValueError as e:  # JSON and UTF-8 errors
        logging.warning("%s is unreadable (%s): treating the run as not finished", path, e)
        return None
    if not isinstance(record, dict):
        logging.warning("%s holds a JSON %s, not an object: treating the run as not finished", path,
                        type(record).__name__)
        return None
    return record
