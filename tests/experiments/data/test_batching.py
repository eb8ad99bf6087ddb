import itertools

import numpy as np
import pytest

from experiments.data.batching import Features, Ragged, Split, default_buckets, pick_bucket

LENGTHS = [3, 20, 5, 7, 40, 2, 9, 16, 17, 1]  # example i has input_ids [i+1] * LENGTHS[i]


def make_split(lengths=LENGTHS, buckets=(16, 32, 64)) -> Split:
    rows = [np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)]
    labels = np.arange(len(lengths), dtype=np.int32) % 3
    feats = Features({"subword": np.array(lengths)}, {"input_ids": Ragged("subword", rows, 0)}, {"labels": labels})
    return Split("toy", labels=labels, features=feats, buckets=buckets)


def example_ids(batch) -> list[int]:
    return (batch["input_ids"][:, 0] - 1).tolist()


def test_default_buckets_and_pick():
    assert default_buckets(128) == (16, 32, 64, 128)
    assert default_buckets(100) == (16, 32, 64, 100)
    assert default_buckets(16) == (16,)
    assert [pick_bucket(n, (16, 32, 64)) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        pick_bucket(65, (16, 32, 64))


def test_rows_padded_to_smallest_bucket_that_fits_the_batch():
    batches = list(make_split().batches(2))
    # batches hold examples (0,1), (2,3), (4,5), (6,7), (8,9): longest rows 20, 7, 40, 16, 17.
    assert [b["input_ids"].shape[1] for b in batches] == [32, 16, 64, 16, 32]
    b = batches[0]
    assert b["input_ids"][0].tolist() == [1] * 3 + [0] * 29
    assert b["attention_mask"].sum(1).tolist() == [3, 20]
    assert b["labels"].tolist() == [0, 1] and b["labels"].dtype == np.int32
    assert b["example_weight"].dtype == np.float32 and b["attention_mask"].dtype == np.int32


def test_shuffle_is_a_deterministic_permutation_per_seed_and_epoch():
    split = make_split()
    order = lambda **kw: sum((example_ids(b) for b in split.batches(5, shuffle=True, **kw)), [])
    assert order(seed=3, epoch=1) == order(seed=3, epoch=1)
    assert sorted(order(seed=3, epoch=1)) == list(range(10))
    assert order(seed=3, epoch=1) != order(seed=3, epoch=2)
    assert order(seed=3, epoch=1) != order(seed=4, epoch=1)
    expected = np.random.default_rng(np.random.SeedSequence([3, 1])).permutation(10).tolist()
    assert order(seed=3, epoch=1) == expected
    assert sum((example_ids(b) for b in split.batches(5)), []) == list(range(10))


def test_start_batch_equals_skipping():
    split = make_split()
    full = list(split.batches(2, shuffle=True, seed=7, epoch=2))
    resumed = list(split.batches(2, shuffle=True, seed=7, epoch=2, start_batch=3))
    assert len(resumed) == 2
    for a, b in zip(full[3:], resumed):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert list(split.batches(2, start_batch=5)) == []


def test_hosts_get_disjoint_slices_whose_union_is_the_global_batch():
    split = make_split()
    kw = dict(shuffle=True, seed=1, drop_remainder=False)
    one = list(split.batches(4, **kw))
    hosts = [list(split.batches(4, process_index=p, process_count=2, **kw)) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(one) == 3
    for whole, h0, h1 in zip(one, *hosts):
        for key in whole:
            assert h0[key].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), whole[key])
    # Same width on both hosts even when one host's rows are all short (global bucket).
    assert all(h0["input_ids"].shape == h1["input_ids"].shape for h0, h1 in zip(*hosts))


def test_global_batch_must_divide_among_hosts():
    with pytest.raises(ValueError, match="not divisible by process_count=4"):
        make_split().batches(6, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        make_split().batches(4, process_index=2, process_count=2)


def test_eval_pads_last_batch_with_zero_weight_rows():
    batches = list(make_split().batches(4, drop_remainder=False))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 4]
    last = batches[-1]
    np.testing.assert_array_equal(last["example_weight"], [1, 1, 0, 0])
    assert example_ids(last) == [8, 9, 9, 9]  # padding rows copy the last real row
    seen = [i for b in batches for i, w in zip(example_ids(b), b["example_weight"]) if w == 1]
    assert sorted(seen) == list(range(10))  # every example counted once


def test_drop_remainder_and_too_small_split():
    split = make_split()
    assert [len(b["labels"]) for b in split.batches(4, drop_remainder=True)] == [4, 4]
    assert split.num_batches(4, drop_remainder=True) == 2 and split.num_batches(4, drop_remainder=False) == 3
    with pytest.raises(ValueError, match="give no full batch of 16"):
        split.batches(16, drop_remainder=True)


def test_stream_cycles_epochs_and_resumes_at_any_step():
    split = make_split()
    steps = list(itertools.islice(split.stream(4, seed=2), 7))  # 2 batches per epoch
    for t, batch in enumerate(steps):
        expected = list(split.batches(4, shuffle=True, seed=2, epoch=t // 2, drop_remainder=True))[t % 2]
        assert example_ids(batch) == example_ids(expected)
    resumed = list(itertools.islice(split.stream(4, seed=2, start_step=3), 4))
    assert [example_ids(b) for b in resumed] == [example_ids(b) for b in steps[3:]]


def test_bad_iteration_arguments():
    with pytest.raises(ValueError, match=r"start_batch=9 outside \[0, 5\]"):
        make_split().batches(2, start_batch=9)
    feats = Features({}, {}, {"labels": np.zeros(3, np.int32)})
    with pytest.raises(ValueError, match="no input features"):
        Split("raw", labels=np.zeros(3, np.int32), features=feats, buckets=(16,)).batches(2)
    with pytest.raises(ValueError, match="empty split"):
        Split("none", labels=np.zeros(0, np.int32), features=feats, buckets=(16,))
    with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
        make_split(buckets=(16, 32))


def test_select_keeps_examples_and_features_together():
    sub = make_split().select([4, 0])
    assert len(sub) == 2 and example_ids(next(sub.batches(2))) == [4, 0]
    assert sub.labels.tolist() == [1, 0]
