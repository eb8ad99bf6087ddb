"""Hugging Face BERT checkpoints <-> our :class:`~models.transformer.Transformer`, without torch.

:func:`load_bert` reads a checkpoint directory (``config.json`` and ``model.safetensors``, or shards listed in
``model.safetensors.index.json``) with ``safetensors.numpy`` and maps every tensor onto our parameter tree;
:func:`save_bert` writes the reverse, a directory that transformers' ``BertModel`` / ``BertFor*`` load.

Name mapping (HF Linear weights are [out, in]; our Dense kernels are [in, out], so they are transposed)::

    [bert.]embeddings.{word,position,token_type}_embeddings.weight -> embeddings/*/embedding
    [bert.]embeddings.LayerNorm.{weight,bias}                      -> embeddings/LayerNorm/{scale,bias}
    [bert.]encoder.layer.i.attention.self.{query,key,value}        -> encoder/layer_i/attention/{query,key,value}
    [bert.]encoder.layer.i.attention.output.dense                  -> encoder/layer_i/attention/output
    [bert.]encoder.layer.i.attention.output.LayerNorm              -> encoder/layer_i/attention_norm
    [bert.]encoder.layer.i.intermediate.dense                      -> encoder/layer_i/intermediate
    [bert.]encoder.layer.i.output.dense                            -> encoder/layer_i/output
    [bert.]encoder.layer.i.output.LayerNorm                        -> encoder/layer_i/output_norm
    [bert.]pooler.dense                                            -> pooler/dense
    classifier                                                     -> classifier
    cls.predictions.transform.dense                                -> mlm/transform
    cls.predictions.transform.LayerNorm                            -> mlm/transform_norm
    cls.predictions.bias                                           -> mlm/bias
    cls.predictions.decoder.{weight,bias}   tied to the word embeddings / cls.predictions.bias (checked equal)

The ``bert.`` prefix is present in ``BertFor*`` checkpoints and absent in ``BertModel`` ones; old checkpoints'
LayerNorm ``gamma``/``beta`` are read as ``weight``/``bias``.

Heads: ``head="auto"`` takes the checkpoint's own head (from ``architectures``, else from the tensors present).
Tensors the requested head needs but the checkpoint lacks (a classifier for a fresh fine-tune, a pooler, an MLM
head) are initialised from ``init_key`` and reported. Tensors nothing maps to are an error, except these, which
are skipped and reported: the ``position_ids`` / ``token_type_ids`` buffers, the next-sentence head
``cls.seq_relationship.*``, and a pooler, MLM head or classifier that the requested head does not use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from models.io import copy_files, tokenizer_files
from models import storage
from models.storage import atomic_directory
from models.transformer import Transformer, TransformerConfig

log = logging.getLogger(__name__)

BERT_MODEL_TYPES = ("bert",)
HEADS = ("auto", "sequence", "token", "mlm", "none")
GELU_ACTS = ("gelu", "gelu_python")  # exact (erf) GELU, what our Transformer computes
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # non-parameter buffers of BertEmbeddings

_ARCHITECTURE_HEADS = {
    "BertModel": "none",
    "BertForSequenceClassification": "sequence",
    "BertForTokenClassification": "token",
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "mlm",  # MLM + next-sentence heads; the latter is skipped
}
_HEAD_ARCHITECTURES = {"none": "BertModel", "sequence": "BertForSequenceClassification",
                       "token": "BertForTokenClassification", "mlm": "BertForMaskedLM"}

# transformers' BertConfig defaults, for fields a config.json leaves out.
_HF_DEFAULTS = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
    "classifier_dropout": None, "is_decoder": False, "add_cross_attention": False, "pruned_heads": {},
}

# Our module path -> HF module name. Layer modules are relative to encoder/layer_i (HF encoder.layer.i).
_LAYER_MODULES = {
    ("attention", "query"): "attention.self.query",
    ("attention", "key"): "attention.self.key",
    ("attention", "value"): "attention.self.value",
    ("attention", "output"): "attention.output.dense",
    ("attention_norm",): "attention.output.LayerNorm",
    ("intermediate",): "intermediate.dense",
    ("output",): "output.dense",
    ("output_norm",): "output.LayerNorm",
}
_BODY_MODULES = {
    ("embeddings", "word_embeddings"): "embeddings.word_embeddings",
    ("embeddings", "position_embeddings"): "embeddings.position_embeddings",
    ("embeddings", "token_type_embeddings"): "embeddings.token_type_embeddings",
    ("embeddings", "LayerNorm"): "embeddings.LayerNorm",
    ("pooler", "dense"): "pooler.dense",
}
_HEAD_MODULES = {
    ("classifier",): "classifier",
    ("mlm", "transform"): "cls.predictions.transform.dense",
    ("mlm", "transform_norm"): "cls.predictions.transform.LayerNorm",
    ("mlm",): "cls.predictions",  # mlm/bias -> cls.predictions.bias
}
_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
_BODY_PREFIXES = ("embeddings.", "encoder.", "pooler.")
_HEAD_SUBTREES = ("pooler", "classifier", "mlm")  # our subtrees that may be freshly initialised
_MAX_LISTED = 30  # problems listed in one error message


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load_bert` did besides mapping tensors one to one.

    Attributes:
      head: the head of the returned config.
      checkpoint_head: the head the checkpoint was saved with.
      initialised: our parameter paths ("classifier/kernel") freshly initialised from ``init_key``.
      ignored: checkpoint tensor names skipped because the requested head does not use them.
      buffers: non-parameter buffers skipped (``position_ids``).
    """

    head: str
    checkpoint_head: str
    initialised: tuple[str, ...]
    ignored: tuple[str, ...]
    buffers: tuple[str, ...]


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Maps one of our parameter paths to its HF tensor name (without the ``bert.`` prefix).

    Returns ``(name, transposed)``; ``transposed`` is true for Dense kernels. Raises ``ValueError`` for a path
    with no HF counterpart (e.g. a fused ``qkv`` projection).
    """
    *module, leaf = path
    module = tuple(module)
    if leaf not in _LEAF_NAMES:
        raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}")
    if module[:1] == ("encoder",) and len(module) >= 3 and re.fullmatch(r"layer_\d+", module[1]) \
            and module[2:] in _LAYER_MODULES:
        name = f"encoder.layer.{module[1][len('layer_'):]}.{_LAYER_MODULES[module[2:]]}"
    elif module in _BODY_MODULES:
        name = _BODY_MODULES[module]
    elif module in _HEAD_MODULES:
        name = _HEAD_MODULES[module]
    else:
        hint = " (fused QKV: unfuse it first; HF BERT stores Q, K and V separately)" if "qkv" in module else ""
        raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}{hint}")
    return f"{name}.{_LEAF_NAMES[leaf]}", leaf == "kernel"


def _is_body(name: str) -> bool:
    return name.startswith(_BODY_PREFIXES)


def _expected_params(config: TransformerConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Our parameter paths and shapes for ``config``, without allocating anything."""
    shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return traverse_util.flatten_dict(shapes["params"])


# ---------------------------------------------------------------------------------------------------- config


def read_hf_config(path: str | os.PathLike) -> dict:
    """Reads ``config.json`` of an HF BERT checkpoint, fills BertConfig defaults and checks it is BERT.

    Raises ``ValueError`` for another architecture or a BERT variant our Transformer does not compute
    (non-exact GELU, relative position embeddings, decoder / cross-attention, pruned heads).
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; not a Hugging Face checkpoint directory")
    raw = json.loads(cfg_file.read_text())
    model_type = raw.get("model_type")
    if model_type is None and "family" in raw:
        raise ValueError(f"{path} is a model directory written by models.save; read it with models.load")
    if model_type not in BERT_MODEL_TYPES:
        raise ValueError(f"{cfg_file}: model_type {model_type!r} is not a BERT checkpoint; supported model types: "
                         f"{', '.join(BERT_MODEL_TYPES)}")
    hf = {**_HF_DEFAULTS, **raw}
    if hf["hidden_act"] not in GELU_ACTS:
        raise ValueError(f"{cfg_file}: hidden_act {hf['hidden_act']!r} is not supported; our Transformer uses "
                         f"exact GELU ({', '.join(GELU_ACTS)})")
    if hf["position_embedding_type"] != "absolute":
        raise ValueError(f"{cfg_file}: position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                         "only 'absolute'")
    if hf["is_decoder"] or hf["add_cross_attention"]:
        raise ValueError(f"{cfg_file}: decoder / cross-attention BERT checkpoints are not supported")
    if hf["pruned_heads"]:
        raise ValueError(f"{cfg_file}: checkpoints with pruned_heads are not supported")
    return hf


def _config_from_hf(hf: dict, head: str, num_labels: int | None) -> TransformerConfig:
    labels = {} if num_labels is None else {"num_labels": num_labels}
    return TransformerConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
        layer_norm_eps=float(hf["layer_norm_eps"]), hidden_dropout_rate=float(hf["hidden_dropout_prob"]),
        attention_dropout_rate=float(hf["attention_probs_dropout_prob"]),
        initializer_range=float(hf["initializer_range"]),
        classifier_dropout_rate=None if hf["classifier_dropout"] is None else float(hf["classifier_dropout"]),
        pad_token_id=hf["pad_token_id"] if hf["pad_token_id"] is not None else 0, head=head, **labels)


def config_to_hf(config: TransformerConfig) -> dict:
    """The ``config.json`` dict of :func:`save_bert`. Raises ``ValueError`` for what HF BERT cannot express."""
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    heads = {config.heads(i) for i in range(config.num_layers)}
    ffn = {config.ffn_size(i) for i in range(config.num_layers)}
    kv = {config.kv_heads(i) for i in range(config.num_layers)}
    if config.fused_qkv:
        raise ValueError("fused_qkv=True cannot be saved as HF BERT, which stores Q, K and V separately; unfuse first")
    if len(heads) != 1:
        raise ValueError(f"num_heads {config.num_heads} differs across layers; HF BERT needs one head count")
    if len(ffn) != 1:
        raise ValueError(f"intermediate_size {config.intermediate_size} differs across layers; HF BERT needs one")
    if kv != heads:
        raise ValueError(f"num_kv_heads {config.num_kv_heads} != num_heads: HF BERT has no multi-/grouped-query "
                         "attention")
    (n,), (f,) = heads, ffn
    if n * config.dim_per_head != config.hidden_size:
        raise ValueError(f"num_heads * head_dim = {n * config.dim_per_head} != hidden_size {config.hidden_size}; "
                         "HF BERT needs them equal")
    return {
        "architectures": [_HEAD_ARCHITECTURES[config.head]],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": n,
        "intermediate_size": f,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.hidden_dropout_rate,
        "attention_probs_dropout_prob": config.attention_dropout_rate,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
        "classifier_dropout": config.classifier_dropout_rate,
        "is_decoder": False,
        "add_cross_attention": False,
        "id2label": {str(i): f"LABEL_{i}" for i in range(config.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(config.num_labels)},
        "dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------------- tensors


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(str(path / shard)))
        return tensors
    others = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack") if (path / n).exists()]
    found = f" (found {', '.join(others)}: convert it to safetensors with transformers first)" if others else ""
    raise FileNotFoundError(f"{path} has no model.safetensors{found}; only safetensors checkpoints are read")


def _canonical_names(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Strips the ``bert.`` prefix and renames LayerNorm gamma/beta; returns tensors and canonical -> original."""
    out, origin = {}, {}
    for name, arr in tensors.items():
        c = name.removeprefix("bert.")
        c = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", c))
        if c in out:
            raise ValueError(f"checkpoint holds both {origin[c]} and {name}, which name the same tensor")
        out[c], origin[c] = arr, name
    return out, origin


def _checkpoint_head(hf: dict, names) -> str:
    for arch in hf.get("architectures") or ():
        if arch in _ARCHITECTURE_HEADS:
            return _ARCHITECTURE_HEADS[arch]
    if any(n.startswith("cls.predictions.") for n in names):
        return "mlm"
    if "classifier.weight" in names:
        return "sequence" if "pooler.dense.weight" in names else "token"
    return "none"


def _listing(items: list[str]) -> str:
    shown = "\n".join(f"  - {s}" for s in items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return shown + more


def load_bert(path: str | os.PathLike, head: str = "auto", num_labels: int | None = None,
              init_key: jax.Array | None = None, *, return_report: bool = False):
    """Loads an HF BERT checkpoint directory into our Transformer's config and parameters.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or its sharded index).
      head: "sequence" | "token" | "mlm" | "none", or "auto" for the checkpoint's own head.
      num_labels: classes of a sequence/token head. Default: the checkpoint classifier's rows, else the
        length of ``id2label`` in config.json; required when a fresh classifier is initialised without either.
      init_key: PRNG key for head tensors the checkpoint lacks; required if there are any.
      return_report: also return a :class:`LoadReport`.

    Returns:
      ``(config, params)`` or ``(config, params, report)``: a :class:`TransformerConfig` and the ``params``
      tree of :class:`Transformer` as float32 jax arrays.

    Raises:
      ValueError: another architecture; missing, unexpected or mis-shaped tensors (all listed, each with the
        checkpoint's and the expected shape); an untied MLM decoder; a needed fresh head without ``init_key``.
      FileNotFoundError: no config.json or no safetensors weights.
    """
    if storage.is_remote(path):  # a checkpoint in a bucket: read from a local download
        with storage.local_copy(path) as local:
            return load_bert(local, head, num_labels, init_key, return_report=return_report)
    path = Path(path)
    if head not in HEADS:
        raise ValueError(f"head {head!r} is not allowed; allowed: {', '.join(HEADS)}")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    hf = read_hf_config(path)
    tensors, origin = _canonical_names(_read_tensors(path))
    ckpt_head = _checkpoint_head(hf, tensors)
    head = ckpt_head if head == "auto" else head
    # A classifier is only reused for the kind of head it was trained as.
    use_classifier = head in ("sequence", "token") and head == ckpt_head and "classifier.weight" in tensors
    if num_labels is None:
        if use_classifier:
            num_labels = int(tensors["classifier.weight"].shape[0])
        elif hf.get("id2label"):
            num_labels = len(hf["id2label"])
        elif head in ("sequence", "token"):
            raise ValueError(f"head={head!r} needs a fresh classifier ({path} has none for this head); pass num_labels")
    config = _config_from_hf(hf, head, num_labels)

    expected = _expected_params(config)
    params, problems, fresh, consumed = {}, [], [], set()
    for p, spec in expected.items():
        name, transposed = hf_name(p)
        if name not in tensors or (p[0] == "classifier" and not use_classifier):
            fresh.append(p)
            continue
        consumed.add(name)
        arr = tensors[name]
        hf_shape = tuple(reversed(spec.shape)) if transposed else tuple(spec.shape)
        if tuple(arr.shape) != hf_shape:
            problems.append(f"mis-shaped {origin[name]}: checkpoint {tuple(arr.shape)}, expected {hf_shape}")
        elif not jnp.issubdtype(arr.dtype, jnp.floating):
            problems.append(f"{origin[name]} has dtype {arr.dtype}, expected a float tensor")
        else:
            params[p] = jnp.asarray(arr.T if transposed else arr, dtype=jnp.float32)
    if head == "mlm":  # the decoder is tied; a checkpoint that stores it must store the tied values
        for name, tied_to in (("cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"),
                              ("cls.predictions.decoder.bias", "cls.predictions.bias")):
            if name in tensors:
                consumed.add(name)
                if tied_to in tensors and not np.array_equal(tensors[name], tensors[tied_to]):
                    problems.append(f"{origin[name]} differs from {origin[tied_to]}: untied MLM decoders are not "
                                    "supported (our decoder is tied)")

    ignored, buffers = [], []
    for name in sorted(set(tensors) - consumed):
        if name in BUFFERS:
            buffers.append(origin[name])
        elif (name.startswith("cls.seq_relationship.")
              or (name.startswith("pooler.") and head != "sequence")
              or (name.startswith("cls.predictions.") and head != "mlm")
              or (name.startswith("classifier.") and not use_classifier)):
            ignored.append(origin[name])
        else:
            problems.append(f"unexpected {origin[name]} {tuple(tensors[name].shape)}: nothing in our "
                            f"Transformer(head={head!r}) maps to it")
    prefix = "bert." if any(origin[n].startswith("bert.") for n in tensors if _is_body(n)) else ""
    for p in fresh:
        if p[0] not in _HEAD_SUBTREES:
            name, transposed = hf_name(p)
            hf_shape = tuple(reversed(expected[p].shape)) if transposed else tuple(expected[p].shape)
            problems.append(f"missing {prefix + name}: expected {hf_shape} for {'/'.join(p)}")
    if problems:
        raise ValueError(f"{path}: the checkpoint does not match TransformerConfig(hidden_size={config.hidden_size}, "
                         f"num_layers={config.num_layers}, head={head!r}, ...):\n{_listing(problems)}")
    if fresh:
        names = ", ".join("/".join(p) for p in fresh)
        if init_key is None:
            raise ValueError(f"{path} lacks tensors that head={head!r} needs ({names}); pass init_key to initialise "
                             "them freshly")
        init = traverse_util.flatten_dict(
            jax.jit(Transformer(config).init)(init_key, jnp.zeros((1, 1), jnp.int32))["params"])
        params.update({p: init[p] for p in fresh})

    report = LoadReport(head=head, checkpoint_head=ckpt_head, initialised=tuple("/".join(p) for p in fresh),
                        ignored=tuple(ignored), buffers=tuple(buffers))
    if report.initialised:
        log.warning("load_bert(%s, head=%s): freshly initialised %s", path, head, ", ".join(report.initialised))
    if report.ignored:
        log.warning("load_bert(%s, head=%s): ignored checkpoint tensors %s", path, head, ", ".join(report.ignored))
    if report.buffers:
        log.info("load_bert(%s): skipped buffers %s", path, ", ".join(report.buffers))
    params = traverse_util.unflatten_dict(params)
    return (config, params, report) if return_report else (config, params)


def save_bert(path: str | os.PathLike, config: TransformerConfig, params,
              tokenizer_dir: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
    """Writes ``params`` as an HF BERT checkpoint directory that transformers' ``BertModel`` / ``BertFor*`` load.

    Writes ``config.json`` (model_type "bert", ``architectures`` from ``config.head``), ``model.safetensors``
    (HF names, float32, the ``bert.`` prefix except for head "none"; the tied MLM decoder is not stored, as
    transformers does) and copies the tokenizer files of ``tokenizer_dir``. Atomic; an existing ``path`` is an
    error unless ``overwrite``. Raises ``ValueError`` for configs HF BERT cannot express (fused QKV, per-layer
    head counts or FFN sizes, multi-query attention) and for params that do not match ``config``.
    """
    hf_config = config_to_hf(config)
    expected = _expected_params(config)
    flat = traverse_util.flatten_dict(params)
    problems = [f"missing {'/'.join(p)} {tuple(s.shape)}" for p, s in expected.items() if p not in flat]
    problems += [f"unexpected {'/'.join(p)}" for p in flat if p not in expected]
    problems += [f"mis-shaped {'/'.join(p)}: {tuple(np.shape(flat[p]))}, expected {tuple(s.shape)}"
                 for p, s in expected.items() if p in flat and tuple(np.shape(flat[p])) != tuple(s.shape)]
    if problems:
        raise ValueError(f"params do not match the config (head={config.head!r}):\n{_listing(problems)}")
    prefix = "" if config.head == "none" else "bert."
    tensors = {}
    for p, arr in flat.items():
        name, transposed = hf_name(p)
        a = np.asarray(arr).astype(np.float32)
        tensors[prefix + name if _is_body(name) else name] = np.ascontiguousarray(a.T if transposed else a)
    tok_files = tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        copy_files(tok_files, tmp)
    return Path(path)
