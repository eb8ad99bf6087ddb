"""Inference throughput of our Transformer beside transformers' PyTorch BertModel, in one process.

    python -m experiments.benchmarks.bench_inference --out=bench_results/inference.json

MiniLM shape (6 layers, hidden 384, 12 heads, FFN 1536) at batch 32 x seq 128 by default; random weights
(speed does not depend on the values). Both sides use the same number of CPU threads. Prints tokens/s and
the ratio ours / PyTorch (target >= 1.0). Without torch installed only our side is measured.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.runtime import measuring
from experiments.runtime import cli
from models.transformer import Transformer, TransformerConfig

MAX_SEQ = TransformerConfig().max_position_embeddings  # longest sequence the position table covers


def _ours(cfg: TransformerConfig, ids: np.ndarray, mask: np.ndarray):
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), jnp.asarray(ids[:1]))["params"]
    fwd = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m).last_hidden_state)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    return lambda: fwd(params, ids_j, mask_j)


def _torch(cfg: TransformerConfig, ids: np.ndarray, mask: np.ndarray, threads: int):
    import torch
    from transformers import BertConfig, BertModel

    torch.set_num_threads(threads)
    model = BertModel(BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.heads(0),
                                 intermediate_size=cfg.ffn_size(0),
                                 max_position_embeddings=cfg.max_position_embeddings),
                      add_pooling_layer=False).eval()
    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def run():
        with torch.inference_mode():
            return model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state

    return run


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_integer("batch", 32, "batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seq", 128, "sequence length", lower_bound=1, upper_bound=MAX_SEQ, flag_values=fv)
    flags.DEFINE_integer("rounds", 7, "interleaved timing rounds", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("threads", os.cpu_count(), "PyTorch CPU threads", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("out", None, "JSON results path", flag_values=fv)


def run(fv: flags.FlagValues):
    """The benchmark on parsed flags ``fv`` (:func:`define_flags`)."""

    cfg = TransformerConfig(head="none", hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, cfg.vocab_size, size=(fv.batch, fv.seq), dtype=np.int32)
    mask = np.ones_like(ids)
    candidates = {"nlpress (JAX)": _ours(cfg, ids, mask)}
    try:
        candidates["transformers BertModel (PyTorch)"] = _torch(cfg, ids, mask, fv.threads)
    except ImportError:
        print("torch not installed: measuring our side only (pip install -e .[torch] for the comparison)")
    times = measuring.time_interleaved(candidates, rounds=fv.rounds, block=lambda x: getattr(
        x, "block_until_ready", lambda: x)())
    tokens = fv.batch * fv.seq
    rows = [{"model": name, "median_ms": 1e3 * measuring.median(t), "tokens_per_s": tokens / measuring.median(t)}
            for name, t in times.items()]
    if len(rows) == 2:
        ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        for r in rows:
            r["ratio_vs_torch"] = r["tokens_per_s"] / rows[1]["tokens_per_s"]
    measuring.print_table(rows, ["model", "median_ms", "tokens_per_s", "ratio_vs_torch"],
                       f"Inference, MiniLM shape, batch {fv.batch} x seq {fv.seq}, {fv.threads} threads")
    if len(rows) == 2:
        print(f"ratio ours / PyTorch: {ratio:.2f}x (target >= 1.0)")
    measuring.write_json(fv.out, {"benchmark": "inference", "batch": fv.batch, "seq": fv.seq,
                                 "rounds": fv.rounds, "rows": rows, "times_s": times})



if __name__ == "__main__":
    cli.run_script(define_flags, run)
