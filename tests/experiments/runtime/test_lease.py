"""The lease of a workdir in a bucket (emulated): a second run is refused at once naming the first, a killed
holder's lease is taken over once its timeout has passed (by exactly one of two takers), a holder whose lease was
taken stops, and an answer lost after the store applied a write does not fool it."""

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from experiments.runtime import lease, workdir
from experiments.runtime.workdir import WorkdirBusyError
from tests.flaky_store import FlakyStore, clients_pointed_at
from tests.multidevice import REPO
from tests.object_store import blob_names

HOLD = """
import sys, time
from experiments.runtime import lease, workdir
lease.configure(float(sys.argv[2]))
with workdir.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def run_dir(gcs_bucket):
    return f"{gcs_bucket[0]}/lease-{uuid.uuid4().hex[:8]}"


def _holder(url: str, env: dict, timeout_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, url, str(timeout_s)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**__import__("os").environ, **env})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_is_refused_naming_the_first_and_takes_over_once_the_killed_holders_lease_expires(
        run_dir, gcs_bucket, caplog):
    timeout = 2.0
    holder = _holder(run_dir, gcs_bucket[1], timeout)
    try:
        time.sleep(timeout * 0.8)  # past several heartbeats: a renewed lease is still refused
        start = time.monotonic()
        with pytest.raises(WorkdirBusyError, match=rf"in use by pid {holder.pid} on host {socket.gethostname()}"):
            with workdir.lock(run_dir):
                pytest.fail("took a lease another live run holds")
        assert time.monotonic() - start < 2.0
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        with pytest.raises(WorkdirBusyError, match="renewed .* s ago"):  # not yet stale
            with workdir.lock(run_dir):
                pass
        time.sleep(max(0.0, killed + timeout + 0.5 - time.monotonic()))
        with caplog.at_level(logging.WARNING), workdir.lock(run_dir):
            record = json.loads(_read(run_dir))
            assert record["pid"] != holder.pid and record["timeout_s"] == lease.default_timeout_s()
        assert f"it was left by pid {holder.pid} on host" in caplog.text and "not renewed for" in caplog.text
        assert ".lock" not in blob_names(run_dir)  # released at the end: the next run starts without a warning
        caplog.clear()
        with caplog.at_level(logging.WARNING), workdir.lock(run_dir):
            with workdir.lock(run_dir):  # re-entrant, as on a local disk
                pass
        assert "taking over" not in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_of_two_runs_taking_over_a_stale_lease_exactly_one_wins(run_dir):
    url = f"{run_dir}/.lock"
    dead = lease.Lease(url, timeout_s=0.5)
    assert dead._write(if_generation_match=0)  # a holder that never renews (killed)
    time.sleep(0.7)
    a, b = lease.Lease(url, timeout_s=30), lease.Lease(url, timeout_s=30)
    (gen_a, age, _), (gen_b, _, _) = a._read(), b._read()
    assert gen_a == gen_b and age > 0.5
    assert [a._write(gen_a), b._write(gen_b)] == [True, False]  # the precondition on the stale generation
    with pytest.raises(lease.LeaseHeldError, match=r"in use by pid \d+ on host .* renewed 0 s ago"):
        b.acquire()
    a.release()


def test_a_holder_whose_lease_was_taken_stops(run_dir):
    url = f"{run_dir}/.lock"
    reasons = []
    lost = threading.Event()
    held = lease.Lease(url, timeout_s=1.0, on_lost=lambda reason: (reasons.append(reason), lost.set()))
    held.acquire()
    intruder = lease.Lease(url, timeout_s=30)
    assert intruder._write(if_generation_match=held.generation)  # as a taker would, had the holder gone quiet
    assert lost.wait(5), "the heartbeat did not notice"
    assert "was lost: it is now held by pid" in reasons[0]
    held.release()
    assert intruder._read()[2].token == intruder.holder.token  # the loser deletes nothing


def test_a_create_whose_answer_was_lost_after_it_landed_is_ours(run_dir, gcs_bucket):
    with FlakyStore(gcs_bucket[1]["STORAGE_EMULATOR_HOST"], seed=0) as proxy, clients_pointed_at(proxy.url):
        held = lease.Lease(f"{run_dir}/.lock", timeout_s=30)
        proxy.queue("drop_after", "drop_after")  # the create lands, its answer is lost; then its retry is too
        held.acquire()  # the retry meets 412; reading the lease back shows our token
        assert proxy.counts["drop_after"] == 2
        assert held._read()[2].token == held.holder.token
        held.release()
    assert ".lock" not in blob_names(run_dir)


def _read(url: str) -> str:
    from google.cloud import storage as gcs

    bucket, _, name = url.removeprefix("gs://").partition("/")
    return gcs.Client().bucket(bucket).blob(f"{name}/.lock").download_as_text()
