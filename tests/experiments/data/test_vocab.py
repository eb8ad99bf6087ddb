import json

import numpy as np
import pytest

from experiments.data.vocab import CharVocab, WordVocab, split_words


def test_split_words_keeps_clitics_and_splits_punctuation():
    assert split_words("it 's a charming , often affecting journey .") == \
        ["it", "'s", "a", "charming", ",", "often", "affecting", "journey", "."]
    assert split_words('He said "no," doesn\'t he?') == ["He", "said", '"', "no", ",", '"', "doesn't", "he", "?"]


def test_word_vocab_orders_by_count_then_alphabet_and_applies_min_count_and_max_size():
    texts = ["b a c", "A b", ["b", "d"]]  # counts: b 3, a 2, c 1, d 1 (lower-cased)
    vocab = WordVocab.build(texts)
    assert vocab.units == ("<pad>", "<unk>", "b", "a", "c", "d")
    assert WordVocab.build(texts, min_count=2).units == ("<pad>", "<unk>", "b", "a")
    assert WordVocab.build(texts, max_size=4).units == ("<pad>", "<unk>", "b", "a")
    np.testing.assert_array_equal(vocab.encode(["B", "zzz", "d"]), [2, 1, 5])
    assert vocab.encode(["a"]).dtype == np.int32


def test_word_vocab_case_sensitive_when_asked():
    vocab = WordVocab.build(["Paris paris"], lower=False)
    assert set(vocab.units[2:]) == {"Paris", "paris"}
    assert vocab.encode(["PARIS"])[0] == 1


def test_vocab_save_load_round_trip_and_kind_check(tmp_path):
    vocab = WordVocab.build(["x y y"])
    vocab.save(tmp_path / "w.json")
    assert WordVocab.load(tmp_path / "w.json") == vocab
    assert json.loads((tmp_path / "w.json").read_text())["units"] == ["<pad>", "<unk>", "y", "x"]
    chars = CharVocab.build([["ab", "b"]])
    chars.save(tmp_path / "c.json")
    assert CharVocab.load(tmp_path / "c.json") == chars
    with pytest.raises(ValueError, match="not a word vocabulary"):
        WordVocab.load(tmp_path / "c.json")


def test_char_vocab_encodes_words_with_fixed_width_and_counts_cut_words():
    chars = CharVocab.build([["Abc", "cb"]])  # counts: b 2, c 2, A 1 -> b, c, A
    assert chars.units == ("<pad>", "<unk>", "b", "c", "A")
    out, cut = chars.encode_words(["Ab", "cbbA", "z"], max_chars=3)
    np.testing.assert_array_equal(out, [[4, 2, 0], [3, 2, 2], [1, 0, 0]])
    assert cut == 1 and out.dtype == np.int32


def test_bad_vocab_arguments():
    with pytest.raises(ValueError, match="min_count"):
        WordVocab.build(["a"], min_count=0)
    with pytest.raises(ValueError, match="no unit"):
        WordVocab.build([])
    with pytest.raises(ValueError, match="must start with"):
        WordVocab(units=("a", "b"))
