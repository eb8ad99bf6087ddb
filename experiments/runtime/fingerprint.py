"""Fingerprints of what makes a run: its config, its input files and its parameters.

A resumed run must be the run that wrote the checkpoint. :func:`experiments.runtime.loop.fit` stores the
caller's fingerprint (a flat JSON dict, usually :func:`config_fingerprint` of the job config plus fingerprints
of its inputs) in every checkpoint and compares it on resume (:func:`check`): a changed seed, learning rate,
batch size or run length stops before training with :class:`FingerprintMismatchError` naming each change,
instead of mixing two trajectories. ``results.json`` should carry the same dict
(``observe.write_results(..., extra={"fingerprint": fp})``) so a finished stage says what produced it.

:func:`params_fingerprint` keys caches of model outputs (e.g. teacher logits) by the weights themselves rather
than by a path and step that a retrained model can reuse.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from experiments.runtime.parallel import is_key
from experiments.runtime.trainer import path_str
from models import storage

# Config fields that change how a run reports or stores itself but not its trajectory (the parameters after
# each step): output cadence and verbosity, checkpoint bookkeeping, and the eval batch size (evaluation sums
# over the same examples), and the switch that allows changes (:data:`SWITCH`). A change of any of them
# resumes without a word.
TRAJECTORY_NEUTRAL = ("log_every_steps", "progress_bar", "eval_batch_size", "checkpoint.async_save",
                      "checkpoint.keep", "checkpoint.every_steps", "allow_changed_config")
# The config switch a job maps to ``fit(allow_changed=...)``, named in the mismatch message.
SWITCH = "--config.allow_changed_config=True"
# Files up to this size are fingerprinted by content; larger ones by size and modification time.
HASH_LIMIT_BYTES = 1 << 20


class FingerprintMismatchError(ValueError):
    """The checkpoint to resume was written by a run whose fingerprint differs; the message lists each change."""


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so that stored and fresh values compare
    equal; what JSON cannot hold becomes its ``repr``; a non-finite float its string ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return repr(value)


def normalize(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """``fingerprint`` with every value as it reads back from JSON: what :func:`check` compares and what a
    checkpoint stores."""
    return {str(k): _jsonable(v) for k, v in fingerprint.items()}


def config_fingerprint(config: Any, exclude: Iterable[str] = TRAJECTORY_NEUTRAL) -> dict[str, Any]:
    """The config flattened to ``{"a.b": value}`` (JSON values), minus the fields ``exclude`` names.

    ``config`` is an ``ml_collections.ConfigDict`` (or any nested mapping). A name in ``exclude`` drops that
    field, or the whole section when it names one (``"checkpoint"`` drops ``checkpoint.*``); by default the
    :data:`TRAJECTORY_NEUTRAL` fields.
    """
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    exclude = tuple(exclude)
    flat: dict[str, Any] = {}

    def visit(node: Mapping, prefix: str) -> None:
        for key in sorted(node):
            name = f"{prefix}{key}"
            if any(name == e or name.startswith(e + ".") for e in exclude):
                continue
            if isinstance(node[key], Mapping):
                visit(node[key], name + ".")
            else:
                flat[name] = _jsonable(node[key])

    visit(tree, "")
    return flat


def _file_entry(path: str, hash_limit: int) -> dict[str, Any]:
    size, mtime_ns = storage.size_and_mtime_ns(path)
    if size <= hash_limit:
        return {"sha256": hashlib.sha256(storage.read_bytes(path)).hexdigest()}
    return {"size": size, "mtime_ns": mtime_ns}


def _walk(path: str) -> Iterator[str]:
    """The files under directory ``path`` (local or remote), in ``os.walk`` order with sorted names."""
    if not storage.is_remote(path):
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            yield from (os.path.join(dirpath, name) for name in sorted(filenames))
        return
    for name in storage.listdir(path):
        child = os.path.join(path, name)
        if storage.is_dir(child):
            yield from _walk(child)
        else:
            yield child


def file_fingerprint(paths: Iterable[str | os.PathLike], *,
                     hash_limit: int = HASH_LIMIT_BYTES) -> dict[str, dict[str, Any]]:
    """``{file path: {"sha256": hex}}`` for files up to ``hash_limit`` bytes, ``{"size", "mtime_ns"}`` for
    larger ones (cheap, and any rewrite changes the mtime). A directory contributes every file under it
    (``dir/sub/file`` keys, sorted). Paths may be gs:// URLs. Raises ``FileNotFoundError`` naming a missing
    path."""
    out: dict[str, dict[str, Any]] = {}
    for p in map(os.fspath, paths):
        if storage.is_dir(p):
            for file in _walk(p):
                out[file] = _file_entry(file, hash_limit)
        elif storage.is_file(p):
            out[p] = _file_entry(p, hash_limit)
        else:
            raise FileNotFoundError(f"cannot fingerprint {p}: no such file or directory")
    return out


def content_digest(path: str) -> str:
    """A sha256 of file or directory ``path``'s :func:`file_fingerprint`, keyed by paths relative to it, so
    that a moved data folder or model keeps its digest."""
    files = file_fingerprint([path])
    relative = {storage.relative_to(name, path) if name != path else os.path.basename(path): entry
                for name, entry in files.items()}
    return hashlib.sha256(json.dumps(relative, sort_keys=True).encode()).hexdigest()


def params_fingerprint(params: Any) -> str:
    """A SHA-256 hex digest of a parameter tree: every leaf's path, dtype, shape and bytes, in tree order.

    Equal digests mean bit-identical trees. Leaves may be numpy or jax arrays (fetched to the host) or typed
    PRNG keys (their key data). Measured: 0.07 s for 22.3M float32 parameters (89 MB, MiniLM-sized)
    in numpy, 0.08-0.12 s as jax arrays, on one core of a Xeon with AVX-512 (2026): cheap next to loading them.
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        arr = np.ascontiguousarray(jax.random.key_data(leaf) if is_key(leaf) else leaf)
        h.update(f"{path_str(path)}|{arr.dtype}|{arr.shape};".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One line per field that differs between two fingerprints: ``"name: old -> new"``, with ``<absent>``
    for a field that only one side has; sorted by field name."""
    absent = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, absent), new.get(key, absent)
        if a != b:
            show = lambda v: "<absent>" if v is absent else json.dumps(v)
            lines.append(f"{key}: {show(a)} -> {show(b)}")
    return lines


def check(stored: Mapping[str, Any] | None, current: Mapping[str, Any] | None, *, where: str,
          allow_changed: bool = False) -> None:
    """Compares the fingerprint ``stored`` with a checkpoint (at ``where``) with the run's ``current`` one.

    Differences raise :class:`FingerprintMismatchError` listing them, or with ``allow_changed`` log them as a
    warning. A side without a fingerprint (a checkpoint from before fingerprints, or a caller that gives
    none) cannot be compared: that is logged and passes.
    """
    if current is None:
        return
    if stored is None:
        logging.warning("%s holds no config fingerprint (written before fingerprints): cannot check that it "
                        "comes from this config; resuming", where)
        return
    changes = diff(stored, normalize(current))
    if not changes:
        return
    listing = "\n  ".join(changes)
    if allow_changed:
        logging.warning("resuming %s with a changed config, as allowed:\n  %s", where, listing)
        return
    raise FingerprintMismatchError(
        f"{where} was written by a run with a different config; resuming would mix two runs. Changed "
        f"(checkpoint -> this run):\n  {listing}\nUse a new workdir for the new config, restore the old values, "
        f"or continue this run with the new values on purpose with {SWITCH}.")
