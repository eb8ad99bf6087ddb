"""single_process._wait, the other processes' side of run_on_process_0, against a stand-in for the coordination
service's key-value store: done, failed (the error named), and a wait past its limit, with progress lines."""

import json
import logging

import pytest

from experiments.runtime import single_process


class Store:
    """``blocking_key_value_get`` that times out ``misses`` times, then returns ``value``."""

    def __init__(self, value: dict | None, misses: int = 0):
        self.value, self.misses, self.calls = value, misses, 0

    def blocking_key_value_get(self, key: str, timeout_ms: int) -> str:
        self.calls += 1
        if self.value is None or self.calls <= self.misses:
            raise RuntimeError("DEADLINE_EXCEEDED: GetKeyValue() timed out")
        return json.dumps(self.value)


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(single_process, "POLL_S", 0.01)
    monkeypatch.setattr(single_process, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(single_process, "_wait_limit_s", 0.2)


def test_the_wait_ends_with_process_0s_outcome_or_at_its_limit(quick, caplog):
    with caplog.at_level(logging.INFO):
        single_process._wait(Store({"status": "done"}, misses=3), "k", "export", "export in gs://b/run/onnx")
    assert "waits for process 0 to run export in gs://b/run/onnx (for at most 0 s)" in caplog.text
    assert "still waits for process 0 to run export" in caplog.text
    with pytest.raises(single_process.ProcessZeroFailed, match="process 0 failed in export: ValueError: no model"):
        single_process._wait(Store({"status": "failed", "error": "ValueError: no model"}), "k", "export", "export")
    with pytest.raises(TimeoutError, match=r"did not finish export within 0 s \(--stage_wait_limit_s\)"):
        single_process._wait(Store(None), "k", "export", "export")


def test_a_lost_runtime_ends_the_wait_at_once(quick):
    class Gone:
        def blocking_key_value_get(self, key, timeout_ms):
            raise RuntimeError("UNAVAILABLE: failed to connect to the coordination service")

    with pytest.raises(RuntimeError, match="lost the distributed runtime while waiting for process 0 to run report"):
        single_process._wait(Gone(), "k", "report", "report")
