"""Checkpointer: exact round trips, keep-last-N plus best, corruption detection and fallback."""

import glob
import json
import logging
import os

import jax
import numpy as np
import optax
import pytest

from experiments.runtime.checkpointing import CheckpointMismatchError, Checkpointer
from experiments.runtime.trainer import TrainState, make_optimizer


def _state(offset: float = 0.0):
    """A host TrainState with a frozen part (optax MaskedNode in the opt state) and a typed key."""
    params = {"body": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3) + offset},
              "head": {"bias": np.full(3, offset, np.float32)}}
    tx = make_optimizer(params, schedule=optax.constant_schedule(0.1), freeze_regex="^body/")
    state = TrainState.create(params, tx, jax.random.key(5))
    return jax.tree.map(lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x),
                        state)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
        np.testing.assert_array_equal(x, y)


def test_round_trip_is_exact(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2)
    state = _state(1.5).replace(step=np.int32(7), epoch=np.int32(2), batch_in_epoch=np.int32(3))
    ckpt.save(7, state, meta={"best": {"accuracy": 0.5}})
    ckpt.wait()
    restored, meta = ckpt.restore(7, _state())
    _assert_same(restored, state)
    assert meta == {"best": {"accuracy": 0.5}}
    assert int(restored.epoch) == 2 and int(restored.batch_in_epoch) == 3
    ckpt.close()


def test_keeps_last_n_plus_best(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2, best_metric="accuracy", best_mode="max")
    evals = {2: 0.6, 4: 0.9, 6: 0.7}  # steps 1, 3, 5, 7 are periodic saves without metrics
    for step in range(1, 8):
        m = {"accuracy": evals[step]} if step in evals else None
        ckpt.save(step, _state(step), metrics=m)
    ckpt.wait()
    assert ckpt.steps() == [4, 6, 7]  # the newest two, and the best (step 4)
    assert ckpt.best_step() == 4
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path), keep=2, best_metric="loss", best_mode="min")
    with pytest.raises(KeyError, match="best metric 'loss'"):
        ckpt.save(8, _state(), metrics={"accuracy": 1.0})
    ckpt.close()


def _largest_data_file(step_dir: str) -> str:
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def test_corrupt_latest_falls_back_to_previous(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(1, _state(1.0))
    ckpt.save(2, _state(2.0))
    ckpt.wait()
    path = _largest_data_file(os.path.join(tmp_path, "2"))
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 4, len(data) // 2):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    step, restored, _ = ckpt.restore_latest(_state())
    assert step == 1
    _assert_same(restored, _state(1.0))
    assert ckpt.steps() == [1]
    assert [d.split("-")[0] for d in os.listdir(tmp_path / "corrupt")] == ["2"]
    ckpt.close()


def test_crc_mismatch_is_detected(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(1, _state(1.0))
    ckpt.wait()
    meta_file = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["crc32"][0] ^= 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(IOError, match="CRC-32"):
        ckpt.restore(1, _state())
    with caplog.at_level(logging.WARNING):
        assert ckpt.restore_latest(_state()) is None  # nothing valid left: the caller starts fresh
    assert f"every checkpoint in {tmp_path} is corrupt (steps [1], moved to {tmp_path / 'corrupt'}): starting " \
           "from step 0" in caplog.text
    ckpt.close()


def test_partial_checkpoint_without_metadata_is_skipped(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(1, _state(1.0))
    ckpt.save(2, _state(2.0))
    ckpt.wait()
    for f in (tmp_path / "2" / "meta").iterdir():
        f.unlink()
    step, restored, _ = ckpt.restore_latest(_state())
    assert step == 1
    ckpt.close()


def test_different_tree_is_a_config_error_not_corruption(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
    ckpt.save(1, {"w": np.zeros(3, np.float32)})
    ckpt.wait()
    with pytest.raises(CheckpointMismatchError, match=r"w is float32\[3\], this run has float32\[4\]"):
        ckpt.restore_latest({"w": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointMismatchError, match="missing"):
        ckpt.restore_latest({"v": np.zeros(3, np.float32)})
    assert ckpt.steps() == [1]  # left in place
    ckpt.close()


def test_a_store_outage_is_not_corruption_and_tensorstore_gets_the_store_retry_budget(tmp_path, monkeypatch):
    from orbax.checkpoint._src.serialization import tensorstore_utils

    from models import retries

    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(1, _state(1.0))
    ckpt.wait()

    def store_down(step):
        raise retries.StoreUnavailableError(f"GET gs://b/run/checkpoints/{step}/meta: still failing after 9 tries")

    monkeypatch.setattr(ckpt, "read_meta", store_down)
    with pytest.raises(retries.StoreUnavailableError, match="checkpoints/1/meta"):
        ckpt.restore_latest(_state())
    assert ckpt.steps() == [1] and not (tmp_path / "corrupt").exists()  # nothing moved aside
    ckpt.close()
    spec = tensorstore_utils.get_ts_context(use_ocdbt=True)["gcs_request_retries"].to_json()
    assert spec["max_retries"] == retries.policy().retries_within_budget()
