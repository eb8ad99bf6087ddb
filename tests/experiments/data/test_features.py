import logging

import numpy as np
import pytest

from experiments.data.batching import IGNORE, Split
from experiments.data.features import encode_sequences, encode_tagged, pair_budget
from experiments.data.subwords import HFTokenizer
from experiments.data.vocab import CharVocab, WordVocab
from tests.experiments.data.conftest import ids

CLS, SEP = ids("[CLS]", "[SEP]")


@pytest.mark.parametrize("len_a, len_b, budget, expected", [
    (2, 2, 8, (2, 2)),    # fits
    (3, 10, 8, (3, 5)),   # only the longer side is cut
    (6, 2, 5, (3, 2)),
    (10, 10, 8, (4, 4)),  # both cut to equal length
    (10, 10, 7, (4, 3)),  # odd budget: the first text keeps the extra token
])
def test_pair_budget_is_longest_first(len_a, len_b, budget, expected):
    assert pair_budget(len_a, len_b, budget) == expected


def test_single_sentence_subwords(wordpiece):
    feats = encode_sequences("t", ["The movie was good", "Johnson was unbelievable ."], None, np.array([1, 0]),
                             tokenizer=HFTokenizer(wordpiece), word_vocab=None, max_length=16)
    rows = feats.ragged["input_ids"].rows
    assert rows[0].tolist() == [CLS, *ids("the", "movie", "was", "good"), SEP]
    assert rows[1].tolist() == [CLS, *ids("john", "##son", "was", "un", "##believ", "##able", "."), SEP]
    assert feats.ragged["token_type_ids"].rows[1].tolist() == [0] * 9
    assert feats.lengths["subword"].tolist() == [6, 9] and feats.truncated == {"subword": 0}
    assert feats.scalars["labels"].tolist() == [1, 0]


def test_pair_subwords_type_ids_and_counted_truncation(wordpiece, caplog):
    with caplog.at_level(logging.WARNING):
        feats = encode_sequences("pairs/train", ["the movie", "unbelievable johnson was good"], ["good", "a b c d e"],
                                 np.array([0, 1]), tokenizer=HFTokenizer(wordpiece), word_vocab=None, max_length=9)
    first, second = feats.ragged["input_ids"].rows
    assert first.tolist() == [CLS, *ids("the", "movie"), SEP, *ids("good"), SEP]
    assert feats.ragged["token_type_ids"].rows[0].tolist() == [0, 0, 0, 0, 1, 1]
    # 6 + 5 pieces into a budget of 9 - 3 = 6: longest-first keeps 3 + 3.
    assert second.tolist() == [CLS, *ids("un", "##believ", "##able"), SEP, *ids("a", "b", "c"), SEP]
    assert feats.truncated == {"subword": 1}
    assert "pairs/train: truncated 1 of 2 examples to max_length=9" in caplog.text


def test_truncation_off_rejects_long_examples(wordpiece):
    with pytest.raises(ValueError, match=r"t: example 1 \(0-based\) and 0 more exceed max_length=5"):
        encode_sequences("t", ["good", "a b c d"], None, np.array([0, 1]), tokenizer=HFTokenizer(wordpiece),
                         word_vocab=None, max_length=5, truncation=False)


def test_word_features_for_pairs_with_word_truncation():
    vocab = WordVocab.build(["the movie was good"])
    feats = encode_sequences("t", ["The movie , good", "good"], ["was bad", "the the the"], np.array([0, 1]),
                             tokenizer=None, word_vocab=vocab, max_length=4)
    w = {u: vocab.id(u) for u in ("the", "movie", "was", "good")}
    assert feats.ragged["word_ids"].rows[0].tolist() == [w["the"], w["movie"], 1, w["good"]]
    assert feats.ragged["word_ids_b"].rows[0].tolist() == [w["was"], 1]
    assert feats.lengths["word_b"].tolist() == [2, 3]
    assert feats.truncated == {"word": 0, "word_b": 0}
    feats = encode_sequences("t", ["a b c d e"], None, np.array([0]), tokenizer=None, word_vocab=vocab, max_length=4)
    assert feats.truncated == {"word": 1} and feats.lengths["word"].tolist() == [4]


TOKENS = [["Johnson", "in", "New", "York"], ["unbelievable", "\u200b"]]
TAGS = [np.array([1, 0, 5, 6], np.int32), np.array([0, 0], np.int32)]


def test_ner_first_subtoken_alignment_and_unk_for_empty_words(wordpiece):
    feats = encode_tagged("ner", TOKENS, TAGS, tokenizer=HFTokenizer(wordpiece), word_vocab=None, char_vocab=None,
                          max_length=32)
    r = feats.ragged
    assert r["input_ids"].rows[0].tolist() == [CLS, *ids("john", "##son", "in", "new", "york"), SEP]
    assert r["labels"].rows[0].tolist() == [IGNORE, 1, IGNORE, 0, 5, 6, IGNORE]
    assert r["word_start_index"].rows[0].tolist() == [1, 3, 4, 5]
    # "\u200b" normalises to nothing: it gets one [UNK] so that it keeps a prediction.
    assert r["input_ids"].rows[1].tolist() == [CLS, *ids("un", "##believ", "##able", "[UNK]"), SEP]
    assert r["labels"].rows[1].tolist() == [IGNORE, 0, IGNORE, IGNORE, 0, IGNORE]
    assert r["word_start_index"].rows[1].tolist() == [1, 4]
    assert r["word_labels"].rows[0].tolist() == [1, 0, 5, 6]
    for row, starts, labels in zip(r["labels"].rows, r["word_start_index"].rows, r["word_labels"].rows):
        np.testing.assert_array_equal(row[starts], labels)  # the documented word-level gather


def test_ner_truncation_cuts_at_a_word_boundary_and_keeps_word_arrays_consistent(wordpiece, caplog):
    vocab = WordVocab.build(TOKENS)
    chars = CharVocab.build(TOKENS)
    with caplog.at_level(logging.WARNING):
        feats = encode_tagged("ner/dev", TOKENS, TAGS, tokenizer=HFTokenizer(wordpiece), word_vocab=vocab,
                              char_vocab=chars, max_length=6, max_word_chars=4)
    r = feats.ragged
    # [CLS] john ##son in new = 5, "york" would need 5 + 1 + [SEP] = 7 > 6.
    assert r["input_ids"].rows[0].tolist() == [CLS, *ids("john", "##son", "in", "new"), SEP]
    assert r["word_labels"].rows[0].tolist() == [1, 0, 5]
    assert r["word_ids"].rows[0].tolist() == vocab.encode(["Johnson", "in", "New"]).tolist()
    assert r["char_ids"].rows[0].shape == (3, 4)
    assert feats.lengths["word"].tolist() == [3, 2]
    assert feats.truncated == {"sentence": 1, "chars": 2}  # Johnson and unbelievable exceed 4 chars
    assert "ner/dev: truncated 1 of 2 examples to max_length=6" in caplog.text
    assert "longer than max_word_chars=4" in caplog.text


def test_ner_batch_without_tokenizer_uses_word_labels_and_pads(wordpiece):
    vocab = WordVocab.build(TOKENS)
    chars = CharVocab.build(TOKENS)
    feats = encode_tagged("ner", TOKENS, TAGS, tokenizer=None, word_vocab=vocab, char_vocab=chars, max_length=8)
    split = Split("ner", labels=TAGS, features=feats, buckets=(4, 8), tokens=TOKENS)
    batch = next(split.batches(3))
    assert set(batch) == {"labels", "word_labels", "word_ids", "word_mask", "char_ids", "example_weight"}
    np.testing.assert_array_equal(batch["labels"], [[1, 0, 5, 6], [0, 0, IGNORE, IGNORE], [IGNORE] * 4])
    np.testing.assert_array_equal(batch["word_mask"], [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["example_weight"], [1, 1, 0])
    assert batch["char_ids"].shape == (3, 4, 16)
    assert batch["char_ids"][0, 0, :8].tolist() == [chars.id(c) for c in "Johnson"] + [0]
