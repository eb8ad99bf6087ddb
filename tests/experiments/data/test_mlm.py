"""Masking for masked-language modelling: rates, the 80/10/10 rule, special tokens and padding, frequency smoothing,
prediction slots, determinism."""

import numpy as np
import pytest

from experiments.data import mlm

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIAL = np.array([PAD, CLS, SEP, MASK, UNK])
VOCAB = 1000
RANDOM_IDS = np.arange(5, VOCAB)


def _batch(rows=400, length=64, seed=0):
    """Packed-looking sequences: [CLS] words [SEP] words [SEP], some padded, an [UNK] here and there."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (rows, length))
    ids[:, 0] = CLS
    ids[:, 20] = SEP
    lengths = rng.integers(10, length + 1, rows)
    ids[np.arange(rows), lengths - 1] = SEP
    ids[rng.random((rows, length)) < 0.02] = UNK
    ids[np.arange(length)[None, :] >= lengths[:, None]] = PAD
    maskable = (np.arange(length)[None, :] < lengths[:, None]) & ~np.isin(ids, SPECIAL)
    return ids, maskable


def _mask(ids, maskable, seed=1, **kw):
    return mlm.mask_tokens(ids, maskable, np.random.default_rng(seed), mask_id=MASK, random_ids=RANDOM_IDS, **kw)


def test_rate_per_sequence_and_overall():
    ids, maskable = _batch()
    _, labels = _mask(ids, maskable, rate=0.15)
    chosen = labels != mlm.IGNORE
    per_row, m = chosen.sum(1), maskable.sum(1)
    assert np.all(np.abs(per_row - 0.15 * m) < 1.0)  # floor(rate * m + u): within one token of rate * m
    assert chosen.sum() / m.sum() == pytest.approx(0.15, abs=0.005)  # unbiased over the batch
    assert np.all(labels[chosen] == ids[chosen]) and np.all(labels[~chosen] == mlm.IGNORE)


def test_special_tokens_and_padding_are_never_chosen_nor_drawn():
    ids, maskable = _batch()
    inputs, labels = _mask(ids, maskable, rate=0.5)
    chosen = labels != mlm.IGNORE
    assert not np.any(chosen & ~maskable)  # [CLS], [SEP], [UNK], padding stay unpredicted
    assert np.array_equal(inputs[~chosen], ids[~chosen])  # unchosen tokens are untouched
    changed = chosen & (inputs != MASK) & (inputs != ids)
    assert changed.any() and not np.isin(inputs[changed], SPECIAL).any()  # random ids are never special


def test_80_10_10():
    ids, maskable = _batch(rows=2000)
    inputs, labels = _mask(ids, maskable, rate=0.15)
    chosen = labels != mlm.IGNORE
    n = chosen.sum()
    masked = (inputs[chosen] == MASK).sum() / n
    kept = (inputs[chosen] == ids[chosen]).sum() / n
    randomised = 1 - masked - kept
    # binomial standard errors at n ~ 70,000 chosen tokens are ~0.0015; a random draw equals the original 1/995
    assert masked == pytest.approx(0.8, abs=0.006)
    assert kept == pytest.approx(0.1 + 0.1 / len(RANDOM_IDS), abs=0.005)
    assert randomised == pytest.approx(0.1 - 0.1 / len(RANDOM_IDS), abs=0.005)


def test_other_fractions_and_no_masking():
    ids, maskable = _batch()
    inputs, labels = _mask(ids, maskable, rate=0.2, mask_fraction=1.0, random_fraction=0.0)
    chosen = labels != mlm.IGNORE
    assert np.all(inputs[chosen] == MASK)
    inputs, labels = _mask(ids, maskable, rate=0.0)
    assert np.array_equal(inputs, ids) and np.all(labels == mlm.IGNORE)


def test_frequency_smoothing_prefers_rare_tokens_as_distilbert_does():
    """Token 5 makes up ~90% of the text, token 6 ~10%. Uniform masking predicts them in proportion; DistilBERT's
    weights count ** -0.7 make each 6 about (9) ** 0.7 = 4.7 times as likely to be chosen as each 5."""
    rng = np.random.default_rng(0)
    ids = np.where(rng.random((3000, 40)) < 0.9, 5, 6)
    ids[:, 0], ids[:, -1] = CLS, SEP
    maskable = ~np.isin(ids, SPECIAL)
    counts = np.bincount(ids.ravel(), minlength=VOCAB)
    weights = mlm.smoothed_weights(counts, 0.7, SPECIAL)
    assert weights[SPECIAL].sum() == 0 and weights[5] < weights[6] and weights[7] == 1.0  # unseen: count 1
    _, uniform = _mask(ids, maskable, rate=0.1)
    _, smoothed = _mask(ids, maskable, rate=0.1, token_weights=weights)

    def chance(labels, token):  # share of the token's occurrences that were chosen
        return ((labels == token) & (ids == token)).sum() / (ids == token).sum()

    assert chance(uniform, 6) / chance(uniform, 5) == pytest.approx(1.0, abs=0.1)
    # sampling without replacement within a sequence pulls the ratio below the weight ratio; it stays far above 1
    assert chance(smoothed, 6) / chance(smoothed, 5) > 3.0
    assert (smoothed != mlm.IGNORE).sum(1).mean() == pytest.approx(0.1 * 38, abs=0.1)  # the rate is unchanged


def test_same_generator_same_masks_and_step_streams_differ():
    ids, maskable = _batch(rows=20)
    a = mlm.mask_tokens(ids, maskable, mlm.step_rng(3, 7), mask_id=MASK, random_ids=RANDOM_IDS)
    b = mlm.mask_tokens(ids, maskable, mlm.step_rng(3, 7), mask_id=MASK, random_ids=RANDOM_IDS)
    c = mlm.mask_tokens(ids, maskable, mlm.step_rng(3, 8), mask_id=MASK, random_ids=RANDOM_IDS)
    d = mlm.mask_tokens(ids, maskable, mlm.step_rng(3, 7, stream=1), mask_id=MASK, random_ids=RANDOM_IDS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[1], d[1])


def test_prediction_slots_gather_in_order_and_pad():
    labels = np.full((3, 10), mlm.IGNORE)
    labels[0, [2, 7]] = [11, 17]
    labels[1, [1, 4, 9]] = [21, 24, 29]
    positions, gathered = mlm.prediction_slots(labels, 3)
    assert positions.tolist() == [[2, 7, 0], [1, 4, 9], [0, 0, 0]]
    assert gathered.tolist() == [[11, 17, -100], [21, 24, 29], [-100, -100, -100]]
    ids, maskable = _batch(length=128)
    _, labels = _mask(ids, maskable)
    positions, gathered = mlm.prediction_slots(labels, mlm.max_predictions(128, 0.15))
    assert np.array_equal(np.take_along_axis(labels, positions, 1)[gathered != -100], gathered[gathered != -100])
    assert (gathered != -100).sum() == (labels != -100).sum()
    with pytest.raises(ValueError, match="more than its 2 slots"):
        mlm.prediction_slots(np.where(np.arange(5) < 3, 1, mlm.IGNORE)[None], 2)


def test_bad_arguments():
    ids, maskable = _batch(rows=2)
    with pytest.raises(ValueError, match="rate"):
        _mask(ids, maskable, rate=1.5)
    with pytest.raises(ValueError, match="sum to at most 1"):
        _mask(ids, maskable, mask_fraction=0.8, random_fraction=0.3)
    with pytest.raises(ValueError, match="same"):
        _mask(ids, maskable[:, :5])
