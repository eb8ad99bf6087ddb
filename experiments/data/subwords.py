"""The small tokenizer interface the data pipeline needs, and an adapter for Hugging Face tokenizers.

The pipeline assembles ``[CLS] a [SEP] (b [SEP])`` itself, so that truncation is explicit and counted and
NER words keep their sub-token alignment. All it needs from a tokenizer is sub-token ids *without* special
tokens, plus four special ids: :class:`SubwordTokenizer`. :func:`as_subword_tokenizer` accepts

* any object implementing :class:`SubwordTokenizer`;
* a ``tokenizers.Tokenizer`` (padding and truncation configured in its ``tokenizer.json`` are turned off
  on a copy: all-MiniLM-L6-v2's pads to 128 by default);
* an object wrapping one as ``backend_tokenizer`` (transformers' fast tokenizers), ``backend``,
  ``tokenizer``, ``_tokenizer`` or ``_tok`` (:class:`models.tokenization.Tokenizer`);
* a path to a ``tokenizer.json`` file or to a directory holding one (a model checkpoint directory).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import tokenizers

from models import storage

_SPECIAL_NAMES = {
    "cls_id": ("[CLS]", "<s>"),
    "sep_id": ("[SEP]", "</s>"),
    "pad_id": ("[PAD]", "<pad>"),
    "unk_id": ("[UNK]", "<unk>"),
}
# Where wrappers keep their tokenizers.Tokenizer (transformers: backend_tokenizer; models.tokenization: _tok).
_WRAPPER_ATTRS = ("backend_tokenizer", "backend", "tokenizer", "_tokenizer", "_tok")


@runtime_checkable
class SubwordTokenizer(Protocol):
    """Sub-token ids without special tokens, and the ids of the four special tokens."""

    cls_id: int
    sep_id: int
    pad_id: int
    unk_id: int

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Sub-token ids of each text, no special tokens, no padding, no truncation."""
        ...


class HFTokenizer:
    """:class:`SubwordTokenizer` over a ``tokenizers.Tokenizer`` (BERT word-piece, BPE, ...).

    Special ids are looked up by name (``[CLS]``/``<s>``, ``[SEP]``/``</s>``, ``[PAD]``/``<pad>``,
    ``[UNK]``/``<unk>``) unless given.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, **special_ids: int):
        unknown = set(special_ids) - set(_SPECIAL_NAMES)
        if unknown:
            raise TypeError(f"unknown special ids {sorted(unknown)}; allowed: {sorted(_SPECIAL_NAMES)}")
        self._tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tok.no_padding()
        self._tok.no_truncation()
        for attr, names in _SPECIAL_NAMES.items():
            value = special_ids.get(attr)
            if value is None:
                value = next((i for i in map(self._tok.token_to_id, names) if i is not None), None)
            if value is None:
                raise ValueError(f"tokenizer has none of the special tokens {names}; pass {attr}= explicitly")
            setattr(self, attr, int(value))

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]


def as_subword_tokenizer(obj) -> SubwordTokenizer:
    """Returns a :class:`SubwordTokenizer` for any of the accepted forms (see the module docstring)."""
    if isinstance(obj, SubwordTokenizer):
        return obj
    if isinstance(obj, tokenizers.Tokenizer):
        return HFTokenizer(obj)
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        file = os.path.join(path, "tokenizer.json") if storage.is_dir(path) else path
        if not storage.is_file(file):
            raise FileNotFoundError(f"no tokenizer file: expected {file}")
        return HFTokenizer(tokenizers.Tokenizer.from_str(storage.read_text(file)))  # local or gs://
    for attr in _WRAPPER_ATTRS:
        inner = getattr(obj, attr, None)
        if isinstance(inner, tokenizers.Tokenizer):
            return HFTokenizer(inner)
    raise TypeError(
        f"cannot use {type(obj).__name__} as a tokenizer: pass an object with pieces(texts) and "
        f"cls_id/sep_id/pad_id/unk_id, a tokenizers.Tokenizer (or an object holding one as one of "
        f"{', '.join(_WRAPPER_ATTRS)}), or a path to tokenizer.json or its directory")
