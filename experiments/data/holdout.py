"""A selection split carved out of train that shares no text with what is trained on.

Some training sets hold pieces of each other: SST-2's train rows are the phrases of the parse trees of its
training sentences (the median row has 7 words, the median sentence and dev example 19), and duplicated
sentences occur in most corpora. A random carve-out of such a train split is mostly pieces of sentences the
model trained on, and scores points above dev. So the carve works on *texts*, not rows:

1. every row's texts (both texts of a pair; the words of a tagged sentence) are normalised (lower case,
   single spaces);
2. text ``a`` *contains* text ``b`` when ``b``'s words occur in ``a`` as a contiguous run of whole words
   (whole words, not characters: "good" is not in "goodness", "row 1" is not in "row 17");
3. a row is a *candidate* when no other, different text of the split contains any of its texts: a whole
   sentence, not a phrase of one. Candidates are what the selection split holds and scores, so it is as hard
   as dev (on SST-2 their median length is dev's, 19 words);
4. a seeded choice of candidates (:data:`SELECTION_SEED`, the same for every run, seed and tool) is the
   selection split; every other row that shares text with it (is contained in one of its texts, or is the
   same text) is *left out*: neither trained on nor scored;
5. the carve checks its result before returning: no training row contains or is contained in a selection
   row. A carve that still overlaps is refused.

Containment is found by enumerating the contiguous word runs of every distinct text and looking them up
among the distinct texts: ``O(sum of words^2)``, about 2 s for SST-2's 67k rows.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from experiments.data.readers import RawSplit

log = logging.getLogger(__name__)

SELECTION_SEED = 20_251_203  # fixed: the same carve-out for every run, seed and tool
SELECTION_CAP = 2000  # "auto" selection size: min(SELECTION_CAP, a tenth of the candidate rows)
METHOD = "whole_texts"  # recorded with a model: the carve above (earlier models record none: a random carve)


@dataclasses.dataclass(frozen=True)
class Carve:
    """The result of :func:`carve`: the rows trained on, the rows chosen on, and what was left out.

    ``candidates`` rows were eligible to be held out (whole texts); ``left_out`` rows share text with the
    selection split and are in neither split.
    """

    train: RawSplit
    selection: RawSplit
    candidates: int
    left_out: int

    def summary(self) -> dict:
        """What a run records about its selection split (``results.json``, the saved model)."""
        return {"examples": len(self.selection), "candidates": self.candidates, "left_out": self.left_out,
                "method": METHOD}


def normalise(text: str) -> str:
    """Lower case, single spaces, no outer spaces."""
    return " ".join(text.lower().split())


def row_texts(raw: RawSplit) -> list[tuple[str, ...]]:
    """The normalised texts of every row: ``(text,)``, ``(text, text_b)`` for pairs, ``(words,)`` for tagged
    sentences (the words joined by spaces)."""
    if raw.tokens is not None:
        return [(normalise(" ".join(words)),) for words in raw.tokens]
    if raw.texts_b is not None:
        return [(normalise(a), normalise(b)) for a, b in zip(raw.texts, raw.texts_b)]
    return [(normalise(a),) for a in raw.texts]


def _word_runs(text: str):
    """Every contiguous run of whole words of ``text`` (itself included), as substrings."""
    starts, ends, position = [], [], 0
    for word in text.split(" "):
        starts.append(position)
        position += len(word)
        ends.append(position)
        position += 1
    for first in range(len(starts)):
        for last in range(first, len(starts)):
            yield text[starts[first]:ends[last]]


def containment(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(outer, inner)`` index arrays of every pair of distinct ``texts`` where ``texts[outer]`` contains
    ``texts[inner]`` (whole words; ``texts`` must be distinct and normalised)."""
    index = {text: i for i, text in enumerate(texts)}
    outer, inner = [], []
    for i, text in enumerate(texts):
        for run in _word_runs(text):
            j = index.get(run)
            if j is not None and j != i:
                outer.append(i)
                inner.append(j)
    return np.asarray(outer, np.int64), np.asarray(inner, np.int64)


def selection_size(n_candidates: int, requested: int | str) -> int:
    """Rows the selection split takes from ``n_candidates`` whole texts: ``requested`` (``"auto"``:
    ``min(2000, n_candidates // 10)``), leaving at least as many candidates to train on; a ValueError naming the
    sizes otherwise."""
    size = min(SELECTION_CAP, n_candidates // 10) if requested == "auto" else requested
    if not isinstance(size, int) or size < 1 or size > n_candidates // 2:
        raise ValueError(f"a selection split of {requested!r} examples does not fit a train split with "
                         f"{n_candidates} whole texts (rows no other row contains): give 1 to "
                         f"{n_candidates // 2} examples (or selection='dev')")
    return size


def carve(raw_train: RawSplit, requested: int | str) -> Carve:
    """Carves the selection split out of ``raw_train`` (see the module docstring); both splits keep file order.

    Args:
      raw_train: the train split as read.
      requested: selection rows, an int or ``"auto"`` (:func:`selection_size`).
    Raises:
      ValueError: the size does not fit, or (a bug) the carved splits still share text.
    """
    rows = row_texts(raw_train)
    distinct = list(dict.fromkeys(text for texts in rows for text in texts))
    text_id = {text: i for i, text in enumerate(distinct)}
    row_ids = [tuple(text_id[t] for t in texts) for texts in rows]
    outer, inner = containment(distinct)

    contained = np.zeros(len(distinct), bool)
    contained[inner] = True
    candidates = np.flatnonzero([not contained[list(ids)].any() for ids in row_ids])
    size = selection_size(len(candidates), requested)
    chosen = np.sort(np.random.default_rng(SELECTION_SEED).permutation(candidates)[:size])

    held_texts = np.zeros(len(distinct), bool)
    held_texts[[i for r in chosen for i in row_ids[r]]] = True
    selection_texts = held_texts.copy()
    held_texts[inner[selection_texts[outer]]] = True  # every text inside a held-out one
    is_chosen = np.zeros(len(rows), bool)
    is_chosen[chosen] = True
    shares = np.array([held_texts[list(ids)].any() for ids in row_ids])
    train_rows = np.flatnonzero(~shares)
    left_out = int((shares & ~is_chosen).sum())

    _check_no_shared_text(row_ids, train_rows, chosen, outer, inner, raw_train.source)
    result = Carve(raw_train.select(train_rows), raw_train.select(chosen), len(candidates), left_out)
    log.info("selection split of %s: %d whole texts held out (of %d candidates); %d rows sharing text with them "
             "left out of training; %d rows trained on; overlap check: no shared text",
             raw_train.source, size, len(candidates), left_out, len(train_rows))
    return result


def _check_no_shared_text(row_ids, train_rows, chosen, outer, inner, source: str) -> None:
    """Refuses a carve in which a training row and a selection row share a text, or one contains the other."""
    n = 1 + max((i for ids in row_ids for i in ids), default=0)
    in_train, in_selection = np.zeros(n, bool), np.zeros(n, bool)
    for r in train_rows:
        in_train[list(row_ids[r])] = True
    for r in chosen:
        in_selection[list(row_ids[r])] = True
    same = np.flatnonzero(in_train & in_selection)
    crossing = (in_train[outer] & in_selection[inner]) | (in_selection[outer] & in_train[inner])
    if len(same) or crossing.any():
        raise ValueError(f"{source}: the selection split shares text with the training rows "
                         f"({len(same)} identical texts, {int(crossing.sum())} containments); refusing to choose "
                         "on it")

