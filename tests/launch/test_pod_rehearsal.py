"""A TPU pod rehearsed on one machine: 2 processes x 4 CPU devices run a recipe (fine-tune, distill, export,
report) with the workdir and the data in a gs:// bucket, are killed mid-way, resume, and end where one process
with 8 devices on a local disk ends.

The bucket is an in-memory Cloud Storage emulator (``tests/object_store.py``): a file reaches it only through
the object-store API, so the run finishing there shows that no step of it reads or writes a local path in
place of the bucket, and the workers' working directory is checked for strays (a local ``gs:`` folder is what
``os.makedirs("gs://...")`` leaves). Orbax writes its checkpoints there through TensorStore's GCS driver.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.multidevice import REPO, device_env
from tests.object_store import blob_names

CONFIG = "--config=tests/launch/rehearsal_recipe.py"
LEASE_TIMEOUT_S = 3  # the killed pod's lease on the workdir is taken over once it has not been renewed this long


def _write_data(folder) -> None:
    """SST-2-format ``train.tsv`` (256 rows) and ``dev.tsv`` (64): a sentiment word decides the label."""
    rng = np.random.default_rng(0)
    fillers = "the a movie film plot actors story was is quite very rather and but it this".split()
    positive, negative = "good great fine lovely superb".split(), "bad awful dull boring poor".split()
    for name, n in (("train.tsv", 256), ("dev.tsv", 64)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = int(rng.integers(2))
            words = list(rng.choice(fillers, 6)) + [rng.choice(positive if label else negative)]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)}\t{label}")
        (folder / name).write_text("\n".join(rows) + "\n")


def _upload(local_dir, url: str) -> None:
    from models import storage

    for f in sorted(local_dir.iterdir()):
        storage.as_path(f"{url}/{f.name}").write_bytes(f.read_bytes())


def _pod(workdir: str, data_dir: str, env: dict, log) -> subprocess.Popen:
    """The launcher with 2 processes x 4 devices; its output goes to the open file ``log`` (a pipe nobody
    reads while the test polls the bucket would fill and stall the workers)."""
    cmd = [sys.executable, os.path.join("launch", "local_multiprocess.py"), "--num_processes=2",
           "--devices_per_process=4", "--timeout=400", "--", CONFIG, f"--workdir={workdir}",
           f"--lease_timeout_s={LEASE_TIMEOUT_S}",
           f"--config.data_dir={data_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env={**device_env(1), **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _results(read, workdir: str) -> dict:
    return {stage: json.loads(read(f"{workdir}/{stage}/results.json")) for stage in ("teacher", "transformer3", "onnx")}


def test_pod_with_a_bucket_killed_and_resumed_ends_where_one_local_process_does(gcs_bucket, tmp_path):
    from models import io, storage

    bucket, env = gcs_bucket
    data = tmp_path / "data"
    data.mkdir()
    _write_data(data)
    remote_data, remote_run = f"{bucket}/pod/data", f"{bucket}/pod/run"
    _upload(data, remote_data)

    # The reference: one process with 8 devices, local disk, uninterrupted.
    local_run = tmp_path / "local"
    proc = subprocess.run([sys.executable, "-m", "experiments.main", CONFIG, f"--workdir={local_run}",
                           f"--config.data_dir={data}"], cwd=REPO, env=device_env(8), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]

    # The pod, killed once the student has a checkpoint in the bucket (Orbax's commit marker on GCS).
    log = tmp_path / "pod.log"
    with open(log, "w") as out:
        pod = _pod(remote_run, remote_data, env, out)
    deadline = time.monotonic() + 400
    try:
        while not any(re.fullmatch(r"transformer3/checkpoints/\d+/commit_success\.txt", n)  # a whole step
                      for n in blob_names(remote_run)):
            assert pod.poll() is None, f"the pod ended before it could be killed:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, "no student checkpoint reached the bucket in time"
            time.sleep(0.05)
        os.killpg(pod.pid, signal.SIGKILL)  # the launcher and both workers, like a preempted slice
    finally:
        pod.wait()
    time.sleep(LEASE_TIMEOUT_S + 0.5)  # a SIGKILLed run cannot release its lease: it expires
    killed_with = blob_names(remote_run)
    assert "transformer3/results.json" not in killed_with  # it really died mid-stage
    assert "teacher/model/_COMPLETE" in killed_with

    with open(log, "w") as out:
        pod = _pod(remote_run, remote_data, env, out)
    pod.wait(timeout=420)
    out = log.read_text()
    assert pod.returncode == 0, out[-8000:]
    assert "teacher (finetune): done, skipped" in out
    assert f"taking over the lease of {remote_run}" in out
    assert "resumed from checkpoint step" in out, out[-8000:]

    names = blob_names(remote_run)
    for expected in ("recipe.json", "report.md", "report.html", "teacher/stage.json", "teacher/model/_COMPLETE",
                     "transformer3/model/_COMPLETE", "transformer3/teacher_logits.npz", "transformer3/metrics.jsonl",
                     "onnx/teacher/model_fp32.onnx", "onnx/transformer3/_COMPLETE"):
        assert expected in names, f"{expected} is not in the bucket: {names}"
    assert not os.path.exists(os.path.join(REPO, "gs:")), "a local 'gs:' folder: something wrote a URL to disk"

    ours, ref = _results(storage.read_text, remote_run), _results(lambda p: open(p).read(), str(local_run))
    assert (ours["teacher"]["num_processes"], ours["teacher"]["num_devices"]) == (2, 8)
    assert (ref["teacher"]["num_processes"], ref["teacher"]["num_devices"]) == (1, 8)
    for stage in ("teacher", "transformer3"):  # gloo sums in another order than one process: rounding only
        assert ours[stage]["steps"] == ref[stage]["steps"]
        assert ours[stage]["final"] == pytest.approx(ref[stage]["final"], abs=1e-5)
        a, b = (io.load(f"{run}/{stage}/model")[2] for run in (remote_run, local_run))
        assert max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) <= 1e-5
    for model in ("teacher", "transformer3"):
        ours_onnx, ref_onnx = (r["onnx"]["models"][model]["files"]["model_fp32.onnx"]["metrics"] for r in (ours, ref))
        assert ours_onnx == pytest.approx(ref_onnx, abs=1e-5)
    # The resumed student's log is one trajectory: the steps the killed run logged after its checkpoint are gone.
    records = [json.loads(line) for line in storage.read_text(f"{remote_run}/transformer3/metrics.jsonl").splitlines()]
    steps = [(r["split"], r["step"]) for r in records]
    assert len(steps) == len(set(steps)) and [s for split, s in steps if split == "eval"] == [20, 40]
