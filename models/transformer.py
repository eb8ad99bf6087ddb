"""A BERT-compatible Transformer encoder with classification, token-classification and masked-LM heads.

Post-LN blocks, exact GELU, learned word/position/token-type embeddings, as in BERT; parameters map one to
one onto Hugging Face ``BertModel`` checkpoints (see :mod:`models.hf`).

Designed for compression from the start:

* sites (:class:`compression.sites.Site`) at each layer's input hidden units (``"hidden"``), per-head
  attention context (``"heads"``), FFN intermediate activations (``"ffn"``) and the layer output
  (``"layer"``, with the layer input as ``skip``);
* float32 islands (:class:`compression.sites.Island`) around softmax, attention scores, LayerNorm and logits;
* per-layer head counts and FFN sizes (non-uniform after pruning), fused or separate Q/K/V projections,
  fewer key/value heads than query heads (multi-query / grouped-query attention);
* ``dtype`` (compute; ``None`` follows the parameters, so a precision policy that casts parameters decides)
  and ``param_dtype`` (storage).

Parameter tree (``params``), with H hidden, N_i heads and K_i key/value heads of layer i, D head_dim,
F_i FFN size::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding, embeddings/LayerNorm
    encoder/layer_i/attention/{query [H, N_i*D], key [H, K_i*D], value [H, K_i*D]}/{kernel,bias}
        or encoder/layer_i/attention/qkv [H, (N_i + 2 K_i) * D] when ``fused_qkv``
    encoder/layer_i/attention/output [N_i*D, H], encoder/layer_i/attention_norm
    encoder/layer_i/intermediate [H, F_i], encoder/layer_i/output [F_i, H], encoder/layer_i/output_norm
    pooler/dense, classifier                      (head="sequence")
    classifier                                    (head="token")
    mlm/transform, mlm/transform_norm, mlm/bias   (head="mlm"; decoder tied to word embeddings)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from compression.sites import Island, Site
from models.config_base import ModelConfig, resolve_dtype

IntOrPerLayer = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    """Configuration of :class:`Transformer`. Defaults are all-MiniLM-L6-v2's shape."""

    family = "transformer"

    vocab_size: int = 30522  # word-piece vocabulary size
    hidden_size: int = 384  # model width H
    num_layers: int = 6  # encoder depth
    num_heads: IntOrPerLayer = 12  # query heads; a tuple gives one count per layer (after pruning)
    num_kv_heads: int | tuple[int, ...] | None = None  # key/value heads (MQA: 1, GQA: g); None = num_heads
    head_dim: int | None = None  # per-head width D; None = hidden_size // num_heads
    intermediate_size: IntOrPerLayer = 1536  # FFN width; a tuple gives one size per layer
    max_position_embeddings: int = 512  # longest sequence the position table covers
    type_vocab_size: int = 2  # token type (segment) ids
    layer_norm_eps: float = 1e-12
    hidden_dropout_rate: float = 0.1  # dropout after embeddings, attention output and FFN output
    attention_dropout_rate: float = 0.1  # dropout on attention probabilities
    initializer_range: float = 0.02  # std of the normal initialisation
    fused_qkv: bool = False  # one [H, (N + 2K) D] projection instead of three
    head: Literal["sequence", "token", "mlm", "none"] = "sequence"  # task head
    num_labels: int = 2  # classes of the sequence / token head
    classifier_dropout_rate: float | None = None  # None = hidden_dropout_rate
    pad_token_id: int = 0
    dtype: str | None = None  # compute dtype; None follows parameters (set by precision policies)
    param_dtype: str = "float32"  # parameter storage dtype

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "max_position_embeddings", "type_vocab_size",
                     "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.num_layers:
                raise ValueError(f"TransformerConfig.{name} has {len(value)} entries for {self.num_layers} layers")
        for i in range(self.num_layers):
            h, kv, f = self.heads(i), self.kv_heads(i), self.ffn_size(i)
            if h < 1:
                raise ValueError(f"layer {i}: num_heads must be >= 1 (remove the layer instead), got {h}")
            if kv < 1 or h % kv:
                raise ValueError(f"layer {i}: num_kv_heads={kv} must be >= 1 and divide num_heads={h}")
            if f < 1:
                raise ValueError(f"layer {i}: intermediate_size must be >= 1, got {f}")
        if self.head_dim is None and isinstance(self.num_heads, int) and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                             "set head_dim explicitly")
        for name in ("hidden_dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)

    def heads(self, layer: int) -> int:
        """Query heads of ``layer``."""
        return self.num_heads[layer] if isinstance(self.num_heads, tuple) else self.num_heads

    def kv_heads(self, layer: int) -> int:
        """Key/value heads of ``layer``."""
        kv = self.num_kv_heads
        if kv is None:
            return self.heads(layer)
        return kv[layer] if isinstance(kv, tuple) else kv

    def ffn_size(self, layer: int) -> int:
        """FFN intermediate units of ``layer``."""
        f = self.intermediate_size
        return f[layer] if isinstance(f, tuple) else f

    @property
    def dim_per_head(self) -> int:
        """D; fixed across layers so that pruning heads never changes it."""
        if self.head_dim is not None:
            return self.head_dim
        n = self.num_heads if isinstance(self.num_heads, int) else max(self.num_heads)
        return self.hidden_size // n


@flax.struct.dataclass
class TransformerOutput:
    """What :class:`Transformer` returns. Arrays are [batch, ...]; ``None`` where not requested.

    Attributes:
      logits: head output, float32. sequence: [B, num_labels]; token: [B, S, num_labels]; mlm: [B, S, V], or
        [B, P, V] at the ``mlm_positions`` [B, P] the call names; ``None`` for ``head="none"``.
      last_hidden_state: [B, S, H], the final layer's output.
      pooled: [B, H], the BERT pooler output (sequence head only).
      hidden_states: with ``output_hidden_states``: tuple of L+1 arrays [B, S, H], the embedding output
        first, then each layer's output.
      attentions: with ``output_attentions``: tuple of L arrays [B, N_i, S, S], attention probabilities.
      attention_scores: with ``output_attentions``: tuple of L arrays [B, N_i, S, S], pre-softmax scores
        (scaled by 1/sqrt(D), before the padding mask is added; mask them yourself, as TinyBERT does).
    """

    logits: jax.Array | None
    last_hidden_state: jax.Array
    pooled: jax.Array | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    attention_scores: tuple | None = None


def _dense(features: int, cfg: TransformerConfig, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype),
                    kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


def _layer_norm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
    # Statistics precision is the "layernorm" island's job, so Flax's own float32 upcast is off.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=resolve_dtype(cfg.dtype),
                        param_dtype=resolve_dtype(cfg.param_dtype), force_float32_reductions=False, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention with N query heads and K <= N key/value heads (K | N).

    Input x: [B, S, H]; mask_bias: [B, 1, 1, S] additive (0 or a large negative). Returns the output
    [B, S, H], the probabilities [B, N, S, S] and the pre-softmax scores [B, N, S, S].
    """

    config: TransformerConfig
    num_heads: int
    num_kv_heads: int

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
        cfg = self.config
        n, k, d = self.num_heads, self.num_kv_heads, cfg.dim_per_head
        b, s, _ = x.shape
        if cfg.fused_qkv:
            qkv = _dense((n + 2 * k) * d, cfg, "qkv")(x)
            q, key, value = jnp.split(qkv, [n * d, (n + k) * d], axis=-1)
        else:
            q = _dense(n * d, cfg, "query")(x)
            key = _dense(k * d, cfg, "key")(x)
            value = _dense(k * d, cfg, "value")(x)
        g = n // k
        q = q.reshape(b, s, k, g, d) * jnp.asarray(1.0 / np.sqrt(d), q.dtype)
        key = key.reshape(b, s, k, d)
        value = value.reshape(b, s, k, d)

        scores = Island("attention_scores", name="scores_island")(
            lambda q_, k_: jnp.einsum("bqkgd,bskd->bkgqs", q_, k_), q, key).reshape(b, n, s, s)
        probs = Island("softmax", name="softmax_island")(
            lambda t, m: jax.nn.softmax(t + m, axis=-1), scores, mask_bias.astype(scores.dtype))
        probs_drop = nn.Dropout(cfg.attention_dropout_rate)(probs, deterministic=deterministic)
        context = jnp.einsum("bkgqs,bskd->bqkgd", probs_drop.reshape(b, k, g, s, s), value)
        context = Site("heads", axis=-2, name="heads_site")(context.reshape(b, s, n, d))
        out = _dense(cfg.hidden_size, cfg, "output")(context.reshape(b, s, n * d))
        return out, probs, scores


class TransformerLayer(nn.Module):
    """One post-LN block: x -> LN(x + Attn(x)) -> LN(. + FFN(.)). x: [B, S, H] -> [B, S, H]."""

    config: TransformerConfig
    index: int

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
        cfg, i = self.config, self.index
        layer_in = x
        x = Site("hidden", name="hidden_site")(x)
        attn_out, probs, scores = SelfAttention(cfg, cfg.heads(i), cfg.kv_heads(i), name="attention")(
            x, mask_bias, deterministic)
        attn_out = nn.Dropout(cfg.hidden_dropout_rate)(attn_out, deterministic=deterministic)
        norm1 = _layer_norm(cfg, "attention_norm")
        h = Island("layernorm", name="attention_norm_island")(lambda t: norm1(t), attn_out + x)
        inter = nn.gelu(_dense(cfg.ffn_size(i), cfg, "intermediate")(h), approximate=False)
        inter = Site("ffn", name="ffn_site")(inter)
        ffn_out = nn.Dropout(cfg.hidden_dropout_rate)(_dense(cfg.hidden_size, cfg, "output")(inter),
                                                      deterministic=deterministic)
        norm2 = _layer_norm(cfg, "output_norm")
        out = Island("layernorm", name="output_norm_island")(lambda t: norm2(t), ffn_out + h)
        out = Site("layer", name="layer_site")(out, skip=layer_in)
        return out, probs, scores


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout. ids: [B, S] int -> [B, S, H]."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        pdt = resolve_dtype(cfg.param_dtype)
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, param_dtype=pdt,
                        name="word_embeddings")
        x = (word(input_ids)
             + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, param_dtype=pdt,
                        name="position_embeddings")(position_ids)
             + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, param_dtype=pdt,
                        name="token_type_embeddings")(token_type_ids))
        if cfg.dtype is not None:
            x = x.astype(resolve_dtype(cfg.dtype))
        norm = _layer_norm(cfg, "LayerNorm")
        x = Island("layernorm", name="norm_island")(lambda t: norm(t), x)
        return nn.Dropout(cfg.hidden_dropout_rate)(x, deterministic=deterministic), word


def _check_concrete_inputs(cfg: TransformerConfig, input_ids, token_type_ids) -> None:
    """Range checks on concrete (non-traced) inputs: out-of-range ids would otherwise gather garbage/NaN."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"input_ids contain ids outside the vocabulary [0, {cfg.vocab_size}): "
                         f"min {ids.min()}, max {ids.max()}")
    if token_type_ids is not None and not isinstance(token_type_ids, jax.core.Tracer):
        tt = np.asarray(token_type_ids)
        if tt.size and (tt.min() < 0 or tt.max() >= cfg.type_vocab_size):
            raise ValueError(f"token_type_ids outside [0, {cfg.type_vocab_size}): min {tt.min()}, max {tt.max()}")


class Transformer(nn.Module):
    """BERT-compatible encoder with a task head; see the module docstring.

    Call: ``apply({'params': p}, input_ids [B, S] int32, attention_mask=[B, S] (1 = token, 0 = padding),
    token_type_ids=[B, S], train=False, output_hidden_states=False, output_attentions=False)`` ->
    :class:`TransformerOutput`. ``train=True`` enables dropout (needs the ``'dropout'`` RNG).
    ``mlm_positions`` (int [B, P], MLM head only) runs the MLM head on those positions alone (BERT's gathered
    masked positions): the logits are [B, P, V] instead of a vocabulary-wide product at every position.

    ``encoder_cls`` swaps the layer stack for another module with :class:`Encoder`'s interface (module
    replacement uses it); extra keyword arguments of the call go to it.
    """

    config: TransformerConfig
    encoder_cls: Any = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, train: bool = False,
                 output_hidden_states: bool = False, output_attentions: bool = False, mlm_positions=None,
                 **encoder_kwargs) -> TransformerOutput:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        b, s = input_ids.shape
        if s > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings={cfg.max_position_embeddings}; "
                             "truncate the inputs (the tokenizer's max_length) or use a longer position table")
        _check_concrete_inputs(cfg, input_ids, token_type_ids)
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, s), jnp.int32)
        deterministic = not train
        position_ids = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
        x, word = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic)
        # Additive mask in float32; the softmax island adds it to float32 scores.
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
        embedded = x
        encoder = (self.encoder_cls or Encoder)(cfg, name="encoder")
        x, layer_outputs, probs_all, scores_all = encoder(embedded, mask_bias, deterministic, **encoder_kwargs)
        hidden = (embedded, *layer_outputs)
        if mlm_positions is not None and cfg.head != "mlm":
            raise ValueError(f"mlm_positions is for the MLM head; this model's head is {cfg.head!r}")

        logits, pooled = None, None
        drop_rate = cfg.classifier_dropout_rate if cfg.classifier_dropout_rate is not None else cfg.hidden_dropout_rate
        if cfg.head == "sequence":
            pooled = Pooler(cfg, name="pooler")(x)
            h = nn.Dropout(drop_rate)(pooled, deterministic=deterministic)
            logits = Island("logits", name="logits_island")(lambda t: t, _dense(cfg.num_labels, cfg, "classifier")(h))
        elif cfg.head == "token":
            h = nn.Dropout(drop_rate)(x, deterministic=deterministic)
            logits = Island("logits", name="logits_island")(lambda t: t, _dense(cfg.num_labels, cfg, "classifier")(h))
        elif cfg.head == "mlm":
            h = x if mlm_positions is None else jnp.take_along_axis(
                x, jnp.asarray(mlm_positions, jnp.int32)[..., None], axis=1)
            logits = MLMHead(cfg, name="mlm")(h, word)
        return TransformerOutput(
            logits=logits, last_hidden_state=x, pooled=pooled,
            hidden_states=hidden if output_hidden_states else None,
            attentions=tuple(probs_all) if output_attentions else None,
            attention_scores=tuple(scores_all) if output_attentions else None)


class Encoder(nn.Module):
    """The stack of :class:`TransformerLayer`. Returns (x, per-layer outputs, probs, scores)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
        outs, probs_all, scores_all = [], [], []
        for i in range(self.config.num_layers):
            x, probs, scores = TransformerLayer(self.config, i, name=f"layer_{i}")(x, mask_bias, deterministic)
            outs.append(x)
            probs_all.append(probs)
            scores_all.append(scores)
        return x, outs, probs_all, scores_all


class Pooler(nn.Module):
    """BERT pooler: tanh(Dense([CLS])). x: [B, S, H] -> [B, H]."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(_dense(self.config.hidden_size, self.config, "dense")(x[:, 0]))


class MLMHead(nn.Module):
    """Masked-LM head: Dense + GELU + LayerNorm, decoder tied to the word embeddings, own bias. -> [B, S, V]."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, word_embed: nn.Embed):
        cfg = self.config
        h = nn.gelu(_dense(cfg.hidden_size, cfg, "transform")(x), approximate=False)
        norm = _layer_norm(cfg, "transform_norm")
        h = Island("layernorm", name="norm_island")(lambda t: norm(t), h)
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), resolve_dtype(cfg.param_dtype))
        return Island("logits", name="logits_island")(lambda t: t, word_embed.attend(h) + bias.astype(h.dtype))


TASK_HEADS = ("sequence", "token")
HEAD_SUBTREES = ("pooler", "classifier", "mlm")  # parameters that belong to a head, not to the body


def with_task_head(config: TransformerConfig, params, head: str, num_labels: int, key: jax.Array):
    """A pretrained body (a model with ``head`` "none" or "mlm", e.g. a general-distillation student) with a fresh
    task head: the MLM head is dropped; a pooler the body has is kept (it is pretrained, as in BERT), and what the
    new head lacks (pooler, classifier) is initialised from ``key``.

    Returns ``(config, params)`` for ``head`` ("sequence" or "token") over ``num_labels`` classes.
    """
    if head not in TASK_HEADS:
        raise ValueError(f"head {head!r} is not a task head; allowed: {TASK_HEADS}")
    new_cfg = config.replace(head=head, num_labels=num_labels)
    fresh = jax.jit(Transformer(new_cfg).init)(key, jnp.zeros((1, 1), jnp.int32))["params"]
    out = {k: v for k, v in params.items() if k not in HEAD_SUBTREES}
    for name in HEAD_SUBTREES:
        if name in fresh:
            out[name] = params[name] if name == "pooler" and name in params else fresh[name]
    return new_cfg, out
