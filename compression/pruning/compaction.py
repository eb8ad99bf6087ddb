"""Compaction: turn head / FFN-unit / layer masks into a smaller dense Transformer that runs faster.

A parameter transform plus a config change (no flag in the forward pass): heads whose mask is 0 lose their
query/key/value columns and output-projection rows, FFN units whose mask is 0 lose their intermediate column
and output row, removed layers disappear and the rest are renumbered. Non-zero mask values (e.g. deterministic
L0 gates in (0, 1)) are folded into the output projections, so the compacted model computes exactly what the
masked model computes. Works on the Transformer's parameter layout (see ``models/transformer.py``); configs are
handled through their ``replace``/``heads``/``ffn_size``/``kv_heads`` interface.
"""

from __future__ import annotations

import re

import numpy as np

from compression.pruning.site_masks import masks_by_path

_HEADS = re.compile(r"(?:^|/)layer_(\d+)/attention/heads_site$")
_FFN = re.compile(r"(?:^|/)layer_(\d+)/ffn_site$")


def layer_masks(collection: dict) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Splits a masks collection (or deterministic gate values laid out alike) into per-layer head and FFN
    masks. Raw L0 ``log_alpha`` leaves are refused: convert them with deterministic gates first."""
    heads, ffn = {}, {}
    for path, value in masks_by_path(collection).items():
        if _is_log_alpha_tree(collection, path):
            raise ValueError(f"{path}: gates are still stochastic (log_alpha); use deterministic gate values "
                             "(compression.pruning.l0.deterministic_gates) before compacting")
        value = np.asarray(value, np.float32)
        if m := _HEADS.search(path):
            heads[int(m.group(1))] = value
        elif m := _FFN.search(path):
            ffn[int(m.group(1))] = value
        else:
            raise ValueError(f"compaction handles heads and ffn sites only; cannot compact {path}")
    return heads, ffn


def _is_log_alpha_tree(collection: dict, path: str) -> bool:
    node = collection
    for part in path.split("/"):
        node = node[part]
    return isinstance(node, dict) and "log_alpha" in node


def compact(config, params: dict, head_masks: dict[int, np.ndarray] | None = None,
            ffn_masks: dict[int, np.ndarray] | None = None, remove_layers: tuple[int, ...] = ()):
    """Returns (new config, new params) of the compacted Transformer.

    Args:
      config: a TransformerConfig (multi-head attention: one key/value head per query head, unfused QKV).
      params: its parameters.
      head_masks: {layer: [N_i]} mask values; 0 removes a head.
      ffn_masks: {layer: [F_i]}; 0 removes a unit.
      remove_layers: layers removed whole (their masks are ignored).
    """
    head_masks, ffn_masks = head_masks or {}, ffn_masks or {}
    if config.fused_qkv:
        raise ValueError("compaction works on separate Q/K/V: unfuse first (compression.fusion.unfuse_qkv)")
    for i in remove_layers:
        if not 0 <= i < config.num_layers:
            raise ValueError(f"remove_layers names layer {i}; the model has {config.num_layers}")
    keep = [i for i in range(config.num_layers) if i not in set(remove_layers)]
    if not keep:
        raise ValueError("compaction would remove every layer")
    d = config.dim_per_head
    layers, heads, ffns, kvs = {}, [], [], []
    for new, old in enumerate(keep):
        layer = {k: v for k, v in params["encoder"][f"layer_{old}"].items()}
        n, f = config.heads(old), config.ffn_size(old)
        hm = np.asarray(head_masks.get(old, np.ones(n)), np.float32)
        fm = np.asarray(ffn_masks.get(old, np.ones(f)), np.float32)
        if hm.shape != (n,) or fm.shape != (f,):
            raise ValueError(f"layer {old}: masks of shape {hm.shape} / {fm.shape} do not match its {n} heads / "
                             f"{f} FFN units")
        if not hm.any():
            raise ValueError(f"layer {old}: every head is pruned; keep one or pass remove_layers=({old},)")
        if not fm.any():
            raise ValueError(f"layer {old}: every FFN unit is pruned; keep one or pass remove_layers=({old},)")
        if config.kv_heads(old) != n and not hm.all():
            raise ValueError(f"layer {old}: pruning query heads of grouped-query attention is not supported")
        layer["attention"] = _compact_heads(layer["attention"], hm, d, config.kv_heads(old) == n)
        layer = _compact_ffn(layer, fm)
        layers[f"layer_{new}"] = layer
        heads.append(int((hm != 0).sum()))
        ffns.append(int((fm != 0).sum()))
        kvs.append(int((hm != 0).sum()) if config.kv_heads(old) == n else config.kv_heads(old))
    new_config = config.replace(
        num_layers=len(keep), num_heads=tuple(heads), intermediate_size=tuple(ffns), head_dim=d,
        num_kv_heads=None if kvs == heads else tuple(kvs))
    return new_config, {**params, "encoder": layers}


def _cols(head_idx: np.ndarray, d: int) -> np.ndarray:
    return (head_idx[:, None] * d + np.arange(d)[None, :]).ravel()


def _compact_heads(att: dict, mask: np.ndarray, d: int, prune_kv: bool) -> dict:
    kept = np.flatnonzero(mask != 0)
    cols = _cols(kept, d)
    out = dict(att)
    names = ("query", "key", "value") if prune_kv else ("query",)
    for name in names:
        out[name] = {"kernel": np.asarray(att[name]["kernel"])[:, cols], "bias": np.asarray(att[name]["bias"])[cols]}
    scale = np.repeat(mask[kept], d)[:, None]
    out["output"] = {"kernel": np.asarray(att["output"]["kernel"])[cols] * scale,
                     "bias": np.asarray(att["output"]["bias"])}
    return out


def _compact_ffn(layer: dict, mask: np.ndarray) -> dict:
    kept = np.flatnonzero(mask != 0)
    out = dict(layer)
    out["intermediate"] = {"kernel": np.asarray(layer["intermediate"]["kernel"])[:, kept],
                           "bias": np.asarray(layer["intermediate"]["bias"])[kept]}
    out["output"] = {"kernel": np.asarray(layer["output"]["kernel"])[kept] * mask[kept][:, None],
                     "bias": np.asarray(layer["output"]["bias"])}
    return out


def keep_layers(config, params: dict, keep: tuple[int, ...]):
    """LayerDrop's pruning on load: keep only ``keep`` layers (e.g. every other), renumbered."""
    remove = tuple(i for i in range(config.num_layers) if i not in set(keep))
    return compact(config, params, remove_layers=remove)
