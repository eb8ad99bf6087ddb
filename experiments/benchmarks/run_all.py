"""Runs every benchmark (``make bench``), each in its own process, writing ``OUT_DIR/<name>.json``.

Each benchmark compares its candidates side by side inside its own process; running them one after another
in separate processes keeps XLA flags and thread pools from leaking between them.

    python -m experiments.benchmarks.run_all --out_dir=bench_results [--only=bench_inference,bench_mqa]

``--only`` is checked against the known names before anything runs; nothing is cached (each benchmark
measures anew).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import flags

from experiments.runtime import cli

BENCHMARKS = [
    "bench_inference",  # our Transformer vs PyTorch BertModel, inference tokens/s
    "bench_train",  # our train step vs PyTorch BertForSequenceClassification + AdamW
    "bench_compaction",  # structured pruning: compacted vs unpruned speed beside the FLOP ratio
    "bench_mqa",  # multi-query / grouped-query successors: KV parameters, FLOPs, throughput
    "bench_precision",  # float32/bfloat16/float16 policies: throughput, logit drift, float16 gradient underflow
    "bench_fusion",  # fused vs separate QKV throughput; residual add + LayerNorm kernels
    "bench_onnx",  # MiniLM in onnxruntime: our export vs torch.onnx, our int8 Q/DQ vs fp32 and ORT dynamic int8
]


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("out_dir", "bench_results", "where OUT_DIR/<name>.json go", flag_values=fv)
    flags.DEFINE_list("only", [], "comma-separated subset of: " + ",".join(BENCHMARKS), flag_values=fv)
    cli.subset(fv, "only", BENCHMARKS, nonempty=False)


def run(fv: flags.FlagValues) -> None:
    """Runs the selected benchmarks one after another, each in its own process."""
    selected = [b for b in BENCHMARKS if not fv.only or b in fv.only]
    os.makedirs(fv.out_dir, exist_ok=True)
    failed = []
    for name in selected:
        print(f"\n=== {name}", flush=True)
        start = time.time()
        rc = subprocess.call([sys.executable, "-m", f"experiments.benchmarks.{name}",
                              f"--out={os.path.join(fv.out_dir, f'{name}.json')}"])
        print(f"=== {name}: exit {rc}, {time.time() - start:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        raise SystemExit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    cli.run_script(define_flags, run)
