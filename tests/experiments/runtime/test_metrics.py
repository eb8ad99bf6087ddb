"""Metrics against values worked out by hand (see the comments for each computation)."""

import numpy as np
import pytest

from experiments.runtime import metrics

# preds vs labels: TP = idx 0, 3, 5; TN = idx 1; FP = idx 2; FN = idx 4.
PREDS = np.array([1, 0, 1, 1, 0, 1])
LABELS = np.array([1, 0, 0, 1, 1, 1])


def test_binary_metrics_by_hand():
    m = metrics.classification_metrics(PREDS, LABELS, 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3 - 1) / sqrt(4*4*2*2) = 0.25
    assert m["mcc"] == pytest.approx(0.25)


def test_weights_drop_and_scale_examples():
    # Weight 0 on idx 4 removes the only FN: TP 3, TN 1, FP 1, FN 0.
    m = metrics.classification_metrics(PREDS, LABELS, 2, weights=np.array([1, 1, 1, 1, 0, 1.0]))
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(6 / 7)
    assert m["mcc"] == pytest.approx(3 / np.sqrt(4 * 3 * 2 * 1))
    # Weight 2 on the FP (idx 2): TP 3, TN 1, FP 2, FN 1, as if that example appeared twice.
    m = metrics.classification_metrics(PREDS, LABELS, 2, weights=np.array([1, 1, 2, 1, 1, 1.0]))
    twice = metrics.classification_metrics(np.append(PREDS, 1), np.append(LABELS, 0), 2)
    assert m["accuracy"] == pytest.approx(4 / 7) == twice["accuracy"]
    assert m["f1"] == pytest.approx(6 / 9) == twice["f1"]
    assert m["mcc"] == pytest.approx(1 / np.sqrt(5 * 4 * 3 * 2)) == twice["mcc"]


def test_ignored_labels_are_skipped():
    m = metrics.classification_metrics(np.append(PREDS, 0), np.append(LABELS, metrics.IGNORE_INDEX), 2)
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_multiclass_mcc_and_macro_f1():
    # Confusion matrix C[gold, pred] = [[2,1,0],[0,1,1],[1,0,2]].
    pairs = [(0, 0)] * 2 + [(0, 1)] + [(1, 1)] + [(1, 2)] + [(2, 0)] + [(2, 2)] * 2
    labels, preds = map(np.array, zip(*pairs))
    cm = metrics.confusion_matrix(preds, labels, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [1, 0, 2]])
    # Gorodkin: c = 5, s = 8, t = p = [3, 2, 3]: (5*8 - 22) / (64 - 22) = 18 / 42.
    assert metrics.matthews_corrcoef(cm) == pytest.approx(18 / 42)
    # Per-class F1: 2*2/(4+1+1), 2*1/(2+1+1), 2*2/(4+1+1).
    assert metrics.f1(cm, positive=None) == pytest.approx((4 / 6 + 2 / 4 + 4 / 6) / 3)
    m = metrics.classification_metrics(preds, labels, 3)
    assert m["f1"] == pytest.approx((4 / 6 + 2 / 4 + 4 / 6) / 3)


def test_degenerate_cases():
    assert metrics.matthews_corrcoef(metrics.confusion_matrix([1, 1, 1], [0, 1, 1], 2)) == 0.0
    assert metrics.classification_metrics([0, 1], [0, 1], 2)["mcc"] == pytest.approx(1.0)
    assert metrics.classification_metrics([1, 0], [0, 1], 2)["mcc"] == pytest.approx(-1.0)
    assert metrics.f1(metrics.confusion_matrix([0, 0], [0, 0], 2)) == 0.0  # no positives anywhere


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match="prediction outside"):
        metrics.confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="not in BIO"):
        metrics.bio_spans(["B-PER", "E-PER"])


@pytest.mark.parametrize("tags, spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 2), ("LOC", 3, 4)}),
    (["I-PER", "I-PER", "O"], {("PER", 0, 2)}),  # an I- without B- starts an entity (conlleval)
    (["B-PER", "I-LOC"], {("PER", 0, 1), ("LOC", 1, 2)}),  # type change splits
    (["B-PER", "B-PER"], {("PER", 0, 1), ("PER", 1, 2)}),  # B- after B- of the same type is a new entity
    (["O", "O"], set()),
    (["O", "B-ORG", "I-ORG", "I-ORG"], {("ORG", 1, 4)}),  # entity running to the end
])
def test_bio_spans(tags, spans):
    assert metrics.bio_spans(tags) == spans


def test_span_f1_micro_average_by_hand():
    gold = [["B-PER", "I-PER"], ["B-LOC", "O", "B-ORG", "O", "O"]]
    pred = [["B-PER", "O"], ["B-LOC", "O", "B-ORG", "O", "B-PER"]]
    # Sentence 1: gold PER(0,2), pred PER(0,1): no match. Sentence 2: 2 matches, 1 spurious.
    # tp 2, predicted 4, gold 3: P 1/2, R 2/3, F 4/7.
    m = metrics.span_f1(pred, gold)
    assert m["span_precision"] == pytest.approx(0.5)
    assert m["span_recall"] == pytest.approx(2 / 3)
    assert m["span_f1"] == pytest.approx(4 / 7)


def test_token_metrics_drop_ignored_positions_and_padding_rows():
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    x = metrics.IGNORE_INDEX
    # Row 0 words (at non-ignored positions): gold B-PER I-PER O, pred B-PER I-PER O  -> 1 tp.
    # Row 1 words: gold B-LOC O, pred B-PER O -> 1 spurious, 1 missed. Row 2 is a padding row (weight 0).
    labels = np.array([[x, 1, x, 2, 0, x], [x, 3, 0, x, x, x], [x, 1, 1, 1, x, x]])
    preds = np.array([[0, 1, 4, 2, 0, 0], [0, 1, 0, 3, 3, 3], [0, 0, 0, 0, 0, 0]])
    m = metrics.token_metrics(preds, labels, names, weights=np.array([1.0, 1.0, 0.0]))
    assert m["span_precision"] == pytest.approx(1 / 2)
    assert m["span_recall"] == pytest.approx(1 / 2)
    assert m["span_f1"] == pytest.approx(1 / 2)
    assert m["token_accuracy"] == pytest.approx(4 / 5)  # 5 counted words, one wrong
