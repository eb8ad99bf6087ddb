"""Structured pruning gives real speed: compacted vs unpruned MiniLM-shaped Transformer, in one process.

    python -m experiments.benchmarks.bench_compaction --out=bench_results/compaction.json

Masks remove a fraction of heads and FFN units (lowest weight norm, a stand-in for importance: speed does
not depend on which units go), compaction slices the parameters into a smaller dense model, and both run at
batch 32 x seq 128. The figure is the measured speed ratio beside XLA's FLOP ratio (target: speed ratio at
least 80% of the FLOP ratio), after checking that masked and compacted outputs agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from compression.pruning import compaction
from experiments.runtime import measuring
from experiments.runtime import cli
from models.transformer import Transformer, TransformerConfig

MAX_SEQ = TransformerConfig().max_position_embeddings  # longest sequence the position table covers


def norm_masks(cfg: TransformerConfig, params: dict, head_fraction: float, ffn_fraction: float):
    """Per-layer masks keeping the heads / FFN units with the largest output-projection row norms."""
    heads, ffn = {}, {}
    d = cfg.dim_per_head
    for i in range(cfg.num_layers):
        layer = params["encoder"][f"layer_{i}"]
        w_o = np.asarray(layer["attention"]["output"]["kernel"]).reshape(cfg.heads(i), d, -1)
        score = np.linalg.norm(w_o.reshape(cfg.heads(i), -1), axis=1)
        keep = np.argsort(-score)[: max(1, round(cfg.heads(i) * (1 - head_fraction)))]
        heads[i] = np.isin(np.arange(cfg.heads(i)), keep).astype(np.float32)
        w_f = np.linalg.norm(np.asarray(layer["output"]["kernel"]), axis=1)
        keep = np.argsort(-w_f)[: max(1, round(cfg.ffn_size(i) * (1 - ffn_fraction)))]
        ffn[i] = np.isin(np.arange(cfg.ffn_size(i)), keep).astype(np.float32)
    return heads, ffn


def masked_params(cfg, params, heads, ffn):
    """The unpruned model with masked units zeroed in place (same outputs as the masked model)."""
    params = jax.tree.map(np.array, params)
    d = cfg.dim_per_head
    for i in range(cfg.num_layers):
        layer = params["encoder"][f"layer_{i}"]
        layer["attention"]["output"]["kernel"] *= np.repeat(heads[i], d)[:, None]
        layer["output"]["kernel"] *= ffn[i][:, None]
    return params


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_integer("batch", 32, "batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seq", 128, "sequence length", lower_bound=1, upper_bound=MAX_SEQ, flag_values=fv)
    flags.DEFINE_float("head_fraction", 0.4, "fraction of heads pruned, in [0, 1)", flag_values=fv)
    flags.DEFINE_float("ffn_fraction", 0.5, "fraction of FFN units pruned, in [0, 1)", flag_values=fv)
    flags.DEFINE_integer("rounds", 7, "interleaved timing rounds", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("out", None, "JSON results path", flag_values=fv)
    for name in ("head_fraction", "ffn_fraction"):
        cli.check(fv, name, lambda v: 0 <= v < 1, "must be in [0, 1)")


def run(fv: flags.FlagValues):
    """The benchmark on parsed flags ``fv`` (:func:`define_flags`)."""

    cfg = TransformerConfig(head="sequence")
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, cfg.vocab_size, (fv.batch, fv.seq)), jnp.int32)
    params = Transformer(cfg).init(jax.random.key(0), ids[:1])["params"]
    heads, ffn = norm_masks(cfg, params, fv.head_fraction, fv.ffn_fraction)
    small_cfg, small_params = compaction.compact(cfg, params, heads, ffn)

    def forward(c):
        model = Transformer(c)
        return lambda p, x: model.apply({"params": p}, x).logits

    full_fn, small_fn = jax.jit(forward(cfg)), jax.jit(forward(small_cfg))
    diff = float(jnp.abs(full_fn(masked_params(cfg, params, heads, ffn), ids) - small_fn(small_params, ids)).max())
    times = measuring.time_interleaved({"unpruned": lambda: full_fn(params, ids),
                                     "compacted": lambda: small_fn(small_params, ids)}, rounds=fv.rounds)
    flops = {"unpruned": measuring.compiled_flops(forward(cfg), params, ids),
             "compacted": measuring.compiled_flops(forward(small_cfg), small_params, ids)}
    sizes = {"unpruned": measuring.param_count(params), "compacted": measuring.param_count(small_params)}
    tokens = fv.batch * fv.seq
    rows = [{"model": n, "params": sizes[n], "gflops": flops[n] / 1e9, "median_ms": 1e3 * measuring.median(t),
             "tokens_per_s": tokens / measuring.median(t)} for n, t in times.items()]
    speed_ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    flop_ratio = flops["unpruned"] / flops["compacted"]
    measuring.print_table(rows, ["model", "params", "gflops", "median_ms", "tokens_per_s"],
                       f"Compaction: {fv.head_fraction:.0%} heads, {fv.ffn_fraction:.0%} FFN units pruned; "
                       f"batch {fv.batch} x seq {fv.seq}")
    print(f"masked vs compacted max |logit diff|: {diff:.2e}")
    print(f"speed ratio {speed_ratio:.2f}x, FLOP ratio {flop_ratio:.2f}x, speed/FLOP = "
          f"{speed_ratio / flop_ratio:.0%} (target >= 80%)")
    measuring.write_json(fv.out, {"benchmark": "compaction", "rows": rows, "speed_ratio": speed_ratio,
                                 "flop_ratio": flop_ratio, "max_abs_logit_diff": diff,
                                 "heads_per_layer": list(small_cfg.num_heads),
                                 "ffn_per_layer": list(small_cfg.intermediate_size), "times_s": times})



if __name__ == "__main__":
    cli.run_script(define_flags, run)
