"""Layer maps: the papers' mappings, worked out by hand, and validation errors."""

import pytest

from compression.distillation import layer_maps as M


def test_uniform_every_kth_layer_and_embeddings():
    assert M.uniform(6, 12) == {1: 2, 2: 4, 3: 6, 4: 8, 5: 10, 6: 12}  # DistilBERT-style every other layer
    assert M.uniform(4, 12, include_embeddings=True) == {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}  # TinyBERT-4: g(m) = 3m
    assert M.uniform(4, 6) == {1: 1, 2: 3, 3: 4, 4: 6}  # floor(m * 6 / 4): the top still maps to the top
    assert M.uniform(3, 3) == {1: 1, 2: 2, 3: 3}


def test_pkd_skip_and_last():
    assert M.skip(6, 12) == {1: 2, 2: 4, 3: 6, 4: 8, 5: 10}  # PKD-skip {2, 4, 6, 8, 10}
    assert M.skip(3, 12) == {1: 4, 2: 8}
    assert M.last(6, 12) == {1: 7, 2: 8, 3: 9, 4: 10, 5: 11}  # PKD-last {7, ..., 11}
    assert M.last(3, 12) == {1: 10, 2: 11}  # PKD's code: fc_layer_idx "9,10" (0-based layer outputs)
    assert M.skip(1, 12) == {} and M.last(1, 12) == {}


def test_build_dispatches_by_name():
    assert M.build("last", 3, 6) == M.last(3, 6)
    assert M.build("uniform", 2, 4, include_embeddings=True) == {0: 0, 1: 2, 2: 4}
    with pytest.raises(ValueError, match="unknown layer map kind 'every'; known: uniform, skip, last"):
        M.build("every", 3, 6)


def test_custom_maps_are_validated_and_sorted():
    assert list(M.custom({3: 12, 0: 0, 1: 5}, 3, 12)) == [0, 1, 3]
    with pytest.raises(ValueError, match=r"teacher layer 13 is past the teacher's depth 12 \(valid 0..12"):
        M.custom({1: 4, 2: 13}, 3, 12)
    with pytest.raises(ValueError, match="student layer 4 is outside the student's depth 3"):
        M.custom({4: 4}, 3, 12)
    with pytest.raises(ValueError, match="teacher layer -1 is past"):
        M.custom({1: -1}, 3, 12)
    with pytest.raises(TypeError, match="teacher layer must be an int, got float"):
        M.custom({1: 2.0}, 3, 12)
    with pytest.raises(TypeError, match="must be a mapping"):
        M.custom([(1, 2)], 3, 12)


def test_bad_depths():
    with pytest.raises(ValueError, match=r"student \(12 layers\) is deeper than the teacher \(6 layers\)"):
        M.uniform(12, 6)
    with pytest.raises(ValueError, match="n_teacher must be an int >= 1, got 0"):
        M.skip(3, 0)
