"""launch/tpu.py forms the gcloud commands a TPU pod run needs (checked in dry-run; gcloud is not called)."""

import os
import shlex
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "launch"))
import tpu  # noqa: E402


def _cmds(argv):
    a, rest = tpu.parse(argv)
    return [shlex.join(c) for c in tpu.commands_for(a, rest)]


def test_create_vm_and_queued_pod():
    (vm,) = _cmds(["create", "--name=n", "--zone=z", "--accelerator=v4-8"])
    assert vm.startswith("gcloud compute tpus tpu-vm create n --zone=z --accelerator-type=v4-8")
    (pod,) = _cmds(["create", "--name=n", "--zone=z", "--accelerator=v4-32", "--queued", "--spot"])
    assert "queued-resources create n --node-id=n" in pod and pod.endswith("--spot")


def test_run_goes_to_every_worker_with_the_experiment_arguments():
    (run,) = _cmds(["run", "--name=n", "--zone=z", "--", "--config=experiments/configs/finetune.py:sst2",
                    "--workdir=gs://b/w"])
    assert "--worker=all" in run
    remote = shlex.split(run)[-1].split("=", 1)[1]
    assert remote == ("cd nlpress && .venv/bin/python -m experiments.main --distributed "
                      "--config=experiments/configs/finetune.py:sst2 --workdir=gs://b/w")


def test_run_without_config_and_bootstrap_without_repo_fail_clearly():
    with pytest.raises(SystemExit, match="--config"):
        _cmds(["run", "--name=n", "--zone=z", "--", "--workdir=w"])
    with pytest.raises(SystemExit):
        tpu.parse(["bootstrap", "--name=n", "--zone=z"])


def test_dry_run_prints_and_does_not_execute(capsys):
    assert tpu.main(["delete", "--name=n", "--zone=z", "--queued", "--dry_run"]) == 0
    assert capsys.readouterr().out.startswith("+ gcloud compute tpus queued-resources delete n --zone=z")


def test_bootstrap_pins_the_tested_jax_and_prints_each_workers_versions():
    (boot,) = _cmds(["bootstrap", "--name=n", "--zone=z", "--repo=https://example.org/nlpress.git"])
    remote = shlex.split(boot)[-1].split("=", 1)[1]
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "constraints.txt")) as f:
        pinned = next(line.strip().split("==")[1] for line in f if line.startswith("jax=="))
    assert f"'jax[tpu]=={pinned}'" in remote and "-c constraints.txt 'jax[tpu]" in remote
    assert "'jax[tpu]' " not in remote  # never the unpinned wheel
    assert remote.rstrip().endswith("print(socket.gethostname(), software_versions())'")
