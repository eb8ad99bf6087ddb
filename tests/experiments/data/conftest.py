"""Shared fixtures: a tiny word-piece tokenizer built from a vocabulary written here, and a file writer."""

import pytest
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "movie", "was", "good", "bad", "not", "john", "##son",
         "new", "york", "in", ".", "un", "##believ", "##able", "a", "b", "c", "d", "e", "f", "g", "h"]


@pytest.fixture
def wordpiece() -> tokenizers.Tokenizer:
    """Lower-casing BERT-style word-piece tokenizer: "Johnson" -> john ##son, "unbelievable" ->
    un ##believ ##able; ids are positions in VOCAB."""
    tok = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def ids(*words: str) -> list[int]:
    return [VOCAB.index(w) for w in words]


@pytest.fixture
def write(tmp_path):
    """write("name", text) -> path of a UTF-8 file under tmp_path (folders created)."""
    def _write(name: str, text: str, encoding: str = "utf-8") -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding=encoding, newline="")
        return str(path)
    return _write
