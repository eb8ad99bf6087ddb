"""models.retries through a flaky store: the path layer lives through 503s, 429s, dropped connections (a lost
answer to an upload that landed included) and delays, counting every retry, and an outage longer than the retry
budget stops with the object named, never read as a missing file."""

import logging
import time
import uuid

import pytest

from models import retries, storage
from tests.flaky_store import Faults, FlakyStore, clients_pointed_at
from tests.object_store import blob_names


@pytest.fixture
def flaky(gcs_bucket):
    """``(proxy, gs:// prefix)``: this process's clients go through a proxy in front of the emulated bucket."""
    bucket, env = gcs_bucket
    with FlakyStore(env["STORAGE_EMULATOR_HOST"], seed=1) as proxy, clients_pointed_at(proxy.url):
        yield proxy, f"{bucket}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def budget():
    """Sets the retry budget for one test (restored after)."""
    old = retries.policy()

    def set_budget(seconds: float) -> None:
        retries.configure(seconds)

    yield set_budget
    retries._policy = old


def test_the_path_layer_lives_through_a_flaky_store_and_checks_failed_uploads(flaky, budget, caplog):
    proxy, root = flaky
    budget(30)
    storage.write_text(f"{root}/seed.txt", "x")  # the bucket's filesystem exists before the faults begin
    proxy.set_faults(Faults(fail=0.15, drop_before=0.05, drop_after=0.1, delay=0.05, delay_s=0.05))
    before = sum(retries.counts().get(k, 0) for k in ("gcsfs", "uploads landed", "uploads redone"))
    with caplog.at_level(logging.WARNING):
        for i in range(8):
            storage.write_text(f"{root}/f{i}.json", f'{{"i": {i}}}')
        with storage.atomic_directory(f"{root}/model") as tmp:
            (tmp / "w.bin").write_bytes(bytes(range(256)) * 8)
        texts = [storage.read_text(f"{root}/f{i}.json") for i in range(8)]
        listed = storage.listdir(root)
        storage.remove(f"{root}/f0.json")
        gone = storage.exists(f"{root}/f0.json")
        complete = storage.is_complete(f"{root}/model")
    proxy.set_faults(Faults())
    assert texts == [f'{{"i": {i}}}' for i in range(8)]
    assert listed == sorted(["seed.txt", "model", *(f"f{i}.json" for i in range(8))])
    assert not gone and complete
    assert storage.read_bytes(f"{root}/model/w.bin") == bytes(range(256)) * 8
    assert blob_names(root) == sorted(["seed.txt", "model/_COMPLETE", "model/w.bin",
                                       *(f"f{i}.json" for i in range(1, 8))])
    assert proxy.failed_fraction() >= 0.15, dict(proxy.counts)
    counts = retries.counts()
    assert counts["gcsfs"] > 0 and "object store:" in caplog.text and "retry 1 in" in caplog.text
    # an upload whose answer was lost after the store applied it is found landed, not written twice
    assert proxy.counts["drop_after"] > 0
    assert sum(counts.get(k, 0) for k in ("gcsfs", "uploads landed", "uploads redone")) > before
    assert "object-store retries:" in retries.summary()


def test_an_outage_longer_than_the_budget_stops_naming_the_object_and_is_never_a_missing_file(flaky, budget):
    proxy, root = flaky
    storage.write_text(f"{root}/results.json", "{}")
    budget(0.5)
    proxy.set_faults(Faults(outage=True))
    start = time.monotonic()
    for probe in (storage.read_text, storage.is_file, storage.is_complete):
        with pytest.raises(retries.StoreUnavailableError, match=rf"{root}/results.json(/_COMPLETE)?: still failing"):
            probe(f"{root}/results.json")
    assert time.monotonic() - start < 3 * 2  # each gives up once the 0.5 s budget is spent
    with pytest.raises(retries.StoreUnavailableError, match="--store_retry_budget_s"):
        storage.write_text(f"{root}/other.json", "{}")
    proxy.set_faults(Faults())
    assert storage.read_text(f"{root}/results.json") == "{}"  # the store is back: everything as it was


def test_transient_errors_are_told_from_lasting_ones():
    from google.api_core import exceptions as api

    assert retries.transient_reason(api.ServiceUnavailable("x")) == "HTTP 503"
    assert retries.transient_reason(api.TooManyRequests("x")) == "HTTP 429"
    assert retries.transient_reason(TimeoutError()) == "timeout"
    assert retries.transient_reason(ConnectionResetError()) == "connection dropped"
    for lasting in (api.PreconditionFailed("x"), api.NotFound("x"), api.Forbidden("x"), FileNotFoundError(),
                    FileExistsError(), ValueError("bad request")):
        assert retries.transient_reason(lasting) is None
    assert retries.is_outage(from_(retries.StoreUnavailableError("gs://b/x")))
    assert retries.is_outage(ValueError("ABORTED: All 5 retry attempts failed: UNAVAILABLE"))
    assert not retries.is_outage(IOError("checkpoint 4: leaf fails its CRC-32 check"))
    p = retries.RetryPolicy(budget_s=10, initial_s=0.1, max_delay_s=2)
    assert p.retries_within_budget() == 9  # 0.1+0.2+0.4+0.8+1.6 (3.1 s), then 2 s each: 4 more reach 11.1 s


def from_(cause):
    """``RuntimeError`` raised from ``cause`` (an exception chain, as a wrapper raises it)."""
    try:
        raise RuntimeError("wrapped") from cause
    except RuntimeError as e:
        return e
