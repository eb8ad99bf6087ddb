"""Self-describing model directories: what every stage (training, distillation, pruning, export) hands on.

A model directory holds::

    config.json          {"format_version": 1, "family": "transformer", "config": {...TransformerConfig...},
                          "num_tensors": N, "extra": {...}}
    params.safetensors   the ``params`` collection, one tensor per leaf, names joined by "/"
                         (e.g. "encoder/layer_0/attention/query/kernel"), stored in the leaves' own dtypes
    vocab.txt, tokenizer.json, ...   the tokenizer / vocabulary files, copied when ``tokenizer_dir`` is given

``load(path)`` rebuilds the family's Flax module from the config through a small registry (family name ->
import path of its config class and model class). Families are imported lazily, so registering a family whose
file does not exist yet costs nothing until a directory of that family is loaded.

Directories are written atomically: everything (extra files such as a QAT ``quant_state.npz`` included) goes
into a hidden temporary sibling that is renamed into place at the end, so a crash never leaves a directory that
looks finished. Every atomic writer of the project names its temporaries the same way (:func:`temporary_path`,
``.tmp-<8 hex>.<name>``), so that what a killed write leaves behind can be found and removed safely
(:func:`experiments.runtime.workdir.remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from models.config_base import ModelConfig

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
# Files that make up a Hugging Face tokenizer or a word-level vocabulary; those present are copied.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "word_vocab.json", "char_vocab.json", "tokenizer_config.json",
                   "special_tokens_map.json",
                   "added_tokens.json")


class FamilyEntry(NamedTuple):
    """Where a family lives: ``module`` (import path), its config class and its Flax model class names."""

    module: str
    config_class: str
    model_class: str


_FAMILIES: dict[str, FamilyEntry] = {
    "transformer": FamilyEntry("models.transformer", "TransformerConfig", "Transformer"),
    "bilstm": FamilyEntry("models.bilstm", "BiLSTMConfig", "BiLSTMClassifier"),
    "cnn_lstm": FamilyEntry("models.cnn_lstm", "CNNLSTMConfig", "CNNLSTMTagger"),
}


def register_family(family: str, module: str, config_class: str, model_class: str) -> None:
    """Registers (or re-points) a family: ``model_class(config)`` must build the Flax module."""
    _FAMILIES[family] = FamilyEntry(module, config_class, model_class)


def known_families() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def _entry(family: str) -> FamilyEntry:
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(known_families())}")
    return _FAMILIES[family]


def _import_attr(family: str, module: str, name: str):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ValueError(f"model family {family!r} is registered at {module}, which cannot be imported: {e}") from e
    if not hasattr(mod, name):
        raise ValueError(f"model family {family!r}: {module} has no {name} (fix the registry entry in models/io.py)")
    return getattr(mod, name)


def config_class(family: str) -> type[ModelConfig]:
    """The config class of ``family`` (imported on first use)."""
    e = _entry(family)
    return _import_attr(family, e.module, e.config_class)


def model_class(family: str) -> type:
    """The Flax model class of ``family`` (imported on first use)."""
    e = _entry(family)
    return _import_attr(family, e.module, e.model_class)


# ---------------------------------------------------------------------------------------------------- writing


# Temporaries of atomic writes: `.tmp-<8 hex>.<name>` beside the destination (hidden; the destination's suffix
# kept, so writers that append one, such as np.savez, leave the name alone). A directory being replaced is
# parked as `.old-<8 hex>.<name>` between the two renames of the swap.
TEMPORARY_PATTERN = re.compile(r"^\.(?P<kind>tmp|old)-[0-9a-f]{8}\.(?P<name>.+)$")
# What atomic_directory named them before (`.<name>.tmp-<8 chars of mkdtemp>`, `.<name>.old-<8 hex>`).
LEGACY_TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")


def temporary_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh hidden sibling name for a temporary of ``path`` (``kind`` "tmp") or its parked old version
    ("old"); matches :data:`TEMPORARY_PATTERN`."""
    path = Path(path)
    return path.parent / f".{kind}-{uuid.uuid4().hex[:8]}.{path.name}"


def _fsync_dir(path: Path) -> None:
    """Makes the renames inside directory ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; it becomes ``path`` (replacing any old file) when the block exits
    without an exception, and is removed otherwise. Readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory that becomes ``path`` when the block exits without an exception.

    Raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is false (checked before any work). On an
    exception the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # data on disk before the rename makes the directory visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = temporary_path(path, "old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tokenizer_files(src: str | os.PathLike) -> list[Path]:
    """The :data:`TOKENIZER_FILES` present in ``src``.

    Raises ``FileNotFoundError`` if ``src`` is not a directory or holds none of them.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {src} is not a directory")
    found = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not found:
        raise FileNotFoundError(f"tokenizer_dir {src} holds no tokenizer files "
                                f"(looked for {', '.join(TOKENIZER_FILES)})")
    return found


def copy_files(files: list[Path], dst: str | os.PathLike) -> None:
    for f in files:
        shutil.copyfile(f, Path(dst) / f.name)


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {"a/b/c": np.ndarray}. Keys must be strings without "/"."""
    flat = {}

    def visit(node, prefix):
        if isinstance(node, Mapping):
            if not node and prefix:
                raise ValueError(f"params: empty sub-tree at {'/'.join(prefix)}")
            for k, v in node.items():
                if not isinstance(k, str) or "/" in k or not k:
                    raise ValueError(f"params: key {k!r} under {'/'.join(prefix) or '<root>'} must be a non-empty "
                                     "string without '/'")
                visit(v, (*prefix, k))
        elif hasattr(node, "shape") and hasattr(node, "dtype"):
            # C order: safetensors writes the raw buffer, so a strided or transposed view (e.g. columns picked
            # by compaction) would be saved scrambled.
            flat["/".join(prefix)] = np.asarray(node, order="C")
        else:
            raise ValueError(f"params: leaf {'/'.join(prefix)} is a {type(node).__name__}, not an array")

    visit(params, ())
    return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_params`; leaves become jax arrays."""
    tree: dict = {}
    for name in sorted(flat):
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(flat[name])
    return tree


def save(path: str | os.PathLike, family: str, config: ModelConfig, params: Any,
         tokenizer_dir: str | os.PathLike | None = None, extra: dict | None = None, *,
         overwrite: bool = False, extra_files: Mapping[str, Callable[[Path], Any]] | None = None) -> Path:
    """Writes a self-describing model directory at ``path`` (see the module docstring); returns ``path``.

    Args:
      family: registered family name; must equal ``config.family``.
      config: the family's :class:`~models.config_base.ModelConfig`.
      params: the ``params`` collection (nested dict of arrays, any float dtype).
      tokenizer_dir: a directory whose tokenizer/vocabulary files are copied alongside.
      extra: JSON-serialisable metadata (label names, training provenance, ...), returned by :func:`read_meta`.
      overwrite: replace an existing directory (atomically); otherwise an existing ``path`` is an error.
      extra_files: file name -> ``write(file_path)`` that writes that file; each is called inside the temporary
        directory, so the files appear together with the model in one rename (e.g. a QAT job's
        ``{"quant_state.npz": lambda p: export.save_quant_state(str(p), quant_state)}``).
    """
    _entry(family)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if config.family != family:
        raise ValueError(f"config is a {type(config).__name__} of family {config.family!r}, not {family!r}")
    flat = flatten_params(params)
    if not flat:
        raise ValueError("params is empty")
    extra_files = dict(extra_files or {})
    reserved = {CONFIG_FILE, PARAMS_FILE, *TOKENIZER_FILES}
    bad = [n for n in extra_files if n in reserved or not n or os.sep in n or n.startswith(".")]
    if bad:
        raise ValueError(f"extra_files: {bad} must be plain file names other than {sorted(reserved)}")
    meta = {"format_version": FORMAT_VERSION, "family": family, "config": config.to_dict(),
            "num_tensors": len(flat), "extra": extra or {}}
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"extra must be JSON-serialisable: {e}") from e
    tok_files = tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(flat, str(tmp / PARAMS_FILE), metadata={"family": family})
        copy_files(tok_files, tmp)
        for name, write in extra_files.items():
            write(tmp / name)
            if not (tmp / name).is_file():
                raise FileNotFoundError(f"extra_files: the writer of {name!r} wrote no file {tmp / name}")
        (tmp / CONFIG_FILE).write_text(meta_text + "\n")
    return Path(path)


# ---------------------------------------------------------------------------------------------------- reading


def read_meta(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a model directory (family, config dict, extra, ...), checked."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file() or not (path / PARAMS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it needs {CONFIG_FILE} and {PARAMS_FILE} "
                                "(written by models.save; for a Hugging Face checkpoint use models.hf.load_bert)")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}): the model directory is damaged; save or export "
                         "it again") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_file} holds a JSON {type(meta).__name__}, not an object: the model directory "
                         "is damaged")
    missing = [k for k in ("format_version", "family", "config") if k not in meta]
    if missing:
        raise ValueError(f"{cfg_file} lacks {missing}; is it a Hugging Face config? use models.hf.load_bert")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: format_version {meta['format_version']} is not supported "
                         f"(this code reads {FORMAT_VERSION})")
    return meta


def read_params(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a safetensors ``file``; a truncated or corrupt file raises ``ValueError`` naming it."""
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise ValueError(f"{file} is truncated or corrupt ({e}); save or export the model again") from e


def load(path: str | os.PathLike):
    """Restores a model directory written by :func:`save`.

    Returns:
      ``(model, config, params)``: the family's Flax module built from the config (``model.apply({'params':
      params}, ...)``), the config, and the params as a nested dict of jax arrays in their stored dtypes.
    """
    meta = read_meta(path)
    family = meta["family"]
    config = config_class(family).from_dict(meta["config"])
    flat = read_params(Path(path) / PARAMS_FILE)
    if "num_tensors" in meta and len(flat) != meta["num_tensors"]:
        raise ValueError(f"{path}/{PARAMS_FILE} holds {len(flat)} tensors, config.json says {meta['num_tensors']}")
    params = unflatten_params(flat)
    return model_class(family)(config), config, params


def tree_equal(a: Any, b: Any) -> bool:
    """True when two param trees have the same structure, dtypes and bit-identical values."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape and np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
