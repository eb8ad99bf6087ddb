"""A split of encoded examples and its batch iterator: static length buckets, deterministic shuffling,
cheap resume and per-host sharding.

Encoded examples are ragged (:class:`Ragged`): each feature belongs to a length *group* -- ``"subword"``
(``input_ids`` ...), ``"word"`` (``word_ids`` ...) or ``"word_b"`` (second text of a pair) -- and every
group has one length per example and a mask key. A batch pads each group to the smallest bucket length
that fits the longest row *of the global batch* (so every host gets the same shapes, as pmap across hosts
requires), which bounds the number of distinct shapes and hence of compilations.

Batch order: with ``shuffle`` the example order of an epoch is a permutation drawn from
``numpy.random.default_rng(SeedSequence([seed, epoch]))``, the same on every host; global batch ``i`` is
rows ``[i*B, (i+1)*B)`` of that order and host ``p`` of ``P`` takes its ``p``-th contiguous ``B/P`` rows.
Skipping ``start_batch`` batches costs one permutation, no encoding.

Eval batches (``drop_remainder=False``) keep a static shape: the last batch is filled up to ``B`` rows with
copies of its last real row carrying ``example_weight`` 0 and, for label features, only ignore values
(-100), so they change no loss or metric and feed the model valid inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

IGNORE = -100  # label value of positions (and padding rows) that no loss or metric counts

MASK_KEYS = {"subword": "attention_mask", "word": "word_mask", "word_b": "word_mask_b"}


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from 16 below ``max_length``, then ``max_length`` itself: 128 -> (16, 32, 64, 128)."""
    return tuple(b for b in (16, 32, 64, 128, 256, 512, 1024) if b < max_length) + (max_length,)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``; raises when none fits (lengths are truncated before batching)."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


@dataclasses.dataclass(frozen=True)
class Ragged:
    """One variable-length feature.

    ``rows[i]`` is example i's array with leading axis of its group's length (trailing axes, e.g. the
    characters of ``char_ids``, are fixed). Padding positions get ``pad``; ``is_label`` features are
    entirely ``IGNORE`` in eval padding rows.
    """

    group: str
    rows: list[np.ndarray]
    pad: int
    is_label: bool = False


@dataclasses.dataclass(frozen=True)
class Features:
    """Encoded examples: ``lengths[group]`` int [N]; ``ragged[key]``; ``scalars[key]`` int32 [N] (sequence
    labels); ``truncated[what]`` counts of examples cut to fit (for reports)."""

    lengths: dict[str, np.ndarray]
    ragged: dict[str, Ragged]
    scalars: dict[str, np.ndarray]
    truncated: dict[str, int] = dataclasses.field(default_factory=dict)

    def select(self, indices: np.ndarray) -> Features:
        return Features({g: v[indices] for g, v in self.lengths.items()},
                        {k: dataclasses.replace(r, rows=[r.rows[i] for i in indices]) for k, r in self.ragged.items()},
                        {k: v[indices] for k, v in self.scalars.items()}, dict(self.truncated))


class Split:
    """One split of a task: the raw examples and their encoded features.

    Raw examples: ``texts`` (and ``texts_b`` for pairs) for sequence tasks, ``tokens`` (word lists) for token
    tasks; ``labels`` is int32 [N] for sequence tasks, a list of int32 [n_words] tag arrays for token tasks.
    ``truncated`` counts examples cut to ``max_length`` per kind (``"subword"``, ``"word"``, ...).
    """

    def __init__(self, name: str, *, labels, features: Features, buckets: Sequence[int],
                 texts: list[str] | None = None, texts_b: list[str] | None = None,
                 tokens: list[list[str]] | None = None):
        if len(labels) == 0:
            raise ValueError(f"{name}: empty split")
        self.name = name
        self.labels = labels
        self.texts, self.texts_b, self.tokens = texts, texts_b, tokens
        self.features = features
        self.buckets = tuple(sorted(buckets))
        self.truncated = features.truncated
        for group, lengths in features.lengths.items():
            if len(lengths) != len(labels):
                raise ValueError(f"{name}: {group} lengths cover {len(lengths)} examples, expected {len(labels)}")
            if len(lengths) and lengths.max() > self.buckets[-1]:
                raise ValueError(f"{name}: a {group} row of length {lengths.max()} exceeds the largest bucket "
                                 f"{self.buckets[-1]}")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"Split({self.name!r}, {len(self)} examples)"

    def select(self, indices: Sequence[int]) -> Split:
        """A new split with the examples at ``indices`` (e.g. a quick subset), in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]
        labels = self.labels[idx] if isinstance(self.labels, np.ndarray) else pick(self.labels)
        return Split(self.name, labels=labels, features=self.features.select(idx), buckets=self.buckets,
                     texts=pick(self.texts), texts_b=pick(self.texts_b), tokens=pick(self.tokens))

    def num_batches(self, batch_size: int, *, drop_remainder: bool) -> int:
        """Global batches per epoch."""
        return len(self) // batch_size if drop_remainder else math.ceil(len(self) / batch_size)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                start_batch: int = 0, drop_remainder: bool = False, process_index: int = 0,
                process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Iterates over one epoch of batches, from global batch ``start_batch`` on.

        ``batch_size`` is the global batch; this process yields ``batch_size // process_count`` rows of
        each. Every batch is a dict of arrays with leading dim ``batch_size // process_count``:
        the ragged features (int32 [B, L] or [B, L, C]) and one int32 [B, L] mask per group, with L the
        group's bucket; ``labels`` int32 [B] for sequence tasks; ``example_weight`` float32 [B] (1 for real
        rows, 0 for eval padding rows). Arguments are checked here, before iteration starts.
        """
        if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad batch_size={batch_size}, process_index={process_index}, "
                             f"process_count={process_count}")
        if batch_size % process_count:
            raise ValueError(f"global batch size {batch_size} is not divisible by process_count={process_count}")
        if not self.features.ragged:
            raise ValueError(f"{self.name}: no input features; load the task with tokenizer= or word_vocab=")
        total = self.num_batches(batch_size, drop_remainder=drop_remainder)
        if total == 0:
            raise ValueError(f"{self.name}: {len(self)} examples give no full batch of {batch_size}")
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch={start_batch} outside [0, {total}] for {self.name}")
        if shuffle:
            order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(self))
        else:
            order = np.arange(len(self))
        local = batch_size // process_count
        return self._iterate(order, batch_size, range(start_batch, total),
                             slice(process_index * local, (process_index + 1) * local))

    def stream(self, batch_size: int, *, seed: int = 0, start_step: int = 0, process_index: int = 0,
               process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Endless shuffled training batches (``drop_remainder``), epoch after epoch; step ``t`` is batch
        ``t % n`` of epoch ``t // n``, so a resumed run passes its step as ``start_step``."""
        per_epoch = self.num_batches(batch_size, drop_remainder=True)
        if per_epoch == 0 or start_step < 0:
            raise ValueError(f"{self.name}: cannot stream batches of {batch_size} from {len(self)} examples "
                             f"starting at step {start_step}")
        args = {"shuffle": True, "seed": seed, "drop_remainder": True, "process_index": process_index,
                "process_count": process_count}
        first = self.batches(batch_size, epoch=start_step // per_epoch, start_batch=start_step % per_epoch, **args)

        def run():
            yield from first
            epoch = start_step // per_epoch + 1
            while True:
                yield from self.batches(batch_size, epoch=epoch, **args)
                epoch += 1
        return run()

    def _iterate(self, order, batch_size, batch_range, host_rows):
        for b in batch_range:
            idx = order[b * batch_size:(b + 1) * batch_size]
            weight = np.ones(batch_size, np.float32)
            if len(idx) < batch_size:
                weight[len(idx):] = 0.0
                idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
            yield self._assemble(idx, weight, host_rows)

    def _assemble(self, idx: np.ndarray, weight: np.ndarray, host_rows: slice) -> dict[str, np.ndarray]:
        feats = self.features
        widths = {g: pick_bucket(int(lengths[idx].max()), self.buckets) for g, lengths in feats.lengths.items()}
        rows, weight = idx[host_rows], weight[host_rows]
        padding = weight == 0
        batch = {}
        for group, width in widths.items():
            lengths = feats.lengths[group][rows]
            batch[MASK_KEYS[group]] = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
        for key, feat in feats.ragged.items():
            width = widths[feat.group]
            first = feat.rows[rows[0]]
            out = np.full((len(rows), width) + first.shape[1:], feat.pad, np.int32)
            for r, i in enumerate(rows):
                out[r, :len(feat.rows[i])] = feat.rows[i]
            if feat.is_label:
                out[padding] = IGNORE
            batch[key] = out
        for key, values in feats.scalars.items():
            batch[key] = values[rows].astype(np.int32)
        batch["example_weight"] = weight
        return batch
