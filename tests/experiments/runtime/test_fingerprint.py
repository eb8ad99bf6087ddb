"""Fingerprints of configs, files and parameters, their differences, and the resume check."""

import hashlib
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.runtime import fingerprint
from experiments.runtime.fingerprint import FingerprintMismatchError


def _config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.layers = (2, 4)
    c.log_every_steps = 50
    c.checkpoint = ml_collections.ConfigDict({"keep": 2, "async_save": True, "best_metric": "accuracy"})
    c.optimizer = ml_collections.ConfigDict({"learning_rate": 1e-4, "schedule": "linear"})
    return c


def test_config_fingerprint_flattens_and_drops_the_neutral_fields():
    assert fingerprint.config_fingerprint(_config()) == {
        "checkpoint.best_metric": "accuracy", "layers": [2, 4], "optimizer.learning_rate": 1e-4,
        "optimizer.schedule": "linear", "seed": 0}
    assert fingerprint.config_fingerprint(_config(), exclude=("optimizer", "seed")) == {
        "checkpoint.async_save": True, "checkpoint.best_metric": "accuracy", "checkpoint.keep": 2,
        "layers": [2, 4], "log_every_steps": 50}


def test_diff_names_each_changed_added_and_removed_field():
    old = {"seed": 0, "optimizer.learning_rate": 1e-4, "gone": "x", "same": [1]}
    new = {"seed": 1, "optimizer.learning_rate": 2e-4, "added": None, "same": [1]}
    assert fingerprint.diff(old, new) == ['added: <absent> -> null', 'gone: "x" -> <absent>',
                                          "optimizer.learning_rate: 0.0001 -> 0.0002", "seed: 0 -> 1"]
    assert fingerprint.diff(old, dict(old)) == []


def test_check_raises_with_old_and_new_values_or_warns_when_allowed(caplog):
    stored = fingerprint.normalize({"batch_size": 32, "layers": (2, 4)})
    fingerprint.check(stored, {"batch_size": 32, "layers": (2, 4)}, where="ckpt 5")  # tuples equal lists
    with pytest.raises(FingerprintMismatchError, match=r"ckpt 5 was written by a run with a different config"
                                                       r"(.|\n)*batch_size: 32 -> 64(.|\n)*allow_changed_config"):
        fingerprint.check(stored, {"batch_size": 64, "layers": (2, 4)}, where="ckpt 5")
    with caplog.at_level(logging.WARNING):
        fingerprint.check(stored, {"batch_size": 64, "layers": [2, 4]}, where="ckpt 5", allow_changed=True)
        fingerprint.check(None, {"batch_size": 64}, where="ckpt 1")
    assert "batch_size: 32 -> 64" in caplog.text and "ckpt 1 holds no config fingerprint" in caplog.text


def test_non_finite_values_compare_equal_after_normalising():
    stored = fingerprint.normalize({"x": float("nan"), "y": float("inf")})
    assert stored == {"x": "nan", "y": "inf"}
    assert fingerprint.diff(stored, fingerprint.normalize({"x": float("nan"), "y": float("inf")})) == []


def test_file_fingerprint_hashes_small_files_and_stats_large_ones(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "vocab.txt").write_bytes(b"a\nb\n")
    (tmp_path / "d" / "sub" / "big.bin").write_bytes(b"\0" * 100)
    fp = fingerprint.file_fingerprint([tmp_path / "d"], hash_limit=10)
    big = os.stat(tmp_path / "d" / "sub" / "big.bin")
    assert fp == {str(tmp_path / "d" / "sub" / "big.bin"): {"size": 100, "mtime_ns": big.st_mtime_ns},
                  str(tmp_path / "d" / "vocab.txt"): {"sha256": hashlib.sha256(b"a\nb\n").hexdigest()}}
    assert fingerprint.file_fingerprint([str(tmp_path / "d" / "vocab.txt")]) == {
        str(tmp_path / "d" / "vocab.txt"): {"sha256": hashlib.sha256(b"a\nb\n").hexdigest()}}
    with pytest.raises(FileNotFoundError, match="cannot fingerprint .*nope"):
        fingerprint.file_fingerprint([tmp_path / "nope"])


def test_params_fingerprint_is_sha256_of_paths_dtypes_shapes_and_bytes():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    params = {"dense": {"kernel": w}, "key": jax.random.key(3)}
    h = hashlib.sha256()
    h.update(b"dense/kernel|float32|(2, 3);" + w.tobytes())
    key_data = np.asarray(jax.random.key_data(jax.random.key(3)))
    h.update(f"key|uint32|{key_data.shape};".encode() + key_data.tobytes())
    assert fingerprint.params_fingerprint(params) == h.hexdigest()
    # jax arrays and transposed views hash by value; one changed bit or a reshape changes the digest
    assert fingerprint.params_fingerprint({"dense": {"kernel": jnp.asarray(w)}, "key": jax.random.key(3)}) \
        == h.hexdigest()
    assert fingerprint.params_fingerprint({"dense": {"kernel": w.T.copy().T}, "key": jax.random.key(3)}) \
        == h.hexdigest()
    flipped = w.copy()
    flipped.view(np.uint32)[0, 0] ^= 1
    assert fingerprint.params_fingerprint({"dense": {"kernel": flipped}, "key": jax.random.key(3)}) != h.hexdigest()
    assert fingerprint.params_fingerprint({"dense": {"kernel": w.reshape(3, 2)}, "key": jax.random.key(3)}) \
        != h.hexdigest()
