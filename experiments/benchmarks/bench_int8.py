"""Inference throughput of the real int8 path against float32, same model, same process.

    python -m experiments.benchmarks.bench_int8 --out bench_results/int8.json

MiniLM shape (``TransformerConfig()`` defaults: 6 layers, hidden 384, 12 heads, FFN 1536), random weights,
batch 32 x seq 128 by default. The int8 model is calibrated (max, one random batch: speed does not depend on
the scales), converted with :func:`compression.quantization.convert_to_int8` (every Dense runs
int8 x int8 -> int32) and timed interleaved with the float32 model; the figure is the ratio of median
times (target >= 2.5x). Each XLA flag variant (``--variants``, default: oneDNN custom calls) runs the same
measurement in a subprocess, since XLA_FLAGS must be set before jax starts; ``default`` is this process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from compression import quantization
from experiments.benchmarks import common
from models.transformer import Transformer, TransformerConfig

VARIANTS = {
    "default": "",
    "onednn": "--xla_cpu_experimental_onednn_custom_call=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
}


def measure(batch: int, seq: int, rounds: int) -> dict:
    """Times float32 and int8 forward passes (jitted, interleaved); returns medians and the speed-up."""
    cfg = TransformerConfig(hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, cfg.vocab_size, size=(batch, seq), dtype=np.int32))
    mask = jnp.ones_like(ids)
    variables = model.init(jax.random.key(0), ids[:1])
    calibrated = quantization.calibrate(model.apply, variables, [(ids[:4], mask[:4])], method="max")
    t = quantization.int8()
    variables8 = t.init(jax.random.key(0), calibrated, model.apply, ids[:1])
    apply8 = t.wrap(model.apply)

    f32 = jax.jit(lambda v, i, m: model.apply(v, i, attention_mask=m).last_hidden_state)
    i8 = jax.jit(lambda v, i, m: apply8(v, i, attention_mask=m).last_hidden_state)
    fq = quantization.fake_quant().wrap(model.apply)
    fake = jax.jit(lambda v, i, m: fq(v, i, attention_mask=m).last_hidden_state)
    # the int8 model must compute what the fake-quantized one does
    drift = float(jnp.max(jnp.abs(i8(variables8, ids, mask) - fake(calibrated, ids, mask))))
    times = common.time_interleaved({"float32": lambda: f32(variables, ids, mask),
                                     "int8": lambda: i8(variables8, ids, mask)}, rounds=rounds)
    med = {k: common.median(v) for k, v in times.items()}
    return {"float32_ms": 1e3 * med["float32"], "int8_ms": 1e3 * med["int8"],
            "speedup": med["float32"] / med["int8"], "tokens_per_s_int8": batch * seq / med["int8"],
            "tokens_per_s_float32": batch * seq / med["float32"], "max_abs_diff_int8_vs_fake_quant": drift,
            "times_s": times}


def _run_variant(name: str, args) -> dict:
    """Runs :func:`measure` in a subprocess with the variant's XLA flags."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "variant.json")
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {VARIANTS[name]}".strip()}
        cmd = [sys.executable, "-m", "experiments.benchmarks.bench_int8", "--variants", "default",
               "--batch", str(args.batch), "--seq", str(args.seq), "--rounds", str(args.rounds), "--quiet",
               "--out", out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout)[-2000:]}
        with open(out) as f:
            return json.load(f)["results"]["default"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", default="default,onednn",
                        help=f"comma-separated XLA flag variants among {sorted(VARIANTS)}")
    parser.add_argument("--quiet", action="store_true", help="no table (used by the variant subprocesses)")
    parser.add_argument("--out", default=None, help="JSON results path")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")

    results = {}
    for name in names:
        results[name] = measure(args.batch, args.seq, args.rounds) if name == "default" else _run_variant(name, args)
    if not args.quiet:
        rows = [{"xla_flags": name, **{k: v for k, v in r.items() if k != "times_s"}} for name, r in results.items()]
        common.print_table(rows, ["xla_flags", "float32_ms", "int8_ms", "speedup", "tokens_per_s_int8",
                                  "max_abs_diff_int8_vs_fake_quant", "error"],
                           f"int8 vs float32 inference, MiniLM shape, batch {args.batch} x seq {args.seq}")
        best = max((r["speedup"] for r in results.values() if "speedup" in r), default=float("nan"))
        print(f"best int8 speed-up: {best:.2f}x (target >= 2.5x)")
    common.write_json(args.out, {"batch": args.batch, "seq": args.seq, "results": results})


if __name__ == "__main__":
    main()
