"""Multi-query / grouped-query successors: key/value parameters, FLOPs and throughput vs full attention.

    python -m experiments.benchmarks.bench_mqa --out bench_results/mqa.json

A MiniLM-shaped 3-layer successor (12 query heads) with 12 (full), 4 (grouped) and 1 (multi-query) key/value
heads, initialised by mean-pooling key/value heads (compression.theseus.mean_pool_kv_heads), run side by side
at batch 32 x seq 128 in one process. In an encoder the key/value projections are a small share of the work,
so expect modest gains; the saving matters most for decoding, where the key/value cache dominates.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from models import theseus as tmodels
from models.transformer import Transformer, TransformerConfig


def kv_param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params)
               if any(getattr(k, "key", None) in ("key", "value") for k in path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    teacher_cfg = TransformerConfig(head="sequence")
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, teacher_cfg.vocab_size, (args.batch, args.seq)),
                      jnp.int32)
    teacher = Transformer(teacher_cfg).init(jax.random.key(0), ids[:1])["params"]
    variants = {}
    for kv in (12, 4, 1):
        succ = tmodels.successor_from_predecessor(teacher_cfg, args.layers, num_kv_heads=None if kv == 12 else kv)
        tparams = tmodels.init_from_predecessor(teacher_cfg, teacher, succ)
        variants[f"kv_heads={kv}"] = tmodels.extract_successor(teacher_cfg, succ, tparams)

    fns = {}
    for name, (cfg, params) in variants.items():
        model = Transformer(cfg)
        fn = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x).logits)
        fns[name] = (fn, params)
    times = common.time_interleaved({n: (lambda f=f, p=p: f(p, ids)) for n, (f, p) in fns.items()},
                                    rounds=args.rounds)
    tokens = args.batch * args.seq
    rows = []
    for name, (cfg, params) in variants.items():
        model = Transformer(cfg)
        rows.append({"model": name, "kv_params": kv_param_count(params), "params": common.param_count(params),
                     "gflops": common.compiled_flops(lambda p, x: model.apply({"params": p}, x).logits, params,
                                                     ids) / 1e9,
                     "tokens_per_s": tokens / common.median(times[name])})
    for r in rows:
        r["speed_vs_full"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        r["kv_param_reduction"] = rows[0]["kv_params"] / r["kv_params"]
    common.print_table(rows, ["model", "kv_params", "kv_param_reduction", "params", "gflops", "tokens_per_s",
                              "speed_vs_full"],
                       f"{args.layers}-layer successors, batch {args.batch} x seq {args.seq}")
    common.write_json(args.out, {"benchmark": "mqa", "rows": rows, "times_s": times})


if __name__ == "__main__":
    main()
