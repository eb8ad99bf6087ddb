"""Runs every benchmark (``make bench``), each in its own process, writing ``OUT_DIR/<name>.json``.

Each benchmark compares its candidates side by side inside its own process; running them one after another
in separate processes keeps XLA flags and thread pools from leaking between them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BENCHMARKS = [
    "bench_inference",  # our Transformer vs PyTorch BertModel, inference tokens/s
    "bench_train",  # our train step vs PyTorch BertForSequenceClassification + AdamW
    "bench_compaction",  # structured pruning: compacted vs unpruned speed beside the FLOP ratio
    "bench_mqa",  # multi-query / grouped-query successors: KV parameters, FLOPs, throughput
    "bench_precision",  # float32/bfloat16/float16 policies: throughput, logit drift, float16 gradient underflow
    "bench_fusion",  # fused vs separate QKV throughput; residual add + LayerNorm kernels
    "bench_onnx",  # MiniLM in onnxruntime: our export vs torch.onnx, our int8 Q/DQ vs fp32 and ORT dynamic int8
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default="bench_results")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(BENCHMARKS))
    args = parser.parse_args(argv)
    selected = [b for b in BENCHMARKS if not args.only or b in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {BENCHMARKS}")
    os.makedirs(args.out_dir, exist_ok=True)
    failed = []
    for name in selected:
        print(f"\n=== {name}", flush=True)
        start = time.time()
        rc = subprocess.call([sys.executable, "-m", f"experiments.benchmarks.{name}",
                              "--out", os.path.join(args.out_dir, f"{name}.json")])
        print(f"=== {name}: exit {rc}, {time.time() - start:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        raise SystemExit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
