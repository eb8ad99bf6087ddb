"""Tasks by name: :func:`load_task` reads (or generates) a task's splits, encodes them and returns
:class:`TaskData`.

Names
  * ``synthetic``, ``synthetic_graded``, ``synthetic_pair``, ``synthetic_ner``: generated (see
    :mod:`experiments.data.synthetic`);
  * ``sst2``, ``mrpc``, ``rte``, ``agnews``, ``wikiann``, ``wnut17``: local files laid out as in the shared
    benchmark data folder. ``data_dir`` is the task's folder (holding e.g. ``train.tsv`` and ``dev.tsv``) or
    the folder above it (then the task's subfolder, e.g. ``wikiann_en/``, is used). AG News ships only a
    train file: a fixed, seed-independent 1,000-example holdout of it is the dev split;
  * ``tsv:OPTIONS``, ``csv:OPTIONS``, ``jsonl:OPTIONS``, ``conll[:OPTIONS]``: any local files in
    ``data_dir``; OPTIONS are ``key=value`` pairs separated by ``,``:

    - tsv/csv: ``text``, ``text_b``, ``label`` (column names, or 0-based indices with ``header=0``),
      ``header`` (true/false or 1/0, default true); files ``train.tsv``/``dev.tsv`` (``.csv``); CSV honours quotes, TSV not;
    - jsonl: ``text`` (and ``text_b``) or ``tokens``, ``label`` (default ``label``); files ``train.jsonl``,
      ``dev.jsonl``;
    - conll: ``prefix`` (stripped from tokens, e.g. ``en:``); files ``train.conll``/``dev.conll``;
    - all: ``labels=a|b|c`` fixes the label set and its order (default: the sorted labels seen in train),
      ``train=FILE``, ``dev=FILE`` override the file names;
  * ``glue/<config>``, ``hub:<id>[:OPTIONS]``: Hugging Face hub datasets (see :mod:`experiments.data.hub`).

Selection split: ``load_task(..., selection="auto" | N)`` carves whole texts out of the train split into
``TaskData.selection`` (:mod:`experiments.data.holdout`: a fixed seed, so a teacher, its students and the tools
that read their models all hold out the same rows; rows sharing text with them, e.g. SST-2's phrases of a
held-out sentence, are left out of training): never trained on (nor in a vocabulary built from train), it is
where runs and tools make their choices (best checkpoint, pruning point, calibrator), so that the dev figure they
report took no part in the choice. ``"auto"``: ``min(2000, a tenth of the whole texts)``.

Every problem with the input -- missing file (named), missing column, label outside the label set (file and
line named), empty split, unknown name -- raises before anything is encoded or trained.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from experiments.data import holdout, synthetic
from experiments.data.batching import Split, default_buckets
from experiments.data.features import encode_sequences, encode_tagged
from experiments.data.readers import RawSplit, infer_label_values, label_ids, read_conll, read_delimited, read_jsonl
from experiments.data.subwords import SubwordTokenizer, as_subword_tokenizer
from experiments.data.vocab import CharVocab, WordVocab
from models import storage

log = logging.getLogger(__name__)

AGNEWS_DEV_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A loaded task.

    ``kind`` is ``"sequence"`` (one label per example) or ``"token"`` (one tag per word); ``is_pair`` says
    whether examples have two texts; ``label_names[i]`` names label id i; ``metric_names`` are the eval
    metrics that fit (``accuracy``/``f1``/``mcc`` for binary, ``accuracy`` for multi-class, ``span_f1``
    for NER; binary F1 is of label 1). ``word_vocab``/``char_vocab`` are the vocabularies the word features
    were encoded with (``None`` without word features) and ``tokenizer`` the sub-word tokenizer.
    """

    name: str
    kind: Literal["sequence", "token"]
    is_pair: bool
    label_names: list[str]
    train: Split
    dev: Split
    metric_names: list[str]
    max_length: int
    tokenizer: SubwordTokenizer | None = None
    word_vocab: WordVocab | None = None
    char_vocab: CharVocab | None = None
    selection: Split | None = None  # carved out of train (never trained on), where choices are made
    selection_summary: dict | None = None  # how it was carved (holdout.Carve.summary): sizes, rows left out

    @property
    def choice_split(self) -> Split:
        """The split choices are made on: ``selection`` when carved, else ``dev`` (the old behaviour)."""
        return self.dev if self.selection is None else self.selection

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclasses.dataclass(frozen=True)
class _LocalTask:
    folder: str  # subfolder name in the shared data layout
    train_file: str
    dev_file: str | None  # None: hold out AGNEWS_DEV_SIZE train examples
    read: Callable[[str], RawSplit]
    label_values: tuple[str, ...]  # labels as written in the files
    label_names: tuple[str, ...] | None = None  # display names (default: the values)


def _bio(*types: str) -> tuple[str, ...]:
    return ("O",) + tuple(f"{p}-{t}" for t in types for p in "BI")


LOCAL_TASKS = {
    "sst2": _LocalTask("sst2", "train.tsv", "dev.tsv",
                       functools.partial(read_delimited, text="sentence", label="label"),
                       ("0", "1"), ("negative", "positive")),
    "mrpc": _LocalTask("mrpc", "train.tsv", "dev.tsv",
                       functools.partial(read_delimited, text="#1 String", text_b="#2 String", label="Quality"),
                       ("0", "1"), ("not_equivalent", "equivalent")),
    "rte": _LocalTask("rte", "train.tsv", "dev.tsv",
                      functools.partial(read_delimited, text="sentence1", text_b="sentence2", label="label"),
                      ("entailment", "not_entailment")),
    "agnews": _LocalTask("agnews", "train.tsv", None,
                         functools.partial(read_delimited, text=0, label=1, header=False),
                         ("World", "Sports", "Business", "Sci/Tech")),
    "wikiann": _LocalTask("wikiann_en", "train.txt", "dev.txt", functools.partial(read_conll, prefix="en:"),
                          _bio("PER", "ORG", "LOC")),
    "wnut17": _LocalTask("wnut17", "train.conll", "dev.conll", read_conll,
                         _bio("corporation", "creative-work", "group", "location", "person", "product")),
}
SYNTHETIC_TASKS = {
    "synthetic": (synthetic.sentiment, synthetic.SENTIMENT_LABELS),
    "synthetic_pair": (synthetic.pairs, synthetic.PAIR_LABELS),
    "synthetic_ner": (synthetic.ner, synthetic.NER_LABELS),
    "synthetic_graded": (synthetic.graded_sentiment, synthetic.SENTIMENT_LABELS),
}
_GENERIC = {  # prefix -> (default file extension, allowed option keys)
    "tsv": ("tsv", {"text", "text_b", "label", "header", "labels", "train", "dev"}),
    "csv": ("csv", {"text", "text_b", "label", "header", "labels", "train", "dev"}),
    "jsonl": ("jsonl", {"text", "text_b", "tokens", "label", "labels", "train", "dev"}),
    "conll": ("conll", {"prefix", "labels", "train", "dev"}),
}


def is_task_name(name: str) -> bool:
    """Whether ``name`` has a form :func:`load_task` reads (its options are checked when it is loaded)."""
    return (name in SYNTHETIC_TASKS or name in LOCAL_TASKS or name.partition(":")[0] in _GENERIC
            or name.startswith(("glue/", "hub:")))


def is_token_task(name: str) -> bool:
    """Whether ``name`` is a tagging task (one tag per word), known from its name alone."""
    return (name in ("synthetic_ner", "wikiann", "wnut17") or name.partition(":")[0] == "conll"
            or (name.startswith("jsonl:") and "tokens=" in name))


def known_task_names() -> list[str]:
    """Fixed task names plus the generic name forms."""
    return [*SYNTHETIC_TASKS, *LOCAL_TASKS, "tsv:...", "csv:...", "jsonl:...", "conll[:...]", "glue/<config>",
            "hub:<id>[:...]"]


def _task_dir(name: str, data_dir: str | os.PathLike | None, folder: str | None, files: Sequence[str]) -> str:
    """The folder holding ``files``: ``data_dir`` itself, else ``data_dir/folder``."""
    if data_dir is None:
        raise ValueError(f"task {name!r} reads files: pass data_dir (the folder holding {', '.join(files)})")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"task {name!r}: data_dir {data_dir} is not a directory")
    if folder and not os.path.isfile(os.path.join(data_dir, files[0])) \
            and os.path.isfile(os.path.join(data_dir, folder, files[0])):
        return os.path.join(data_dir, folder)
    return data_dir


def _read_local(name: str, data_dir) -> tuple[RawSplit, RawSplit, tuple[str, ...], list[str]]:
    spec = LOCAL_TASKS[name]
    files = [f for f in (spec.train_file, spec.dev_file) if f]
    folder = _task_dir(name, data_dir, spec.folder, files)
    train = spec.read(os.path.join(folder, spec.train_file))
    if spec.dev_file:
        dev = spec.read(os.path.join(folder, spec.dev_file))
    else:
        if len(train) <= AGNEWS_DEV_SIZE:
            raise ValueError(f"{train.source}: {len(train)} examples leave nothing for training after holding "
                             f"out {AGNEWS_DEV_SIZE} for dev")
        held = np.zeros(len(train), bool)
        held[np.random.default_rng(0).permutation(len(train))[:AGNEWS_DEV_SIZE]] = True
        train, dev = train.select(np.flatnonzero(~held)), train.select(np.flatnonzero(held))
    return train, dev, spec.label_values, list(spec.label_names or spec.label_values)


def _parse_options(name: str, text: str, allowed: set[str]) -> dict[str, str]:
    options = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ValueError(f"task {name!r}: bad option {item!r}; allowed keys: {', '.join(sorted(allowed))}")
        options[key] = value
    return options


def _read_generic(name: str, data_dir) -> tuple[RawSplit, RawSplit, tuple[str, ...], list[str]]:
    prefix, _, text = name.partition(":")
    ext, allowed = _GENERIC[prefix]
    opts = _parse_options(name, text, allowed)
    files = [opts.get("train", f"train.{ext}"), opts.get("dev", f"dev.{ext}")]
    folder = _task_dir(name, data_dir, None, files)
    if prefix in ("tsv", "csv"):
        if "text" not in opts or "label" not in opts:
            raise ValueError(f"task {name!r}: give the columns, e.g. {prefix}:text=sentence,label=label")
        header = _boolean_option(name, "header", opts.get("header", "1"))
        column = (lambda c: c) if header else _index_option(name)
        read = functools.partial(read_delimited, text=column(opts["text"]), label=column(opts["label"]),
                                 text_b=column(opts["text_b"]) if "text_b" in opts else None,
                                 header=header, delimiter="\t" if prefix == "tsv" else ",",
                                 quoting=prefix == "csv")
    elif prefix == "jsonl":
        read = functools.partial(read_jsonl, text=opts.get("text"), text_b=opts.get("text_b"),
                                 tokens=opts.get("tokens"), label=opts.get("label", "label"))
        if ("text" in opts) == ("tokens" in opts):
            raise ValueError(f"task {name!r}: give exactly one of text= (sequence task) or tokens= (token task)")
    else:
        read = functools.partial(read_conll, prefix=opts.get("prefix"))
    train, dev = (read(os.path.join(folder, f)) for f in files)
    values = tuple(opts["labels"].split("|")) if "labels" in opts else tuple(infer_label_values(train))
    return train, dev, values, list(values)


BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _boolean_option(name: str, key: str, value: str) -> bool:
    if value.lower() not in BOOLEANS:
        raise ValueError(f"task {name!r}: {key} must be true or false (or 1/0, yes/no), got {value!r}")
    return BOOLEANS[value.lower()]


def _index_option(name: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not value.isdigit():
            raise ValueError(f"task {name!r}: with header=0 columns are 0-based indices, got {value!r}")
        return int(value)
    return parse


def _read_hub(name: str) -> tuple[RawSplit, RawSplit, tuple[str, ...], list[str]]:
    from experiments.data.hub import load_hub

    train, dev, names, _ = load_hub(name)
    values = tuple(names) if names else tuple(infer_label_values(train))
    return train, dev, values, list(values)


def _sizes(synthetic_size: int | tuple[int, int]) -> tuple[int, int]:
    sizes = (synthetic_size, max(synthetic_size // 4, 2)) if isinstance(synthetic_size, int) else synthetic_size
    if len(sizes) != 2 or any(not isinstance(s, int) or s < 2 for s in sizes):
        raise ValueError(f"synthetic_size must be an int >= 2 or a (train, dev) pair of them, got {synthetic_size!r}")
    return sizes


def _raw_task(name, data_dir, seed, synthetic_size):
    if name in SYNTHETIC_TASKS:
        generate, labels = SYNTHETIC_TASKS[name]
        n_train, n_dev = _sizes(synthetic_size)
        return generate(n_train, seed, 0), generate(n_dev, seed, 1), labels, list(labels)
    if name in LOCAL_TASKS:
        return _read_local(name, data_dir)
    if name.partition(":")[0] in _GENERIC:
        return _read_generic(name, data_dir)
    if name.startswith(("glue/", "hub:")):
        return _read_hub(name)
    raise ValueError(f"unknown task {name!r}; known: {', '.join(known_task_names())}")


def _check_buckets(buckets, max_length: int) -> tuple[int, ...]:
    if buckets is None:
        return default_buckets(max_length)
    buckets = sorted({int(b) for b in buckets})
    if not buckets or buckets[0] < 1 or buckets[-1] > max_length:
        raise ValueError(f"buckets must be positive lengths <= max_length={max_length}, got {buckets}")
    return tuple(buckets) if buckets[-1] == max_length else (*buckets, max_length)


def load_task(name: str, data_dir: str | os.PathLike | None = None, *, tokenizer=None, max_length: int = 128,
              word_vocab: WordVocab | Literal["build"] | None = None,
              char_vocab: CharVocab | Literal["build"] | None = None, seed: int = 0,
              synthetic_size: int | tuple[int, int] = 2000, buckets: Sequence[int] | None = None,
              max_word_chars: int = 16, truncation: bool = True,
              selection: int | Literal["auto"] | None = None) -> TaskData:
    """Reads or generates task ``name`` and encodes its train and dev splits (see the module docstring for
    names and :mod:`experiments.data.features` for the batch keys).

    Args:
      tokenizer: sub-word tokenizer for transformer inputs (anything
        :func:`~experiments.data.subwords.as_subword_tokenizer` accepts); ``None``: no ``input_ids``.
      max_length: longest encoded example, in sub-tokens (special tokens included) and in words; longer
        examples are truncated with a warning, or rejected when ``truncation`` is false.
      word_vocab: a :class:`WordVocab` for word-level student features, ``"build"`` to build one from the
        train split (all words), or ``None`` for no word features.
      char_vocab: for token tasks with word features: a :class:`CharVocab`, or ``None``/``"build"`` to build
        one from the train split.
      seed: generation seed of the synthetic tasks (file-based tasks ignore it).
      synthetic_size: train size of synthetic tasks (dev gets a quarter), or a (train, dev) pair.
      buckets: static padded lengths (default :func:`~experiments.data.batching.default_buckets`);
        ``max_length`` is always the last one.
      max_word_chars: characters per word in ``char_ids``.
      selection: examples carved out of train into ``TaskData.selection`` (see the module docstring): a count,
        ``"auto"``, or ``None`` for no selection split (choices on dev).
    """
    if not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
    if max_word_chars < 1:
        raise ValueError(f"max_word_chars must be >= 1, got {max_word_chars}")
    if not (word_vocab is None or word_vocab == "build" or isinstance(word_vocab, WordVocab)):
        raise TypeError(f"word_vocab must be a WordVocab, 'build' or None, got {word_vocab!r}")
    if not (char_vocab is None or char_vocab == "build" or isinstance(char_vocab, CharVocab)):
        raise TypeError(f"char_vocab must be a CharVocab, 'build' or None, got {char_vocab!r}")
    buckets = _check_buckets(buckets, max_length)
    sub = as_subword_tokenizer(tokenizer) if tokenizer is not None else None

    if data_dir is not None and storage.is_remote(data_dir):  # a bucket's data folder is read from a local copy
        with storage.local_copy(data_dir) as local:
            raw_train, raw_dev, values, label_names = _raw_task(name, local, seed, synthetic_size)
    else:
        raw_train, raw_dev, values, label_names = _raw_task(name, data_dir, seed, synthetic_size)
    raws = {"train": raw_train, "dev": raw_dev}
    carved = None
    if selection is not None:
        carved = holdout.carve(raw_train, selection)
        raw_train = raws["train"] = carved.train
        raws["selection"] = carved.selection
    labels = {which: label_ids(raw, values) for which, raw in raws.items()}
    kind = "token" if raw_train.tokens is not None else "sequence"
    is_pair = raw_train.texts_b is not None

    if word_vocab == "build":
        texts = raw_train.tokens if kind == "token" else raw_train.texts + (raw_train.texts_b or [])
        word_vocab = WordVocab.build(texts)
    if kind == "token" and word_vocab is not None and not isinstance(char_vocab, CharVocab):
        char_vocab = CharVocab.build(raw_train.tokens)
    if kind == "sequence":
        char_vocab = None

    splits = {}
    for which, raw in raws.items():
        split_name = f"{name}/{which}"
        if kind == "token":
            feats = encode_tagged(split_name, raw.tokens, labels[which], tokenizer=sub, word_vocab=word_vocab,
                                  char_vocab=char_vocab, max_length=max_length, max_word_chars=max_word_chars,
                                  truncation=truncation)
        else:
            feats = encode_sequences(split_name, raw.texts, raw.texts_b, labels[which], tokenizer=sub,
                                     word_vocab=word_vocab, max_length=max_length, truncation=truncation)
        splits[which] = Split(split_name, labels=labels[which], features=feats, buckets=buckets,
                              texts=raw.texts, texts_b=raw.texts_b, tokens=raw.tokens)

    if kind == "token":
        metrics = ["span_f1"]
    else:
        metrics = ["accuracy", "f1", "mcc"] if len(label_names) == 2 else ["accuracy"]
    return TaskData(name=name, kind=kind, is_pair=is_pair, label_names=label_names, train=splits["train"],
                    dev=splits["dev"], metric_names=metrics, max_length=max_length, tokenizer=sub,
                    word_vocab=word_vocab, char_vocab=char_vocab, selection=splits.get("selection"),
                    selection_summary=None if carved is None else carved.summary())
