"""Precision benchmark: float32 vs bfloat16 vs float16 inference, logit drift, float16 gradient underflow.

Run::

    python -m experiments.benchmarks.bench_precision --out=precision.json

What it measures, in one process:

1. Inference throughput (tokens/s) of a MiniLM-shaped Transformer (``TransformerConfig()`` defaults,
   random init, sequence head) at batch 32 x seq 128 under the float32, bfloat16 and float16 policies with
   all float32 islands on. Policies are timed in interleaved rounds (one round times each policy in turn),
   so machine noise hits all of them alike; median times and the median (and range) of the per-round
   ratios to float32 are reported.
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

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from compression import precision
from experiments.runtime import measuring
from experiments.runtime import cli
from models.transformer import Transformer, TransformerConfig

MAX_SEQ = TransformerConfig().max_position_embeddings  # longest sequence the position table covers

POLICIES = ("float32", "bfloat16", "float16")
FP16_TINY = float(jnp.finfo(jnp.float16).tiny)  # smallest normal float16, 6.1e-5


def inference(batch: int, seq: int, rounds: int, seed: int) -> dict:
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

    times = measuring.time_interleaved({name: (lambda f=fns[name]: f(variables, ids, mask)) for name in POLICIES},
                                    rounds=rounds, warmup=0)  # compiled and warmed up above

    ref = outs["float32"]
    result = {}
    for name in POLICIES:
        med = statistics.median(times[name])
        # Paired per-round ratios: the policies run back to back, so load changes cancel within a round.
        ratios = sorted(a / b for a, b in zip(times["float32"], times[name]))
        result[name] = {
            "median_s_per_batch": med,
            "tokens_per_s": batch * seq / med,
            "ratio_vs_float32": statistics.median(ratios),
            "ratio_vs_float32_min_max": [ratios[0], ratios[-1]],
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
        def flat_grads(params, ids, labels):
            return jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(jax.grad(loss)(params, ids, labels))])

        return jax.jit(flat_grads)

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


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seq", 128, "sequence length", lower_bound=1, upper_bound=MAX_SEQ, flag_values=fv)
    flags.DEFINE_integer("rounds", 8, "interleaved timing rounds", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("underflow_batches", 4, "random batches of the underflow count", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the random weights and inputs", flag_values=fv)


def run(fv: flags.FlagValues) -> dict:
    """The benchmark on parsed flags ``fv`` (:func:`define_flags`)."""
    env = measuring.environment()
    print(f"platform={env['platform']} device={env['device']}", flush=True)
    t0 = time.perf_counter()
    inf = inference(fv.batch, fv.seq, fv.rounds, fv.seed)
    uf = underflow(fv.underflow_batches, 16, 64, fv.seed)

    rows = []
    for name in POLICIES:
        r = inf[name]
        lo, hi = r["ratio_vs_float32_min_max"]
        rows.append({"policy": name, "ms_per_batch": 1e3 * r["median_s_per_batch"], "tokens_per_s": r["tokens_per_s"],
                     "speed_vs_float32": r["ratio_vs_float32"], "ratio_range": f"{lo:.2f}-{hi:.2f}",
                     "max_abs_logit_diff": r["max_abs_logit_diff"], "max_abs_hidden_diff": r["max_abs_hidden_diff"]})
    measuring.print_table(rows, ["policy", "ms_per_batch", "tokens_per_s", "speed_vs_float32", "ratio_range",
                              "max_abs_logit_diff", "max_abs_hidden_diff"],
                       f"Inference, MiniLM shape (random init), batch {fv.batch} x seq {fv.seq}, islands on, "
                       f"{env['platform']}; median of {fv.rounds} interleaved rounds (speed: per-round paired "
                       "float32 time / policy time)")
    print(f"(max |logit| in float32: {inf['max_abs_logit_float32']:.3f})")
    measuring.print_table(
        [{"gradients": "float16, no loss scaling", "flushed_to_zero": uf["float16_flushed_fraction"],
          "subnormal": uf["float16_subnormal_fraction"]},
         {"gradients": f"float16, loss scale 2^{int(np.log2(uf['loss_scale']))}",
          "flushed_to_zero": uf["float16_scaled_flushed_fraction"],
          "subnormal": uf["float16_scaled_subnormal_fraction"]}],
        ["gradients", "flushed_to_zero", "subnormal"],
        f"Float16 gradient underflow (small Transformer, {uf['batches']} random batches; fractions of the "
        f"{uf['nonzero_in_float32']} gradient entries nonzero in float32)")
    results = {"benchmark": "precision", "batch": fv.batch, "seq": fv.seq, "rounds": fv.rounds,
               "model": "MiniLM-shaped, random init", "inference": inf, "underflow": uf,
               "wall_s": time.perf_counter() - t0}
    measuring.write_json(fv.out, results)
    return results



if __name__ == "__main__":
    cli.run_script(define_flags, run)
