"""The GPU check (experiments/benchmarks/gpu_check.py) on the CPU: the tiny run's JSON (every row, FLOPs equal to a
hand count, ratios consistent with the times), the refusal of full shapes on a CPU, the budget's skipping, the
verdicts and the chip table, and that it imports only what a bare GPU image has."""

import datetime
import json
import os
import statistics
import subprocess
import sys

import pytest

from experiments.benchmarks import accelerator, gpu_check
from tests.multidevice import REPO

ROWS = [
    "train/teacher/float32", "train/teacher/bfloat16", "train/teacher/float16",
    "infer/teacher/float32", "infer/teacher/bfloat16",
    "fp8/ffn/bfloat16", "fp8/ffn/fp8->float32", "fp8/ffn/fp8->bfloat16",
    "infer/int8/float32", "infer/int8/bfloat16",
    "infer/compacted/float32", "infer/compacted/bfloat16",
    "infer/student/float32", "infer/student/bfloat16",
    "infer/mqa/float32", "infer/mqa/bfloat16",
    "infer/bilstm/float32", "infer/bilstm/bfloat16",
]


def cpu_env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``(payload, stdout)`` of ``gpu_check --shapes=tiny`` run from the command line on the CPU."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.gpu_check", "--shapes=tiny", f"--out={out}"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


# -- FLOPs of the tiny shapes, counted by hand: 2*m*k*n per [m, k] @ [k, n] product, training = 3 x forward --

B, S = 2, 8  # batch, sequence
T = B * S  # tokens
H, F, L, D = 32, 64, 2, 8  # hidden, FFN, labels, head width (32 / 4 heads)


def mm(m, k, n):
    return 2 * m * k * n


def layer(heads, kv_heads, ffn):
    """One Transformer layer: Q, K, V, scores and context per head, output projection, FFN in and out."""
    return (mm(T, H, heads * D) + 2 * mm(T, H, kv_heads * D)
            + B * heads * (mm(S, D, S) + mm(S, S, D))
            + mm(T, heads * D, H) + mm(T, H, ffn) + mm(T, ffn, H))


HEAD = mm(B, H, H) + mm(B, H, L)  # pooler and classifier
TEACHER = 4 * layer(4, 4, 64) + HEAD
COMPACTED = 4 * layer(2, 2, 32) + HEAD  # half the heads, half the FFN units
STUDENT = 3 * layer(4, 4, 64) + HEAD
MQA = 3 * layer(4, 1, 64) + HEAD
# BiLSTM: embed 16, hidden 8 per direction; input and recurrent products of both directions, MLP 16, classifier.
BILSTM = 2 * (mm(T, 16, 4 * 8) + mm(T, 8, 4 * 8)) + mm(B, 2 * 8, 16) + mm(B, 16, L)
FFN = mm(T, H, F) + mm(T, F, H)  # the fp8 rows: both Dense layers of the FFN

HAND_FLOPS = {"train/teacher": 3 * TEACHER, "infer/teacher": TEACHER, "infer/int8": TEACHER,
              "infer/compacted": COMPACTED, "infer/student": STUDENT, "infer/mqa": MQA, "infer/bilstm": BILSTM,
              "fp8/ffn": FFN}


def test_hand_count_itself():
    assert TEACHER == 4 * (98_304 + 16_384 + 32_768 + 131_072) + 4_352 == 1_118_464
    assert BILSTM == 49_152 + 1_024 + 128


def test_tiny_run_measures_every_row_with_hand_counted_flops(tiny_run):
    payload, stdout = tiny_run
    rows = payload["rows"]
    assert [r["name"] for r in rows] == ROWS
    assert all(r["status"] == "ok" for r in rows), [(r["name"], r.get("error")) for r in rows if r["status"] != "ok"]
    teacher = payload["config"]["teacher"]
    assert (teacher["num_layers"], teacher["hidden_size"], teacher["num_heads"], teacher["intermediate_size"],
            teacher["num_labels"], payload["config"]["batch"], payload["config"]["seq"]) == (4, H, 4, F, L, B, S)
    for r in rows:
        assert r["flops"] == HAND_FLOPS[r["name"].rsplit("/", 1)[0]], r["name"]
        assert r["tokens"] == T
        assert r["name"] in stdout  # the table lists every row
    assert "2*m*n*k" in payload["flop_convention"] and "3 forward passes" in payload["flop_convention"]


def test_tiny_run_ratios_are_consistent_with_the_times(tiny_run):
    rows = {r["name"]: r for r in tiny_run[0]["rows"]}
    for name, r in rows.items():
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]), rel=1e-12)
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_s"], rel=1e-12)
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["median_s"], rel=1e-12)
        base = rows[r["ratio_to"]]
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"], rel=1e-12)
        assert r["ratio"] == pytest.approx(base["median_s"] / r["median_s"], rel=1e-9)
        if name.startswith(("train/", "infer/")):
            assert r["ratio_to"] == name.rsplit("/", 1)[0] + "/float32"
        if r.get("teacher_row"):
            teacher = rows[r["teacher_row"]]
            assert r["teacher_row"] == "infer/teacher/" + name.rsplit("/", 1)[1]
            assert r["speedup_vs_teacher"] == pytest.approx(r["tokens_per_s"] / teacher["tokens_per_s"], rel=1e-12)
            assert r["flop_ratio_vs_teacher"] == pytest.approx(teacher["flops"] / r["flops"], rel=1e-12)
    assert rows["fp8/ffn/fp8->float32"]["ratio_to"] == "fp8/ffn/bfloat16"
    for variant in ("fp8->float32", "fp8->bfloat16"):  # fp8 computes the same Dense layers, to fp8's precision
        assert 0 < rows[f"fp8/ffn/{variant}"]["max_rel_err_vs_bfloat16"] < 0.15


def test_tiny_run_records_where_and_when_and_gives_no_gpu_verdicts_on_a_cpu(tiny_run):
    payload = tiny_run[0]
    assert payload["device"]["platform"] == "cpu" and payload["device"]["peak_bf16_flops"] is None
    versions = payload["versions"]
    assert versions["jax"] and versions["jaxlib"] != "n/a" and versions["cuda_runtime"] == "n/a"
    assert datetime.datetime.fromisoformat(payload["date"]).tzinfo is not None
    assert payload["git_commit"] and payload["environment"]["platform"] == "cpu"
    assert payload["wall_s"] < payload["budget_s"] == gpu_check.DEFAULT_BUDGET_S
    for r in payload["rows"]:
        assert r["mfu"] is None  # no peak for a CPU
        assert r["verdict"]["holds"] is None
        assert r["verdict"]["text"] == "baseline" or r["verdict"]["text"].startswith("n/a (not a GPU)")


def test_the_flops_are_those_of_the_models_that_run():
    """The compressed rows' FLOPs come from configs derived without parameters; the models built are those."""
    shapes = gpu_check.SHAPES["tiny"]
    models = gpu_check.Models(shapes)
    small = gpu_check.compacted_config(shapes)
    cfg = models.compacted[0]
    assert [cfg.heads(i) for i in range(4)] == [small.heads(i) for i in range(4)] == [2] * 4
    assert [cfg.ffn_size(i) for i in range(4)] == [small.ffn_size(i) for i in range(4)] == [32] * 4
    assert [cfg.kv_heads(i) for i in range(4)] == [2] * 4
    assert (models.student[0].num_layers, models.mqa[0].num_layers, models.mqa[0].kv_heads(0)) == (3, 3, 1)
    assert models.student[0].kv_heads(0) == 4


def test_full_shapes_are_refused_on_a_cpu_saying_why(tmp_path):
    out = tmp_path / "full.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.gpu_check", f"--out={out}"], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "refusing the full BERT-base shapes on JAX's cpu backend" in proc.stderr
    assert "--shapes=tiny" in proc.stderr and "--allow_cpu" in proc.stderr
    assert not out.exists()


def test_refusal_only_for_full_shapes_on_a_cpu():
    import jax

    if jax.devices()[0].platform != "cpu":
        pytest.skip("this process's backend is not a CPU")
    assert "refusing" in gpu_check.refusal("full", allow_cpu=False)
    assert gpu_check.refusal("full", allow_cpu=True) is None
    assert gpu_check.refusal("tiny", allow_cpu=False) is None


def fake_measure(speeds: dict, clock_box: list, cost_s: float):
    """A stand-in for gpu_check.measure: each row costs ``cost_s`` seconds of a fake clock and runs at
    ``speeds[name]`` tokens/s (default 1000); nothing is compiled."""

    def measure(case, rounds, target_call_s, clock):
        clock_box[0] += cost_s
        median = case.tokens / speeds.get(case.name, 1000.0)
        return {"status": "ok", "compile_s": 0.0, "iters_per_call": 1, "rounds": rounds, "times_s": [median],
                "median_s": median, "tokens_per_s": case.tokens / median, "flops_per_s": case.flops / median}

    return measure


@pytest.fixture
def fake_clock(monkeypatch):
    box = [0.0]
    monkeypatch.setattr(gpu_check, "now", lambda: box[0])
    return box


def test_rows_past_the_budget_are_skipped_and_marked_never_dropped(monkeypatch, fake_clock, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "measure", fake_measure({}, fake_clock, cost_s=10.0))
    out = tmp_path / "budget.json"
    payload = gpu_check.run_check("tiny", budget_s=45.0, out=str(out))
    rows = payload["rows"]
    assert [r["name"] for r in rows] == ROWS
    # 10 s a row: the fifth row would end at 50 s > 45 s, and so would every later one.
    assert [r["status"] for r in rows] == ["ok"] * 4 + [gpu_check.SKIPPED] * (len(ROWS) - 4)
    assert json.loads(out.read_text())["rows"][-1]["status"] == gpu_check.SKIPPED
    table = capsys.readouterr().out
    assert table.count(gpu_check.SKIPPED) >= len(ROWS) - 4
    skipped = {r["name"]: r for r in rows}["infer/student/float32"]
    assert skipped["ratio"] is None and skipped["mfu"] is None
    assert skipped["flop_ratio_vs_teacher"] == pytest.approx(TEACHER / STUDENT)  # known without running


def test_a_cheap_row_still_runs_after_an_expensive_one_is_skipped(monkeypatch, fake_clock):
    costs = iter([5.0, 30.0] + [1.0] * 30)  # the bfloat16 training row is slow, the rest fast

    def measure(case, rounds, target_call_s, clock):
        fake_clock[0] += next(costs)
        return {"status": "ok", "compile_s": 0.0, "iters_per_call": 1, "rounds": 1, "times_s": [1.0],
                "median_s": 1.0, "tokens_per_s": float(case.tokens), "flops_per_s": case.flops}

    monkeypatch.setattr(gpu_check, "measure", measure)
    rows = gpu_check.run_check("tiny", budget_s=50.0, out=None)["rows"]
    status = {r["name"]: r["status"] for r in rows}
    # At 35 s the float16 row is estimated at the slowest training row (30 s) and skipped; the first inference
    # row at the cheapest row so far (5 s), so it runs, and the next ones at its 1 s.
    assert [status[f"train/teacher/{p}"] for p in ("float32", "bfloat16", "float16")] == ["ok", "ok", gpu_check.SKIPPED]
    assert all(s == "ok" for name, s in status.items() if not name.startswith("train/"))


def test_verdicts_and_mfu_on_a_gpu(monkeypatch, fake_clock):
    h100 = {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "device_count": 1, "chip": "H100 SXM",
            "peak_bf16_flops": 989.4e12, "peak_source": "test"}
    monkeypatch.setattr(gpu_check.accelerator, "device_info", lambda: h100)
    monkeypatch.setattr(gpu_check.accelerator, "is_gpu", lambda device=None: True)
    speeds = {"train/teacher/float32": 1000.0, "train/teacher/bfloat16": 2500.0, "train/teacher/float16": 1500.0,
              "infer/teacher/float32": 1000.0, "infer/teacher/bfloat16": 1000.0,
              "infer/student/float32": 1.2 * 1000.0 * TEACHER / STUDENT,  # 1.2x the FLOP ratio: holds
              "infer/compacted/float32": 0.5 * 1000.0 * TEACHER / COMPACTED}  # half the FLOP ratio: fails
    monkeypatch.setattr(gpu_check, "measure", fake_measure(speeds, fake_clock, cost_s=0.0))
    rows = {r["name"]: r for r in gpu_check.run_check("tiny", budget_s=100.0, out=None)["rows"]}
    assert rows["train/teacher/float32"]["verdict"]["text"] == "baseline"
    assert rows["train/teacher/bfloat16"]["verdict"]["holds"] is True
    assert rows["train/teacher/bfloat16"]["verdict"]["text"].startswith("holds: bf16 training >= 2x float32 "
                                                                        "(measured 2.50x")
    assert rows["train/teacher/float16"]["verdict"]["holds"] is False
    assert rows["train/teacher/float16"]["verdict"]["text"].startswith("FAILS")
    assert rows["infer/student/float32"]["verdict"]["holds"] is True
    assert rows["infer/compacted/float32"]["verdict"]["holds"] is False
    assert rows["infer/teacher/bfloat16"]["verdict"]["holds"] is False  # 1.0x < 1.5x
    assert rows["train/teacher/float32"]["mfu"] == pytest.approx(1000.0 / T * 3 * TEACHER / 989.4e12)
    assert all(r["verdict"]["text"] for r in rows.values())


@pytest.mark.parametrize("kind, expected", [
    ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989.4e12)),
    ("NVIDIA H100 PCIe", ("H100 PCIe", 756.5e12)),
    ("NVIDIA H100 NVL", ("H100 NVL", None)),
    ("NVIDIA H200", ("H200", 989.4e12)),
    ("NVIDIA A100-SXM4-80GB", ("A100", 312e12)),
    ("NVIDIA A100-PCIE-40GB", ("A100", 312e12)),
    ("NVIDIA L4", ("L4", 121e12)),
    ("NVIDIA L40S", (None, None)),
    ("TPU v4", (None, None)),
    ("cpu", (None, None)),
])
def test_chip_peaks(kind, expected):
    assert accelerator.chip(kind) == expected


def test_cuda_versions_read_off_jaxlib_plugin(monkeypatch):
    import types

    from jax._src import lib

    fake = types.SimpleNamespace(cuda_runtime_get_version=lambda: 12080, cuda_driver_get_version=lambda: 13000,
                                 cudnn_get_version=lambda: 90800)
    monkeypatch.setattr(lib, "cuda_versions", fake)
    versions = accelerator.software_versions()
    assert (versions["cuda_runtime"], versions["cuda_driver"], versions["cudnn"]) == ("12.8", "13.0", "9.8.0")
    monkeypatch.setattr(lib, "cuda_versions", None)
    assert accelerator.software_versions()["cuda_runtime"] == "n/a"


def test_imports_only_what_a_bare_gpu_image_has():
    """The GPU image lacks ml_collections, datasets, tensorboardX, gcsfs, jax2onnx (and may lack more); the check
    imports none of them, nor experiments.tools (benchmarks depend on tools' callers, not on tools)."""
    code = ("import sys\n"
            "for m in ('ml_collections', 'datasets', 'tensorboardX', 'gcsfs', 'jax2onnx', 'tqdm', 'matplotlib', "
            "'transformers', 'torch', 'onnxruntime'):\n"
            "    sys.modules[m] = None\n"
            "import experiments.benchmarks.gpu_check\n"
            "assert not [m for m in sys.modules if m.startswith('experiments.tools')]\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv, match", [(["--shapes=huge"], "flag --shapes=huge"),
                                         (["--budget_s=-1"], "flag --budget_s=-1"),
                                         (["--rounds=0"], "flag --rounds=0")])
def test_bad_flags_are_refused_when_parsed(argv, match):
    from absl import flags

    fv = flags.FlagValues()
    gpu_check.define_flags(fv)
    with pytest.raises(flags.Error, match=match):
        fv(["prog", *argv])
    fv.unparse_flags()
    fv(["prog"])
    assert (fv.shapes, fv.budget_s, fv.allow_cpu, fv.out) == ("full", 420.0, False, "bench_results/gpu_check.json")
