"""Evaluation metrics on host numpy arrays: accuracy, F1, Matthews correlation, entity-level span F1.

All functions take predictions and gold labels of the same shape and optional per-example ``weights``
(float; 0 drops an example, which is how the padding rows of the last eval batch are ignored). The
classification metrics are computed from a weighted confusion matrix, so they agree with scikit-learn's
``sample_weight`` conventions; span F1 follows seqeval's default (conlleval) chunking of BIO tags.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

IGNORE_INDEX = -100  # label value of positions that no metric (and no loss) looks at


def confusion_matrix(preds, labels, num_classes: int, weights=None) -> np.ndarray:
    """Weighted confusion matrix ``C[gold, pred]``, float64 [num_classes, num_classes].

    preds, labels: int arrays of one shape (any rank); weights: broadcastable to it, default 1.
    Positions whose label is ``IGNORE_INDEX`` are skipped.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} differ in shape")
    w = np.ones(labels.shape) if weights is None else np.broadcast_to(np.asarray(weights, np.float64),
                                                                       labels.shape)
    keep = (labels != IGNORE_INDEX) & (w != 0)
    p, g, w = preds[keep].astype(np.int64), labels[keep].astype(np.int64), w[keep]
    for name, a in (("prediction", p), ("label", g)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} outside [0, {num_classes}): min {a.min()}, max {a.max()}")
    cm = np.zeros((num_classes, num_classes), np.float64)
    np.add.at(cm, (g, p), w)
    return cm


def accuracy(cm: np.ndarray) -> float:
    """Fraction of (weighted) examples on the diagonal; 0.0 for an empty matrix."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def f1(cm: np.ndarray, *, positive: int | None = 1) -> float:
    """F1 of class ``positive`` (binary tasks: MRPC's convention), or macro F1 over classes if ``None``."""
    if positive is not None:
        tp = cm[positive, positive]
        return _f1(tp, cm[:, positive].sum() - tp, cm[positive, :].sum() - tp)
    scores = [_f1(cm[k, k], cm[:, k].sum() - cm[k, k], cm[k, :].sum() - cm[k, k]) for k in range(len(cm))]
    return float(np.mean(scores))


def matthews_corrcoef(cm: np.ndarray) -> float:
    """Matthews correlation (Gorodkin's multi-class R_K; the usual MCC for two classes). 0.0 if undefined."""
    t = cm.sum(axis=1)  # gold counts per class
    p = cm.sum(axis=0)  # predicted counts per class
    c, s = np.trace(cm), cm.sum()
    cov = c * s - t @ p
    denom = np.sqrt(s * s - p @ p) * np.sqrt(s * s - t @ t)
    return float(cov / denom) if denom else 0.0


def classification_metrics(preds, labels, num_classes: int, weights=None) -> dict[str, float]:
    """accuracy, f1 (positive class 1 when binary, else macro) and mcc of sequence-level predictions."""
    cm = confusion_matrix(preds, labels, num_classes, weights)
    return {"accuracy": accuracy(cm), "f1": f1(cm, positive=1 if num_classes == 2 else None),
            "mcc": matthews_corrcoef(cm)}


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''). Raises on a tag that is not BIO."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I") or not kind:
        raise ValueError(f"tag {tag!r} is not in BIO format (O, B-TYPE, I-TYPE)")
    return prefix, kind


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, start, end_exclusive)`` of one BIO tag sequence, conlleval style.

    An entity begins at ``B-X``, or at ``I-X`` that does not continue an entity of type X (seqeval's default
    mode counts such an ``I-X`` as a start); it extends over the following ``I-X`` tags.
    """
    spans, kind, start = set(), None, 0
    for i, tag in enumerate(tags):
        prefix, t = _split_tag(tag)
        continues = prefix == "I" and t == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix != "O" and not continues:
            kind, start = t, i
    if kind is not None:
        spans.add((kind, start, len(tags)))
    return spans


def span_f1(pred_tags: Iterable[Sequence[str]], gold_tags: Iterable[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity-level precision, recall and F1 over sentences (exact span and type match)."""
    tp = n_pred = n_gold = 0
    for pred, gold in zip(pred_tags, gold_tags, strict=True):
        if len(pred) != len(gold):
            raise ValueError(f"predicted and gold tag sequences differ in length: {len(pred)} vs {len(gold)}")
        ps, gs = bio_spans(pred), bio_spans(gold)
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"span_precision": float(precision), "span_recall": float(recall), "span_f1": float(f)}


def token_metrics(preds, labels, label_names: Sequence[str], weights=None) -> dict[str, float]:
    """Span P/R/F1 and token accuracy for token classification.

    preds, labels: int [N, S]; positions with label ``IGNORE_INDEX`` (special tokens, padding, non-first
    word pieces) are dropped, so each row becomes the word-level tag sequence. weights: [N]; rows with
    weight 0 are skipped entirely.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.ndim != 2 or preds.shape != labels.shape:
        raise ValueError(f"token metrics need [N, S] predictions and labels, got {preds.shape} and {labels.shape}")
    w = np.ones(len(labels)) if weights is None else np.asarray(weights)
    names = list(label_names)
    pred_seqs, gold_seqs = [], []
    for p, g, wi in zip(preds, labels, w):
        if wi == 0:
            continue
        keep = g != IGNORE_INDEX
        pred_seqs.append([names[k] for k in p[keep]])
        gold_seqs.append([names[k] for k in g[keep]])
    out = span_f1(pred_seqs, gold_seqs)
    out["token_accuracy"] = accuracy(confusion_matrix(preds, labels, len(names), w[:, None]))
    return out
