"""Raw-text corpora for general (task-agnostic) distillation: streamed, tokenised once into a cached shard set.

A corpus is text with one document or sentence per line: a file, a folder of files (every non-hidden file under
it, in sorted order), either on a local disk or in a bucket (``gs://...``, :mod:`models.storage`), or a Hugging
Face ``datasets`` id where the machine can reach the hub: ``hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]`` (split ``train``
and column ``text`` by default; each record's text is split into lines). Lines are stripped; empty ones are
skipped.

:func:`prepare` reads the corpus once, as a stream (memory holds one chunk of lines and one shard, never the
corpus), and writes a *shard set*: the lines tokenised without special tokens, packed into sequences of at most
``max_length`` tokens (:class:`Packer`), split into a training and a held-out part, in shards of
``shard_sequences`` sequences::

    <cache_root>/<fingerprint[:16]>/index.json               what was built from what, shard sizes, counts
                                   train-00000.ids.npy       uint16 (int32 for vocabularies >= 65,536) [n, L],
                                   train-00000.len.npy       padded with [PAD]; lengths int32 [n]
                                   heldout-00000.ids.npy ...
                                   token_counts.npy          int64 [V]: token frequencies of the training part

The fingerprint covers the corpus (the caller's digest of its files, or the dataset id), the tokenizer and
every build parameter, so a changed corpus or tokenizer builds a new set and an unchanged one is reused, by any
run, wherever its workdir is. The set is published whole (:func:`models.storage.atomic_directory`).

Held-out lines are chosen by a hash of their text (``heldout_fraction`` of the lines): the choice is the same
in every build, needs no pass over the corpus, and puts repeated lines on the same side, so the held-out part
shares no line with the training part. Held-out lines are packed among themselves.

Packing (``pack=True``, RoBERTa's FULL-SENTENCES): consecutive lines are joined into ``[CLS] a [SEP] b [SEP] ...``
while they fit, so short sentences fill whole sequences instead of padding; a line longer than a sequence is
cut into pieces of ``max_length - 2`` tokens. ``pack=False``: one line (or piece) per sequence, padded.
Token types are all 0 (one segment); attention spans the packed lines, as in RoBERTa.

Reading (:class:`CorpusSplit`): sequences by position, and the training order of an epoch as a function of
(seed, epoch) alone, so that a run's data position is two integers (epoch, batch in epoch) that
:class:`experiments.runtime.trainer.TrainState` checkpoints. The order shuffles in two levels, the shard order
then the sequences within each shard, which needs one shard's permutation in memory (a corpus larger than
memory stays on disk: local shards are memory-mapped, remote ones read one at a time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from absl import logging

from models import storage

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
COUNTS_FILE = "token_counts.npy"
SPLITS = ("train", "heldout")
HF_PREFIX = "hf:"


# -- reading the text -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """Where a corpus's lines come from: ``files`` (local or remote paths, in reading order), or a ``datasets``
    id (``hf_name``, ``hf_config``, ``hf_split``, ``hf_column``)."""

    spec: str
    files: tuple[str, ...] = ()
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_column: str = "text"


def _files_under(path: str) -> list[str]:
    """Every non-hidden file under directory ``path`` (names starting with ``.`` or ``_`` skipped), sorted."""
    out = []
    for name in storage.listdir(path):
        if name.startswith((".", "_")):
            continue
        child = os.path.join(path, name)
        out.extend(_files_under(child) if storage.is_dir(child) else [child])
    return out


def parse_source(spec: str) -> Source:
    """The :class:`Source` of a corpus spec (a file, a folder, or ``hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]``); raises
    ``FileNotFoundError`` for a path that does not exist or a folder without files."""
    spec = str(spec).strip()
    if spec.startswith(HF_PREFIX):
        parts = spec[len(HF_PREFIX):].split(":")
        if not parts[0] or len(parts) > 4:
            raise ValueError(f"corpus {spec!r}: expected hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]")
        parts += [""] * (4 - len(parts))
        return Source(spec, hf_name=parts[0], hf_config=parts[1] or None, hf_split=parts[2] or "train",
                      hf_column=parts[3] or "text")
    if storage.is_dir(spec):
        files = _files_under(spec)
        if not files:
            raise FileNotFoundError(f"corpus folder {spec} holds no files")
        return Source(spec, files=tuple(files))
    if storage.is_file(spec):
        return Source(spec, files=(spec,))
    raise FileNotFoundError(f"corpus {spec!r} is neither a file, a folder nor hf:NAME")


def _file_lines(path: str) -> Iterator[str]:
    """The lines of one text file (local or remote), read as a stream; a non-UTF-8 byte names the file and line."""
    with storage.as_path(path).open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {number} is not UTF-8 ({e.reason} at byte {e.start})") from None


def iter_lines(source: Source) -> Iterator[str]:
    """The corpus's non-empty lines, stripped, in order, streamed."""
    if source.hf_name is not None:
        import datasets  # optional: only for hf: corpora

        records = datasets.load_dataset(source.hf_name, source.hf_config, split=source.hf_split, streaming=True)
        raw = (line for record in records for line in str(record[source.hf_column]).splitlines())
    else:
        raw = (line for path in source.files for line in _file_lines(path))
    for line in raw:
        line = line.strip()
        if line:
            yield line


def is_heldout(line: str, fraction: float) -> bool:
    """Whether ``line`` belongs to the held-out part: the first 8 bytes of its SHA-1 as a fraction of 2^64 below
    ``fraction`` (the same line always lands on the same side)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(line.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0 ** 64


# -- packing ------------------------------------------------------------------------------------------------

class Packer:
    """Turns tokenised lines into sequences ``[CLS] line [SEP] line [SEP] ...`` of at most ``max_length`` ids.

    :meth:`add` takes one line's token ids (no special tokens) and returns the sequences it completed;
    :meth:`flush` returns the last, partly filled one. With ``pack=False`` every line is its own sequence. A line
    longer than ``max_length - 2`` tokens is cut into pieces of that size, each treated as a line.
    """

    def __init__(self, max_length: int, cls_id: int, sep_id: int, pack: bool = True):
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([CLS], a token, [SEP]), got {max_length}")
        self.max_length, self.cls_id, self.sep_id, self.pack = max_length, cls_id, sep_id, pack
        self._current: list[int] = []

    def add(self, tokens: list[int]) -> list[np.ndarray]:
        room = self.max_length - 2
        out = []
        for start in range(0, len(tokens), room):
            piece = list(tokens[start:start + room])
            if not self.pack:
                out.append(np.asarray([self.cls_id, *piece, self.sep_id], np.int32))
                continue
            if self._current and len(self._current) + len(piece) + 1 > self.max_length:
                out.append(np.asarray(self._current, np.int32))
                self._current = []
            if not self._current:
                self._current = [self.cls_id]
            self._current.extend(piece)
            self._current.append(self.sep_id)
        return out

    def flush(self) -> list[np.ndarray]:
        out = [np.asarray(self._current, np.int32)] if self._current else []
        self._current = []
        return out


# -- the shard set ------------------------------------------------------------------------------------------

def _ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


class _ShardWriter:
    """Writes one split's sequences into shards of ``shard_sequences`` rows; counts tokens if ``counts`` is given."""

    def __init__(self, out: Path, split: str, max_length: int, pad_id: int, dtype: np.dtype, shard_sequences: int,
                 counts: np.ndarray | None = None):
        self.out, self.split, self.max_length, self.pad_id = out, split, max_length, pad_id
        self.dtype, self.shard_sequences, self.counts = dtype, shard_sequences, counts
        self.sizes: list[int] = []
        self.tokens = 0
        self._rows: list[np.ndarray] = []

    def add(self, seqs: Iterable[np.ndarray]) -> None:
        for seq in seqs:
            self._rows.append(seq)
            if len(self._rows) == self.shard_sequences:
                self._write()

    def close(self) -> None:
        if self._rows:
            self._write()

    def _write(self) -> None:
        n = len(self._rows)
        ids = np.full((n, self.max_length), self.pad_id, self.dtype)
        lengths = np.zeros(n, np.int32)
        for i, seq in enumerate(self._rows):
            ids[i, :len(seq)] = seq
            lengths[i] = len(seq)
        name = f"{self.split}-{len(self.sizes):05d}"
        np.save(self.out / f"{name}.ids.npy", ids)
        np.save(self.out / f"{name}.len.npy", lengths)
        if self.counts is not None:
            real = np.arange(self.max_length)[None, :] < lengths[:, None]
            self.counts += np.bincount(ids[real].astype(np.int64), minlength=len(self.counts))
        self.sizes.append(n)
        self.tokens += int(lengths.sum())
        self._rows = []


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build(lines: Iterable[str], out: str | os.PathLike, encode: Callable[[list[str]], list[list[int]]], *,
          max_length: int, cls_id: int, sep_id: int, pad_id: int, vocab_size: int, pack: bool = True,
          heldout_fraction: float = 0.01, shard_sequences: int = 65536, chunk_lines: int = 4096,
          index_extra: dict | None = None) -> dict:
    """Tokenises ``lines`` with ``encode`` (texts -> id lists, no special tokens) and writes the shard set into the
    existing local directory ``out`` (see the module docstring); returns the index it wrote."""
    out = Path(out)
    dtype = _ids_dtype(vocab_size)
    counts = np.zeros(vocab_size, np.int64)
    writers = {"train": _ShardWriter(out, "train", max_length, pad_id, dtype, shard_sequences, counts),
               "heldout": _ShardWriter(out, "heldout", max_length, pad_id, dtype, shard_sequences)}
    packers = {s: Packer(max_length, cls_id, sep_id, pack) for s in SPLITS}
    n_lines = {s: 0 for s in SPLITS}
    start, last_log = time.time(), time.time()
    for chunk in _batched(lines, chunk_lines):
        for line, tokens in zip(chunk, encode(chunk)):
            split = "heldout" if is_heldout(line, heldout_fraction) else "train"
            n_lines[split] += 1
            writers[split].add(packers[split].add(tokens))
        if time.time() - last_log > 30:
            logging.info("corpus: %d lines tokenised (%.0f lines/s)", sum(n_lines.values()),
                         sum(n_lines.values()) / (time.time() - start))
            last_log = time.time()
    for split in SPLITS:
        writers[split].add(packers[split].flush())
        writers[split].close()
    np.save(out / COUNTS_FILE, counts)
    index = {"format_version": FORMAT_VERSION, "max_length": max_length, "pack": pack, "dtype": dtype.name,
             "vocab_size": vocab_size, "pad_id": pad_id, "heldout_fraction": heldout_fraction,
             "shard_sequences": shard_sequences, "build_seconds": round(time.time() - start, 1),
             "splits": {s: {"shards": writers[s].sizes, "sequences": sum(writers[s].sizes), "tokens": writers[s].tokens,
                            "lines": n_lines[s]} for s in SPLITS},
             **(index_extra or {})}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def fingerprint_of(inputs: dict, **params) -> str:
    """The shard set's fingerprint: a SHA-256 of the format version, the caller's ``inputs`` (corpus and
    tokenizer digests) and the build parameters."""
    record = {"format_version": FORMAT_VERSION, "inputs": inputs, **params}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def shard_set_path(cache_root: str, fingerprint: str) -> str:
    return os.path.join(cache_root, fingerprint[:16])


def find(cache_root: str, fingerprint: str) -> "ShardSet | None":
    """The complete shard set of ``fingerprint`` under ``cache_root``, or None."""
    path = shard_set_path(cache_root, fingerprint)
    if not storage.is_complete(path) or not storage.is_file(os.path.join(path, INDEX_FILE)):
        return None
    shards = ShardSet(path)
    return shards if shards.fingerprint == fingerprint else None


def prepare(spec: str, cache_root: str, tokenizer, *, inputs: dict, max_length: int, pack: bool = True,
            heldout_fraction: float = 0.01, shard_sequences: int = 65536) -> "ShardSet":
    """The shard set of corpus ``spec`` tokenised by ``tokenizer`` (:class:`models.tokenization.Tokenizer`):
    reused from ``cache_root`` when one with the same fingerprint is there, else built (streaming) and published.

    ``inputs`` identifies the corpus and tokenizer content (e.g. ``{"corpus": digest, "tokenizer": digest}``);
    it and the build parameters make the fingerprint.
    """
    specials = tokenizer.special_ids()
    missing = [k for k in ("cls_token", "sep_token", "pad_token") if specials.get(k) is None]
    if missing:
        raise ValueError(f"the tokenizer {tokenizer.source} lacks {missing}: packing needs [CLS], [SEP] and [PAD]")
    params = dict(max_length=max_length, pack=pack, heldout_fraction=heldout_fraction, shard_sequences=shard_sequences,
                  vocab_size=tokenizer.vocab_size)
    key = fingerprint_of(inputs, **params)
    found = find(cache_root, key)
    if found is not None:
        logging.info("corpus: reusing shard set %s (%s)", found.path, found.describe())
        return found
    source = parse_source(spec)
    path = shard_set_path(cache_root, key)
    logging.info("corpus: tokenising %s into %s", spec, path)
    with storage.atomic_directory(path, overwrite=True) as tmp:
        build(iter_lines(source), tmp, tokenizer.token_ids, max_length=max_length, cls_id=specials["cls_token"],
              sep_id=specials["sep_token"], pad_id=specials["pad_token"], vocab_size=tokenizer.vocab_size, pack=pack,
              heldout_fraction=heldout_fraction, shard_sequences=shard_sequences,
              index_extra={"fingerprint": key, "inputs": inputs, "corpus": spec, "tokenizer": tokenizer.source})
    shards = ShardSet(path)
    logging.info("corpus: %s", shards.describe())
    return shards


class ShardSet:
    """A published shard set (see the module docstring): its index, its splits and the token counts."""

    def __init__(self, path: str):
        self.path = path
        self.index = json.loads(storage.read_text(os.path.join(path, INDEX_FILE)))
        if self.index.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: shard set format {self.index.get('format_version')} is not "
                             f"{FORMAT_VERSION}; delete it to rebuild")
        self.fingerprint = self.index.get("fingerprint")
        self.max_length = int(self.index["max_length"])

    def split(self, name: str) -> "CorpusSplit":
        if name not in SPLITS:
            raise ValueError(f"unknown corpus split {name!r}; known: {SPLITS}")
        return CorpusSplit(self.path, name, self.index["splits"][name]["shards"], self.max_length)

    def token_counts(self) -> np.ndarray:
        return np.load(io.BytesIO(storage.read_bytes(os.path.join(self.path, COUNTS_FILE))))

    def describe(self) -> str:
        s = self.index["splits"]
        return ", ".join(f"{name} {s[name]['sequences']:,} sequences of <= {self.max_length} ({s[name]['tokens']:,} "
                         f"tokens, {s[name]['lines']:,} lines, {len(s[name]['shards'])} shard(s))" for name in SPLITS)


class CorpusSplit:
    """One split of a shard set: ``len()`` sequences, read by position (:meth:`rows`) or in the seeded order of
    an epoch (:meth:`epoch_positions`)."""

    def __init__(self, root: str, name: str, shard_sizes: list[int], max_length: int, cached_shards: int = 2):
        self.root, self.name, self.max_length = root, name, max_length
        self.sizes = np.asarray(shard_sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self._shards: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached = cached_shards

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._shards:
            base = os.path.join(self.root, f"{self.name}-{k:05d}")
            if storage.is_remote(base):
                load = lambda p: np.load(io.BytesIO(storage.read_bytes(p)))
            else:
                load = lambda p: np.load(p, mmap_mode="r")
            self._shards[k] = (load(base + ".ids.npy"), load(base + ".len.npy"))
            while len(self._shards) > self._cached:
                self._shards.popitem(last=False)
        self._shards.move_to_end(k)
        return self._shards[k]

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [k, L], lengths int32 [k])`` of the sequences at ``positions`` (in the split's order)."""
        positions = np.asarray(positions, np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"corpus {self.name}: positions outside [0, {len(self)})")
        ids = np.zeros((len(positions), self.max_length), np.int32)
        lengths = np.zeros(len(positions), np.int32)
        shard_of = np.searchsorted(self.offsets, positions, side="right") - 1
        for k in np.unique(shard_of):
            where = np.nonzero(shard_of == k)[0]
            shard_ids, shard_len = self._shard(int(k))
            local = positions[where] - self.offsets[k]
            ids[where] = shard_ids[local]
            lengths[where] = shard_len[local]
        return ids, lengths

    def _perm(self, seed: int, epoch: int, shard: int) -> np.ndarray:
        key = (seed, epoch, shard)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([seed, epoch, shard + 1]).permutation(int(self.sizes[shard]))
            while len(self._perms) > self._cached:
                self._perms.popitem(last=False)
        return self._perms[key]

    def epoch_positions(self, seed: int, epoch: int, start: int, count: int) -> np.ndarray:
        """Positions ``start .. start + count - 1`` of epoch ``epoch``'s order (a function of ``seed`` and
        ``epoch`` only): shards in a seeded order, each shard's sequences in a seeded order."""
        if start < 0 or start + count > len(self):
            raise IndexError(f"corpus {self.name}: epoch positions [{start}, {start + count}) outside [0, {len(self)})")
        shard_order = np.random.default_rng([seed, epoch, 0]).permutation(len(self.sizes))
        ends = np.cumsum(self.sizes[shard_order])
        p = np.arange(start, start + count, dtype=np.int64)
        slot = np.searchsorted(ends, p, side="right")
        out = np.empty(count, np.int64)
        for s in np.unique(slot):
            where = np.nonzero(slot == s)[0]
            shard = int(shard_order[s])
            within = p[where] - (ends[s] - self.sizes[shard])
            out[where] = self.offsets[shard] + self._perm(seed, epoch, shard)[within]
        return out
