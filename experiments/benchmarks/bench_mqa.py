"""Multi-query / grouped-query successors: key/value parameters, FLOPs and throughput vs full attention.

    python -m experiments.benchmarks.bench_mqa --out=bench_results/mqa.json

A MiniLM-shaped 3-layer successor (12 query heads) with 12 (full), 4 (grouped) and 1 (multi-query) key/value
heads, initialised by mean-pooling key/value heads (compression.theseus.mean_pool_kv_heads), run side by side
at batch 32 x seq 128 in one process. In an encoder the key/value projections are a small share of the work,
so expect modest gains; the saving matters most for decoding, where the key/value cache dominates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.runtime import measuring
from experiments.runtime import cli
from models import theseus as tmodels
from models.transformer import Transformer, TransformerConfig

MAX_SEQ = TransformerConfig().max_position_embeddings  # longest sequence the position table covers


def kv_param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params)
               if any(getattr(k, "key", None) in ("key", "value") for k in path))


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_integer("batch", 32, "batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seq", 128, "sequence length", lower_bound=1, upper_bound=MAX_SEQ, flag_values=fv)
    flags.DEFINE_integer("layers", 3, "successor layers (of the 6 MiniLM-shaped ones)", lower_bound=1,
                         upper_bound=TransformerConfig().num_layers, flag_values=fv)
    flags.DEFINE_integer("rounds", 7, "interleaved timing rounds", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("out", None, "JSON results path", flag_values=fv)


def run(fv: flags.FlagValues):
    """The benchmark on parsed flags ``fv`` (:func:`define_flags`)."""

    teacher_cfg = TransformerConfig(head="sequence")
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, teacher_cfg.vocab_size, (fv.batch, fv.seq)),
                      jnp.int32)
    teacher = Transformer(teacher_cfg).init(jax.random.key(0), ids[:1])["params"]
    variants = {}
    for kv in (12, 4, 1):
        succ = tmodels.successor_from_predecessor(teacher_cfg, fv.layers, num_kv_heads=None if kv == 12 else kv)
        tparams = tmodels.init_from_predecessor(teacher_cfg, teacher, succ)
        variants[f"kv_heads={kv}"] = tmodels.extract_successor(teacher_cfg, succ, tparams)

    fns = {}
    for name, (cfg, params) in variants.items():
        model = Transformer(cfg)
        fn = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x).logits)
        fns[name] = (fn, params)
    times = measuring.time_interleaved({n: (lambda f=f, p=p: f(p, ids)) for n, (f, p) in fns.items()},
                                    rounds=fv.rounds)
    tokens = fv.batch * fv.seq
    rows = []
    for name, (cfg, params) in variants.items():
        model = Transformer(cfg)
        rows.append({"model": name, "kv_params": kv_param_count(params), "params": measuring.param_count(params),
                     "gflops": measuring.compiled_flops(lambda p, x: model.apply({"params": p}, x).logits, params,
                                                     ids) / 1e9,
                     "tokens_per_s": tokens / measuring.median(times[name])})
    for r in rows:
        r["speed_vs_full"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        r["kv_param_reduction"] = rows[0]["kv_params"] / r["kv_params"]
    measuring.print_table(rows, ["model", "kv_params", "kv_param_reduction", "params", "gflops", "tokens_per_s",
                              "speed_vs_full"],
                       f"{fv.layers}-layer successors, batch {fv.batch} x seq {fv.seq}")
    measuring.write_json(fv.out, {"benchmark": "mqa", "rows": rows, "times_s": times})



if __name__ == "__main__":
    cli.run_script(define_flags, run)
