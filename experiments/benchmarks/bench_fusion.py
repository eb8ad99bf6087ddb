"""Fusion benchmark: fused vs separate QKV, residual add + LayerNorm, and the FFN's bias + exact GELU.

Run::

    python -m experiments.benchmarks.bench_fusion --out fusion.json [--precision bfloat16]

What it measures, in one process, timed in interleaved rounds (medians reported):

1. Fused QKV: inference throughput of a MiniLM-shaped Transformer (``TransformerConfig()`` defaults,
   random init) at batch 32 x seq 128 with separate Q/K/V projections and after
   :func:`compression.fusion.fuse_qkv`, the ratio fused/unfused, and the max abs output difference.
2. Residual add + LayerNorm on [B, S, H]: the add and the LayerNorm as two compiled programs (what an
   unfused runtime does: the sum goes through memory), as one program (XLA fuses it), and
   :func:`compression.fusion.skip_layer_norm`; the number of kernels XLA emits for the one-program
   versions; and whether, inside the compiled Transformer layer, the projection feeding each LayerNorm was
   absorbed into the LayerNorm's kernel (no top-level ``dot_general`` of its own).
3. The FFN's ``Dense + exact GELU`` on [B*S, H] -> [B*S, F], with GELU as ``jax.nn.gelu(approximate=False)``
   (erfc-based, what the model uses) and as ``0.5 x (1 + erf(x / sqrt 2))``: same function (max abs
   difference reported), different XLA code.

Expected runtime: about a minute on 2 CPU cores; it runs unchanged on GPU/TPU (``platform`` in the output).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compression import fusion, precision
from models.transformer import Transformer, TransformerConfig


def _interleaved(fns: dict, args: dict, repeats: int, iters: int) -> dict:
    """Median seconds per call of each ``fns[k](*args[k])``, timed round-robin over ``repeats`` rounds."""
    for k, f in fns.items():
        jax.block_until_ready(f(*args[k]))  # compile + warm up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                jax.block_until_ready(f(*args[k]))
            times[k].append((time.perf_counter() - start) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


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


def qkv(batch: int, seq: int, policy: str, repeats: int, iters: int, seed: int) -> dict:
    cfg = TransformerConfig()
    k_ids, k_init = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(k_ids, (batch, seq), 0, cfg.vocab_size, dtype=jnp.int32)
    params = Transformer(cfg).init(k_init, ids[:1, :8])["params"]
    fused_cfg, fused_params = fusion.fuse_qkv(cfg, params)
    wrap = precision.policy(policy).wrap
    fns = {"unfused": jax.jit(wrap(Transformer(cfg).apply)), "fused": jax.jit(wrap(Transformer(fused_cfg).apply))}
    args = {"unfused": ({"params": params}, ids), "fused": ({"params": fused_params}, ids)}
    outs = {k: fns[k](*args[k]) for k in fns}
    med = _interleaved(fns, args, repeats, iters)
    return {
        "precision": policy,
        "unfused_tokens_per_s": batch * seq / med["unfused"], "fused_tokens_per_s": batch * seq / med["fused"],
        "fused_over_unfused": med["unfused"] / med["fused"],
        "max_abs_logit_diff": float(jnp.max(jnp.abs(outs["fused"].logits - outs["unfused"].logits))),
        "max_abs_hidden_diff": float(jnp.max(jnp.abs(outs["fused"].last_hidden_state
                                                     - outs["unfused"].last_hidden_state))),
    }


def add_layernorm(batch: int, seq: int, repeats: int, iters: int, seed: int) -> dict:
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
    args = {k: (p, x, r) for k in fns}
    med = _interleaved(fns, args, repeats, iters)
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


def gelu(batch: int, seq: int, repeats: int, iters: int, seed: int) -> dict:
    cfg = TransformerConfig()
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (batch * seq, cfg.hidden_size))
    w = jax.random.normal(k2, (cfg.hidden_size, cfg.ffn_size(0))) * cfg.hidden_size ** -0.5
    b = jnp.full((cfg.ffn_size(0),), 0.1)
    inv_sqrt2 = np.float32(1 / np.sqrt(2))
    fns = {
        "dense_only": jax.jit(lambda x, w, b: x @ w + b),
        "gelu_erfc": jax.jit(lambda x, w, b: jax.nn.gelu(x @ w + b, approximate=False)),
        "gelu_erf": jax.jit(lambda x, w, b: (lambda h: 0.5 * h * (1 + jax.lax.erf(h * inv_sqrt2)))(x @ w + b)),
    }
    args = {k: (x, w, b) for k in fns}
    med = _interleaved(fns, args, repeats, iters)
    return {
        "shape": [batch * seq, cfg.hidden_size, cfg.ffn_size(0)],
        "ms": {k: 1e3 * v for k, v in med.items()},
        "kernels": {k: len(_entry_ops(f.lower(x, w, b).compile().as_text())) for k, f in fns.items()},
        "max_abs_diff_erf_vs_erfc": float(jnp.max(jnp.abs(fns["gelu_erf"](x, w, b) - fns["gelu_erfc"](x, w, b)))),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--precision", default="float32", help="precision policy of the QKV comparison")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--iters", type=int, default=2, help="calls per variant per round (model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.batch, args.seq, args.repeats, args.iters) < 1:
        parser.error("--batch, --seq, --repeats and --iters must be >= 1")
    if args.seq > TransformerConfig().max_position_embeddings:
        parser.error(f"--seq must be <= {TransformerConfig().max_position_embeddings}")
    precision.resolve_dtype(args.precision)

    device = jax.devices()[0]
    print(f"platform={device.platform} device={device.device_kind}", flush=True)
    t0 = time.perf_counter()
    res_qkv = qkv(args.batch, args.seq, args.precision, args.repeats, args.iters, args.seed)
    res_ln = add_layernorm(args.batch, args.seq, args.repeats, 10 * args.iters, args.seed)
    res_gelu = gelu(args.batch, args.seq, args.repeats, 5 * args.iters, args.seed)
    results = {"platform": device.platform, "device_kind": device.device_kind, "batch": args.batch,
               "seq": args.seq, "repeats": args.repeats, "qkv": res_qkv, "add_layernorm": res_ln,
               "gelu": res_gelu, "wall_s": time.perf_counter() - t0}

    print(f"\nFused QKV, MiniLM shape, batch {args.batch} x seq {args.seq}, {args.precision} ({device.platform}):")
    print(f"  unfused {res_qkv['unfused_tokens_per_s']:.0f} tokens/s, fused {res_qkv['fused_tokens_per_s']:.0f} "
          f"tokens/s, fused/unfused {res_qkv['fused_over_unfused']:.3f}x; max |dlogit| "
          f"{res_qkv['max_abs_logit_diff']:.1e}, max |dhidden| {res_qkv['max_abs_hidden_diff']:.1e}")
    print(f"\nResidual add + LayerNorm on {res_ln['shape']} (ms per call; kernels in the compiled program):")
    for k, v in res_ln["ms"].items():
        print(f"  {k:<16} {v:>7.3f} ms  {res_ln['kernels'].get(k, '-')}")
    print(f"  in the compiled layer, projection before LayerNorm is its own kernel: "
          f"{res_ln['projection_is_separate_kernel_in_layer']}")
    print(f"\nFFN Dense + exact GELU on {res_gelu['shape']} (ms per call; kernels):")
    for k, v in res_gelu["ms"].items():
        print(f"  {k:<16} {v:>7.3f} ms  {res_gelu['kernels'][k]}")
    print(f"  max |erf - erfc form| {res_gelu['max_abs_diff_erf_vs_erfc']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
