"""A thin wrapper over a checkpoint's fast (Rust) tokenizer, giving static-shape numpy batches.

:meth:`Tokenizer.from_dir` reads ``tokenizer.json`` when present, else builds the BERT WordPiece pipeline
(BERT normaliser, BERT pre-tokeniser, ``[CLS] A [SEP] B [SEP]`` template) from ``vocab.txt``, with lower-casing
and special tokens from ``tokenizer_config.json`` / ``special_tokens_map.json`` when present. Everything is
offline. Padding and truncation configured inside ``tokenizer.json`` (all-MiniLM-L6-v2 pads every sequence to
128) are switched off: :meth:`Tokenizer.encode` pads and truncates only as its arguments say.

Truncation is never silent: ``truncation="error"`` (the default) raises naming the rows that do not fit;
``truncation="longest_first"`` truncates (the longer of a pair first, token by token), logs how many rows were
cut, and returns the count with ``return_num_truncated=True``.

The tokenizer object is not safe to share between threads (each call sets the backend's truncation).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

from models import storage

log = logging.getLogger(__name__)

TRUNCATION = ("error", "longest_first")
PADDING = ("max_length", "longest")  # or an int: pad to exactly that length
IGNORE_LABEL = -100  # label of sub-tokens after the first, special tokens and padding (ignored by losses)
_DEFAULT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                     "mask_token": "[MASK]"}


def _special_tokens(path: Path) -> dict[str, str]:
    """Special token strings from tokenizer_config.json / special_tokens_map.json, BERT defaults otherwise."""
    specials = dict(_DEFAULT_SPECIALS)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file():
            cfg = json.loads((path / name).read_text())
            for key in _DEFAULT_SPECIALS:
                value = cfg.get(key)
                if isinstance(value, dict):  # {"content": "[PAD]", ...} in newer files
                    value = value.get("content")
                if isinstance(value, str):
                    specials[key] = value
    return specials


def _bert_wordpiece(vocab_file: Path, lowercase: bool, specials: dict[str, str]) -> tokenizers.Tokenizer:
    """The BERT uncased/cased WordPiece pipeline over ``vocab_file`` (one token per line)."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(str(vocab_file), unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    for key in ("unk_token", "cls_token", "sep_token", "pad_token"):
        if tok.token_to_id(specials[key]) is None:
            raise ValueError(f"{vocab_file} lacks the special token {specials[key]!r} ({key})")
    # Registered as special so that the normaliser and pre-tokeniser leave them whole.
    tok.add_special_tokens([t for t in dict.fromkeys(specials.values()) if tok.token_to_id(t) is not None])
    cls, sep = specials["cls_token"], specials["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


class Tokenizer:
    """Tokenizes sentences, sentence pairs and pre-split words into padded int32 numpy batches.

    Attributes:
      pad_id, unk_token: the padding id and the unknown-token string.
      source: the file the tokenizer was read from.
    """

    def __init__(self, backend: tokenizers.Tokenizer, pad_token: str = "[PAD]", unk_token: str = "[UNK]",
                 source: str = "<memory>", special_tokens: dict[str, str] | None = None):
        backend.no_padding()
        backend.no_truncation()
        self._tok = backend
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{source}: the pad token {pad_token!r} is not in the vocabulary")
        self.pad_id = pad_id
        self.unk_token = unk_token
        self.source = source
        self.special_tokens = {**_DEFAULT_SPECIALS, "pad_token": pad_token, "unk_token": unk_token,
                               **(special_tokens or {})}

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads the tokenizer of a checkpoint / model directory (tokenizer.json, else vocab.txt; local, or
        downloaded from a gs:// URL)."""
        if storage.is_remote(path):  # only its tokenizer files are downloaded, not the model's weights
            from models.io import copy_files, tokenizer_files

            with tempfile.TemporaryDirectory(prefix="nlpress-tokenizer-") as local:
                copy_files(tokenizer_files(path), local)
                return cls.from_dir(local)
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        specials = _special_tokens(path)
        if (path / "tokenizer.json").is_file():
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            source = path / "tokenizer.json"
        elif (path / "vocab.txt").is_file():
            lowercase = True
            if (path / "tokenizer_config.json").is_file():
                lowercase = bool(json.loads((path / "tokenizer_config.json").read_text()).get("do_lower_case", True))
            backend = _bert_wordpiece(path / "vocab.txt", lowercase, specials)
            source = path / "vocab.txt"
        else:
            raise FileNotFoundError(f"{path} has neither tokenizer.json nor vocab.txt")
        return cls(backend, pad_token=specials["pad_token"], unk_token=specials["unk_token"], source=str(source),
                   special_tokens=specials)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def special_ids(self) -> dict[str, int | None]:
        """``{"cls_token": id, "sep_token": id, "pad_token": id, "mask_token": id, "unk_token": id}`` (None for a
        token the vocabulary lacks, e.g. ``[MASK]`` in a word-level vocabulary)."""
        return {name: self._tok.token_to_id(token) for name, token in self.special_tokens.items()}

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids without special tokens, untruncated (raw text for packing into sequences)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------------ encoding

    def _check_args(self, max_length, padding, truncation, pair: bool) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an int, got {max_length!r}")
        need = self._tok.num_special_tokens_to_add(pair) + 1
        if max_length < need:
            raise ValueError(f"max_length={max_length} leaves no room for text: {'pairs' if pair else 'sentences'} "
                             f"need at least {need}")
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation {truncation!r} is not allowed; allowed: {', '.join(TRUNCATION)}")
        if not (padding in PADDING or (isinstance(padding, int) and not isinstance(padding, bool) and padding > 0)):
            raise ValueError(f"padding {padding!r} is not allowed; allowed: {', '.join(PADDING)} or a positive int")

    def _run(self, inputs: list, max_length: int, truncation: str, is_pretokenized: bool):
        """Encodes with truncation at ``max_length``; raises for truncated rows if ``truncation='error'``."""
        self._tok.enable_truncation(max_length, strategy="longest_first")
        try:
            encs = self._tok.encode_batch(inputs, is_pretokenized=is_pretokenized)
        finally:
            self._tok.no_truncation()
        cut = [i for i, e in enumerate(encs) if e.overflowing]
        if cut and truncation == "error":
            raise ValueError(f"{len(cut)} of {len(encs)} inputs exceed max_length={max_length} tokens (rows "
                             f"{cut[:10]}{' ...' if len(cut) > 10 else ''}); raise max_length or pass "
                             "truncation='longest_first'")
        if cut:
            log.warning("truncated %d of %d inputs to max_length=%d", len(cut), len(encs), max_length)
        return encs, len(cut)

    def _pad(self, encs, max_length: int, padding) -> dict[str, np.ndarray]:
        longest = max(len(e.ids) for e in encs)
        length = max_length if padding == "max_length" else longest if padding == "longest" else padding
        if longest > length:
            row = next(i for i, e in enumerate(encs) if len(e.ids) == longest)
            raise ValueError(f"row {row} has {longest} tokens, more than the padding length {length}")
        batch = {"input_ids": np.full((len(encs), length), self.pad_id, np.int32),
                 "attention_mask": np.zeros((len(encs), length), np.int32),
                 "token_type_ids": np.zeros((len(encs), length), np.int32)}
        for i, e in enumerate(encs):
            n = len(e.ids)
            batch["input_ids"][i, :n] = e.ids
            batch["attention_mask"][i, :n] = 1
            batch["token_type_ids"][i, :n] = e.type_ids
        return batch

    def encode(self, texts: Sequence[str], texts_b: Sequence[str] | None = None, *, max_length: int,
               padding: str | int = "max_length", truncation: str = "error", return_num_truncated: bool = False):
        """Tokenizes sentences (or sentence pairs) into a padded batch.

        Args:
          texts: B strings (first segments).
          texts_b: optional B strings (second segments of pairs).
          max_length: the most tokens per row, special tokens included.
          padding: "max_length" (every row max_length long: one static shape), "longest" (the batch's longest
            row), or an int L (rows padded to L; a longer row is an error).
          truncation: "error" (raise if a row exceeds max_length) or "longest_first".
          return_num_truncated: also return how many rows were truncated.

        Returns:
          ``{"input_ids", "attention_mask", "token_type_ids"}``, each np.int32 [B, L]; mask 1 on tokens and 0 on
          padding, token types 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``. With ``return_num_truncated``:
          ``(batch, num_truncated)``.
        """
        texts = _check_texts(texts, "texts")
        pair = texts_b is not None
        if pair:
            texts_b = _check_texts(texts_b, "texts_b")
            if len(texts_b) != len(texts):
                raise ValueError(f"texts has {len(texts)} entries but texts_b has {len(texts_b)}")
        self._check_args(max_length, padding, truncation, pair)
        encs, n_cut = self._run(list(zip(texts, texts_b)) if pair else texts, max_length, truncation, False)
        batch = self._pad(encs, max_length, padding)
        return (batch, n_cut) if return_num_truncated else batch

    def encode_words(self, words: Sequence[Sequence[str]], labels: Sequence[Sequence[int]] | None = None, *,
                     max_length: int, padding: str | int = "max_length", truncation: str = "error",
                     return_num_truncated: bool = False):
        """Tokenizes pre-split words (NER) with word-aligned labels.

        A word the tokenizer maps to no sub-token at all (e.g. only control or zero-width characters) is
        encoded as the unknown token, so that every word keeps a position and its label (a warning counts them).

        Args:
          words: B lists of words.
          labels: optional B lists of int labels, one per word.
          max_length, padding, truncation, return_num_truncated: as in :meth:`encode`.

        Returns:
          The :meth:`encode` arrays plus ``word_ids`` (np.int32 [B, L]: the word each token belongs to, -1 for
          special tokens and padding) and, with ``labels``, ``labels`` (np.int32 [B, L]: the word's label on its
          first sub-token, :data:`IGNORE_LABEL` (-100) elsewhere).
        """
        if isinstance(words, (str, bytes)) or not isinstance(words, Sequence) or not words:
            raise TypeError("words must be a non-empty sequence of word lists")
        words = [list(_check_texts(w, f"words[{i}]", allow_empty=True)) for i, w in enumerate(words)]
        if labels is not None:
            if len(labels) != len(words):
                raise ValueError(f"labels has {len(labels)} rows but words has {len(words)}")
            for i, (w, l) in enumerate(zip(words, labels)):
                if len(l) != len(w):
                    raise ValueError(f"row {i}: {len(w)} words but {len(l)} labels")
        self._check_args(max_length, padding, truncation, False)
        encs, n_cut = self._run(words, max_length, truncation, True)
        n_unk = 0
        for i, e in enumerate(encs):  # words without any sub-token become the unknown token
            seen = {w for w in e.word_ids if w is not None}
            limit = (max(seen, default=-1) + 1) if e.overflowing else len(words[i])  # words cut off stay cut off
            empty = [j for j in range(limit) if j not in seen]
            if empty:
                n_unk += len(empty)
                words[i] = [self.unk_token if j in empty else w for j, w in enumerate(words[i])]
                (encs[i],), _ = self._run([words[i]], max_length, truncation, True)
        if n_unk:
            log.warning("%d words produced no sub-token and were encoded as %s", n_unk, self.unk_token)
        batch = self._pad(encs, max_length, padding)
        length = batch["input_ids"].shape[1]
        batch["word_ids"] = np.full((len(encs), length), -1, np.int32)
        if labels is not None:
            batch["labels"] = np.full((len(encs), length), IGNORE_LABEL, np.int32)
        for i, e in enumerate(encs):
            prev = None
            for t, w in enumerate(e.word_ids):
                if w is None:
                    prev = None
                    continue
                batch["word_ids"][i, t] = w
                if labels is not None and w != prev:
                    batch["labels"][i, t] = int(labels[i][w])
                prev = w
        return (batch, n_cut) if return_num_truncated else batch


def _check_texts(texts, name: str, allow_empty: bool = False) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a sequence of strings, got {type(texts).__name__}")
    if not texts and not allow_empty:
        raise ValueError(f"{name} is empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a str")
    return list(texts)
