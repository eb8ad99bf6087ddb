"""Two processes run a recipe whose single-process stage (on process 0) outlasts the barrier timeout: the other
process polls the stage's completion marker instead of waiting at a barrier, so the run completes; when the stage
fails on process 0, both processes stop within seconds, naming its error; when another run holds the workdir, both
stop at once, naming it. And a barrier does give up after its timeout (what a long stage would have run into)."""

import subprocess
import sys
import time

from launch.local_multiprocess import commands, free_port, process_env
from tests.experiments.runtime.test_workdir import HOLD
from tests.launch.nap_stage import FAILURE
from tests.multidevice import REPO

BARRIER_TIMEOUT_S, NAP_S = 2, 5


def _start(args: list[str], tmp_path, tag: str) -> list[tuple[subprocess.Popen, object]]:
    """The processes of one run, started directly (the local launcher would stop the others at the first failure,
    which is what the run must do by itself), each logging to its own file."""
    procs = []
    for i, cmd in enumerate(commands(2, free_port(), args)):
        log = open(tmp_path / f"{tag}-p{i}.log", "w+")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=process_env(1), stdout=log, stderr=subprocess.STDOUT),
                      log))
    return procs


def _finish(procs, timeout: float = 120) -> list[tuple[int, float, str]]:
    """(exit status, when it ended, output) of each process."""
    deadline, ended = time.monotonic() + timeout, {}
    while len(ended) < len(procs):
        for i, (p, _) in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic()
        if time.monotonic() > deadline:
            for p, _ in procs:
                p.kill()
            raise AssertionError("the processes did not end in time:\n" + "\n".join(_output(f) for _, f in procs))
        time.sleep(0.1)
    return [(p.returncode, ended[i], _output(f)) for i, (p, f) in enumerate(procs)]


def _output(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def _recipe(workdir, fail: bool) -> list[str]:
    return ["--config=tests/launch/nap_recipe.py", f"--workdir={workdir}", f"--barrier_timeout_s={BARRIER_TIMEOUT_S}",
            f"--config.nap.config.seconds={NAP_S}", f"--config.nap.config.fail={fail}"]


def test_a_stage_longer_than_the_barrier_timeout_completes_and_a_failure_or_a_refusal_stops_both_processes(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "held")], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)  # another run, holding the third run's workdir
    try:
        assert holder.stdout.readline().strip() == "locked"
        ok, failing, refused = (_start(_recipe(tmp_path / name, fail), tmp_path, name)
                                for name, fail in (("ok", False), ("failing", True), ("held", False)))
        (rc0, _, out0), (rc1, _, out1) = _finish(ok)
        assert (rc0, rc1) == (0, 0), out0[-4000:] + out1[-4000:]
        assert "process 1 waits for process 0 to run nap" in out1
        assert "slept_s" in open(tmp_path / "ok" / "nap" / "results.json").read()

        (rc0, end0, out0), (rc1, end1, out1) = _finish(failing)
        assert rc0 != 0 and rc1 != 0
        assert FAILURE in out0 and f"process 0 failed in nap: RuntimeError: {FAILURE}" in out1, out1[-4000:]
        assert abs(end1 - end0) < 10  # nobody is left waiting

        (rc0, end0, out0), (rc1, end1, out1) = _finish(refused)
        assert rc0 != 0 and rc1 != 0 and abs(end1 - end0) < 10
        assert all(f"is in use by pid {holder.pid}" in out for out in (out0, out1)), out1[-4000:]
    finally:
        holder.kill()
        holder.wait()


BARRIER = """
import sys, time
from experiments.runtime import parallel
parallel.initialize_distributed(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]), "gloo")
parallel.check_same_versions()  # the backends are up (their start is itself a rendezvous), as in every run
if sys.argv[2] == "0":
    time.sleep(3)
try:
    parallel.barrier("slow", 1.0)
except RuntimeError as e:
    print("gave up:", e, flush=True)
"""


def test_a_barrier_gives_up_after_its_timeout():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER, str(port), str(i)], cwd=REPO, env=process_env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all("gave up: barrier 'slow': not every process arrived within 1 s" in out for out in outs), outs
