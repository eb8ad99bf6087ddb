"""Work one process of a multi-host run does while the others wait, with waits that no long stage can time out.

Pruning, quantization, export and the report run on process 0 only. Waiting for them at a barrier of the
distributed runtime would tie their length to the barrier's timeout (the coordination service's
``wait_at_barrier`` gives up with DEADLINE_EXCEEDED and the job dies; Orbax's barriers default to 300 s), so
:func:`run_on_process_0` makes the others poll a marker instead:

1. process 0 removes the marker of an earlier attempt; all meet at a barrier (everyone is there: it is short),
   so nobody can read a stale marker;
2. process 0 runs the work and writes ``<directory>/.single_process/<name>.json``: ``{"status": "done"}``, or
   ``{"status": "failed", "error": ...}`` when the work raised. The others read it every
   :data:`POLL_S` seconds, logging a progress line every :data:`PROGRESS_EVERY_S` seconds, for at most the wait
   limit (``--stage_wait_limit_s``, 24 hours by default);
3. on success all meet at a second short barrier; on failure the others raise :class:`ProcessZeroFailed` with
   process 0's error, after a barrier that keeps process 0 (which hosts the coordination service) alive until
   every process has read it.

The marker lives in the workdir, so the polling works wherever the workdir is (a local disk for one machine's
processes, a bucket for a pod), and its reads go through the store's retries (:mod:`models.retries`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import TypeVar

from absl import logging

from models import storage

T = TypeVar("T")
DEFAULT_WAIT_LIMIT_S = 24 * 3600.0
DEFAULT_BARRIER_TIMEOUT_S = 600.0
POLL_S = 1.0  # between two reads of the marker
PROGRESS_EVERY_S = 60.0  # between two "still waiting" lines
MARKER_DIR = ".single_process"

_wait_limit_s = DEFAULT_WAIT_LIMIT_S
_barrier_timeout_s = DEFAULT_BARRIER_TIMEOUT_S


def configure(wait_limit_s: float, barrier_timeout_s: float) -> None:
    """Sets how long the other processes wait for process 0's work (``--stage_wait_limit_s``) and how long a
    barrier waits for every process to arrive (``--barrier_timeout_s``)."""
    global _wait_limit_s, _barrier_timeout_s
    if not (wait_limit_s > 0 and barrier_timeout_s > 0):
        raise ValueError(f"wait limit and barrier timeout must be > 0 s, got {wait_limit_s}, {barrier_timeout_s}")
    _wait_limit_s, _barrier_timeout_s = float(wait_limit_s), float(barrier_timeout_s)


def barrier_timeout_s() -> float:
    return _barrier_timeout_s


class ProcessZeroFailed(RuntimeError):
    """Process 0's single-process work raised; the message carries its error."""


def barrier(name: str) -> None:
    """All processes meet (:func:`experiments.runtime.parallel.barrier` with the configured timeout)."""
    from experiments.runtime import parallel

    parallel.barrier(name, _barrier_timeout_s)


def marker_path(directory: str, name: str) -> str:
    return os.path.join(directory, MARKER_DIR, f"{name}.json")


def run_on_process_0(name: str, fn: Callable[[], T], directory: str) -> T | None:
    """Runs ``fn()`` on process 0 while the other processes wait (see the module docstring); returns its result
    on process 0 and None on the others. With one process it is just ``fn()``.

    Raises (on every process) what ``fn`` raised on process 0: the exception itself there,
    :class:`ProcessZeroFailed` with its message elsewhere; ``TimeoutError`` on a process whose wait passed the
    limit.
    """
    import jax

    if jax.process_count() == 1:
        return fn()
    marker = marker_path(directory, name)
    first = jax.process_index() == 0
    if first:
        storage.remove(marker)
    barrier(f"{name}_start")
    if not first:
        _wait(marker, name)
        barrier(f"{name}_done")
        return None
    try:
        result = fn()
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        storage.makedirs(os.path.dirname(marker))
        storage.write_text(marker, json.dumps({"status": "failed", "error": error}))
        try:
            barrier(f"{name}_failed")  # the others have read the error before this process (and its runtime) ends
        except Exception as barrier_error:  # noqa: BLE001 - a process already gone must not hide the error
            logging.warning("not every process acknowledged the failure of %s: %s", name, barrier_error)
        raise
    storage.makedirs(os.path.dirname(marker))
    storage.write_text(marker, json.dumps({"status": "done"}))
    barrier(f"{name}_done")
    return result


def _wait(marker: str, name: str) -> None:
    import jax

    start = time.monotonic()
    last_line = start
    logging.info("process %d waits for process 0 to run %s (polling %s every %g s, for at most %s)",
                 jax.process_index(), name, marker, POLL_S, _duration(_wait_limit_s))
    while True:
        record = json.loads(storage.read_text(marker)) if storage.exists(marker) else None
        if record is not None and record.get("status") == "done":
            return
        if record is not None:
            barrier(f"{name}_failed")
            raise ProcessZeroFailed(f"process 0 failed in {name}: {record.get('error')}")
        now = time.monotonic()
        if now - start > _wait_limit_s:
            raise TimeoutError(f"process 0 did not finish {name} within {_duration(_wait_limit_s)} "
                               f"(--stage_wait_limit_s): {marker} never appeared")
        if now - last_line >= PROGRESS_EVERY_S:
            logging.info("process %d still waits for process 0 to run %s: %s so far (limit %s)",
                         jax.process_index(), name, _duration(now - start), _duration(_wait_limit_s))
            last_line = now
        time.sleep(POLL_S)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
