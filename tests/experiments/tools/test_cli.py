"""Every command-line entry point: absl flags, listed by ``--help``, and a bad argument refused naming it when
the flags are parsed, before any data or model is loaded (the tools' own tests check theirs in more detail)."""

import importlib
import subprocess
import sys

import pytest
from absl import app, flags

from experiments.runtime import cli
from experiments.tools import precision_train, report
from tests.multidevice import REPO

ENTRY_POINTS = [f"experiments.tools.{m}" for m in ("prune", "quant_eval", "precision_eval", "precision_train",
                                                   "export", "export_eval", "report")] + [
    f"experiments.benchmarks.{m}" for m in ("run_all", "bench_compaction", "bench_fusion", "bench_inference",
                                            "bench_int8", "bench_mqa", "bench_onnx", "bench_precision",
                                            "bench_train")]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_lists_every_flag(module):
    fv = flags.FlagValues()
    importlib.import_module(module).define_flags(fv)
    names = [n for n in fv if "." not in n]  # config overrides are listed under --config
    assert len(names) >= 2
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert "Traceback" not in out.stderr, out.stderr  # absl's --help prints usage and exits with status 1
    missing = [n for n in names if f"--{n}" not in out.stdout and f"--[no]{n}" not in out.stdout]
    assert not missing, f"{module} --help lacks {missing}"


BAD = [  # (module, arguments, what the message must say)
    ("experiments.benchmarks.run_all", ["--only=bench_inference,bench_gpu"], "flag --only=.*subset of bench_"),
    ("experiments.benchmarks.bench_compaction", ["--head_fraction=1.0"], "flag --head_fraction=1.0: must be in"),
    ("experiments.benchmarks.bench_fusion", ["--precision=float8"], "flag --precision=float8: is not a precision"),
    ("experiments.benchmarks.bench_inference", ["--seq=513"], "flag --seq=513"),  # the position table has 512
    ("experiments.benchmarks.bench_int8", ["--batch=3"], "flag --batch=3"),  # calibration takes four rows
    ("experiments.benchmarks.bench_int8", ["--variants=default,avx9"], "flag --variants=.*subset of default,"),
    ("experiments.benchmarks.bench_mqa", ["--layers=7"], "flag --layers=7"),  # 6 MiniLM layers to take from
    ("experiments.benchmarks.bench_onnx", ["--data_dir=/nonexistent/sst2"], "flag --data_dir=/nonexistent/sst2: is"),
    ("experiments.benchmarks.bench_onnx", ["--calib_method=percentile:x"], "flag --calib_method=percentile:x"),
    ("experiments.benchmarks.bench_precision", ["--underflow_batches=0"], "flag --underflow_batches=0"),
    ("experiments.benchmarks.bench_train", ["--steps=0"], "flag --steps=0"),
    ("experiments.tools.precision_train", ["--workdir=/tmp/w", "--variants=float8"], "flag --variants=.*subset"),
    ("experiments.tools.precision_train", ["--workdir=/tmp/w", "--seeds=0,one"], "flag --seeds=.*integers >= 0"),
    ("experiments.tools.precision_train", ["--workdir=/tmp/w", "--config.num_train_steps=many"],
     "flag --config.num_train_steps=many"),
    ("experiments.tools.precision_train", ["--workdir=/tmp/w", "--config.num_trian_steps=7"],
     "override names no field of the config: .*num_trian_steps"),
    ("experiments.tools.report", ["--rounds=0"], "flag --rounds=0"),
]


@pytest.mark.parametrize("module, args, match", BAD)
def test_a_bad_argument_fails_when_parsed_naming_it(module, args, match):
    define = importlib.import_module(module).define_flags
    if module.endswith("precision_train"):  # ml_collections reads --config.* overrides from the argv it is given
        define = (lambda d: lambda fv: d(fv, ["prog", *args]))(define)
    with pytest.raises(flags.Error, match=match):
        cli.parse(define, args)


def test_precision_train_takes_config_overrides():
    args = ["--workdir=/tmp/w", "--config=experiments/configs/finetune.py:sst2", "--config.num_train_steps=700",
            "--seeds=0,3"]
    fv = cli.parse(lambda fv: precision_train.define_flags(fv, ["prog", *args]), args)
    assert (fv.config.task, fv.config.num_train_steps, fv.seeds) == ("sst2", 700, ["0", "3"])
    assert fv.variants == ["float32", "bfloat16", "float16", "float16_unscaled"]


def test_report_checks_runs_and_reference_before_loading(tmp_path):
    (tmp_path / "recipe" / "teacher").mkdir(parents=True)
    report.check_runs([str(tmp_path / "recipe")], "teacher")  # a stage folder's name
    report.check_runs([str(tmp_path / "recipe")], str(tmp_path / "recipe"))
    with pytest.raises(app.UsageError, match="do not exist"):
        report.check_runs([str(tmp_path / "recipe"), str(tmp_path / "missing")], None)
    with pytest.raises(app.UsageError, match="--reference=student is neither"):
        report.check_runs([str(tmp_path / "recipe")], "student")
    with pytest.raises(app.UsageError, match="give one or more run directories"):
        report.check_runs([], None)
