"""The raw-text corpus pipeline: reading, held-out lines, packing, the fingerprinted shard set, and the epoch order
that makes a run's data position two integers."""

import os
import uuid

import numpy as np
import pytest
import tokenizers
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

from experiments.data import corpus
from models.tokenization import Tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(50)]
PAD, CLS, SEP = 0, 2, 3


def word_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIALS)
    return Tokenizer(backend)


def write_corpus(path, lines=300, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    text = [" ".join(f"w{j}" for j in rng.integers(0, 50, rng.integers(1, 30))) for _ in range(lines)]
    text[10] = text[20] = text[30]  # repeated lines go to the same side
    with open(path, "w") as f:
        f.write("\n".join(text[:100]) + "\n\n   \n" + "\n".join(text[100:]) + "\n")  # blank lines are skipped
    return text


def test_packing_joins_lines_while_they_fit_and_cuts_long_ones():
    p = corpus.Packer(8, CLS, SEP, pack=True)
    out = p.add([5, 6]) + p.add([7, 8, 9]) + p.add([10, 11]) + p.add(list(range(20, 33))) + p.flush()
    assert [s.tolist() for s in out] == [
        [CLS, 5, 6, SEP, 7, 8, 9, SEP],           # two lines fill a sequence exactly
        [CLS, 10, 11, SEP],                       # the next piece (6 tokens) does not fit beside them
        [CLS, 20, 21, 22, 23, 24, 25, SEP],       # a long line is cut into pieces of max_length - 2
        [CLS, 26, 27, 28, 29, 30, 31, SEP, ],
        [CLS, 32, SEP]]
    p = corpus.Packer(8, CLS, SEP, pack=False)
    out = p.add([5, 6]) + p.add([7, 8, 9]) + p.add(list(range(20, 27))) + p.flush()
    assert [s.tolist() for s in out] == [[CLS, 5, 6, SEP], [CLS, 7, 8, 9, SEP], [CLS, 20, 21, 22, 23, 24, 25, SEP],
                                         [CLS, 26, SEP]]
    assert p.add([]) == []


def test_heldout_lines_by_hash_fraction_and_duplicates():
    lines = [f"line {i}" for i in range(20000)]
    held = [corpus.is_heldout(x, 0.05) for x in lines]
    assert np.mean(held) == pytest.approx(0.05, abs=0.005)
    assert held == [corpus.is_heldout(x, 0.05) for x in lines]  # deterministic
    assert not any(corpus.is_heldout(x, 0.0) for x in lines[:100])


def _tokens_of(split, with_specials=False):
    ids, lengths = split.rows(np.arange(len(split)))
    return [ids[i, :lengths[i]].tolist() for i in range(len(split))]


def test_shard_set_holds_every_line_once_split_and_packed(tmp_path):
    text = write_corpus(tmp_path / "c.txt")
    tok = word_tokenizer()
    shards = corpus.prepare(str(tmp_path / "c.txt"), str(tmp_path / "cache"), tok, inputs={"corpus": "a"},
                            max_length=24, heldout_fraction=0.1, shard_sequences=16)
    for name in corpus.SPLITS:
        split = shards.split(name)
        sequences = _tokens_of(split)
        assert all(s[0] == CLS and s[-1] == SEP and len(s) <= 24 for s in sequences)
        assert len(shards.index["splits"][name]["shards"]) == -(-len(split) // 16)  # shards of 16 sequences
        # the packed stream without its specials is the split's lines, in order
        stream = [t for s in sequences for t in s if t not in (CLS, SEP)]
        lines = [x for x in text if corpus.is_heldout(x, 0.1) == (name == "heldout")]
        assert stream == [t for x in lines for t in tok.token_ids([x])[0]]
    assert corpus.is_heldout(text[30], 0.1) == corpus.is_heldout(text[10], 0.1)
    train_tokens = [t for s in _tokens_of(shards.split("train")) for t in s]
    assert np.array_equal(shards.token_counts(), np.bincount(train_tokens, minlength=tok.vocab_size))
    ids, _ = shards.split("train").rows(np.array([0]))
    assert ids.dtype == np.int32 and np.all(ids[0, len(_tokens_of(shards.split("train"))[0]):] == PAD)


def test_prepare_reuses_the_same_fingerprint_and_rebuilds_another(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c.txt")
    tok = word_tokenizer()
    kwargs = dict(max_length=24, heldout_fraction=0.1, shard_sequences=16)
    first = corpus.prepare(str(tmp_path / "c.txt"), str(tmp_path / "cache"), tok, inputs={"corpus": "a"}, **kwargs)
    monkeypatch.setattr(corpus, "build", lambda *a, **k: pytest.fail("rebuilt an existing shard set"))
    again = corpus.prepare(str(tmp_path / "c.txt"), str(tmp_path / "cache"), tok, inputs={"corpus": "a"}, **kwargs)
    assert again.path == first.path
    monkeypatch.undo()
    other = corpus.prepare(str(tmp_path / "c.txt"), str(tmp_path / "cache"), tok, inputs={"corpus": "b"}, **kwargs)
    unpacked = corpus.prepare(str(tmp_path / "c.txt"), str(tmp_path / "cache"), tok, inputs={"corpus": "a"},
                              **{**kwargs, "max_length": 32})
    assert len({first.path, other.path, unpacked.path}) == 3


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes_anywhere(tmp_path):
    write_corpus(tmp_path / "c.txt", lines=600)
    shards = corpus.prepare(str(tmp_path / "c.txt"), str(tmp_path / "cache"), word_tokenizer(), inputs={},
                            max_length=16, heldout_fraction=0.0, shard_sequences=50)
    split = shards.split("train")
    n = len(split)
    assert len(shards.index["splits"]["train"]["shards"]) > 3
    full = split.epoch_positions(0, 0, 0, n)
    assert sorted(full.tolist()) == list(range(n))  # a permutation of every sequence
    assert not np.array_equal(full, np.arange(n))
    assert not np.array_equal(full, split.epoch_positions(0, 1, 0, n))  # epochs differ
    assert not np.array_equal(full, split.epoch_positions(1, 0, 0, n))  # seeds differ
    # a reader opened afresh (a resumed run) gives batch b of epoch e without reading batches 0 .. b - 1
    fresh = corpus.ShardSet(shards.path).split("train")
    for start in (0, 7, 49, 50, 51, n - 13):
        assert np.array_equal(fresh.epoch_positions(0, 0, start, 13), full[start:start + 13])
    ids, lengths = split.rows(full[:5])
    again_ids, again_lengths = fresh.rows(full[:5])
    assert np.array_equal(ids, again_ids) and np.array_equal(lengths, again_lengths)
    with pytest.raises(IndexError):
        split.epoch_positions(0, 0, n - 1, 2)


def test_sources_folder_order_hidden_files_and_errors(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("second\n")
    (tmp_path / "docs" / "a.txt").write_text("  first  \n\n")
    (tmp_path / "docs" / "sub" / "c.txt").write_text("third\n")
    (tmp_path / "docs" / ".hidden").write_text("never\n")
    (tmp_path / "docs" / "_COMPLETE").write_text("")
    assert list(corpus.iter_lines(corpus.parse_source(str(tmp_path / "docs")))) == ["first", "second", "third"]
    source = corpus.parse_source("hf:wikitext:wikitext-2-raw-v1")
    assert (source.hf_name, source.hf_config, source.hf_split, source.hf_column) == (
        "wikitext", "wikitext-2-raw-v1", "train", "text")
    (tmp_path / "bad.txt").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match="bad.txt: line 2 is not UTF-8"):
        list(corpus.iter_lines(corpus.parse_source(str(tmp_path / "bad.txt"))))
    with pytest.raises(FileNotFoundError, match="neither a file"):
        corpus.parse_source(str(tmp_path / "missing"))


def test_corpus_and_shard_set_in_a_bucket_equal_the_local_ones(gcs_bucket, tmp_path):
    from models import storage

    text = write_corpus(tmp_path / "c.txt")
    remote = f"{gcs_bucket[0]}/{uuid.uuid4().hex[:8]}"
    storage.as_path(f"{remote}/text/c.txt").write_text("\n".join(text) + "\n")
    tok = word_tokenizer()
    kwargs = dict(inputs={}, max_length=24, heldout_fraction=0.1, shard_sequences=16)
    local = corpus.prepare(str(tmp_path / "c.txt"), str(tmp_path / "cache"), tok, **kwargs)
    in_bucket = corpus.prepare(f"{remote}/text", f"{remote}/cache", tok, **kwargs)
    assert in_bucket.path.startswith("gs://") and storage.is_complete(in_bucket.path)
    for name in corpus.SPLITS:
        a, b = local.split(name), in_bucket.split(name)
        assert len(a) == len(b) and _tokens_of(a) == _tokens_of(b)
    assert np.array_equal(local.split("train").epoch_positions(0, 2, 0, 20),
                          in_bucket.split("train").epoch_positions(0, 2, 0, 20))
    assert os.path.basename(local.path) == os.path.basename(in_bucket.path)  # the same fingerprint
