"""Readers for local files: delimited text (GLUE TSV, CSV), JSON lines and CoNLL-style token/tag files.

They return :class:`RawSplit` (labels still strings, each with its 1-based line number) and fail with the
file and line on bad input; :func:`label_ids` then maps labels onto a label set, naming the line of any
label outside it. Everything works offline; files are read as UTF-8 with an optional BOM, and lines end
only at ``\\n`` (so stray ``\\r`` or Unicode line separators inside text never split a record). A byte that
is not UTF-8 is an error naming the file, the line and the byte's offset.

GLUE TSV files are read with quoting off (MRPC's texts contain unbalanced quotes): a field is exactly what
lies between tabs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from experiments.data.vocab import split_words

BOM = "\ufeff"


@dataclasses.dataclass
class RawSplit:
    """Examples as read from one file.

    Sequence tasks fill ``texts`` (and ``texts_b`` for pairs) with one string per example and ``labels``
    with one string per example; token tasks fill ``tokens`` with one word list per sentence and ``labels``
    with one tag list per sentence. ``lines`` mirrors ``labels`` with 1-based line numbers in ``source``.
    """

    source: str
    labels: list
    lines: list
    texts: list[str] | None = None
    texts_b: list[str] | None = None
    tokens: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Sequence[int]) -> RawSplit:
        """The examples at ``indices``, in that order."""
        pick = lambda xs: None if xs is None else [xs[i] for i in indices]
        return RawSplit(self.source, pick(self.labels), pick(self.lines), pick(self.texts),
                        pick(self.texts_b), pick(self.tokens))


def require_file(path: str) -> None:
    """Raises ``FileNotFoundError`` naming the expected path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing data file: expected {path}")


def _not_utf8(path: str) -> ValueError:
    """The error for a file that fails to decode, naming its first bad byte's line and offsets (found by a
    rescan in binary: the text decoder reports only an offset within its read buffer)."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):  # UTF-8 never uses byte 0x0a inside a character
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{path}:{number}: not UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                                  f"the line (offset {offset + e.start} in the file); save the file as UTF-8")
            offset += len(raw)
    return ValueError(f"{path}: not UTF-8")


@contextlib.contextmanager
def _named_errors(path: str, csv_line: Callable[[], int] | None = None) -> Iterator[None]:
    """Re-raises decoding errors inside the block, and CSV errors (at line ``csv_line()``), as ``ValueError``
    naming ``path`` and the line."""
    try:
        yield
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as e:
        raise ValueError(f"{path}:{csv_line()}: {e}") from None


def _lines(path: str) -> Iterator[tuple[int, str]]:
    require_file(path)
    with open(path, encoding="utf-8-sig", newline="\n") as f, _named_errors(path):
        for number, line in enumerate(f, 1):
            yield number, line.rstrip("\r\n")


def _nonempty(raw: RawSplit) -> RawSplit:
    if not raw.labels:
        raise ValueError(f"{raw.source}: no examples (empty split)")
    return raw


def read_delimited(path: str, *, text: str | int, label: str | int, text_b: str | int | None = None,
                   header: bool = True, delimiter: str = "\t", quoting: bool = False) -> RawSplit:
    """Reads a TSV/CSV file with one example per line.

    Columns are header names when ``header`` is true, else 0-based indices. Every line must have as many
    fields as the header (or the first line); blank lines are skipped; text fields are stripped.
    ``quoting`` turns on CSV quote handling (off for GLUE TSV).
    """
    require_file(path)
    wanted = {"text": text, "text_b": text_b, "label": label}
    reader = None  # the CSV reader when quoting: its line_num places CSV errors
    with open(path, encoding="utf-8-sig", newline="" if quoting else "\n") as f, \
            _named_errors(path, lambda: reader.line_num):
        if quoting:
            reader = csv.reader(f, delimiter=delimiter)
            rows = ((reader.line_num, row) for row in reader)
        else:
            rows = ((n, line.rstrip("\r\n").split(delimiter)) for n, line in enumerate(f, 1))
        out = RawSplit(path, [], [], texts=[], texts_b=[] if text_b is not None else None)
        width, index = None, None
        for number, fields in rows:
            if fields in ([], [""]):
                continue
            if width is None:
                width = len(fields)
                if header:
                    names = [c.strip() for c in fields]
                    missing = [c for c in wanted.values() if c is not None and c not in names]
                    if missing:
                        raise ValueError(f"{path}: missing column(s) {missing}; the header has {names}")
                    index = {k: names.index(c) for k, c in wanted.items() if c is not None}
                    continue
                bad = [c for c in wanted.values() if c is not None and not 0 <= int(c) < width]
                if bad:
                    raise ValueError(f"{path}: column index(es) {bad} out of range; line 1 has {width} fields")
                index = {k: int(c) for k, c in wanted.items() if c is not None}
            if len(fields) != width:
                raise ValueError(f"{path}:{number}: expected {width} fields separated by {delimiter!r}, "
                                 f"found {len(fields)}")
            out.texts.append(fields[index["text"]].strip())
            if text_b is not None:
                out.texts_b.append(fields[index["text_b"]].strip())
            out.labels.append(fields[index["label"]].strip())
            out.lines.append(number)
    return _nonempty(out)


def read_jsonl(path: str, *, label: str, text: str | None = None, text_b: str | None = None,
               tokens: str | None = None) -> RawSplit:
    """Reads JSON lines: one object per line with a ``text`` key (and ``text_b``) and a scalar ``label``
    for sequence tasks, or a ``tokens`` list and a same-length tag list under ``label`` for token tasks."""
    if (text is None) == (tokens is None):
        raise ValueError("read_jsonl: give exactly one of text= (sequence task) or tokens= (token task)")
    out = RawSplit(path, [], [], texts=[] if text else None, texts_b=[] if text_b else None,
                   tokens=[] if tokens else None)
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        keys = [k for k in (text, text_b, tokens, label) if k is not None]
        missing = [k for k in keys if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing key(s) {missing}")
        if tokens:
            words, tags = record[tokens], record[label]
            if not (isinstance(words, list) and isinstance(tags, list) and len(words) == len(tags)):
                raise ValueError(f"{path}:{number}: {tokens!r} and {label!r} must be lists of equal length")
            out.tokens.append([str(w) for w in words])
            out.labels.append([str(t) for t in tags])
            out.lines.append([number] * len(tags))
        else:
            out.texts.append(str(record[text]).strip())
            if text_b:
                out.texts_b.append(str(record[text_b]).strip())
            out.labels.append(str(record[label]))
            out.lines.append(number)
    return _nonempty(out)


def read_conll(path: str, *, prefix: str | None = None) -> RawSplit:
    """Reads CoNLL-style files: one ``token<TAB>tag`` (or whitespace-separated, tag last) per line, a blank
    line between sentences. U+FEFF is removed wherever it appears (WNUT-17 dev has stray ones, one of them
    on an otherwise blank line); ``prefix`` (WikiANN's ``en:``) is stripped from tokens that carry it;
    ``-DOCSTART-`` lines are skipped."""
    out = RawSplit(path, [], [], tokens=[])
    words, tags, lines = [], [], []

    def flush():
        if words:
            out.tokens.append(list(words))
            out.labels.append(list(tags))
            out.lines.append(list(lines))
            words.clear(), tags.clear(), lines.clear()

    for number, line in _lines(path):
        line = line.replace(BOM, "")
        if not line.strip():
            flush()
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        token, tag = fields[0].strip(), fields[-1].strip()
        if token == "-DOCSTART-":
            continue
        if prefix and token.startswith(prefix):
            token = token[len(prefix):]
        if len(fields) < 2 or not token or not tag:
            raise ValueError(f"{path}:{number}: expected 'token<TAB>tag', found {line!r}")
        words.append(token)
        tags.append(tag)
        lines.append(number)
    flush()
    return _nonempty(out)


def read_unlabeled(path: str, *, kind: str, is_pair: bool = False) -> RawSplit:
    """Reads an unlabeled transfer file: one example per line, blank lines skipped.

    ``kind="sequence"``: each line is one text, or for pair tasks (``is_pair``) two texts separated by one
    tab. ``kind="token"``: each line is a sentence, split into words with
    :func:`experiments.data.vocab.split_words` (letters/digits runs and single punctuation marks, the way
    the NER files tokenise). Labels are empty strings (the teacher labels the rows). A single-text line with a
    tab, or a pair line without exactly one tab, is an error naming the line: cut label columns off first.
    """
    if kind not in ("sequence", "token"):
        raise ValueError(f"kind must be 'sequence' or 'token', got {kind!r}")
    out = RawSplit(path, [], [], **({"tokens": []} if kind == "token" else {"texts": []}))
    if is_pair:
        out.texts_b = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != (2 if is_pair else 1):
            want = "two tab-separated texts (a pair task)" if is_pair else "one text without tabs"
            raise ValueError(f"{path}:{number}: expected {want}, found {len(fields)} tab-separated fields: "
                             f"{line[:80]!r}")
        if kind == "token":
            words = split_words(fields[0])
            if not words:
                continue
            out.tokens.append(words)
        else:
            out.texts.append(fields[0].strip())
            if is_pair:
                out.texts_b.append(fields[1].strip())
        out.labels.append("")
        out.lines.append(number)
    return _nonempty(out)


def label_ids(raw: RawSplit, label_values: Sequence[str]) -> np.ndarray | list[np.ndarray]:
    """Maps string labels onto indices of ``label_values``: int32 [N] for sequence tasks, a list of int32
    [n_words] arrays for token tasks. A label outside the set raises naming its file and line."""
    index = {v: i for i, v in enumerate(label_values)}

    def lookup(value, line):
        if value not in index:
            raise ValueError(f"{raw.source}:{line}: label {value!r} is not in the label set {list(label_values)}")
        return index[value]

    if raw.tokens is not None:
        return [np.array([lookup(t, n) for t, n in zip(tags, lines)], np.int32)
                for tags, lines in zip(raw.labels, raw.lines)]
    return np.array([lookup(v, n) for v, n in zip(raw.labels, raw.lines)], np.int32)


def infer_label_values(raw: RawSplit) -> list[str]:
    """The label set seen in ``raw``, in a stable order: sorted for sequence tasks; for BIO tags ``O`` first,
    then by entity type with ``B-`` before ``I-``."""
    if raw.tokens is None:
        return sorted(set(raw.labels))
    seen = {t for tags in raw.labels for t in tags}
    key = lambda t: (t != "O", t[2:] if t[1:2] == "-" else t, t[:1])
    return sorted(seen, key=key)
