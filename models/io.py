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

Directories are written atomically (:func:`models.storage.atomic_directory`): everything (extra files such as a
QAT ``quant_state.npz`` included) is written into a local temporary directory and published at the end, by a
rename on a local disk and by a completion marker written last on an object store, so a crash never leaves a
directory that looks finished. Paths may be local or ``gs://`` URLs (:mod:`models.storage`).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from etils import epath
from safetensors.numpy import load_file, save_file

from models import storage
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


def tokenizer_files(src: str | os.PathLike) -> list[epath.Path]:
    """The :data:`TOKENIZER_FILES` present in ``src`` (a local or object-store directory).

    Raises ``FileNotFoundError`` if ``src`` is not a directory or holds none of them.
    """
    src = storage.as_path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {src} is not a directory")
    present = set(storage.listdir(src))
    found = [src / name for name in TOKENIZER_FILES if name in present]
    if not found:
        raise FileNotFoundError(f"tokenizer_dir {src} holds no tokenizer files "
                                f"(looked for {', '.join(TOKENIZER_FILES)})")
    return found


def copy_files(files: list[epath.Path], dst: str | os.PathLike) -> None:
    """Copies ``files`` (local or remote) into local directory ``dst``."""
    for f in files:
        (Path(dst) / f.name).write_bytes(f.read_bytes())


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
         overwrite: bool = False, extra_files: Mapping[str, Callable[[Path], Any]] | None = None) -> epath.Path:
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
    reserved = {CONFIG_FILE, PARAMS_FILE, storage.COMPLETE_MARKER, *TOKENIZER_FILES}
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
    with storage.atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(flat, str(tmp / PARAMS_FILE), metadata={"family": family})
        copy_files(tok_files, tmp)
        for name, write in extra_files.items():
            write(tmp / name)
            if not (tmp / name).is_file():
                raise FileNotFoundError(f"extra_files: the writer of {name!r} wrote no file {tmp / name}")
        (tmp / CONFIG_FILE).write_text(meta_text + "\n")
    return storage.as_path(path)


# ---------------------------------------------------------------------------------------------------- reading


def read_meta(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a model directory (family, config dict, extra, ...), checked."""
    path = storage.as_path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file() or not (path / PARAMS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it needs {CONFIG_FILE} and {PARAMS_FILE} "
                                "(written by models.save; for a Hugging Face checkpoint use models.hf.load_bert)")
    if not storage.is_complete(path):
        raise FileNotFoundError(f"{path} is an unfinished model directory (no {storage.COMPLETE_MARKER} marker: its "
                                "upload was cut short); save or export the model again")
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
    """The tensors of a safetensors ``file`` (local or remote); a truncated or corrupt file raises ``ValueError``
    naming it."""
    try:
        with storage.local_copy(file) as local:  # a remote file is downloaded first
            return load_file(local)
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
    flat = read_params(os.path.join(path, PARAMS_FILE))
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
