"""A gs:// workdir (emulated, behind a proxy that can take the store down) is as safe as a local one:

1. a second run started on it while the first lives is refused within seconds, naming the first;
2. once the first is SIGKILLed and its lease timeout has passed, a new run takes over with a warning and resumes
   from the last checkpoint;
3. a store outage longer than the retry budget stops that run with a message naming an object of the workdir,
   and a rerun after the store is back resumes from the last complete checkpoint and finishes.

The runs are ``python -m experiments.main`` on a tiny fine-tuning config (``tests/launch/tiny_finetune.py``) with
a short lease timeout and retry budget, going through the proxy; the refused run and the final one are the same
job run in this process (no second JAX start-up), on the bucket directly.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.flaky_store import Faults, FlakyStore
from tests.launch import tiny_finetune
from tests.multidevice import REPO, device_env
from tests.object_store import blob_names, emulator_env

LEASE_TIMEOUT_S, RETRY_BUDGET_S = 4, 1.5
COMMITTED = re.compile(r"checkpoints/(\d+)/commit_success\.txt")


class Run:
    """One ``experiments.main`` process on the workdir, its output in a file."""

    def __init__(self, workdir: str, proxy_url: str, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.main", "--config=tests/launch/tiny_finetune.py", f"--workdir={workdir}",
             f"--lease_timeout_s={LEASE_TIMEOUT_S}", f"--store_retry_budget_s={RETRY_BUDGET_S}"],
            cwd=REPO, env={**device_env(1), **emulator_env(proxy_url)}, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return open(self.log_path).read()

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.output())):
            assert self.proc.poll() is None, f"the run ended before {pattern!r}:\n{self.output()[-6000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} in time:\n{self.output()[-6000:]}"
            time.sleep(0.1)
        return match

    def end(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()


def _committed(workdir: str) -> list[int]:
    """Steps whose checkpoint is complete, listed from the store directly (not through the proxy)."""
    return sorted(int(m.group(1)) for n in blob_names(workdir) if (m := COMMITTED.fullmatch(n)))


@pytest.fixture
def short_timeouts():
    """This process's lease timeout and store retry budget as the subprocesses' flags set them (restored after)."""
    from experiments.runtime import lease
    from models import retries

    policy, timeout = retries.policy(), lease.default_timeout_s()
    retries.configure(RETRY_BUDGET_S)
    lease.configure(LEASE_TIMEOUT_S)
    yield
    retries._policy = policy
    lease.configure(timeout)


def test_a_bucket_workdir_refuses_a_second_run_is_taken_over_after_a_kill_and_survives_an_outage(
        gcs_bucket, tmp_path, short_timeouts, caplog):
    from experiments.jobs import registry
    from experiments.runtime.workdir import WorkdirBusyError
    from models import storage

    bucket, env = gcs_bucket
    workdir = f"{bucket}/workdir-{os.getpid()}"
    with FlakyStore(env["STORAGE_EMULATOR_HOST"], seed=0) as proxy:
        first = Run(workdir, proxy.url, tmp_path / "first.log")
        try:
            deadline = time.monotonic() + 180
            while not _committed(workdir):  # a whole checkpoint in the bucket
                assert first.proc.poll() is None, first.output()[-6000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.1)

            start = time.monotonic()
            holder = rf"is in use by pid {first.proc.pid} on host {socket.gethostname()}"
            with pytest.raises(WorkdirBusyError, match=holder):
                registry.run(tiny_finetune.get_config(), workdir)  # the same job, in this process
            assert time.monotonic() - start < 5  # refused at start, before any work

            first.proc.send_signal(signal.SIGKILL)
        finally:
            first.proc.kill()
            first.end()
        killed, checkpoints = time.monotonic(), _committed(workdir)
        time.sleep(max(0.0, killed + LEASE_TIMEOUT_S + 0.5 - time.monotonic()))

        third = Run(workdir, proxy.url, tmp_path / "third.log")
        try:
            third.wait_for(rf"taking over the lease of {workdir}: it was left by pid {first.proc.pid}")
            step = int(third.wait_for(r"resumed from checkpoint step (\d+)").group(1))
            assert step == checkpoints[-1]
            proxy.set_faults(Faults(outage=True))
            outage = time.monotonic()
            assert third.end(timeout=120) != 0
            stopped = time.monotonic() - outage
        finally:
            third.proc.kill()
            third.end()
        out = third.output()
        assert re.search(rf"{workdir}/\S+: still failing after \d+ tries", out), out[-6000:]
        assert "object-store retries:" in out  # the count, logged as the run stops
        assert stopped < 60, f"{stopped:.0f} s to stop"
        assert "results.json" not in " ".join(blob_names(workdir))  # it did not finish
        complete = _committed(workdir)[-1]

    time.sleep(LEASE_TIMEOUT_S + 0.5)  # its lease could not be released while the store was down
    with caplog.at_level(logging.INFO):
        results = registry.run(tiny_finetune.get_config(), workdir)  # the store is back
    assert f"taking over the lease of {workdir}" in caplog.text
    assert f"resumed from checkpoint step {complete}" in caplog.text, caplog.text[-6000:]
    assert results["steps"] == 100 == json.loads(storage.read_text(f"{workdir}/results.json"))["steps"]
