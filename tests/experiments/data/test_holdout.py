"""The selection split shares no text with the training rows, on a task built as SST-2 is (every phrase of every
sentence a row of its own), checked against a brute-force containment test written here."""

import numpy as np
import pytest

from experiments.data import holdout
from experiments.data.readers import RawSplit

WORDS = [f"w{i}" for i in range(40)]


def _contains(outer: str, inner: str) -> bool:
    """Whole-word containment, brute force: ``inner`` is a run of whole words of ``outer``."""
    return f" {inner} " in f" {outer} "


def _phrase_task(n_sentences: int = 60, seed: int = 0) -> tuple[RawSplit, list[str]]:
    """Sentences of 6-12 random words, each with its sub-phrases of up to 4 words as rows (SST-2's layout:
    a sentence's phrases are rows of their own), shuffled; returns the split and the sentences."""
    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(WORDS, int(rng.integers(6, 13)))) for _ in range(n_sentences)]
    rows = set(sentences)
    for s in sentences:
        words = s.split()
        rows |= {" ".join(words[a:a + k]) for k in range(1, 5) for a in range(len(words) - k + 1)}
    rows = sorted(rows)
    rng.shuffle(rows)
    labels = [str(int(rng.integers(2))) for _ in rows]
    return RawSplit("phrases.tsv", labels, list(range(2, len(rows) + 2)), texts=rows), sentences


def test_no_selection_row_shares_text_with_a_training_row():
    raw, sentences = _phrase_task()
    carved = holdout.carve(raw, 12)
    train, held = carved.train.texts, carved.selection.texts
    assert len(held) == 12 and set(held) <= set(sentences)  # whole sentences, not phrases
    for s in held:
        assert not any(_contains(s, t) or _contains(t, s) for t in train)
    # every row is trained on, held out, or left out because it lies inside a held-out sentence
    left = set(raw.texts) - set(train) - set(held)
    assert len(left) == carved.left_out and all(any(_contains(s, t) for s in held) for t in left)
    # nothing is left out that did not have to be
    assert all(not any(_contains(s, t) for s in held) for t in train)
    assert carved.candidates == sum(not any(_contains(o, t) for o in raw.texts if o != t) for t in raw.texts)


def test_a_random_carve_of_the_same_task_would_leak():
    """The test above can fail: a random carve-out of the same rows shares text with training rows."""
    raw, _ = _phrase_task()
    held = set(np.random.default_rng(0).choice(raw.texts, 12, replace=False))
    train = [t for t in raw.texts if t not in held]
    assert sum(any(_contains(t, s) or _contains(s, t) for t in train) for s in held) >= 6


def test_pairs_sharing_a_text_go_to_the_same_side():
    premises = [f"premise number {i} says {w}" for i, w in enumerate(WORDS[:30])]
    texts = premises + premises[:10]  # the first ten premises appear in two pairs each
    texts_b = [f"hypothesis {i}" for i in range(len(texts))]
    raw = RawSplit("pairs.tsv", ["0"] * len(texts), list(range(len(texts))), texts=texts, texts_b=texts_b)
    carved = holdout.carve(raw, 8)
    held = set(carved.selection.texts)
    assert not held & set(carved.train.texts)
    assert len(carved.selection) + carved.left_out + len(carved.train) == len(texts)
    # a held-out premise's other pair is left out, never trained on
    assert carved.left_out == sum(texts.count(p) - 1 for p in held)


def test_case_and_spacing_do_not_hide_a_copy():
    texts = [f"Sentence {i} is  here" for i in range(40)] + [f"sentence {i} IS here " for i in range(40)]
    raw = RawSplit("dup.tsv", ["0"] * 80, list(range(80)), texts=texts)
    carved = holdout.carve(raw, 4)
    norm = lambda xs: {holdout.normalise(x) for x in xs}
    assert not norm(carved.selection.texts) & norm(carved.train.texts) and carved.left_out == 4


def test_tagged_sentences_are_carved_by_their_words():
    tokens = [["Ann", "met", f"Bob{i}"] for i in range(30)] + [["met", "Bob3"]]
    raw = RawSplit("ner.conll", [["O"] * len(t) for t in tokens], list(range(31)), tokens=tokens)
    carved = holdout.carve(raw, 3)
    assert ["met", "Bob3"] not in carved.selection.tokens  # a phrase of another sentence is no candidate
    if ["Ann", "met", "Bob3"] in carved.selection.tokens:
        assert ["met", "Bob3"] not in carved.train.tokens and carved.left_out == 1


def test_sizes_that_do_not_fit_are_refused():
    raw, _ = _phrase_task(n_sentences=10)
    with pytest.raises(ValueError, match="does not fit a train split with 10 whole texts"):
        holdout.carve(raw, 6)
    assert len(holdout.carve(raw, "auto").selection) == 1  # a tenth of the 10 sentences
