"""models.storage: one path layer for local disks and object stores (a gs:// bucket served by the emulator)."""

import uuid

import pytest

import models
from models import io, storage
from tests.models.test_io import CFG, _params
from tests.object_store import blob_names


@pytest.fixture
def remote(gcs_bucket):
    """A fresh gs:// prefix of the emulated bucket."""
    return f"{gcs_bucket[0]}/{uuid.uuid4().hex[:8]}"


def test_local_directory_is_renamed_into_place_with_its_marker_and_a_failed_one_leaves_nothing(tmp_path):
    with storage.atomic_directory(tmp_path / "d") as tmp:
        (tmp / "a.txt").write_text("x")
        assert not (tmp_path / "d").exists()  # invisible until the block ends
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["_COMPLETE", "a.txt"]
    with pytest.raises(RuntimeError), storage.atomic_directory(tmp_path / "e") as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    (tmp_path / "legacy").mkdir()  # a directory renamed into place before markers existed is complete
    assert storage.is_complete(tmp_path / "legacy")


def test_remote_files_and_directories_reach_the_bucket_and_markers_publish_them(remote):
    storage.write_text(f"{remote}/results.json", '{"a": 1}')
    assert storage.read_text(f"{remote}/results.json") == '{"a": 1}'
    with storage.atomic_directory(f"{remote}/model") as tmp:
        (tmp / "w.npy").write_bytes(b"123")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("y")
        assert not storage.exists(f"{remote}/model")  # nothing uploaded before the block ends
    assert blob_names(remote) == ["model/_COMPLETE", "model/sub/x", "model/w.npy", "results.json"]
    assert storage.is_complete(f"{remote}/model")
    with pytest.raises(FileExistsError, match="already exists"):
        with storage.atomic_directory(f"{remote}/model"):
            pass
    with pytest.raises(RuntimeError), storage.atomic_directory(f"{remote}/failed") as tmp:
        (tmp / "w.npy").write_bytes(b"123")
        raise RuntimeError("killed")
    assert not storage.exists(f"{remote}/failed")
    with storage.atomic_directory(f"{remote}/model", overwrite=True) as tmp:  # old files do not survive
        (tmp / "v.npy").write_bytes(b"4")
    assert blob_names(f"{remote}/model") == ["_COMPLETE", "v.npy"]
    storage.move(f"{remote}/model", f"{remote}/aside")
    assert blob_names(remote) == ["aside/_COMPLETE", "aside/v.npy", "results.json"]


def test_model_round_trip_through_a_bucket_and_an_unmarked_upload_is_not_trusted(remote, tmp_path):
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    models.save(f"{remote}/m", "transformer", CFG, _params(), tokenizer_dir=vocab, extra={"labels": [1, 2, 3]})
    assert blob_names(f"{remote}/m") == ["_COMPLETE", "config.json", "params.safetensors", "vocab.txt"]
    _, config, params = models.load(f"{remote}/m")
    assert config == CFG and io.tree_equal(params, _params())
    assert models.read_meta(f"{remote}/m")["extra"] == {"labels": [1, 2, 3]}
    with storage.local_copy(f"{remote}/m") as local:
        assert open(f"{local}/vocab.txt").read().startswith("[PAD]")
    # A second save whose upload stopped before the marker: every file but the marker is there.
    storage.as_path(f"{remote}/m/{storage.COMPLETE_MARKER}").unlink()
    with pytest.raises(FileNotFoundError, match="unfinished model directory"):
        models.load(f"{remote}/m")
    models.save(f"{remote}/m", "transformer", CFG, _params(1))  # the killed upload is replaced, not refused
    assert io.tree_equal(models.load(f"{remote}/m")[2], _params(1))
    assert blob_names(f"{remote}/m") == ["_COMPLETE", "config.json", "params.safetensors"]
