"""Encoding raw examples into the ragged features a :class:`batching.Split` batches.

Batch keys produced (after padding to the group's bucket length; B rows):

Sequence tasks
  * with a tokenizer: ``input_ids``, ``token_type_ids``, ``attention_mask`` int32 [B, S] --
    ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` (type ids 0 for a, 1 for b);
  * with a word vocabulary: ``word_ids``, ``word_mask`` int32 [B, W] (and ``word_ids_b``, ``word_mask_b``
    int32 [B, W_b] for pairs);
  * ``labels`` int32 [B].

Token tasks (NER)
  * always: ``word_labels`` int32 [B, W] (tag per word, -100 past the sentence) and ``word_mask``;
  * with a tokenizer: ``input_ids``, ``token_type_ids``, ``attention_mask`` int32 [B, S]; ``labels``
    int32 [B, S] holding each word's tag at its *first* sub-token and -100 elsewhere ([CLS], [SEP],
    continuation sub-tokens, padding); ``word_start_index`` int32 [B, W], the position in ``input_ids`` of
    each word's first sub-token (0 past the sentence). So word-level predictions are
    ``take_along_axis(subword_logits, word_start_index[..., None], axis=1)``, scored against
    ``word_labels`` under ``word_mask`` for entity-level span F1. A word the tokenizer maps to no
    sub-token at all gets one ``[UNK]`` so that every word keeps a prediction;
  * without a tokenizer: ``labels`` equals ``word_labels``;
  * with a word vocabulary: ``word_ids`` int32 [B, W] and ``char_ids`` int32 [B, W, C] (C =
    ``max_word_chars``, longer words keep their first C characters).

Truncation is explicit: examples longer than ``max_length`` (sub-tokens with specials, or words) are cut --
pairs longest-first, NER sentences at a word boundary, with word-level arrays cut to the same words --
counted in ``Features.truncated`` and reported with a warning; with ``truncation=False`` they raise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from experiments.data.batching import IGNORE, Features, Ragged
from experiments.data.subwords import SubwordTokenizer
from experiments.data.vocab import CharVocab, WordVocab, split_words

log = logging.getLogger(__name__)


def _report(name: str, truncated: dict[str, int], total: int, max_length: int, truncation: bool,
            first_long: dict[str, int]) -> None:
    """Warns about (or, without ``truncation``, rejects) examples cut to ``max_length``."""
    units = {"subword": "sub-tokens (special tokens included)", "word": "words", "word_b": "words (second text)",
             "sentence": "(sentences cut at a word boundary to fit in sub-tokens and in words)"}
    for what, count in truncated.items():
        if not count or what not in units:
            continue
        if not truncation:
            raise ValueError(f"{name}: example {first_long[what]} (0-based) and {count - 1} more exceed "
                             f"max_length={max_length} {units[what]}; raise max_length or allow truncation")
        log.warning("%s: truncated %d of %d examples to max_length=%d %s", name, count, total, max_length,
                    units[what])


def pair_budget(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Longest-first truncation of a pair to ``budget`` tokens: the longer side is cut first, down to
    equal lengths, then both alternately (the first text keeps the odd token)."""
    if len_a + len_b <= budget:
        return len_a, len_b
    half = budget // 2
    if len_a <= half:
        return len_a, budget - len_a
    if len_b <= half:
        return budget - len_b, len_b
    return budget - half, half


def encode_sequences(name: str, texts: Sequence[str], texts_b: Sequence[str] | None, labels: np.ndarray, *,
                     tokenizer: SubwordTokenizer | None, word_vocab: WordVocab | None, max_length: int,
                     truncation: bool = True) -> Features:
    """Features of a sequence (single-text or pair) task; see the module docstring for the keys."""
    n = len(texts)
    lengths, ragged, truncated, first_long = {}, {}, {}, {}
    if tokenizer is not None:
        specials = 3 if texts_b is not None else 2
        if max_length < specials + 2:
            raise ValueError(f"max_length={max_length} leaves no room for text beside {specials} special tokens")
        pieces_a = tokenizer.pieces(texts)
        pieces_b = tokenizer.pieces(texts_b) if texts_b is not None else None
        ids, types, cut = [], [], []
        for i in range(n):
            a = pieces_a[i]
            b = pieces_b[i] if pieces_b is not None else []
            ka, kb = pair_budget(len(a), len(b), max_length - specials) if pieces_b is not None else \
                (min(len(a), max_length - specials), 0)
            if (ka, kb) != (len(a), len(b)):
                cut.append(i)
            row = [tokenizer.cls_id, *a[:ka], tokenizer.sep_id]
            row_types = [0] * len(row)
            if pieces_b is not None:
                row += [*b[:kb], tokenizer.sep_id]
                row_types += [1] * (kb + 1)
            ids.append(np.array(row, np.int32))
            types.append(np.array(row_types, np.int32))
        lengths["subword"] = np.array([len(r) for r in ids], np.int64)
        ragged["input_ids"] = Ragged("subword", ids, tokenizer.pad_id)
        ragged["token_type_ids"] = Ragged("subword", types, 0)
        truncated["subword"] = len(cut)
        first_long["subword"] = cut[0] if cut else -1
    if word_vocab is not None:
        for group, key, column in (("word", "word_ids", texts), ("word_b", "word_ids_b", texts_b)):
            if column is None:
                continue
            words = [split_words(t) for t in column]
            cut = [i for i, w in enumerate(words) if len(w) > max_length]
            rows = [word_vocab.encode(w[:max_length]) for w in words]
            lengths[group] = np.array([len(r) for r in rows], np.int64)
            ragged[key] = Ragged(group, rows, 0)
            truncated[group] = len(cut)
            first_long[group] = cut[0] if cut else -1
    _report(name, truncated, n, max_length, truncation, first_long)
    return Features(lengths, ragged, {"labels": np.asarray(labels, np.int32)}, truncated)


def encode_tagged(name: str, tokens: Sequence[Sequence[str]], tags: Sequence[np.ndarray], *,
                  tokenizer: SubwordTokenizer | None, word_vocab: WordVocab | None,
                  char_vocab: CharVocab | None, max_length: int, max_word_chars: int = 16,
                  truncation: bool = True) -> Features:
    """Features of a token (NER) task; see the module docstring for the keys."""
    n = len(tokens)
    keep = np.array([min(len(t), max_length) for t in tokens], np.int64)
    lengths, ragged, first_long = {}, {}, {}
    if tokenizer is not None:
        if max_length < 3:
            raise ValueError(f"max_length={max_length} leaves no room for words beside [CLS] and [SEP]")
        flat = tokenizer.pieces([w for sent in tokens for w in sent])
        ids, sub_labels, starts = [], [], []
        offset = 0
        for i, (words, word_tags) in enumerate(zip(tokens, tags)):
            per_word = [p or [tokenizer.unk_id] for p in flat[offset:offset + len(words)]]
            offset += len(words)
            row, row_labels, row_starts = [tokenizer.cls_id], [IGNORE], []
            for w, pieces in enumerate(per_word[:keep[i]]):
                if len(row) + len(pieces) + 1 > max_length:
                    keep[i] = w
                    break
                row_starts.append(len(row))
                row += pieces
                row_labels += [int(word_tags[w])] + [IGNORE] * (len(pieces) - 1)
            row.append(tokenizer.sep_id)
            row_labels.append(IGNORE)
            ids.append(np.array(row, np.int32))
            sub_labels.append(np.array(row_labels, np.int32))
            starts.append(np.array(row_starts, np.int32))
        lengths["subword"] = np.array([len(r) for r in ids], np.int64)
        ragged["input_ids"] = Ragged("subword", ids, tokenizer.pad_id)
        ragged["token_type_ids"] = Ragged("subword", [np.zeros_like(r) for r in ids], 0)
        ragged["labels"] = Ragged("subword", sub_labels, IGNORE, is_label=True)
        ragged["word_start_index"] = Ragged("word", starts, 0)
    cut = [i for i in range(n) if keep[i] < len(tokens[i])]
    first_long["sentence"] = cut[0] if cut else -1
    truncated = {"sentence": len(cut)}
    lengths["word"] = keep
    word_labels = [np.asarray(t[:k], np.int32) for t, k in zip(tags, keep)]
    ragged["word_labels"] = Ragged("word", word_labels, IGNORE, is_label=True)
    if tokenizer is None:
        ragged["labels"] = ragged["word_labels"]
    if word_vocab is not None:
        if char_vocab is None:
            raise ValueError("token tasks with word features need a char vocabulary too")
        ragged["word_ids"] = Ragged("word", [word_vocab.encode(t[:k]) for t, k in zip(tokens, keep)], 0)
        chars, long_words = [], []
        for i, (t, k) in enumerate(zip(tokens, keep)):
            encoded, cut_words = char_vocab.encode_words(t[:k], max_word_chars)
            chars.append(encoded)
            if cut_words:
                long_words.append(i)
        ragged["char_ids"] = Ragged("word", chars, 0)
        truncated["chars"] = len(long_words)
        if long_words:
            log.warning("%s: %d of %d examples have words longer than max_word_chars=%d; their char_ids keep "
                        "the first %d characters", name, len(long_words), n, max_word_chars, max_word_chars)
    _report(name, truncated, n, max_length, truncation, first_long)
    return Features(lengths, ragged, {}, truncated)
