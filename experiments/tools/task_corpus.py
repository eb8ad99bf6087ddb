"""A raw-text corpus from the benchmark data's training splits: every sentence once, one a line.

    python -m experiments.tools.task_corpus --data_dir=../shared/data --out=runs/corpus/tasks.txt

Reads the training split of every task folder present under ``--data_dir`` (laid out as ../shared/data: SST-2's
sentences, both sentences of MRPC and RTE pairs, WikiANN's and WNUT-17's sentences with their words joined by
spaces, AG News's texts), never a dev split, normalises whitespace, and writes each distinct line once, in the order
first seen (``--out``, written atomically; local or ``gs://``). It prints the lines each source gave and kept.

The result is the corpus of general distillation on this machine (experiments/configs/general_distill.py). SST-2's
training rows are phrases of its training sentences, so the corpus holds a sentence and the phrases inside it as
separate lines; the held-out part of general distillation is chosen by line and so may hold a phrase of a training
line: its losses watch the distillation, they are not a task figure.
"""

from __future__ import annotations

import os

from absl import flags

from experiments.data import readers
from experiments.runtime import cli
from models import storage

# folder -> (reader of its training split's texts)
SOURCES = {
    "sst2": lambda d: readers.read_delimited(os.path.join(d, "train.tsv"), text="sentence", label="label").texts,
    "mrpc": lambda d: _pairs(readers.read_delimited(os.path.join(d, "train.tsv"), text="#1 String",
                                                    text_b="#2 String", label="Quality")),
    "rte": lambda d: _pairs(readers.read_delimited(os.path.join(d, "train.tsv"), text="sentence1", text_b="sentence2",
                                                   label="label")),
    "wikiann_en": lambda d: [" ".join(w) for w in
                             readers.read_conll(os.path.join(d, "train.txt"), prefix="en:").tokens],
    "wnut17": lambda d: [" ".join(w) for w in readers.read_conll(os.path.join(d, "train.conll")).tokens],
    "agnews": lambda d: readers.read_delimited(os.path.join(d, "train.tsv"), text=0, label=1, header=False).texts,
}


def _pairs(raw) -> list[str]:
    return [t for pair in zip(raw.texts, raw.texts_b) for t in pair]


def build_corpus(data_dir: str, out: str) -> dict[str, tuple[int, int]]:
    """Writes the de-duplicated corpus to ``out``; returns ``{folder: (lines read, lines kept)}`` for the
    folders found under ``data_dir``."""
    seen: set[str] = set()
    kept: list[str] = []
    counts = {}
    for folder, read in SOURCES.items():
        path = os.path.join(data_dir, folder)
        if not os.path.isdir(path):
            continue
        texts = [" ".join(t.split()) for t in read(path)]
        before = len(kept)
        for t in texts:
            if t and t not in seen:
                seen.add(t)
                kept.append(t)
        counts[folder] = (len(texts), len(kept) - before)
    if not counts:
        raise FileNotFoundError(f"{data_dir} holds none of the task folders {sorted(SOURCES)}")
    storage.write_text(out, "\n".join(kept) + "\n")
    return counts


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("data_dir", None, "Folder of task folders laid out as ../shared/data.", flag_values=fv)
    flags.DEFINE_string("out", None, "The corpus file to write (one line per distinct sentence).", flag_values=fv)
    flags.mark_flags_as_required(["data_dir", "out"], flag_values=fv)
    cli.directory(fv, "data_dir")


def run(fv: flags.FlagValues) -> dict:
    counts = build_corpus(fv.data_dir, fv.out)
    for folder, (read, kept) in counts.items():
        print(f"{folder:12s} {read:8,d} lines read, {kept:8,d} new")
    print(f"{sum(k for _, k in counts.values()):,d} lines in {fv.out}")
    return counts


if __name__ == "__main__":
    cli.run_script(define_flags, run)
