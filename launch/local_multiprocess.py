"""Run a multi-host experiment on one machine: N processes x D CPU devices, joined with gloo collectives.

Each process runs ``python -m experiments.main`` with ``--coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i --cpu_collectives=gloo`` and ``XLA_FLAGS`` forcing D host devices, so
``jax.pmap``/``shard_map`` all-reduce across processes exactly as across TPU hosts. Usage::

    python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \\
        --config=experiments/configs/finetune.py:synthetic --workdir=/tmp/multihost

Everything after ``--`` goes to ``experiments.main``. Output lines are prefixed with ``[p<i>]``. If one
process fails, the others are terminated; the exit status is the first failure's (0 when all succeed).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices_per_process: int, base: dict | None = None) -> dict:
    """Environment of one worker: CPU platform with ``devices_per_process`` forced host devices."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return env


def commands(num_processes: int, port: int, main_args: list[str], python: str = sys.executable) -> list[list[str]]:
    """The command line of each process."""
    return [[python, "-m", "experiments.main", f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={num_processes}", f"--process_id={i}", "--cpu_collectives=gloo", *main_args]
            for i in range(num_processes)]


def _pump(prefix: str, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix} {line}")
        out.flush()


def run(num_processes: int, devices_per_process: int, main_args: list[str], *, timeout: float | None = None,
        python: str = sys.executable) -> int:
    """Starts the processes, streams their output, and returns the exit status (see the module docstring)."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"need >= 1 process and device, got {num_processes} x {devices_per_process}")
    port = free_port()
    env = process_env(devices_per_process)
    procs, pumps = [], []
    for i, cmd in enumerate(commands(num_processes, port, main_args, python)):
        p = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, bufsize=1)
        t = threading.Thread(target=_pump, args=(f"[p{i}]", p.stdout, sys.stdout), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"local_multiprocess: timeout after {timeout} s", file=sys.stderr)
                status = 124
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, main_args = argv[:split], argv[split + 1:]
    else:
        own, main_args = argv, []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2, help="processes to start (simulated hosts)")
    parser.add_argument("--devices_per_process", type=int, default=2, help="CPU devices forced per process")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before all processes are stopped")
    args = parser.parse_args(own)
    if not main_args:
        parser.error("give experiments.main's flags after --, e.g. -- --config=... --workdir=...")
    return run(args.num_processes, args.devices_per_process, main_args, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
