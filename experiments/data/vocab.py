"""Word and character vocabularies for the LSTM and CNN-LSTM students.

Both reserve index 0 for padding and 1 for unknown units, are built deterministically from counts (most
frequent first, ties broken alphabetically) and round-trip through a small JSON file, so a student's model
directory carries the exact vocabulary it was trained with.

Words of raw text come from :func:`split_words` (lower-cased by default); pre-split token lists (NER) are
used as given.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import ClassVar

import numpy as np

from models import storage

PAD_ID = 0
UNK_ID = 1

_WORD_RE = re.compile(r"\w+(?:'\w+)*|'\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Splits raw text into words: runs of letters/digits (keeping inner apostrophes, ``doesn't``), a
    leading-apostrophe clitic (``'s`` as in tokenized SST-2), or single punctuation marks."""
    return _WORD_RE.findall(text)


@dataclasses.dataclass(frozen=True)
class _Vocab:
    """Shared implementation: ``units[i]`` is the unit of index i; units[0] is padding, units[1] unknown."""

    units: tuple[str, ...]
    lower: bool = False

    kind: ClassVar[str] = ""
    specials: ClassVar[tuple[str, str]] = ("<pad>", "<unk>")

    def __post_init__(self):
        if tuple(self.units[:2]) != self.specials:
            raise ValueError(f"{type(self).__name__}: units must start with {self.specials}, "
                             f"got {tuple(self.units[:2])}")
        if len(set(self.units)) != len(self.units):
            raise ValueError(f"{type(self).__name__}: duplicate units in vocabulary")
        object.__setattr__(self, "_index", {u: i for i, u in enumerate(self.units)})

    def __len__(self) -> int:
        return len(self.units)

    def id(self, unit: str) -> int:
        """Index of one unit (``UNK_ID`` when absent)."""
        return self._index.get(unit.lower() if self.lower else unit, UNK_ID)

    @classmethod
    def _from_counts(cls, counts: collections.Counter, min_count: int, max_size: int | None, lower: bool):
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < 3:
            raise ValueError(f"max_size must be >= 3 (pad, unk and one unit), got {max_size}")
        counts = {u: c for u, c in counts.items() if u not in cls.specials}
        ranked = sorted((u for u, c in counts.items() if c >= min_count), key=lambda u: (-counts[u], u))
        if max_size is not None:
            ranked = ranked[:max_size - 2]
        if not ranked:
            raise ValueError(f"{cls.__name__}.build: no unit occurs >= {min_count} times (empty input?)")
        return cls(units=cls.specials + tuple(ranked), lower=lower)

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``{"kind", "lower", "units"}`` as JSON (atomically; ``path`` may be a gs:// URL)."""
        storage.write_text(path, json.dumps({"kind": self.kind, "lower": self.lower, "units": list(self.units)},
                                            ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Reads a file written by :meth:`save`; the kind must match the class."""
        data = json.loads(storage.read_text(path))
        if not isinstance(data, dict) or data.get("kind") != cls.kind:
            raise ValueError(f"{path}: not a {cls.kind} vocabulary file (kind={data.get('kind')!r})"
                             if isinstance(data, dict) else f"{path}: not a vocabulary file")
        return cls(units=tuple(data["units"]), lower=bool(data["lower"]))


@dataclasses.dataclass(frozen=True)
class WordVocab(_Vocab):
    """Word vocabulary (index 0 ``<pad>``, 1 ``<unk>``); ``lower`` lower-cases words before lookup."""

    kind: ClassVar[str] = "word"

    @classmethod
    def build(cls, texts: Iterable[str | Sequence[str]], min_count: int = 1, max_size: int | None = None,
              *, lower: bool = True) -> WordVocab:
        """Builds from raw strings (split with :func:`split_words`) or pre-split token lists.

        Keeps words seen at least ``min_count`` times; ``max_size`` caps the total size, specials included.
        """
        counts = collections.Counter()
        for text in texts:
            words = split_words(text) if isinstance(text, str) else text
            counts.update(w.lower() if lower else w for w in words)
        return cls._from_counts(counts, min_count, max_size, lower)

    def encode(self, words: Sequence[str]) -> np.ndarray:
        """Word ids, int32 [len(words)]."""
        return np.fromiter((self.id(w) for w in words), dtype=np.int32, count=len(words))


@dataclasses.dataclass(frozen=True)
class CharVocab(_Vocab):
    """Character vocabulary (index 0 ``<pad>``, 1 ``<unk>``); case is kept by default (a NER feature)."""

    kind: ClassVar[str] = "char"

    @classmethod
    def build(cls, texts: Iterable[str | Sequence[str]], min_count: int = 1, max_size: int | None = None,
              *, lower: bool = False) -> CharVocab:
        """Builds from strings or token lists (the characters of every token; spaces between tokens are
        not units)."""
        counts = collections.Counter()
        for text in texts:
            for word in (text.split() if isinstance(text, str) else text):
                counts.update(word.lower() if lower else word)
        return cls._from_counts(counts, min_count, max_size, lower)

    def encode_words(self, words: Sequence[str], max_chars: int) -> tuple[np.ndarray, int]:
        """Char ids int32 [len(words), max_chars], 0-padded; longer words keep their first ``max_chars``.

        Returns the ids and how many words were cut.
        """
        out = np.zeros((len(words), max_chars), np.int32)
        cut = 0
        for i, word in enumerate(words):
            cut += len(word) > max_chars
            out[i, :min(len(word), max_chars)] = [self.id(c) for c in word[:max_chars]]
        return out, cut
