"""CNN-LSTM token tagger after Izsak et al. (2019), for BIO-tagged NER.

Each token is represented by its word embedding concatenated with a character CNN's features (character
embeddings -> 1-D convolution over the token's characters -> ReLU -> max over the real characters); a BiLSTM
(:class:`models.bilstm.BiLSTMEncoder`) reads the token sequence and a Dense layer gives per-token logits.

Character padding: ``pad_id`` is the padding id of both vocabularies. Padded characters embed to zeros and
are left out of the max, and the convolution pads with zeros ("SAME"), so a token's features do not depend on
how many padding characters follow it; a token without characters (a padding token) gets zero features.

Parameter tree (``params``), W word_embed_dim, C char_embed_dim, K char_kernel_size, F char_filters,
H hidden_size::

    word_embedding/embedding                              [vocab_size, W]
    char_cnn/char_embedding/embedding                     [char_vocab_size, C]
    char_cnn/conv/{kernel [K, C, F], bias [F]}
    encoder/layer_i/{forward,backward}/...                as in models.bilstm (layer 0 input width W + F)
    classifier/{kernel [2H, num_labels], bias}

Sites and islands: ``Site("hidden")`` on each BiLSTM layer's output (``encoder/layer_i/hidden_site``),
``Island("logits")`` around the logits.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from compression.sites import Island
from models.bilstm import BiLSTMEncoder, LSTMOutput, check_ids, check_mask
from models.config_base import ModelConfig, resolve_dtype


@dataclasses.dataclass(frozen=True)
class CNNLSTMConfig(ModelConfig):
    """Configuration of :class:`CNNLSTMTagger`."""

    family = "cnn_lstm"

    vocab_size: int = 30000  # word vocabulary size
    char_vocab_size: int = 128  # character vocabulary size
    word_embed_dim: int = 100  # word embedding width W
    char_embed_dim: int = 30  # character embedding width C
    char_filters: int = 30  # character CNN output channels F
    char_kernel_size: int = 3  # characters per convolution window K
    max_chars_per_token: int = 20  # characters kept per token: char_ids' last axis must have this length
    hidden_size: int = 100  # LSTM hidden units per direction H
    num_layers: int = 1  # stacked BiLSTM layers
    num_labels: int = 9  # tags (e.g. CoNLL-2003 BIO: O + B/I for 4 entity types)
    dropout_rate: float = 0.1  # dropout on token features, between LSTM layers and before the classifier
    pad_id: int = 0  # padding id in both the word and the character vocabulary; mask defaults to word_ids != pad_id
    dtype: str | None = None  # compute dtype; None follows parameters (set by precision policies)
    param_dtype: str = "float32"  # parameter storage dtype

    def validate(self) -> None:
        for name in ("vocab_size", "char_vocab_size", "word_embed_dim", "char_embed_dim", "char_filters",
                     "char_kernel_size", "max_chars_per_token", "hidden_size", "num_layers", "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"CNNLSTMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"CNNLSTMConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        for name in ("vocab_size", "char_vocab_size"):
            if not 0 <= self.pad_id < getattr(self, name):
                raise ValueError(f"CNNLSTMConfig.pad_id={self.pad_id} is outside the {name} "
                                 f"[0, {getattr(self, name)})")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)


class CharCNN(nn.Module):
    """Character CNN: ``char_ids [B, S, L]`` int -> ``[B, S, F]`` per-token features (see the module docstring)."""

    config: CNNLSTMConfig

    @nn.compact
    def __call__(self, char_ids):
        cfg = self.config
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        b, s, length = char_ids.shape
        real = (char_ids != cfg.pad_id)[..., None]  # [B, S, L, 1]
        e = nn.Embed(cfg.char_vocab_size, cfg.char_embed_dim, param_dtype=param_dtype, name="char_embedding")(char_ids)
        e = jnp.where(real, e, 0)
        if dtype is not None:
            e = e.astype(dtype)
        conv = nn.Conv(cfg.char_filters, (cfg.char_kernel_size,), padding="SAME", dtype=dtype,
                       param_dtype=param_dtype, name="conv")(e.reshape(b * s, length, cfg.char_embed_dim))
        h = jnp.where(real, nn.relu(conv.reshape(b, s, length, cfg.char_filters)), 0)  # ReLU >= 0: 0 is neutral
        return h.max(axis=2)


class CNNLSTMTagger(nn.Module):
    """CNN-LSTM token tagger; see the module docstring.

    Call: ``apply({'params': p}, word_ids [B, S] int, char_ids [B, S, max_chars_per_token] int, mask [B, S]
    (1 = token, 0 = padding; None: word_ids != pad_id), train=False, output_hidden_states=False)`` ->
    :class:`models.bilstm.LSTMOutput` with ``logits [B, S, num_labels]`` float32 (padded positions carry
    logits too; mask them in the loss). ``train=True`` enables dropout (needs the ``'dropout'`` RNG).
    """

    config: CNNLSTMConfig

    @nn.compact
    def __call__(self, word_ids, char_ids, mask=None, *, train: bool = False,
                 output_hidden_states: bool = False) -> LSTMOutput:
        cfg = self.config
        check_ids("word_ids", word_ids, cfg.vocab_size, ndim=2)
        check_ids("char_ids", char_ids, cfg.char_vocab_size, ndim=3)
        if tuple(char_ids.shape[:2]) != tuple(word_ids.shape):
            raise ValueError(f"char_ids has shape {tuple(char_ids.shape)}; its first two axes must match "
                             f"word_ids {tuple(word_ids.shape)}")
        if char_ids.shape[2] != cfg.max_chars_per_token:
            raise ValueError(f"char_ids has {char_ids.shape[2]} characters per token; the model expects "
                             f"max_chars_per_token={cfg.max_chars_per_token} (pad or truncate the characters)")
        if mask is None:
            mask = word_ids != cfg.pad_id
        check_mask("mask", mask, word_ids.shape)

        deterministic = not train
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        words = nn.Embed(cfg.vocab_size, cfg.word_embed_dim, param_dtype=param_dtype, name="word_embedding")(word_ids)
        chars = CharCNN(cfg, name="char_cnn")(char_ids)
        if dtype is not None:
            words = words.astype(dtype)
        x = jnp.concatenate([words, chars.astype(words.dtype)], axis=-1)
        y, layers = BiLSTMEncoder(cfg.hidden_size, cfg.num_layers, cfg.dropout_rate, dtype, param_dtype,
                                  name="encoder")(nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic),
                                                  mask, deterministic)
        y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
        logits = Island("logits", name="logits_island")(
            lambda t: t, nn.Dense(cfg.num_labels, dtype=dtype, param_dtype=param_dtype, name="classifier")(y))
        return LSTMOutput(logits=logits, hidden_states=(x, *layers) if output_hidden_states else None)
