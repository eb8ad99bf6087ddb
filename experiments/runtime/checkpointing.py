"""Checkpoints of host-side train-state trees, with Orbax inside and corruption detection on top.

:class:`Checkpointer` keeps the newest ``keep`` checkpoints plus the best one by an eval metric, saves
asynchronously, and restores the newest checkpoint that verifies. Each checkpoint holds two Orbax items:

* ``state``: the tree's leaves as a flat dict ``{"leaf_00000": array, ...}`` (typed PRNG keys stored as
  their uint32 key data). Flat leaves make any pytree (optax states with ``MaskedNode``, flax dataclasses)
  checkpointable without registering types, and the template given at restore rebuilds the structure.
* ``meta`` (JSON): every leaf's path, shape, dtype and CRC-32, the key implementations, the eval metrics
  (if any) and caller metadata.

Restore reads ``meta`` first. A structure that differs from the template is a configuration change and an
error (start a new workdir); a checkpoint that fails to read or whose CRCs do not match is corrupt: it is
moved to ``<directory>/corrupt/`` with a warning and the previous checkpoint is tried. Orbax writes into a
temporary directory and renames it when complete, so a save cut short by a kill never shows up as a step.

In a bucket Orbax writes its arrays through TensorStore, whose GCS requests retry on their own (32 times, delays
doubling from 1 s to 32 s, about 15 minutes) with no Orbax setting for it; :func:`_install_tensorstore_retries`
gives them the retry budget of every other store request (:mod:`models.retries`). A checkpoint that cannot be
read because the store is down is not corrupt: the outage stops the run and the checkpoint stays where it is.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from experiments.runtime.parallel import is_key
from experiments.runtime.trainer import path_str
from models import retries, storage

PyTree = Any


def _install_tensorstore_retries() -> None:
    """Makes Orbax's TensorStore contexts carry the store retry budget (``gcs_request_retries``), read when each
    context is made. Orbax builds them in one function of its serialization utilities and takes no context from
    the caller, so that function is wrapped; if it moves, TensorStore keeps its own retries (with a warning)."""
    import tensorstore as ts

    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils
        make_context = tensorstore_utils.get_ts_context
    except (ImportError, AttributeError):  # pragma: no cover - another Orbax
        logging.warning("Orbax changed: TensorStore keeps its own GCS retries (up to 32, about 15 minutes)")
        return
    if getattr(make_context, "_nlpress_retries", False):
        return

    def get_ts_context(*args, **kwargs):
        return ts.Context(retries.tensorstore_retries(), parent=make_context(*args, **kwargs))

    get_ts_context._nlpress_retries = True
    tensorstore_utils.get_ts_context = get_ts_context


_install_tensorstore_retries()


class CheckpointMismatchError(ValueError):
    """A checkpoint's tree does not match the run's state (the model or optimizer config changed)."""


def _flatten(tree: PyTree) -> tuple[dict[str, np.ndarray], dict]:
    """Host tree -> (flat leaves, meta describing them)."""
    leaves_with_paths = jax.tree_util.tree_leaves_with_path(tree)
    flat, paths, shapes, dtypes, crcs, key_impls = {}, [], [], [], [], {}
    for i, (path, leaf) in enumerate(leaves_with_paths):
        name = f"leaf_{i:05d}"
        if is_key(leaf):
            key_impls[name] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        arr = np.asarray(leaf)
        flat[name] = arr
        paths.append(path_str(path))
        shapes.append(list(arr.shape))
        dtypes.append(str(arr.dtype))
        crcs.append(zlib.crc32(arr.tobytes()))
    return flat, {"paths": paths, "shapes": shapes, "dtypes": dtypes, "crc32": crcs, "key_impls": key_impls}


class Checkpointer:
    """Orbax-backed checkpoints of a host tree; see the module docstring.

    Args:
      directory: where step directories live (created if missing).
      keep: how many of the newest checkpoints to keep (>= 1).
      best_metric: eval metric whose best checkpoint is kept besides the newest ones (``None``: no best).
      best_mode: ``"max"`` or ``"min"``: which direction is better.
      async_save: write in a background thread (call :meth:`wait` / :meth:`close` before reading).
    """

    def __init__(self, directory: str, *, keep: int = 2, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = storage.absolute(directory)  # a local path or a gs:// URL (Orbax writes both)
        self.best_metric, self.best_mode = best_metric, best_mode
        policies = [checkpoint_managers.LatestN(keep)]
        if best_metric:
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # -- saving ---------------------------------------------------------------------------------------

    def save(self, step: int, tree: PyTree, *, metrics: dict[str, float] | None = None,
             meta: dict | None = None) -> None:
        """Saves ``tree`` (host arrays, typed keys allowed) as ``step``; ``metrics`` rank it for best-keeping.

        Every process must call it (Orbax saves collectively; replicated arrays are written once).
        """
        flat, info = _flatten(tree)
        info["step"] = int(step)
        info["metrics"] = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        info["user"] = meta or {}
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            raise KeyError(f"metrics lack the best metric {self.best_metric!r}: {sorted(metrics)}")
        self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                              meta=ocp.args.JsonSave(info)),
                           metrics=info["metrics"], force=True)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # -- reading --------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Finalised checkpoint steps, ascending."""
        return sorted(self._manager.all_steps())

    def read_meta(self, step: int) -> dict:
        """The ``meta`` item of ``step`` (paths, shapes, metrics, caller metadata)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def best_step(self) -> int | None:
        """The kept checkpoint with the best ``best_metric``, the later one of a tie (``None`` if none carries
        metrics)."""
        if not self.best_metric:
            return None
        scored = []
        for step in self.steps():
            try:
                metrics = self.read_meta(step).get("metrics")
            except Exception as e:  # noqa: BLE001 - an unreadable checkpoint simply does not compete
                if retries.is_outage(e):  # ... but an unreachable store stops the run
                    raise
                continue
            if metrics and self.best_metric in metrics:
                scored.append((metrics[self.best_metric], step))
        if not scored:
            return None
        sign = 1 if self.best_mode == "max" else -1  # a tie goes to the later step, in either mode
        return max((sign * metric, step) for metric, step in scored)[1]

    def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict]:
        """Restores ``step`` into the structure of ``template``; returns (tree, caller metadata).

        Raises :class:`CheckpointMismatchError` if the saved tree does not match the template, and
        ``IOError`` if the checkpoint is unreadable or fails its CRC check.
        """
        flat_t, info_t = _flatten(template)
        try:
            info = self.read_meta(step)
        except Exception as e:  # noqa: BLE001 - any read failure means the checkpoint is unusable
            if retries.is_outage(e):  # the store is down, the checkpoint may be fine: stop, move nothing
                raise
            raise IOError(f"checkpoint {step}: cannot read its metadata ({type(e).__name__}: {e})") from e
        self._check_structure(step, info, info_t)
        target = {k: np.zeros(v.shape, v.dtype) for k, v in flat_t.items()}
        try:
            flat = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        except Exception as e:  # noqa: BLE001
            if retries.is_outage(e):
                raise
            raise IOError(f"checkpoint {step}: cannot read its arrays ({type(e).__name__}: {e})") from e
        for i, (name, expected) in enumerate(zip(sorted(target), info["crc32"])):
            arr = np.asarray(flat[name])
            if zlib.crc32(arr.tobytes()) != expected:
                raise IOError(f"checkpoint {step}: leaf {info['paths'][i]} fails its CRC-32 check")
        leaves = []
        for name in sorted(target):
            arr = np.asarray(flat[name])
            if name in info["key_impls"]:
                leaves.append(jax.random.wrap_key_data(arr, impl=info["key_impls"][name]))
            else:
                leaves.append(arr)
        return jax.tree.unflatten(jax.tree.structure(template), leaves), info["user"]

    @staticmethod
    def _check_structure(step: int, info: dict, expected: dict) -> None:
        if info["paths"] != expected["paths"]:
            missing = sorted(set(expected["paths"]) - set(info["paths"]))[:5]
            extra = sorted(set(info["paths"]) - set(expected["paths"]))[:5]
            raise CheckpointMismatchError(
                f"checkpoint {step} holds a different tree than this run (missing {missing}, unexpected "
                f"{extra}); the model or optimizer config changed: use a new workdir")
        for path, shape, dtype, shape_t, dtype_t in zip(info["paths"], info["shapes"], info["dtypes"],
                                                         expected["shapes"], expected["dtypes"]):
            if shape != shape_t or dtype != dtype_t:
                raise CheckpointMismatchError(
                    f"checkpoint {step}: {path} is {dtype}{shape}, this run has {dtype_t}{shape_t}; the model "
                    "or optimizer config changed: use a new workdir")

    def restore_latest(self, template: PyTree) -> tuple[int, PyTree, dict] | None:
        """Restores the newest checkpoint that verifies: (step, tree, caller metadata), or ``None``.

        Corrupt checkpoints met on the way are moved to ``<directory>/corrupt/`` with a warning; when every
        checkpoint is corrupt, a warning lists them and says that the run starts from step 0.
        """
        rejected = []
        for step in reversed(self.steps()):
            try:
                tree, user = self.restore(step, template)
                return step, tree, user
            except IOError as e:
                logging.warning("%s; moving it aside and trying the previous checkpoint", e)
                self._quarantine(step)
                rejected.append(step)
        if rejected:
            logging.warning("every checkpoint in %s is corrupt (steps %s, moved to %s): starting from step 0",
                            self.directory, sorted(rejected), os.path.join(self.directory, "corrupt"))
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            dest = os.path.join(self.directory, "corrupt", f"{step}-{int(time.time())}")
            storage.makedirs(os.path.dirname(dest))
            storage.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        self._manager.reload()
