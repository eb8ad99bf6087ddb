"""BERT-of-Theseus for our Transformer: predecessor layers grouped into modules, each replaceable by a successor.

``theseus_model(predecessor_cfg, successor_cfg)`` returns a :class:`models.transformer.Transformer` whose layer
stack is a :class:`TheseusEncoder`: embeddings, pooler and classifier are the predecessor's; module ``m`` runs
either predecessor layers ``m*k .. m*k+k-1`` or successor layers ``m*j .. m*j+j-1`` (k = predecessor layers per
module, j = successor layers per module). The successor config may differ in attention (fewer key/value heads:
multi-query / grouped-query) and in per-layer heads / FFN sizes (after pruning), but not in width or vocabulary.

Call with ``mode="mixed", replace_prob=p`` (training; needs the ``"theseus"`` RNG), ``"predecessor"`` or
``"successor"`` (the default, also for evaluation, as in the reference implementation).

Parameter tree: the predecessor's, with ``encoder/module_m/{predecessor,successor}/layer_i`` in place of
``encoder/layer_i``. :func:`init_from_predecessor` builds it from a fine-tuned predecessor;
:func:`extract_successor` returns a plain Transformer (config, params) of the successor alone.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from compression import theseus
from models.transformer import Transformer, TransformerConfig, TransformerLayer

_SHARED_FIELDS = ("vocab_size", "hidden_size", "max_position_embeddings", "type_vocab_size", "head",
                  "num_labels", "layer_norm_eps")


class LayerRun(nn.Module):
    """Runs layers ``indices`` of ``config`` in order; ``(x, mask_bias) -> x`` (the module interface)."""

    config: TransformerConfig
    indices: tuple[int, ...]
    deterministic: bool

    @nn.compact
    def __call__(self, x, mask_bias):
        for i in self.indices:
            x, _, _ = TransformerLayer(self.config, i, name=f"layer_{i}")(x, mask_bias, self.deterministic)
        return x


class TheseusEncoder(nn.Module):
    """Replaceable modules over the predecessor's layers; :class:`models.transformer.Encoder`'s interface.

    Returns (x, module outputs, (), ()): attention maps are not collected in mixed mode.
    """

    config: TransformerConfig  # the predecessor's
    successor: TransformerConfig
    num_modules: int

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool, *, mode: str = "successor", replace_prob=None):
        k = theseus.check_grouping(self.config.num_layers, self.num_modules)
        j = theseus.check_grouping(self.successor.num_layers, self.num_modules)
        flags = theseus.replacement_flags(self, mode, replace_prob, self.num_modules)
        outputs = []
        for m in range(self.num_modules):
            module = theseus.Replaceable(
                LayerRun(self.config, tuple(range(m * k, (m + 1) * k)), deterministic, parent=None),
                LayerRun(self.successor, tuple(range(m * j, (m + 1) * j)), deterministic, parent=None),
                name=f"module_{m}")
            x = module(x, mask_bias, replace=flags[m])
            outputs.append(x)
        return x, outputs, (), ()


def check_compatible(predecessor: TransformerConfig, successor: TransformerConfig, num_modules: int) -> None:
    """Raises naming the field when the successor cannot replace the predecessor module by module."""
    for name in _SHARED_FIELDS:
        if getattr(predecessor, name) != getattr(successor, name):
            raise ValueError(f"successor.{name}={getattr(successor, name)!r} differs from the predecessor's "
                             f"{getattr(predecessor, name)!r}; the interface between modules must match")
    theseus.check_grouping(predecessor.num_layers, num_modules)
    theseus.check_grouping(successor.num_layers, num_modules)


def theseus_model(predecessor: TransformerConfig, successor: TransformerConfig,
                  num_modules: int | None = None) -> Transformer:
    """The Theseus training model. ``num_modules`` defaults to the successor's depth (one layer per module)."""
    num_modules = num_modules or successor.num_layers
    check_compatible(predecessor, successor, num_modules)
    encoder = functools.partial(TheseusEncoder, successor=successor, num_modules=num_modules)
    return Transformer(predecessor, encoder_cls=encoder)


def successor_from_predecessor(predecessor: TransformerConfig, num_layers: int, num_kv_heads=None,
                               init_layers: tuple[int, ...] | None = None, **changes) -> TransformerConfig:
    """A successor config: the predecessor's, with ``num_layers`` layers and optionally fewer key/value heads.

    Per-layer fields (heads and FFN sizes of a pruned predecessor) are taken from the predecessor layers that
    initialise the successor, ``init_layers`` (default: the first ``num_layers``; pass the same tuple to
    :func:`init_from_predecessor`).
    """
    init_layers = _check_init_layers(predecessor, num_layers, init_layers)

    def per_layer(field_fn):
        values = tuple(field_fn(i) for i in init_layers)
        return values[0] if len(set(values)) == 1 else values

    return predecessor.replace(num_layers=num_layers, num_heads=per_layer(predecessor.heads),
                               intermediate_size=per_layer(predecessor.ffn_size),
                               num_kv_heads=num_kv_heads, fused_qkv=False, **changes)


def init_from_predecessor(predecessor_cfg: TransformerConfig, predecessor_params: dict,
                          successor_cfg: TransformerConfig, num_modules: int | None = None,
                          init_layers: tuple[int, ...] | None = None) -> dict:
    """Parameters of the Theseus model from a fine-tuned predecessor.

    Successor layer i starts as a copy of predecessor layer ``init_layers[i]`` (default: the first layers,
    ``0 .. n-1``, as the reference implementation does); when the successor has fewer key/value heads, its
    key/value projections are the mean of each group's predecessor heads
    (:func:`compression.theseus.mean_pool_kv_heads`).
    """
    num_modules = num_modules or successor_cfg.num_layers
    check_compatible(predecessor_cfg, successor_cfg, num_modules)
    if predecessor_cfg.fused_qkv:
        raise ValueError("unfuse the predecessor's QKV first (compression.fusion.unfuse_qkv)")
    init_layers = _check_init_layers(predecessor_cfg, successor_cfg.num_layers, init_layers)
    k = predecessor_cfg.num_layers // num_modules
    j = successor_cfg.num_layers // num_modules
    layers = predecessor_params["encoder"]
    encoder = {}
    for m in range(num_modules):
        pred = {f"layer_{i}": layers[f"layer_{i}"] for i in range(m * k, (m + 1) * k)}
        succ = {f"layer_{i}": _successor_layer(predecessor_cfg, successor_cfg, layers[f"layer_{init_layers[i]}"],
                                               init_layers[i], i)
                for i in range(m * j, (m + 1) * j)}
        encoder[f"module_{m}"] = {"predecessor": pred, "successor": succ}
    return {**{n: v for n, v in predecessor_params.items() if n != "encoder"}, "encoder": encoder}


def _check_init_layers(predecessor: TransformerConfig, num_layers: int,
                       init_layers: tuple[int, ...] | None) -> tuple[int, ...]:
    init_layers = tuple(range(num_layers)) if init_layers is None else tuple(init_layers)
    if len(init_layers) != num_layers or not all(0 <= i < predecessor.num_layers for i in init_layers):
        raise ValueError(f"init_layers {init_layers} must name {num_layers} predecessor layers "
                         f"in 0..{predecessor.num_layers - 1}")
    return init_layers


def _successor_layer(pred_cfg: TransformerConfig, succ_cfg: TransformerConfig, layer: dict, src: int,
                     dst: int) -> dict:
    heads = succ_cfg.heads(dst)
    if heads != pred_cfg.heads(src) or succ_cfg.ffn_size(dst) != pred_cfg.ffn_size(src):
        raise ValueError(f"successor layer {dst} ({heads} heads, FFN {succ_cfg.ffn_size(dst)}) cannot start from "
                         f"predecessor layer {src} ({pred_cfg.heads(src)} heads, FFN {pred_cfg.ffn_size(src)})")
    layer = jax.tree.map(np.asarray, layer)
    kv_src, kv_dst = pred_cfg.kv_heads(src), succ_cfg.kv_heads(dst)
    if kv_dst == kv_src:
        return layer
    if kv_src != heads:
        raise ValueError(f"predecessor layer {src} already shares key/value heads ({kv_src} of {heads})")
    attention = dict(layer["attention"])
    for name in ("key", "value"):
        kernel, bias = theseus.mean_pool_kv_heads(attention[name]["kernel"], attention[name]["bias"], kv_dst,
                                                  pred_cfg.dim_per_head)
        attention[name] = {"kernel": np.asarray(kernel), "bias": np.asarray(bias)}
    return {**layer, "attention": attention}


def extract_successor(predecessor_cfg: TransformerConfig, successor_cfg: TransformerConfig, params: dict,
                      num_modules: int | None = None) -> tuple[TransformerConfig, dict]:
    """The successor alone as a plain Transformer: (successor config, params)."""
    num_modules = num_modules or successor_cfg.num_layers
    check_compatible(predecessor_cfg, successor_cfg, num_modules)
    encoder = {}
    for m in range(num_modules):
        encoder.update(params["encoder"][f"module_{m}"]["successor"])
    return successor_cfg, {**{n: v for n, v in params.items() if n != "encoder"}, "encoder": encoder}


def trainable(path: tuple[str, ...]) -> bool:
    """Phase-one trainability, as in the reference implementation: only successor modules train."""
    return "successor" in path
