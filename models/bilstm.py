"""BiLSTM sentence and sentence-pair classifiers, and the LSTM layer the LSTM families share.

Models:

* single sentence, after Tang et al. (2019): embedding -> BiLSTM -> pooling -> MLP -> logits;
* sentence pair, after Tang et al.: both sentences through the same encoder, features
  ``[u, v, |u - v|, u * v]`` -> MLP;
* attentive variant, after Liu et al. (2019): learned attention pooling over the BiLSTM states
  (``pooling="attention"``).

The LSTM (:class:`LSTM`) is one ``lax.scan`` over time for both directions at once:

* the input projection ``x @ W_ih + b`` of all four gates is one ``nn.Dense`` over all time steps, outside
  the loop (so Dense interceptors, e.g. fake quantization, see it); only ``h @ W_hh`` stays in the loop;
* the backward direction runs on the time-flipped sequence in the same scan as the forward one (weights
  stacked on a direction axis), and its outputs are flipped back;
* the recurrence is masked: a padded step leaves (h, c) unchanged and outputs zeros. Padding therefore never
  feeds either direction's state, whatever its position: with right padding, the flipped sequence starts
  with padded steps that keep the zero initial state, which is the same as reversing each sequence within
  its true length; left padding and holes work too (the model reads the real tokens in order).

Gate layout: along the ``4H`` axis the blocks are ``[i | f | g | o]`` (input, forget, cell candidate,
output), as in PyTorch's ``nn.LSTM``. ONNX's ``LSTM`` op orders them ``[i | o | f | c]``: block ``j`` of
ONNX's layout is our block ``ONNX_GATE_ORDER[j]``. PyTorch's two biases (``bias_ih + bias_hh``) and ONNX's
``Wb + Rb`` sum to our single bias. There are no peepholes. The cell state and the gate nonlinearities are
float32 whatever the compute dtype (a bfloat16 cell state drifts over long sequences); the matmuls run in the
compute dtype and the layer's outputs are cast to it.

Parameter tree of :class:`BiLSTMClassifier` (``params``), E embed_dim, H hidden_size, D_i the input width
of layer i (E, then 2H), F the pooled width (2H, or 8H for pairs)::

    embedding/embedding                                   [vocab_size, E]
    encoder/layer_i/{forward,backward}/input/{kernel [D_i, 4H], bias [4H]}
    encoder/layer_i/{forward,backward}/recurrent_kernel   [H, 4H]
    attention_pool/proj/{kernel [2H, 2H], bias}, attention_pool/score/kernel [2H, 1]   (pooling="attention")
    mlp/{kernel [F, mlp_hidden], bias}, classifier/{kernel [mlp_hidden, num_labels], bias}

Sites and islands: ``Site("hidden")`` on each LSTM layer's output ``[B, S, 2H]`` (units: the forward
direction's H hidden units, then the backward direction's), at ``encoder/layer_i/hidden_site``; the gate acts
on what the next layer and the pooling see, not inside the recurrence. ``Island("softmax")`` around the
attention pooling weights; ``Island("logits")`` around the logits.
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

# Block j of ONNX's gate layout [i, o, f, c] is block ONNX_GATE_ORDER[j] of ours [i, f, g, o].
ONNX_GATE_ORDER = (0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------
# Input checks shared by the LSTM families


def check_ids(name: str, ids, size: int, ndim: int) -> None:
    """Raises ``ValueError`` unless ``ids`` is an integer array of rank ``ndim`` with values in [0, size).

    The range is checked only on concrete (non-traced) inputs: out-of-range ids would otherwise gather
    garbage (clamped or NaN rows) silently.
    """
    if ids.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes, got shape {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer ids, got dtype {ids.dtype}")
    if isinstance(ids, jax.core.Tracer):
        return
    values = np.asarray(ids)
    if values.size and (values.min() < 0 or values.max() >= size):
        raise ValueError(f"{name} contain ids outside the vocabulary [0, {size}): "
                         f"min {values.min()}, max {values.max()}")


def check_mask(name: str, mask, shape: tuple) -> None:
    """Raises ``ValueError`` unless ``mask`` has ``shape`` ([batch, seq], 1 = token, 0 = padding)."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(shape)} (one entry per token)")


# ---------------------------------------------------------------------------------------------------------
# The LSTM layer


def _forget_bias_init(hidden_size: int):
    """Bias init: zeros, forget-gate block 1 (remember by default; Jozefowicz et al.)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.zeros(shape, dtype).at[hidden_size:2 * hidden_size].set(1)

    return init


class LSTMDirection(nn.Module):
    """Parameters of one direction and its hoisted input projection.

    Call: ``x [S, B, D]`` (time-major) -> ``(x @ W_ih + b [S, B, 4H] in the compute dtype,
    W_hh [H, 4H] as stored)``.
    """

    hidden_size: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = self.hidden_size
        proj = nn.Dense(4 * h, dtype=self.dtype, param_dtype=self.param_dtype,
                        bias_init=_forget_bias_init(h), name="input")(x)
        w_hh = self.param("recurrent_kernel", nn.initializers.orthogonal(), (h, 4 * h), self.param_dtype)
        return proj, w_hh


def _masked_recurrence(proj, mask, w_hh, compute_dtype):
    """Runs the LSTM recurrence for all directions in one scan.

    Args:
      proj: [S, N, B, 4H] hoisted input projections (N directions, each already in its reading order).
      mask: [S, N, B] bool, False where the step is padding.
      w_hh: [N, H, 4H] recurrent kernels.
      compute_dtype: dtype of the recurrent matmul's operands and of the outputs.

    Returns:
      [S, N, B, H] hidden states in ``compute_dtype``; zeros at padded steps.
    """
    _, n, b, four_h = proj.shape
    hidden = four_h // 4
    w = w_hh.astype(compute_dtype)

    def step(carry, inputs):
        h, c = carry  # float32 [N, B, H]
        x_t, m_t = inputs
        z = x_t.astype(jnp.float32) + jnp.einsum("nbh,nhg->nbg", h.astype(compute_dtype), w,
                                                 preferred_element_type=jnp.float32)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
        m_t = m_t[..., None]
        carry = (jnp.where(m_t, h_new, h), jnp.where(m_t, c_new, c))
        return carry, jnp.where(m_t, h_new, 0.0).astype(compute_dtype)

    zeros = jnp.zeros((n, b, hidden), jnp.float32)
    _, ys = jax.lax.scan(step, (zeros, zeros), (proj, mask))
    return ys


class LSTM(nn.Module):
    """A (bidirectional) LSTM layer; see the module docstring for the algorithm and gate layout.

    Call: ``x [B, S, D]``, ``mask [B, S]`` (nonzero = token; ``None``: all tokens) -> ``[B, S, 2H]``
    (forward states, then backward states; ``[B, S, H]`` when not bidirectional), zeros at padded positions,
    in ``dtype`` (``None``: the promotion of ``x`` and the parameters). The output passes through
    ``Site("hidden", name="hidden_site")``.

    Attributes:
      hidden_size: H, hidden units per direction.
      bidirectional: add the backward direction.
      dtype: compute dtype (``None`` follows inputs and parameters).
      param_dtype: parameter storage dtype.
    """

    hidden_size: int
    bidirectional: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        if x.ndim != 3:
            raise ValueError(f"LSTM input must be [batch, seq, features], got shape {tuple(x.shape)}")
        b, s, _ = x.shape
        if mask is None:
            mask = jnp.ones((b, s), bool)
        check_mask("LSTM mask", mask, (b, s))
        x_t = jnp.swapaxes(x, 0, 1)  # [S, B, D]: scan runs over the leading axis
        m_t = jnp.swapaxes(mask, 0, 1) != 0  # [S, B]
        directions = [("forward", x_t, m_t)]
        if self.bidirectional:
            directions.append(("backward", jnp.flip(x_t, 0), jnp.flip(m_t, 0)))
        projs, kernels = [], []
        for name, xs, _ in directions:
            proj, w_hh = LSTMDirection(self.hidden_size, self.dtype, self.param_dtype, name=name)(xs)
            projs.append(proj)
            kernels.append(w_hh)
        compute_dtype = self.dtype if self.dtype is not None else jnp.result_type(projs[0].dtype, kernels[0].dtype)
        ys = _masked_recurrence(jnp.stack(projs, 1), jnp.stack([m for _, _, m in directions], 1),
                                jnp.stack(kernels), compute_dtype)  # [S, N, B, H]
        outs = [ys[:, 0]]
        if self.bidirectional:
            outs.append(jnp.flip(ys[:, 1], 0))
        y = jnp.swapaxes(jnp.concatenate(outs, -1), 0, 1)  # [B, S, N*H]
        return Site("hidden", name="hidden_site")(y)


class BiLSTMEncoder(nn.Module):
    """A stack of bidirectional :class:`LSTM` layers (``layer_i``) with dropout between layers.

    Call: ``x [B, S, D]``, ``mask [B, S]``, ``deterministic`` -> ``(y [B, S, 2H], per-layer outputs tuple)``.
    """

    hidden_size: int
    num_layers: int
    dropout_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        outputs = []
        for i in range(self.num_layers):
            if i:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
            x = LSTM(self.hidden_size, True, self.dtype, self.param_dtype, name=f"layer_{i}")(x, mask)
            outputs.append(x)
        return x, tuple(outputs)


# ---------------------------------------------------------------------------------------------------------
# The classifiers


@dataclasses.dataclass(frozen=True)
class BiLSTMConfig(ModelConfig):
    """Configuration of :class:`BiLSTMClassifier`: a small single-layer student by default."""

    family = "bilstm"

    vocab_size: int = 30522  # word vocabulary size (e.g. the teacher's word pieces)
    embed_dim: int = 300  # word embedding width E
    hidden_size: int = 150  # LSTM hidden units per direction H (layer outputs are 2H wide)
    num_layers: int = 1  # stacked BiLSTM layers
    mlp_hidden: int = 200  # width of the ReLU layer between the pooled features and the logits
    num_labels: int = 2  # classes
    dropout_rate: float = 0.1  # dropout on embeddings, between LSTM layers, on features and the MLP layer
    pooling: Literal["max", "mean", "attention"] = "max"  # over time; "attention": learned (Liu et al.)
    pair: bool = False  # sentence-pair classifier: shared encoder, features [u, v, |u-v|, u*v] (Tang et al.)
    pad_id: int = 0  # padding word id; the mask defaults to word_ids != pad_id
    dtype: str | None = None  # compute dtype; None follows parameters (set by precision policies)
    param_dtype: str = "float32"  # parameter storage dtype

    def validate(self) -> None:
        for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers", "mlp_hidden", "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"BiLSTMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"BiLSTMConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"BiLSTMConfig.pad_id={self.pad_id} is outside the vocabulary [0, {self.vocab_size})")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)

    @property
    def feature_size(self) -> int:
        """Width of the pooled features fed to the MLP: 2H, or 8H for pairs."""
        return 2 * self.hidden_size * (4 if self.pair else 1)


@flax.struct.dataclass
class LSTMOutput:
    """What the LSTM-family models return. ``None`` where not requested / not applicable.

    Attributes:
      logits: float32. Classifier: [B, num_labels]; tagger: [B, S, num_labels].
      hidden_states: with ``output_hidden_states``: the embedding output [B, S, E] (for the tagger: word
        embeddings and character features concatenated), then each LSTM layer's output [B, S, 2H], in the
        compute dtype. For pairs: those of the first sentence.
      pooled: classifier only: the features fed to the MLP, [B, 2H] or, for pairs, [B, 8H] = [u, v, |u-v|, u*v].
      hidden_states_b: pair classifier with ``output_hidden_states``: the second sentence's hidden states.
    """

    logits: jax.Array
    hidden_states: tuple | None = None
    pooled: jax.Array | None = None
    hidden_states_b: tuple | None = None


class AttentionPooling(nn.Module):
    """Learned attention over time: ``a = softmax_t(w . tanh(W y_t + b))`` over real tokens, ``sum_t a_t y_t``.

    Call: ``y [B, S, F]``, ``mask [B, S]`` -> ``[B, F]``. A row without tokens pools to zeros (its ``y`` is 0).
    """

    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y, mask):
        proj = jnp.tanh(nn.Dense(y.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(y))
        # No bias on the score: softmax over time ignores a constant shift.
        scores = nn.Dense(1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="score")(proj)[..., 0]
        bias = jnp.where(mask != 0, 0.0, -1e9).astype(jnp.float32)
        weights = Island("softmax", name="softmax_island")(lambda t, m: jax.nn.softmax(t + m, axis=-1), scores, bias)
        return jnp.einsum("bs,bsf->bf", weights.astype(y.dtype), y)


def pool(y, mask, pooling: str, attention: AttentionPooling | None):
    """Pools LSTM states ``y [B, S, F]`` over real tokens (``mask [B, S]``) -> ``[B, F]``; empty rows -> 0."""
    valid = (mask != 0)[..., None]
    if pooling == "max":
        masked = jnp.where(valid, y, jnp.finfo(y.dtype).min)
        return jnp.where(valid.any(1), masked.max(1), 0).astype(y.dtype)
    if pooling == "mean":
        count = jnp.maximum(valid.sum(1), 1).astype(jnp.float32)
        return (jnp.where(valid, y, 0).astype(jnp.float32).sum(1) / count).astype(y.dtype)
    return attention(y, mask)


class BiLSTMClassifier(nn.Module):
    """BiLSTM (pair) classifier; see the module docstring.

    Call: ``apply({'params': p}, word_ids [B, S] int, mask [B, S] (1 = token, 0 = padding; None: word_ids !=
    pad_id), word_ids_b [B, S_b] int, mask_b [B, S_b] (pairs only), train=False, output_hidden_states=False)``
    -> :class:`LSTMOutput`. ``train=True`` enables dropout (needs the ``'dropout'`` RNG).
    """

    config: BiLSTMConfig

    @nn.compact
    def __call__(self, word_ids, mask=None, word_ids_b=None, mask_b=None, *, train: bool = False,
                 output_hidden_states: bool = False) -> LSTMOutput:
        cfg = self.config
        if cfg.pair and word_ids_b is None:
            raise ValueError("BiLSTMConfig.pair=True: pass the second sentence as word_ids_b (and mask_b)")
        if not cfg.pair and (word_ids_b is not None or mask_b is not None):
            raise ValueError("word_ids_b/mask_b given to a single-sentence model; set BiLSTMConfig.pair=True")
        sentences = [("word_ids", "mask", word_ids, mask)]
        if cfg.pair:
            sentences.append(("word_ids_b", "mask_b", word_ids_b, mask_b))
        checked = []
        for ids_name, mask_name, ids, m in sentences:
            check_ids(ids_name, ids, cfg.vocab_size, ndim=2)
            if m is None:
                m = ids != cfg.pad_id
            check_mask(mask_name, m, ids.shape)
            checked.append((ids, m))
        if cfg.pair and word_ids.shape[0] != word_ids_b.shape[0]:
            raise ValueError(f"word_ids and word_ids_b have different batch sizes: "
                             f"{word_ids.shape[0]} and {word_ids_b.shape[0]}")

        deterministic = not train
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, param_dtype=param_dtype, name="embedding")
        encoder = BiLSTMEncoder(cfg.hidden_size, cfg.num_layers, cfg.dropout_rate, dtype, param_dtype,
                                name="encoder")
        attention = (AttentionPooling(dtype, param_dtype, name="attention_pool") if cfg.pooling == "attention"
                     else None)

        def encode(ids, m):
            e = embed(ids)
            if dtype is not None:
                e = e.astype(dtype)
            y, layers = encoder(nn.Dropout(cfg.dropout_rate)(e, deterministic=deterministic), m, deterministic)
            return pool(y, m, cfg.pooling, attention), (e, *layers)

        encoded = [encode(ids, m) for ids, m in checked]
        u, hidden = encoded[0]
        hidden_b = None
        features = u
        if cfg.pair:
            v, hidden_b = encoded[1]
            features = jnp.concatenate([u, v, jnp.abs(u - v), u * v], axis=-1)
        h = nn.Dropout(cfg.dropout_rate)(features, deterministic=deterministic)
        h = nn.relu(nn.Dense(cfg.mlp_hidden, dtype=dtype, param_dtype=param_dtype, name="mlp")(h))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        logits = Island("logits", name="logits_island")(
            lambda t: t, nn.Dense(cfg.num_labels, dtype=dtype, param_dtype=param_dtype, name="classifier")(h))
        return LSTMOutput(logits=logits, hidden_states=hidden if output_hidden_states else None,
                          pooled=features,
                          hidden_states_b=hidden_b if output_hidden_states else None)
