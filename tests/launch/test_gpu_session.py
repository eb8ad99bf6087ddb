"""launch/gpu_session.sh end to end on the CPU: the check (tiny shapes, a zero budget: every row skipped and marked)
and a one-test suite, everything written under OUT, within its time limit."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "launch", "gpu_session.sh")


def test_session_writes_the_check_and_the_tests_under_out(tmp_path):
    out = tmp_path / "gpu_out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "TOTAL_S": "200",
           "GPU_CHECK_ARGS": "--shapes=tiny --budget_s=0", "NLPRESS_GIT_COMMIT": "0123abc",
           "SUITE": "tests/experiments/benchmarks/test_gpu_check.py::test_hand_count_itself"}
    proc = subprocess.run(["bash", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["environment.txt", "gpu_check.json", "gpu_check.log",
                                                     "summary.txt", "tests.log", "tests.xml"]
    payload = json.loads((out / "gpu_check.json").read_text())
    assert payload["shapes"] == "tiny" and payload["budget_s"] == 0
    assert {r["status"] for r in payload["rows"]} == {"skipped-for-budget"}  # every row listed, none dropped
    assert "1 passed" in (out / "tests.log").read_text()
    summary = (out / "summary.txt").read_text()
    assert "gpu_check: exit 0" in summary and "tests exit 0" in summary
    assert "jax:" in (out / "environment.txt").read_text()
