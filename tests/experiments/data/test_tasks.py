import pytest

from experiments.data import tasks
from experiments.data.tasks import load_task
from experiments.data.vocab import WordVocab
from tests.experiments.data.conftest import ids

SST2 = "sentence\tlabel\nthe movie was good \t1\nbad\t0\nnot good\t0\n"
MRPC = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t1\t2\tJohn said "good.\tJohn said good.\n0\t3\t4\tthe movie\tnew york\n')
RTE = "index\tsentence1\tsentence2\tlabel\n0\ta b\tc\tnot_entailment\n1\td\te\tentailment\n"
WIKIANN = "en:John\tB-PER\nen:in\tO\nen:New\tB-LOC\nen:York\tI-LOC\n\nen:the\tO\nen:movie\tO\n\n"
WNUT = "john\tB-person\nwas\tO\n\ngood\tO\n\ufeff\nnew\tB-location\nyork\tI-location\n"


@pytest.fixture
def shared(write, tmp_path):
    """A data root laid out like the shared benchmark folder, with made-up content."""
    for name, text in [("sst2/train.tsv", SST2), ("sst2/dev.tsv", SST2), ("mrpc/train.tsv", MRPC),
                       ("mrpc/dev.tsv", MRPC), ("rte/train.tsv", RTE), ("rte/dev.tsv", RTE),
                       ("wikiann_en/train.txt", WIKIANN), ("wikiann_en/dev.txt", WIKIANN),
                       ("wnut17/train.conll", WNUT), ("wnut17/dev.conll", WNUT)]:
        write(name, text)
    return tmp_path


def test_sst2_from_task_folder_or_root(shared, wordpiece):
    for data_dir in (shared / "sst2", shared):
        task = load_task("sst2", data_dir, tokenizer=wordpiece)
        assert (task.kind, task.is_pair, task.label_names) == ("sequence", False, ["negative", "positive"])
        assert task.metric_names == ["accuracy", "f1", "mcc"] and task.num_labels == 2
        assert task.train.texts == ["the movie was good", "bad", "not good"]
        assert task.train.labels.tolist() == [1, 0, 0]
    batch = next(task.dev.batches(4))
    assert batch["input_ids"][0, :6].tolist() == ids("[CLS]", "the", "movie", "was", "good", "[SEP]")
    assert batch["input_ids"].shape == (4, 16)
    assert batch["labels"].tolist() == [1, 0, 0, 0] and batch["example_weight"].tolist() == [1, 1, 1, 0]


def test_mrpc_and_rte_pairs(shared, wordpiece):
    mrpc = load_task("mrpc", shared, tokenizer=wordpiece)
    assert mrpc.is_pair and mrpc.label_names == ["not_equivalent", "equivalent"]
    assert mrpc.train.texts == ['John said "good.', "the movie"] and mrpc.train.texts_b[1] == "new york"
    batch = next(mrpc.train.batches(2))
    assert batch["token_type_ids"][1, :8].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    rte = load_task("rte", shared)
    assert rte.label_names == ["entailment", "not_entailment"] and rte.train.labels.tolist() == [1, 0]


def test_agnews_holds_out_a_fixed_dev_split(write, tmp_path):
    names = ["World", "Sports", "Business", "Sci/Tech"]
    write("agnews/train.tsv", "".join(f"story {i}\t{names[i % 4]}\n" for i in range(1010)))
    task = load_task("agnews", tmp_path, seed=1)
    assert (len(task.train), len(task.dev)) == (10, tasks.AGNEWS_DEV_SIZE)
    assert task.metric_names == ["accuracy"] and task.label_names == names
    assert sorted(task.train.texts + task.dev.texts) == sorted(f"story {i}" for i in range(1010))
    assert load_task("agnews", tmp_path, seed=2).train.texts == task.train.texts  # seed-independent
    i = int(task.train.texts[0].split()[1])
    assert task.train.labels[0] == i % 4


def test_wikiann_and_wnut17_token_tasks(shared, wordpiece):
    wikiann = load_task("wikiann", shared, tokenizer=wordpiece, word_vocab="build")
    assert wikiann.kind == "token" and wikiann.metric_names == ["span_f1"]
    assert wikiann.label_names == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
    assert wikiann.train.tokens == [["John", "in", "New", "York"], ["the", "movie"]]
    batch = next(wikiann.train.batches(2))
    assert batch["word_labels"][0, :4].tolist() == [1, 0, 5, 6]
    assert {"input_ids", "labels", "word_start_index", "word_ids", "char_ids", "word_mask"} <= set(batch)
    assert wikiann.word_vocab.id("john") > 1 and wikiann.char_vocab.id("J") > 1
    wnut = load_task("wnut17", shared)
    assert wnut.train.tokens == [["john", "was"], ["good"], ["new", "york"]]
    assert wnut.label_names[wnut.train.labels[2][1]] == "I-location"


def test_word_features_with_a_given_vocabulary(shared):
    vocab = WordVocab.build(["movie good"])
    task = load_task("sst2", shared, word_vocab=vocab)
    batch = next(task.train.batches(3))
    assert "input_ids" not in batch and task.word_vocab is vocab
    assert batch["word_ids"][0, :4].tolist() == [1, vocab.id("movie"), 1, vocab.id("good")]


def test_missing_file_names_the_expected_path(shared, tmp_path):
    (shared / "rte" / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=f"expected {shared / 'rte' / 'dev.tsv'}"):
        load_task("rte", shared)
    with pytest.raises(ValueError, match="reads files: pass data_dir"):
        load_task("sst2")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_task("sst2", tmp_path / "nowhere")


def test_bad_label_missing_column_and_empty_split_fail_before_encoding(write, tmp_path):
    write("a/train.tsv", "sentence\tlabel\nfine\t1\nodd\t2\n")
    write("a/dev.tsv", SST2)
    with pytest.raises(ValueError, match=r"train.tsv:3: label '2' is not in the label set \['0', '1'\]"):
        load_task("sst2", tmp_path / "a")
    write("b/train.tsv", "text\tlabel\nfine\t1\n")
    write("b/dev.tsv", SST2)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence'\]"):
        load_task("sst2", tmp_path / "b")
    write("c/train.tsv", SST2)
    write("c/dev.tsv", "sentence\tlabel\n")
    with pytest.raises(ValueError, match=r"dev.tsv: no examples \(empty split\)"):
        load_task("sst2", tmp_path / "c")


def test_unknown_names_and_bad_arguments(shared):
    with pytest.raises(ValueError, match=r"unknown task 'sst3'; known: synthetic, synthetic_pair"):
        load_task("sst3", shared)
    with pytest.raises(ValueError, match="max_length must be an int >= 4"):
        load_task("synthetic", max_length=2)
    with pytest.raises(ValueError, match="buckets must be positive lengths <= max_length=64"):
        load_task("synthetic", max_length=64, buckets=(16, 128))
    with pytest.raises(TypeError, match="word_vocab must be"):
        load_task("synthetic", word_vocab="yes")
    with pytest.raises(ValueError, match="synthetic_size"):
        load_task("synthetic", synthetic_size=1)
    with pytest.raises(TypeError, match="cannot use int as a tokenizer"):
        load_task("synthetic", tokenizer=3)


def test_buckets_are_configurable(shared, wordpiece):
    task = load_task("sst2", shared, tokenizer=wordpiece, max_length=12, buckets=(4, 8))
    assert task.train.buckets == (4, 8, 12)
    assert next(task.train.batches(1))["input_ids"].shape == (1, 8)  # [CLS] + 4 + [SEP] = 6 -> 8


def test_generic_tsv_csv_jsonl_and_conll(write, tmp_path, wordpiece):
    write("t/train.tsv", "q\tlab\nwhy\tyes\nhow\tno\n")
    write("t/dev.tsv", "q\tlab\nwhat\tno\n")
    task = load_task("tsv:text=q,label=lab", tmp_path / "t")
    assert task.label_names == ["no", "yes"] and task.train.labels.tolist() == [1, 0]
    write("h/train.tsv", "x\tp\nq\tn\n")
    write("h/other.tsv", "z\tn\n")
    task = load_task("tsv:text=0,label=1,header=0,labels=p|n,dev=other.tsv", tmp_path / "h", word_vocab="build")
    assert task.label_names == ["p", "n"] and task.dev.labels.tolist() == [1]
    assert next(task.dev.batches(1))["word_ids"][0, :1].tolist() == [1]  # "z" is not in the train vocabulary
    same = load_task("tsv:text=0,label=1,header=false,labels=p|n,dev=other.tsv", tmp_path / "h")
    assert same.train.texts == task.train.texts == ["x", "q"]  # true/false read as 1/0
    with pytest.raises(ValueError, match="header must be true or false"):
        load_task("tsv:text=0,label=1,header=nope,dev=other.tsv", tmp_path / "h")
    write("h/train.tsv", "x\tp\nq\ty\tn\n")
    with pytest.raises(ValueError, match=r"train.tsv:2: expected 2 fields"):
        load_task("tsv:text=0,label=1,header=0,dev=other.tsv", tmp_path / "h")
    write("c/train.csv", 'a,b,y\n"x, y",z,1\nu,v,0\n')
    write("c/dev.csv", "a,b,y\nu,v,0\n")
    task = load_task("csv:text=a,text_b=b,label=y", tmp_path / "c")
    assert task.is_pair and task.train.texts == ["x, y", "u"]
    write("j/train.jsonl", '{"s": "a", "y": 0}\n{"s": "b", "y": 1}\n{"s": "c", "y": 2}\n')
    write("j/dev.jsonl", '{"s": "d", "y": 3}\n')
    with pytest.raises(ValueError, match=r"dev.jsonl:1: label '3' is not in the label set \['0', '1', '2'\]"):
        load_task("jsonl:text=s,label=y", tmp_path / "j")
    write("k/train.conll", "en:a\tB-X\n\nen:b\tO\n")
    write("k/dev.conll", "en:b\tO\n")
    task = load_task("conll:prefix=en:", tmp_path / "k")
    assert task.kind == "token" and task.label_names == ["O", "B-X"] and task.train.tokens == [["a"], ["b"]]
    with pytest.raises(ValueError, match=r"bad option 'sep=x'"):
        load_task("tsv:text=q,label=lab,sep=x", tmp_path / "t")
    with pytest.raises(ValueError, match="give the columns"):
        load_task("tsv:", tmp_path / "t")


def test_hub_dataset_conversion_without_network(monkeypatch, wordpiece):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"])})
    data = {"train": {"sentence1": ["a b", "c"], "sentence2": ["d", "e"], "label": [1, 0]},
            "validation": {"sentence1": ["g"], "sentence2": ["h"], "label": [0]}}
    calls = []

    def fake_load(path, config, split):
        calls.append((path, config, split))
        return datasets.Dataset.from_dict(data[split], features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    task = load_task("glue/rte", tokenizer=wordpiece)
    assert calls == [("nyu-mll/glue", "rte", "train"), ("nyu-mll/glue", "rte", "validation")]
    assert task.is_pair and task.label_names == ["entailment", "not_entailment"]
    assert task.train.texts == ["a b", "c"] and task.train.labels.tolist() == [1, 0] and len(task.dev) == 1


def test_hub_offline_gives_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"could not load hub dataset 'nyu-mll/glue'.*need network access"):
        load_task("glue/sst2")
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
        load_task("glue/sst3")
    with pytest.raises(ValueError, match="give exactly one of text="):
        load_task("hub:imdb:label=label")
