"""Operator fusion as parameter transforms.

Fused QKV. A Transformer layer's separate query/key/value projections ([H, N*D], [H, K*D], [H, K*D], for N
query heads, K key/value heads and head width D) become one projection ``attention/qkv`` of width
(N + 2K) * D, laid out [query | key | value] along the output axis, as ``models.transformer`` expects with
``fused_qkv=True``. One matmul reads the layer input once instead of three times, and a quantized model
then shares one activation scale across Q, K and V, exactly as deployed fused kernels do. The transform is
pure (the input tree is never modified) and exact: :func:`unfuse_qkv` gives back the original arrays bit for
bit.

The function works on any config with ``num_layers``, ``heads(i)``, ``kv_heads(i)``, ``dim_per_head``,
``hidden_size`` and a ``fused_qkv`` field (``models.transformer.TransformerConfig``); compression/ does not
import models/.

Residual add + LayerNorm ("SkipLayerNorm"). In JAX the kernel boundaries are XLA's decision, not the
formulation's: a stand-alone add + LayerNorm compiles to one kernel whether written as ``LayerNorm(x + r)``
or as :func:`skip_layer_norm`, and inside the compiled MiniLM layer at batch 32 x seq 128 XLA on CPU folds
the output projection, its bias, the residual add and the LayerNorm statistics into one kernel (at tiny
shapes it keeps them apart). ``experiments/benchmarks/bench_fusion.py`` measures both. So the models keep
the plain formulation inside their ``layernorm`` islands; :func:`skip_layer_norm` is the reference
semantics of ONNX Runtime's SkipLayerNormalization, for exporters and for runtimes that do not fuse.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = Mapping[str, Any]
_SEPARATE = ("query", "key", "value")


def _copy_tree(params: Params) -> dict:
    """New nested dicts over the same (immutable) arrays, so edits never reach the caller's tree."""
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in params.items()}


def _layers(config, params: Params):
    if not isinstance(params, Mapping) or "encoder" not in params:
        wrapped = isinstance(params, Mapping) and "params" in params
        hint = " (pass variables['params'], not the variables)" if wrapped else ""
        raise ValueError(f"expected a Transformer parameter tree with an 'encoder' entry{hint}")
    encoder = params["encoder"]
    for i in range(config.num_layers):
        name = f"layer_{i}"
        if name not in encoder or "attention" not in encoder[name]:
            raise ValueError(f"encoder/{name}/attention is missing from the parameters "
                             f"(config has {config.num_layers} layers)")
        yield i, f"encoder/{name}/attention", encoder[name]["attention"]


def _widths(config, i: int) -> tuple[int, int, int]:
    d = config.dim_per_head
    return config.heads(i) * d, config.kv_heads(i) * d, config.kv_heads(i) * d


def _check_dense(path: str, name: str, dense: Any, in_dim: int, out_dim: int) -> None:
    if not isinstance(dense, Mapping) or "kernel" not in dense:
        raise ValueError(f"{path}/{name}: expected a dense layer with a 'kernel', got {type(dense).__name__}")
    want = (in_dim, out_dim)
    if tuple(dense["kernel"].shape) != want:
        raise ValueError(f"{path}/{name}/kernel has shape {tuple(dense['kernel'].shape)}, expected {want} "
                         "from the config")
    if "bias" in dense and tuple(dense["bias"].shape) != (out_dim,):
        raise ValueError(f"{path}/{name}/bias has shape {tuple(dense['bias'].shape)}, expected ({out_dim},)")


def fuse_qkv(config, params: Params) -> tuple[Any, dict]:
    """Separate Q/K/V projections -> one fused ``qkv`` projection.

    Args:
      config: a Transformer config with ``fused_qkv=False``.
      params: its parameter tree (``variables['params']``); every layer has ``attention/{query,key,value}``
        with kernels [H, N_i*D], [H, K_i*D], [H, K_i*D] and (all or none) biases.

    Returns:
      ``(config with fused_qkv=True, new params)`` where each layer's attention has ``qkv`` with kernel
      [H, (N_i + 2 K_i) D] (and bias [(N_i + 2 K_i) D]) in [query | key | value] order. The input is not
      modified; all checks run before anything is built.
    """
    if config.fused_qkv:
        raise ValueError("the config already has fused_qkv=True: the parameters are already fused")
    layers = list(_layers(config, params))
    for i, path, attn in layers:
        if "qkv" in attn:
            raise ValueError(f"{path} already has a fused 'qkv' projection although the config says "
                             "fused_qkv=False; the checkpoint is already fused")
        missing = [n for n in _SEPARATE if n not in attn]
        if missing:
            raise ValueError(f"{path} lacks {missing}; cannot fuse")
        for name, width in zip(_SEPARATE, _widths(config, i)):
            _check_dense(path, name, attn[name], config.hidden_size, width)
        with_bias = ["bias" in attn[n] for n in _SEPARATE]
        if any(with_bias) and not all(with_bias):
            raise ValueError(f"{path}: biases present on {[n for n, b in zip(_SEPARATE, with_bias) if b]} only; "
                             "fusing needs all three or none")
        dtypes = {jnp.dtype(attn[n]["kernel"].dtype) for n in _SEPARATE}
        if len(dtypes) != 1:
            raise ValueError(f"{path}: query/key/value kernels have different dtypes {sorted(map(str, dtypes))}")

    out = _copy_tree(params)
    for i, _, attn in layers:
        new_attn = {k: v for k, v in attn.items() if k not in _SEPARATE}
        fused = {"kernel": jnp.concatenate([attn[n]["kernel"] for n in _SEPARATE], axis=-1)}
        if "bias" in attn["query"]:
            fused["bias"] = jnp.concatenate([attn[n]["bias"] for n in _SEPARATE], axis=-1)
        new_attn["qkv"] = fused
        out["encoder"][f"layer_{i}"]["attention"] = new_attn
    return config.replace(fused_qkv=True), out


def unfuse_qkv(config, params: Params) -> tuple[Any, dict]:
    """Inverse of :func:`fuse_qkv`: splits each ``attention/qkv`` back into ``query``, ``key``, ``value``.

    Returns ``(config with fused_qkv=False, new params)``; bit-identical to the tree :func:`fuse_qkv` took.
    """
    if not config.fused_qkv:
        raise ValueError("the config has fused_qkv=False: the parameters are not fused")
    layers = list(_layers(config, params))
    for i, path, attn in layers:
        if "qkv" not in attn:
            raise ValueError(f"{path} has no fused 'qkv' projection although the config says fused_qkv=True")
        present = [n for n in _SEPARATE if n in attn]
        if present:
            raise ValueError(f"{path} has both 'qkv' and {present}; the tree is inconsistent")
        _check_dense(path, "qkv", attn["qkv"], config.hidden_size, sum(_widths(config, i)))

    out = _copy_tree(params)
    for i, _, attn in layers:
        cuts = np.cumsum(_widths(config, i))[:-1].tolist()
        new_attn = {k: v for k, v in attn.items() if k != "qkv"}
        kernels = jnp.split(attn["qkv"]["kernel"], cuts, axis=-1)
        biases = jnp.split(attn["qkv"]["bias"], cuts, axis=-1) if "bias" in attn["qkv"] else [None] * 3
        for name, kernel, bias in zip(_SEPARATE, kernels, biases):
            new_attn[name] = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
        out["encoder"][f"layer_{i}"]["attention"] = new_attn
    return config.replace(fused_qkv=False), out


def skip_layer_norm(x: jax.Array, residual: jax.Array, scale: jax.Array, bias: jax.Array,
                    epsilon: float = 1e-12) -> jax.Array:
    """LayerNorm(x + residual) over the last axis in one pass over the sum (ONNX Runtime's
    SkipLayerNormalization): mean and mean of squares are reduced together, so the sum is read once for
    the statistics and once for the normalisation.

    Shapes: x, residual [..., H]; scale, bias [H]. Statistics are computed in float32 whatever the input
    dtype (the float32 island); the result has x's dtype.
    """
    if x.shape != residual.shape or scale.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise ValueError(f"skip_layer_norm: x {x.shape}, residual {residual.shape}, scale {scale.shape} and "
                         f"bias {bias.shape} do not match")
    h = x.astype(jnp.float32) + residual.astype(jnp.float32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    mean_sq = jnp.mean(h * h, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + epsilon)
    return ((h - mean) * inv * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
