"""Workdir lock between real processes, and removal of what killed atomic writes leave."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.runtime import workdir
from experiments.runtime.workdir import WorkdirBusyError
from models import io, storage
from tests.multidevice import REPO

HOLD = """
import sys, time
from experiments.runtime import workdir
with workdir.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A child process that holds the lock of ``tmp_path/run`` (killed at the end if still alive)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_second_process_fails_at_once_then_takes_over_from_the_killed_holder(tmp_path, holder, caplog):
    run = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(WorkdirBusyError, match=rf"in use by pid {holder.pid} on host {socket.gethostname()}"):
        with workdir.lock(run):
            pytest.fail("took a lock another live process holds")
    assert time.monotonic() - start < 1.0  # no waiting
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING), workdir.lock(run):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert f"left by pid {holder.pid} on host" in caplog.text
    assert (run / ".lock").read_text() == ""  # released cleanly: the next run starts without a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING), workdir.lock(run):
        pass
    assert "taking over" not in caplog.text


def test_lock_is_reentrant_in_one_process_and_disabled_is_a_no_op(tmp_path):
    with workdir.lock(tmp_path):
        with workdir.lock(tmp_path):  # a job inside a runner that locked the same workdir
            pass
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()  # still held
    with workdir.lock(tmp_path / "other", enabled=False):
        pass
    assert not (tmp_path / "other").exists()


def test_stale_temporaries_are_removed_and_a_parked_old_version_restored(tmp_path, caplog):
    # A model directory, then what killed writes leave beside it and one level down.
    io.save(tmp_path / "model", "transformer", _cfg(), _params())
    killed_dir = storage.temporary_path(tmp_path / "model")
    killed_dir.mkdir()
    (killed_dir / "params.safetensors").write_bytes(b"\0" * 2_500_000)
    (tmp_path / "stage").mkdir()
    killed_file = storage.temporary_path(tmp_path / "stage" / "results.json")
    killed_file.write_text("{")
    legacy = tmp_path / ".model.tmp-ab_cd12x"  # the mkdtemp name of the older atomic_directory
    legacy.mkdir()
    # A replacement killed between its two renames: only the parked old version of "ner" is left.
    parked = storage.temporary_path(tmp_path / "ner", "old")
    io.save(parked, "transformer", _cfg(), _params())
    # Names that merely look similar are left alone.
    keep = [tmp_path / ".tmp-notahex.x", tmp_path / "tmp-0123abcd.x", tmp_path / "metrics.jsonl.old-20260101"]
    for k in keep:
        k.write_text("")
    with caplog.at_level(logging.WARNING):
        removed = workdir.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(map(str, [killed_dir, killed_file, legacy]))
    assert f"removed {killed_dir} (2.5 MB)" in caplog.text
    assert f"restored {tmp_path / 'ner'}" in caplog.text
    assert io.tree_equal(io.load(tmp_path / "ner")[2], _params())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model", "ner", "stage", *(k.name for k in keep)])
    assert list((tmp_path / "stage").iterdir()) == []


def test_atomic_writers_use_the_shared_temporary_pattern(tmp_path, monkeypatch):
    """What a write killed midway leaves matches the pattern remove_stale_temporaries looks for."""
    seen = []
    real_rename = os.rename

    def spy(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    io.save(tmp_path / "m", "transformer", _cfg(), _params())
    io.save(tmp_path / "m", "transformer", _cfg(), _params(), overwrite=True)
    (new1, m1), (m2, parked), (new2, m3) = seen  # new -> m; then m -> parked old, new -> m
    assert m1 == m2 == m3 == "m"
    kinds = [(storage.TEMPORARY_PATTERN.match(n)["kind"], storage.TEMPORARY_PATTERN.match(n)["name"])
             for n in (new1, parked, new2)]
    assert kinds == [("tmp", "m"), ("old", "m"), ("tmp", "m")]
    with storage.atomic_file(tmp_path / "logits.npz") as tmp:
        np.savez(tmp, x=np.zeros(2))  # keeps the name: np.savez appends .npz only to names without it
        assert storage.TEMPORARY_PATTERN.match(tmp.name)["name"] == "logits.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits.npz", "m"]


def _cfg():
    from models.transformer import TransformerConfig
    return TransformerConfig(vocab_size=8, hidden_size=4, num_layers=1, num_heads=1, intermediate_size=4,
                             max_position_embeddings=4, num_labels=2)


def _params():
    return {"w": {"kernel": np.arange(4, dtype=np.float32)}}
