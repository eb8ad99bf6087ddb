"""Precision benchmark: float32 vs bfloat16 vs float16 inference, logit drift, float16 gradient underflow.

Run::

    python -m experiments.benchmarks.bench_precision --out precision.json

What it measures, in one process:

1. Inference throughput (tokens/s) of a MiniLM-shaped Transformer (``TransformerConfig()`` defaults,
   random init, sequence head) at batch 32 x seq 128 under the float32, bfloat16 and float16 policies with
   all float32 islands on. Policies are timed in interleaved rounds (one round times each policy in turn),
   so machine noise hits all of them alike; medians and ratios to float32 are reported.
   Low-precision speed depends on the backend: XLA on CPU has no fast 16-bit matmul path, so ratios near
   (or below) 1 are expected there; on GPU/TPU the same script runs unchanged (the ``platform`` field says
   where it ran).
2. Max abs difference of the logits and of the last hidden state vs float32 on the benchmark batch
   (random init: a trained checkpoint's drift is measured by the SST-2 evaluation, not here).
3. Float16 gradient underflow: gradients of a small Transformer on random batches under the float16 policy,
   without and with a loss scale of 2**15, against float32 gradients: the fraction of entries that are
   nonzero in float32 but exactly zero in float16 (flushed), and the fraction below float16's smallest
   normal number (subnormal: precision lost).

Expected runtime: under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from compression import precision
from models.transformer import Transformer, TransformerConfig

POLICIES = ("float32", "bfloat16", "float16")
FP16_TINY = float(jnp.finfo(jnp.float16).tiny)  # smallest normal float16, 6.1e-5


def _time_calls(fn, args, iters: int) -> float:
    """Seconds per call of ``fn(*args)``, averaged over ``iters`` calls (results blocked on)."""
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / iters


def inference(batch: int, seq: int, repeats: int, iters: int, seed: int) -> dict:
    """Throughput and drift of the three policies on a MiniLM-shaped model; see the module docstring."""
    cfg = TransformerConfig()
    model = Transformer(cfg)
    key_ids, key_init = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(key_ids, (batch, seq), 0, cfg.vocab_size, dtype=jnp.int32)
    mask = jnp.ones((batch, seq), jnp.int32)
    variables = model.init(key_init, ids[:1, :8])

    fns, outs = {}, {}
    for name in POLICIES:
        apply = precision.policy(name).wrap(model.apply)
        fns[name] = jax.jit(lambda v, i, m, apply=apply: apply(v, i, attention_mask=m))
        start = time.perf_counter()
        outs[name] = jax.block_until_ready(fns[name](variables, ids, mask))
        print(f"  compiled {name} in {time.perf_counter() - start:.1f}s", flush=True)

    times = {name: [] for name in POLICIES}
    for _ in range(repeats):
        for name in POLICIES:
            times[name].append(_time_calls(fns[name], (variables, ids, mask), iters))

    ref = outs["float32"]
    result = {}
    for name in POLICIES:
        med = statistics.median(times[name])
        result[name] = {
            "median_s_per_batch": med,
            "tokens_per_s": batch * seq / med,
            "ratio_vs_float32": statistics.median(times["float32"]) / med,
            "max_abs_logit_diff": float(jnp.max(jnp.abs(outs[name].logits - ref.logits))),
            "max_abs_hidden_diff": float(jnp.max(jnp.abs(outs[name].last_hidden_state - ref.last_hidden_state))),
        }
    result["max_abs_logit_float32"] = float(jnp.max(jnp.abs(ref.logits)))
    return result


def _small_config() -> TransformerConfig:
    return TransformerConfig(vocab_size=2000, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                             max_position_embeddings=128, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)


def underflow(num_batches: int, batch: int, seq: int, seed: int, loss_scale: float = 2.0 ** 15) -> dict:
    """Fractions of float16 parameter gradients that flush to zero or go subnormal, vs float32 gradients."""
    cfg = _small_config()
    model = Transformer(cfg)
    key = jax.random.key(seed)
    variables = model.init(key, jnp.zeros((1, 8), jnp.int32))

    def grads_fn(name: str, scale: float):
        apply = precision.policy(name).wrap(model.apply)

        def loss(params, ids, labels):
            logits = apply({"params": params}, ids).logits  # float32 (policy output dtype)
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1)) * scale

        # Raw (still scaled) gradients: under the float16 policy each entry is the float16 value that
        # reached the float32 master weight, so zeros and subnormals are read off directly.
        return jax.jit(lambda p, i, y: jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(jax.grad(loss)(p, i, y))]))

    fns = {"float32": grads_fn("float32", 1.0), "float16": grads_fn("float16", 1.0),
           "float16_scaled": grads_fn("float16", loss_scale)}
    counts = {k: {"flushed": 0, "subnormal": 0} for k in ("float16", "float16_scaled")}
    nonzero_total, total = 0, 0
    for b in range(num_batches):
        k_ids, k_y = jax.random.split(jax.random.fold_in(key, b))
        ids = jax.random.randint(k_ids, (batch, seq), 0, cfg.vocab_size, dtype=jnp.int32)
        labels = jax.random.randint(k_y, (batch,), 0, cfg.num_labels, dtype=jnp.int32)
        nonzero = np.asarray(fns["float32"](variables["params"], ids, labels)) != 0
        nonzero_total += int(nonzero.sum())
        total += nonzero.size
        for name in counts:
            g16 = np.abs(np.asarray(fns[name](variables["params"], ids, labels)))
            counts[name]["flushed"] += int((nonzero & (g16 == 0)).sum())
            counts[name]["subnormal"] += int((nonzero & (g16 > 0) & (g16 < FP16_TINY)).sum())
    return {
        "model": {k: v for k, v in cfg.to_dict().items()
                  if k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")},
        "batches": num_batches, "batch": batch, "seq": seq, "loss_scale": loss_scale,
        "gradient_entries": total, "nonzero_in_float32": nonzero_total,
        **{f"{name}_flushed_fraction": c["flushed"] / nonzero_total for name, c in counts.items()},
        **{f"{name}_subnormal_fraction": c["subnormal"] / nonzero_total for name, c in counts.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--iters", type=int, default=2, help="calls per policy per round")
    parser.add_argument("--underflow_batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.batch, args.seq, args.repeats, args.iters, args.underflow_batches) < 1:
        parser.error("--batch, --seq, --repeats, --iters and --underflow_batches must be >= 1")
    if args.seq > TransformerConfig().max_position_embeddings:
        parser.error(f"--seq must be <= {TransformerConfig().max_position_embeddings}")

    device = jax.devices()[0]
    print(f"platform={device.platform} device={device.device_kind} devices={jax.device_count()}", flush=True)
    t0 = time.perf_counter()
    inf = inference(args.batch, args.seq, args.repeats, args.iters, args.seed)
    uf = underflow(args.underflow_batches, 16, 64, args.seed)
    results = {"platform": device.platform, "device_kind": device.device_kind, "batch": args.batch,
               "seq": args.seq, "repeats": args.repeats, "iters": args.iters, "model": "MiniLM-shaped, random init",
               "inference": inf, "underflow": uf, "wall_s": time.perf_counter() - t0}

    print(f"\nInference, batch {args.batch} x seq {args.seq}, islands on ({device.platform}; median of "
          f"{args.repeats} interleaved rounds):")
    print(f"{'policy':<10} {'ms/batch':>9} {'tokens/s':>10} {'vs fp32':>8} {'max|dlogit|':>12} {'max|dhidden|':>13}")
    for name in POLICIES:
        r = inf[name]
        print(f"{name:<10} {1e3 * r['median_s_per_batch']:>9.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['ratio_vs_float32']:>7.2f}x {r['max_abs_logit_diff']:>12.2e} {r['max_abs_hidden_diff']:>13.2e}")
    print(f"(max |logit| in float32: {inf['max_abs_logit_float32']:.3f}; random init)")
    print(f"\nFloat16 gradient underflow (small Transformer, {uf['batches']} random batches, "
          f"{uf['nonzero_in_float32']} nonzero float32 gradient entries):")
    print(f"{'':<22} {'flushed to 0':>13} {'subnormal':>10}")
    print(f"{'float16, no scaling':<22} {uf['float16_flushed_fraction']:>13.2%} {uf['float16_subnormal_fraction']:>10.2%}")
    print(f"{'float16, scale 2^15':<22} {uf['float16_scaled_flushed_fraction']:>13.2%} "
          f"{uf['float16_scaled_subnormal_fraction']:>10.2%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
