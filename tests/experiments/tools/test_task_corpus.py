"""experiments.tools.task_corpus on generated folders laid out as ../shared/data (tests never read the real data)."""

import pytest
from absl import flags

from experiments.runtime import cli
from experiments.tools import task_corpus


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_every_training_sentence_once_in_first_seen_order(tmp_path):
    data = tmp_path / "data"
    _write(data / "sst2" / "train.tsv", "sentence\tlabel\na  good   film \t1\na bad film\t0\na good film\t1\n")
    _write(data / "sst2" / "dev.tsv", "sentence\tlabel\nnever in the corpus\t1\n")
    _write(data / "rte" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tIt rains.\ta bad film\tentailment\n")
    _write(data / "wnut17" / "train.conll", "New\tB-loc\nYork\tI-loc\n\nhi\tO\n")
    _write(data / "agnews" / "train.tsv", "Stocks fell.\tBusiness\n")
    out = tmp_path / "corpus" / "tasks.txt"
    counts = task_corpus.run(cli.parse(task_corpus.define_flags, [f"--data_dir={data}", f"--out={out}"]))
    assert out.read_text().splitlines() == ["a good film", "a bad film", "It rains.", "New York", "hi", "Stocks fell."]
    assert counts == {"sst2": (3, 2), "rte": (2, 1), "wnut17": (2, 2), "agnews": (1, 1)}


def test_flags_are_checked_first(tmp_path):
    with pytest.raises(flags.IllegalFlagValueError, match="data_dir"):
        cli.parse(task_corpus.define_flags, [f"--data_dir={tmp_path / 'missing'}", f"--out={tmp_path / 'x'}"])
    with pytest.raises(FileNotFoundError, match="holds none of the task folders"):
        task_corpus.build_corpus(str(tmp_path), str(tmp_path / "x.txt"))
