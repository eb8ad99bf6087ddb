"""Training-step throughput of our Transformer beside transformers' PyTorch BertForSequenceClassification.

    python -m experiments.benchmarks.bench_train --out=bench_results/train.json

MiniLM shape, batch 32 x seq 64, AdamW, cross-entropy on a 2-class head, dropout on, in one process, rounds
interleaved. Prints tokens/s and the ratio ours / PyTorch (target >= 1.0).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from experiments.runtime import measuring
from experiments.runtime import cli
from models.transformer import Transformer, TransformerConfig

MAX_SEQ = TransformerConfig().max_position_embeddings  # longest sequence the position table covers


def _ours(cfg: TransformerConfig, ids, mask, labels, steps: int):
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), jnp.asarray(ids[:1]))["params"]
    tx = optax.adamw(5e-5, weight_decay=0.01)
    state = {"params": params, "opt": tx.init(params), "key": jax.random.key(1)}

    def loss_fn(p, key):
        logits = model.apply({"params": p}, ids_j, attention_mask=mask_j, train=True,
                             rngs={"dropout": key}).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels_j).mean()

    @jax.jit
    def step(s):
        key, sub = jax.random.split(s["key"])
        grads = jax.grad(loss_fn)(s["params"], sub)
        updates, opt = tx.update(grads, s["opt"], s["params"])
        return {"params": optax.apply_updates(s["params"], updates), "opt": opt, "key": key}

    ids_j, mask_j, labels_j = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels)
    box = [state]

    def run():
        for _ in range(steps):
            box[0] = step(box[0])
        return box[0]["params"]

    return run


def _torch(cfg: TransformerConfig, ids, mask, labels, steps: int, threads: int):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.heads(0), intermediate_size=cfg.ffn_size(0), num_labels=cfg.num_labels)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask_t = torch.from_numpy(mask.astype(np.int64))
    labels_t = torch.from_numpy(labels.astype(np.int64))

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss
            loss.backward()
            opt.step()
        return loss

    return run


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_integer("batch", 32, "batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seq", 64, "sequence length", lower_bound=1, upper_bound=MAX_SEQ, flag_values=fv)
    flags.DEFINE_integer("steps", 3, "train steps per timed call", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("rounds", 5, "interleaved timing rounds", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("threads", os.cpu_count(), "PyTorch CPU threads", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("out", None, "JSON results path", flag_values=fv)


def run(fv: flags.FlagValues):
    """The benchmark on parsed flags ``fv`` (:func:`define_flags`)."""

    cfg = TransformerConfig(head="sequence", num_labels=2)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, cfg.vocab_size, size=(fv.batch, fv.seq), dtype=np.int32)
    mask = np.ones_like(ids)
    labels = rng.integers(0, 2, size=(fv.batch,), dtype=np.int32)
    candidates = {"nlpress (JAX, optax AdamW)": _ours(cfg, ids, mask, labels, fv.steps)}
    try:
        candidates["transformers BertForSequenceClassification (PyTorch AdamW)"] = _torch(
            cfg, ids, mask, labels, fv.steps, fv.threads)
    except ImportError:
        print("torch not installed: measuring our side only (pip install -e .[torch] for the comparison)")

    def block(x):
        return jax.block_until_ready(x) if not hasattr(x, "detach") else x

    times = measuring.time_interleaved(candidates, rounds=fv.rounds, block=block)
    tokens = fv.batch * fv.seq * fv.steps
    rows = [{"model": name, "median_ms_per_step": 1e3 * measuring.median(t) / fv.steps,
             "tokens_per_s": tokens / measuring.median(t)} for name, t in times.items()]
    if len(rows) == 2:
        for r in rows:
            r["ratio_vs_torch"] = r["tokens_per_s"] / rows[1]["tokens_per_s"]
    measuring.print_table(rows, ["model", "median_ms_per_step", "tokens_per_s", "ratio_vs_torch"],
                       f"Training step, MiniLM shape, batch {fv.batch} x seq {fv.seq}, {fv.threads} threads")
    if len(rows) == 2:
        print(f"ratio ours / PyTorch: {rows[0]['ratio_vs_torch']:.2f}x (target >= 1.0)")
    measuring.write_json(fv.out, {"benchmark": "train_step", "batch": fv.batch, "seq": fv.seq,
                                 "steps_per_call": fv.steps, "rows": rows, "times_s": times})



if __name__ == "__main__":
    cli.run_script(define_flags, run)
