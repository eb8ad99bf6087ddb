"""A recipe (teacher, distilled student, ONNX export) run with its workdir and data in a bucket behind a flaky
store (503s, 429s, dropped connections before and after the store applied a request, delays: more than 5% of all
requests fail) ends with the metrics, parameters and files of the same recipe on a bucket that never fails, and
its log counts the retries.

Both runs are in this process, one after the other (the second reuses the first's compilations through the
suite's compilation cache); the flaky one reaches the bucket only through the proxy (gcsfs, the Cloud Storage
client of the lease, and TensorStore's checkpoint writes, each counted by the proxy).
"""

import json
import logging
import re

import jax
import numpy as np
import pytest

from tests.flaky_store import Faults, FlakyStore, clients_pointed_at
from tests.launch import rehearsal_recipe
from tests.launch.test_pod_rehearsal import _upload, _write_data
from tests.object_store import blob_names

STAGES = ("teacher", "transformer3", "onnx")
FAULTS = Faults(fail=0.05, drop_before=0.01, drop_after=0.01, delay=0.05, delay_s=0.05)


def _config(data_dir: str):
    c = rehearsal_recipe.get_config()
    c.data_dir = data_dir
    for stage in ("teacher", "transformer3"):  # a short run still has checkpoints, an eval and a resume-able state
        sc = c[stage].config
        sc.num_train_steps, sc.eval_every_steps, sc.checkpoint.every_steps = 8, 8, 4
    c.report.enabled = False
    return c


def _normalized(names: list[str]) -> list[str]:
    """Object names with the parts that differ between any two runs removed: TensorBoard files' time and host,
    and the random names of TensorStore's data files in a checkpoint (how many it writes depends on timing)."""
    names = (re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents", n) for n in names)
    return sorted({re.sub(r"/d/[0-9a-f]{32}$", "/d/*", n) for n in names})


def test_a_recipe_through_a_flaky_store_ends_where_it_ends_on_a_reliable_one(gcs_bucket, tmp_path, caplog):
    from experiments.jobs import registry
    from models import io, retries, storage

    bucket, env = gcs_bucket
    (tmp_path / "data").mkdir()
    _write_data(tmp_path / "data")
    data, clean, flaky = f"{bucket}/flaky/data", f"{bucket}/flaky/clean", f"{bucket}/flaky/flaky"
    _upload(tmp_path / "data", data)
    registry.run(_config(data), clean)

    policy = retries.policy()
    before = retries.counts()
    retries.configure(60)
    try:
        with FlakyStore(env["STORAGE_EMULATOR_HOST"], FAULTS, seed=0) as proxy, clients_pointed_at(proxy.url), \
                caplog.at_level(logging.WARNING):
            registry.run(_config(data), flaky)
            proxy.set_faults(Faults())
    finally:
        retries._policy = policy
    after = retries.counts()

    assert proxy.failed_fraction() >= 0.05, dict(proxy.counts)
    assert {"python-gcsfs", "gcloud-python", "tensorstore"} <= set(proxy.clients), dict(proxy.clients)
    retried = after["gcsfs"] - before.get("gcsfs", 0) + after["tensorstore"] - before.get("tensorstore", 0)
    assert retried > 0 and "object store:" in caplog.text and "retries in this process)" in caplog.text
    assert "object-store retries:" in retries.summary()

    names = blob_names(flaky)
    assert _normalized(names) == _normalized(blob_names(clean))
    for stage in STAGES:
        ours, ref = (json.loads(storage.read_text(f"{run}/{stage}/results.json")) for run in (flaky, clean))
        if stage == "onnx":
            for model in ("teacher", "transformer3"):
                files = (r["models"][model]["files"]["model_fp32.onnx"] for r in (ours, ref))
                a, b = (f["metrics"] for f in files)
                assert a == pytest.approx(b, abs=1e-6)
            continue
        assert ours["steps"] == ref["steps"]
        assert ours["final"] == pytest.approx(ref["final"], abs=1e-6)
        a, b = (io.load(f"{run}/{stage}/model")[2] for run in (flaky, clean))
        assert max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) <= 1e-6
    published = [n for n in names if n.endswith((".onnx", ".safetensors", "config.json", "vocab.txt", "_COMPLETE"))]
    # byte for byte, but for the run's own path (the student's config names its teacher's directory)
    assert published and all(storage.read_bytes(f"{flaky}/{n}").replace(flaky.encode(), clean.encode())
                             == storage.read_bytes(f"{clean}/{n}") for n in published)
