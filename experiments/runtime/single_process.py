"""Work one process of a multi-host run does while the others wait, with waits that no long stage can time out.

Pruning, quantization, export and the report run on process 0 only. Waiting for them at a barrier would tie their
length to the barrier's timeout (the coordination service's ``wait_at_barrier`` gives up with DEADLINE_EXCEEDED
and the job dies; Orbax's barriers default to 300 s), so :func:`run_on_process_0` has the others wait for a
message instead:

1. process 0 runs the work, then publishes its outcome in the distributed runtime's key-value store (the
   coordination service that ``jax.distributed`` starts): ``{"status": "done"}``, or ``{"status": "failed",
   "error": ...}`` when the work raised;
2. the others wait for that key in short blocking reads, logging a progress line every :data:`PROGRESS_EVERY_S`
   seconds, for at most the wait limit (``--stage_wait_limit_s``, 24 hours by default);
3. on success all meet at a short barrier; on failure the others raise :class:`ProcessZeroFailed` with process 0's
   error, after a barrier that keeps process 0 (which hosts the coordination service) alive until every process
   has read it.

Keys are numbered in call order, which every process shares, so an earlier attempt can never be mistaken for this
one; nothing is written to the workdir, so the wait does not depend on the store (or on the workdir being shared
between hosts), and a process 0 that dies takes the coordination service with it, which ends the others' wait at
once instead of at the limit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar

from absl import logging

T = TypeVar("T")
DEFAULT_WAIT_LIMIT_S = 24 * 3600.0
DEFAULT_BARRIER_TIMEOUT_S = 600.0
POLL_S = 5.0  # the longest one blocking read of the outcome waits
PROGRESS_EVERY_S = 60.0  # between two "still waiting" lines

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


_calls = 0  # run_on_process_0 calls so far: every process makes them in the same order, so their keys agree


def run_on_process_0(name: str, fn: Callable[[], T], directory: str | None = None) -> T | None:
    """Runs ``fn()`` on process 0 while the other processes wait (see the module docstring); returns its result
    on process 0 and None on the others. With one process it is just ``fn()``. ``directory`` (where the work
    writes) is named in the waiting processes' log lines.

    Raises (on every process) what ``fn`` raised on process 0: the exception itself there,
    :class:`ProcessZeroFailed` with its message elsewhere; ``TimeoutError`` on a process whose wait passed the
    limit.
    """
    global _calls
    import jax

    from experiments.runtime import parallel

    if jax.process_count() == 1:
        return fn()
    key = f"nlpress/single_process/{_calls}/{name}"
    _calls += 1
    client = parallel.coordination_client()
    if jax.process_index() != 0:
        _wait(client, key, name, name if directory is None else f"{name} in {directory}")
        barrier(f"{name}_done")
        return None
    try:
        result = fn()
    except BaseException as e:
        client.key_value_set(key, json.dumps({"status": "failed", "error": f"{type(e).__name__}: {e}"}))
        try:
            barrier(f"{name}_failed")  # the others have read the error before this process (and its runtime) ends
        except Exception as barrier_error:  # noqa: BLE001 - a process already gone must not hide the error
            logging.warning("not every process acknowledged the failure of %s: %s", name, barrier_error)
        raise
    client.key_value_set(key, json.dumps({"status": "done"}))
    barrier(f"{name}_done")
    return result


def _wait(client, key: str, name: str, what: str) -> None:
    import jax

    start = time.monotonic()
    last_line = start
    logging.info("process %d waits for process 0 to run %s (for at most %s)", jax.process_index(), what,
                 _duration(_wait_limit_s))
    while True:
        remaining = _wait_limit_s - (time.monotonic() - start)
        if remaining <= 0:
            raise TimeoutError(f"process 0 did not finish {what} within {_duration(_wait_limit_s)} "
                               "(--stage_wait_limit_s)")
        try:
            record = json.loads(client.blocking_key_value_get(key, int(min(POLL_S, remaining) * 1000)))
        except Exception as e:  # noqa: BLE001 - jaxlib's error type is not public
            if "DEADLINE_EXCEEDED" not in str(e):
                raise RuntimeError(f"lost the distributed runtime while waiting for process 0 to run {what}: "
                                   f"{e}") from e
            now = time.monotonic()
            if now - last_line >= PROGRESS_EVERY_S:
                logging.info("process %d still waits for process 0 to run %s: %s so far (limit %s)",
                             jax.process_index(), what, _duration(now - start), _duration(_wait_limit_s))
                last_line = now
            continue
        if record.get("status") == "done":
            return
        barrier(f"{name}_failed")
        raise ProcessZeroFailed(f"process 0 failed in {name}: {record.get('error')}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
