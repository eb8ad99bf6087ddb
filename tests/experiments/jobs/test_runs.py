"""Whole runs of ``python -m experiments.main`` in subprocesses, against one uninterrupted reference run.

* Resume: a run killed with SIGKILL mid-training, whose newest checkpoint is then corrupted, restarts with
  the same command and ends with the reference's parameters (max abs difference <= 1e-6).
* Multi-host: launch/local_multiprocess.py's 2 processes x 2 devices end where 1 process x 4 devices does.

All runs use 4 devices in total and dropout 0.1, so the per-(step, device) RNG streams are exercised too.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.experiments.tiny import run_main, tiny_flags
from tests.multidevice import REPO, device_env

RUN = dict(num_train_steps=40, eval_every_steps=20, log_every_steps=10, checkpoint__every_steps=5)


def _params(workdir) -> dict[str, np.ndarray]:
    return load_file(os.path.join(workdir, "model", "params.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    run_main(workdir, devices=4, **RUN)
    return workdir


def _garble_newest_checkpoint(ckpt_dir: str) -> int:
    newest = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    files = [f for f in glob.glob(os.path.join(ckpt_dir, str(newest), "state", "**", "*"), recursive=True)
             if os.path.isfile(f)]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 4, len(data) // 2):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    return newest


def test_sigkill_and_corrupt_checkpoint_then_resume_matches_reference(reference, tmp_path):
    workdir = tmp_path / "killed"
    ckpt_dir = workdir / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.main", f"--workdir={workdir}", *tiny_flags(**RUN)],
                            cwd=REPO, env=device_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        # Wait for two finished checkpoints (Orbax renames a step directory into place when it is complete).
        while not (ckpt_dir / "10").is_dir():
            assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "results.json").exists()  # it really died mid-run

    corrupted = _garble_newest_checkpoint(str(ckpt_dir))
    proc = run_main(workdir, devices=4, **RUN)
    assert f"checkpoint {corrupted}" in proc.stderr  # the corruption was reported ...
    assert glob.glob(str(ckpt_dir / "corrupt" / f"{corrupted}-*"))  # ... and the checkpoint moved aside

    assert _max_diff(_params(workdir), _params(reference)) <= 1e-6
    ours, ref = (json.loads((d / "results.json").read_text()) for d in (workdir, reference))
    assert ours["steps"] == ref["steps"] == 40
    assert ours["final"] == pytest.approx(ref["final"], abs=1e-6)
    # The log describes one trajectory: no step appears twice after the restart trimmed it.
    steps = [(l["split"], l["step"]) for l in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps))
    assert [s for split, s in steps if split == "eval"] == [20, 40]


def test_two_processes_match_one_process(reference, tmp_path):
    workdir = tmp_path / "multihost"
    cmd = [sys.executable, os.path.join("launch", "local_multiprocess.py"), "--num_processes=2",
           "--devices_per_process=2", "--timeout=280", "--", f"--workdir={workdir}",
           *tiny_flags(**dict(RUN, checkpoint__every_steps=0, log_every_steps=20))]  # same trajectory, fewer syncs
    proc = subprocess.run(cmd, cwd=REPO, env=device_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "[p1]" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert (results["num_processes"], results["num_devices"]) == (2, 4)
    # gloo's all-reduce sums in another order than the in-process one: float32 rounding, no more.
    assert _max_diff(_params(workdir), _params(reference)) <= 1e-5
    ref = json.loads((reference / "results.json").read_text())
    assert results["final"] == pytest.approx(ref["final"], abs=1e-5)
