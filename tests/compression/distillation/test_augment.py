"""Tang et al. augmentation: determinism, dedupe, the statistics of each operation, the tag substitute."""

import collections

import numpy as np
import pytest

from compression.distillation import augment as A

SENTENCES = [
    "the movie was surprisingly wonderful and deeply moving",
    "i hated the boring acting in this film",
    "a quietly beautiful story about friendship and loss",
    "the plot is thin but the performances are great",
    "it never finds its rhythm and the jokes fall flat",
    "an utterly charming comedy with a big heart",
]


def test_deterministic_by_seed_and_per_sentence():
    a = A.augment(SENTENCES, 8, seed=3)
    assert a == A.augment(SENTENCES, 8, seed=3)
    assert a != A.augment(SENTENCES, 8, seed=4)
    # Sentence i's stream depends on (seed, i) only: augmenting a prefix gives a prefix of the samples.
    no_dedupe = A.augment(SENTENCES, 5, seed=3, dedupe=False)
    assert A.augment(SENTENCES[:2], 5, seed=3, dedupe=False, corpus=SENTENCES) == no_dedupe[:10]


def test_dedupe_against_originals_and_itself():
    out = A.augment(SENTENCES, 30, seed=0)
    assert len(out) == len(set(out))
    assert not set(out) & set(SENTENCES)
    raw = A.augment(SENTENCES, 30, seed=0, dedupe=False)
    assert len(raw) == 30 * len(SENTENCES) and len(out) < len(raw)
    assert len(set(raw) - set(SENTENCES)) == len(out)  # dedupe drops exactly the repeats and the originals


def test_masking_rate_matches_p_mask():
    words = [w for s in SENTENCES for w in s.split()]
    out = A.augment(SENTENCES, 400, seed=1, p_mask=0.3, p_pos=0.0, p_ng=0.0, dedupe=False)
    tokens = [t for s in out for t in s.split()]
    assert len(tokens) == 400 * len(words)  # no n-gram sampling: lengths kept
    rate = tokens.count("[MASK]") / len(tokens)
    sd = np.sqrt(0.3 * 0.7 / len(tokens))
    assert abs(rate - 0.3) < 5 * sd
    for s, o in zip(np.repeat(SENTENCES, 400), out):  # unmasked words are the originals in place
        assert all(x == y for x, y in zip(s.split(), o.split()) if y != "[MASK]")


def test_pos_replacement_keeps_the_tag_and_follows_unigram_counts():
    out = A.augment(SENTENCES, 300, seed=2, p_mask=0.0, p_pos=1.0, p_ng=0.0, dedupe=False)
    picks = collections.Counter()
    for src, o in zip(np.repeat(SENTENCES, 300), out):
        src_w, out_w = src.split(), o.split()
        assert len(src_w) == len(out_w)
        assert A.heuristic_tags(src_w) == A.heuristic_tags(out_w)
        picks.update(w for w, t in zip(out_w, A.heuristic_tags(src_w)) if t == "DET")
    # DET words in the corpus, counted by hand: the x5, a x2, an x1, this x1 -> drawn with p = count / 9.
    det_counts = {"the": 5, "a": 2, "an": 1, "this": 1}
    corpus_dets = [w for s in SENTENCES for w in s.split() if A.heuristic_tag(w) == "DET"]
    assert collections.Counter(corpus_dets) == det_counts
    total = sum(picks.values())
    assert set(picks) == set(det_counts)
    for word, count in det_counts.items():
        p = count / 9
        assert abs(picks[word] / total - p) < 5 * np.sqrt(p * (1 - p) / total), (word, picks)


def test_ngram_sampling_lengths_and_contiguity():
    sentence = "one two three four five six seven eight nine ten"
    out = A.augment([sentence], 2000, seed=5, p_mask=0.0, p_pos=0.0, p_ng=1.0, dedupe=False)
    lengths = collections.Counter(len(s.split()) for s in out)
    assert set(lengths) == {1, 2, 3, 4, 5}
    for n in range(1, 6):  # n uniform in 1..5
        assert abs(lengths[n] / 2000 - 0.2) < 5 * np.sqrt(0.2 * 0.8 / 2000)
    assert all(f" {s} " in f" {sentence} " for s in out)
    short = A.augment(["just two"], 50, seed=0, p_mask=0.0, p_pos=0.0, p_ng=1.0, dedupe=False)
    assert {len(s.split()) for s in short} == {1, 2}  # n is capped at the sentence length


def test_ngram_probability():
    out = A.augment(SENTENCES, 400, seed=6, p_mask=0.0, p_pos=0.0, p_ng=0.25, dedupe=False)
    unchanged = sum(o == s for s, o in zip(np.repeat(SENTENCES, 400), out)) / len(out)
    assert abs(unchanged - 0.75) < 5 * np.sqrt(0.75 * 0.25 / len(out))  # every sentence is longer than 5


def test_pairs_augment_both_sides():
    pairs = [(SENTENCES[0], SENTENCES[1]), (SENTENCES[2], SENTENCES[3])]
    out = A.augment_pairs(pairs, 20, seed=0)
    assert out == A.augment_pairs(pairs, 20, seed=0)
    assert len(out) == len(set(out)) and not set(out) & set(pairs)
    assert any(a != pairs[0][0] for a, _ in out[:10]) and any(b != pairs[0][1] for _, b in out[:10])


def test_heuristic_tags_substitute():
    words = ["The", "films", "were", "quietly", "devastating", ",", "2", "hours", "of", "sadness", "[MASK]"]
    tags = A.heuristic_tags(words)
    assert tags == ["DET", "S-FORM", "AUX", "ADV-LY", "VERB-ING", "PUNCT", "NUM", "S-FORM", "ADP", "NOUN",
                    "SPECIAL"]
    assert A.heuristic_tag("wonderful") == "ADJ" and A.heuristic_tag("movie") == "OPEN"
    assert A.heuristic_tag("red") == "OPEN"  # the stem must keep 3 letters for a suffix rule
    out = A.augment(["the [MASK] film"], 20, seed=0, p_mask=0.0, p_pos=1.0, p_ng=0.0, dedupe=False)
    assert all(s.split()[1] == "[MASK]" for s in out)


def test_custom_tagger_and_corpus():
    tagger = lambda toks: ["X" if t.startswith("x") else "Y" for t in toks]
    out = A.augment(["x1 y1"], 50, seed=0, p_mask=0.0, p_pos=1.0, p_ng=0.0, tagger=tagger,
                    corpus=["x2 x3 y2"], dedupe=False)
    assert {s.split()[0] for s in out} == {"x2", "x3"} and {s.split()[1] for s in out} == {"y2"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="p_mask must be in"):
        A.augment(SENTENCES, 2, 0, p_mask=1.5)
    with pytest.raises(ValueError, match="p_mask \\+ p_pos must be <= 1"):
        A.augment(SENTENCES, 2, 0, p_mask=0.6, p_pos=0.6)
    with pytest.raises(ValueError, match="n_per_sentence must be an int >= 0"):
        A.augment(SENTENCES, -1, 0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        A.augment(SENTENCES, 1, 1.5)
    with pytest.raises(TypeError, match="not one string"):
        A.augment("a sentence", 1, 0)
    with pytest.raises(ValueError, match="tagger returned 1 tags for 2 tokens"):
        A.augment(["a b"], 1, 0, tagger=lambda toks: ["X"])
    with pytest.raises(ValueError, match=r"pairs\[0\] must be a \(sentence_a, sentence_b\) pair"):
        A.augment_pairs(["one sentence"], 1, 0)
