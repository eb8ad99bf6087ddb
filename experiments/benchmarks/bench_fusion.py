"""Fusion benchmark: fused vs separate QKV, and residual add + LayerNorm.

Run::

    python -m experiments.benchmarks.bench_fusion --out=fusion.json [--precision=bfloat16]

What it measures, in one process, timed in interleaved rounds (medians reported):

1. Fused QKV: inference throughput of a MiniLM-shaped Transformer (``TransformerConfig()`` defaults,
   random init) at batch 32 x seq 128 with separate Q/K/V projections and after
   :func:`compression.fusion.fuse_qkv`, the ratio fused/unfused (median of per-round paired ratios, with
   their range), and the max abs output difference.
2. Residual add + LayerNorm on [B, S, H]: the add and the LayerNorm as two compiled programs (what an
   unfused runtime does: the sum goes through memory), as one program (XLA fuses it), and
   :func:`compression.fusion.skip_layer_norm`; the number of kernels XLA emits for the one-program
   versions; and whether, inside the compiled Transformer layer, the projection feeding each LayerNorm was
   absorbed into the LayerNorm's kernel (no top-level ``dot_general`` of its own).

Expected runtime: about a minute on 2 CPU cores; it runs unchanged on GPU/TPU (``platform`` in the output).
"""

from __future__ import annotations

import re
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags

from compression import fusion, precision
from experiments.runtime import measuring
from experiments.runtime import cli
from models.transformer import Transformer, TransformerConfig

MAX_SEQ = TransformerConfig().max_position_embeddings  # longest sequence the position table covers


def _repeated(fn, args, iters: int):
    """A zero-argument candidate for :func:`measuring.time_interleaved` running ``fn(*args)`` ``iters`` times
    (XLA runs the calls in order; blocking on the last result waits for all of them)."""
    def run():
        for _ in range(iters):
            out = fn(*args)
        return out

    return run


def _paired(times: dict, num: str, den: str) -> tuple[float, float, float]:
    """Median and range of the per-round ratios ``times[num] / times[den]`` (both timed back to back in
    each round, so load changes on a shared machine cancel within a round)."""
    ratios = sorted(a / b for a, b in zip(times[num], times[den]))
    return statistics.median(ratios), ratios[0], ratios[-1]


def _entry_ops(compiled_text: str) -> list[tuple[str, str]]:
    """(instruction name, metadata op_name) of each top-level instruction of a compiled HLO module's entry
    computation; parameters, constants, bitcasts and tuples excluded."""
    entry = compiled_text[compiled_text.index("ENTRY"):]
    ops = []
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(", line)
        if m and m.group(2) not in ("parameter", "constant", "bitcast", "tuple", "get-tuple-element"):
            name = re.search(r'op_name="([^"]+)"', line)
            ops.append((m.group(1), name.group(1) if name else ""))
    return ops


def qkv(batch: int, seq: int, policy: str, rounds: int, iters: int, seed: int) -> dict:
    cfg = TransformerConfig()
    k_ids, k_init = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(k_ids, (batch, seq), 0, cfg.vocab_size, dtype=jnp.int32)
    params = Transformer(cfg).init(k_init, ids[:1, :8])["params"]
    fused_cfg, fused_params = fusion.fuse_qkv(cfg, params)
    wrap = precision.policy(policy).wrap
    fns = {"unfused": jax.jit(wrap(Transformer(cfg).apply)), "fused": jax.jit(wrap(Transformer(fused_cfg).apply))}
    args = {"unfused": ({"params": params}, ids), "fused": ({"params": fused_params}, ids)}
    outs = {k: jax.block_until_ready(fns[k](*args[k])) for k in fns}  # compile
    times = measuring.time_interleaved({k: _repeated(fns[k], args[k], iters) for k in fns}, rounds=rounds)
    med = {k: statistics.median(v) / iters for k, v in times.items()}
    ratio, lo, hi = _paired(times, "unfused", "fused")
    return {
        "precision": policy,
        "unfused_tokens_per_s": batch * seq / med["unfused"], "fused_tokens_per_s": batch * seq / med["fused"],
        "fused_over_unfused": ratio, "fused_over_unfused_min_max": [lo, hi],
        "max_abs_logit_diff": float(jnp.max(jnp.abs(outs["fused"].logits - outs["unfused"].logits))),
        "max_abs_hidden_diff": float(jnp.max(jnp.abs(outs["fused"].last_hidden_state
                                                     - outs["unfused"].last_hidden_state))),
    }


def add_layernorm(batch: int, seq: int, rounds: int, iters: int, seed: int) -> dict:
    h = TransformerConfig().hidden_size
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (batch, seq, h))
    r = jax.random.normal(k2, (batch, seq, h))
    norm = nn.LayerNorm(epsilon=1e-12, force_float32_reductions=False)
    p = norm.init(k3, x)
    scale, bias = p["params"]["scale"], p["params"]["bias"]
    add = jax.jit(jnp.add)
    ln = jax.jit(norm.apply)
    fused_xla = jax.jit(lambda p, a, b: norm.apply(p, a + b))
    skip = jax.jit(fusion.skip_layer_norm)
    fns = {"two_programs": lambda p, a, b: ln(p, add(a, b)), "xla_one_program": fused_xla,
           "skip_layer_norm": lambda p, a, b: skip(a, b, scale, bias)}
    times = measuring.time_interleaved({k: _repeated(f, (p, x, r), iters) for k, f in fns.items()}, rounds=rounds)
    med = {k: statistics.median(v) / iters for k, v in times.items()}
    kernels = {"xla_one_program": len(_entry_ops(fused_xla.lower(p, x, r).compile().as_text())),
               "skip_layer_norm": len(_entry_ops(skip.lower(x, r, scale, bias).compile().as_text()))}

    # Inside a compiled one-layer Transformer: is each LayerNorm's input projection its own kernel?
    cfg = TransformerConfig(num_layers=1)
    ids = jnp.zeros((batch, seq), jnp.int32)
    variables = Transformer(cfg).init(k3, ids[:1, :8])
    ops = _entry_ops(jax.jit(Transformer(cfg).apply).lower(variables, ids).compile().as_text())
    separate = {name: any(op.endswith(f"layer_0/{proj}/dot_general") for _, op in ops)
                for name, proj in (("attention_output", "attention/output"), ("ffn_output", "output"))}
    out = fused_xla(p, x, r)
    return {
        "shape": [batch, seq, h],
        "ms": {k: 1e3 * v for k, v in med.items()},
        "kernels": kernels,
        "max_abs_diff_skip_vs_xla": float(jnp.max(jnp.abs(skip(x, r, scale, bias) - out))),
        "projection_is_separate_kernel_in_layer": separate,
    }


def _known_dtype(name: str) -> bool:
    try:
        precision.dtype_from_name(name)
    except ValueError:
        return False
    return True


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seq", 128, "sequence length", lower_bound=1, upper_bound=MAX_SEQ, flag_values=fv)
    flags.DEFINE_string("precision", "float32", "precision policy of the QKV comparison", flag_values=fv)
    flags.DEFINE_integer("rounds", 12, "interleaved timing rounds", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("iters", 1, "calls per variant per round (model)", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the random weights and inputs", flag_values=fv)
    cli.check(fv, "precision", _known_dtype, "is not a precision name (float32, bfloat16, float16)")


def run(fv: flags.FlagValues) -> dict:
    """The benchmark on parsed flags ``fv`` (:func:`define_flags`)."""
    env = measuring.environment()
    print(f"platform={env['platform']} device={env['device']}", flush=True)
    t0 = time.perf_counter()
    res_qkv = qkv(fv.batch, fv.seq, fv.precision, fv.rounds, fv.iters, fv.seed)
    res_ln = add_layernorm(fv.batch, fv.seq, fv.rounds, 10 * fv.iters, fv.seed)

    lo, hi = res_qkv["fused_over_unfused_min_max"]
    measuring.print_table(
        [{"variant": "separate Q/K/V", "tokens_per_s": res_qkv["unfused_tokens_per_s"]},
         {"variant": "fused QKV", "tokens_per_s": res_qkv["fused_tokens_per_s"],
          "fused_over_unfused": res_qkv["fused_over_unfused"], "ratio_range": f"{lo:.2f}-{hi:.2f}",
          "max_abs_logit_diff": res_qkv["max_abs_logit_diff"], "max_abs_hidden_diff": res_qkv["max_abs_hidden_diff"]}],
        ["variant", "tokens_per_s", "fused_over_unfused", "ratio_range", "max_abs_logit_diff", "max_abs_hidden_diff"],
        f"Fused QKV, MiniLM shape (random init), batch {fv.batch} x seq {fv.seq}, {fv.precision}, "
        f"{env['platform']}; median of {fv.rounds} interleaved rounds (ratio: per-round paired)")
    measuring.print_table(
        [{"variant": k, "ms_per_call": v, "kernels": res_ln["kernels"].get(k, "-")} for k, v in res_ln["ms"].items()],
        ["variant", "ms_per_call", "kernels"],
        f"Residual add + LayerNorm on {res_ln['shape']} (kernels: top-level ops of the compiled program)")
    print(f"skip_layer_norm vs XLA-fused LayerNorm(x + r): max |diff| {res_ln['max_abs_diff_skip_vs_xla']:.1e}")
    print(f"in the compiled layer, the projection before each LayerNorm is its own kernel: "
          f"{res_ln['projection_is_separate_kernel_in_layer']}")
    results = {"benchmark": "fusion", "batch": fv.batch, "seq": fv.seq, "rounds": fv.rounds,
               "qkv": res_qkv, "add_layernorm": res_ln, "wall_s": time.perf_counter() - t0}
    measuring.write_json(fv.out, results)
    return results



if __name__ == "__main__":
    cli.run_script(define_flags, run)
