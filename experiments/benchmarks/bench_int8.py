"""Inference throughput of the real int8 path against float32, same model, same process.

    python -m experiments.benchmarks.bench_int8 --out_dir=bench_results      # -> bench_results/bench_int8.json

MiniLM shape (``TransformerConfig()`` defaults: 6 layers, hidden 384, 12 heads, FFN 1536), random weights,
batch 32 x seq 128 by default. The int8 model is calibrated (max, four random rows: speed does not depend on
the scales), converted with :func:`compression.quantization.convert_to_int8` (every Dense runs
int8 x int8 -> int32 ``lax.dot_general``, one dequantization per layer) and timed interleaved with the float32
model; the figure is the ratio of median times (target >= 2.5x). Also timed, interleaved with them:

* the FFN GEMM alone (``[B*S, 384] @ [384, 1536]``) in float32 and int8 x int8 -> int32: the kernel-level
  ceiling of the speed-up on this CPU;
* with PyTorch installed (``--torch``), transformers' ``BertModel`` in float32 and after
  ``torch.ao.quantization.quantize_dynamic`` (fbgemm int8 Linear layers): what a mature int8 CPU stack gets
  from the same hardware.

The int8 path computes what the fake-quantized model computes: ``int8_vs_fake_quant_rel_diff`` is
``max |int8 - fake| / max |fake|`` of the last hidden state (0 when the integer sums stay exact in float32).
Each XLA flag variant (``--variants``; default: this process and oneDNN custom calls) runs in its own
subprocess, since XLA_FLAGS must be set before jax starts.

int8 speed depends on the CPU's int8 dot-product instructions (``cpu_int8_isa`` in the JSON): AVX-512 VNNI or
AMX give XLA's int8 GEMM several times float32 throughput; with AVX2 only it is about float32's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from compression import quantization
from experiments.runtime import measuring
from experiments.runtime import hardware
from experiments.runtime import cli
from models.transformer import Transformer, TransformerConfig

MAX_SEQ = TransformerConfig().max_position_embeddings  # longest sequence the position table covers

VARIANTS = {
    "default": "",
    "onednn": "--xla_cpu_experimental_onednn_custom_call=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
}


def _torch_candidates(cfg: TransformerConfig, ids: np.ndarray, mask: np.ndarray) -> dict:
    """transformers' BertModel in float32 and dynamically quantized to int8 (empty without torch)."""
    try:
        import torch
        from transformers import BertConfig, BertModel
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count() or 1)
    model = BertModel(BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.heads(0),
                                 intermediate_size=cfg.ffn_size(0),
                                 max_position_embeddings=cfg.max_position_embeddings),
                      add_pooling_layer=False).eval()
    qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def run(m):
        with torch.inference_mode():
            return m(input_ids=ids_t, attention_mask=mask_t).last_hidden_state

    return {"torch_float32": lambda: run(model), "torch_int8_dynamic": lambda: run(qmodel)}


def measure(batch: int, seq: int, rounds: int, with_torch: bool) -> dict:
    """Times float32 and int8 forward passes (jitted, interleaved); returns medians and the speed-ups."""
    cfg = TransformerConfig(head="none", hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    ids_np = rng.integers(1000, cfg.vocab_size, size=(batch, seq), dtype=np.int32)
    ids, mask = jnp.asarray(ids_np), jnp.ones((batch, seq), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), ids[:1])
    calibrated = quantization.calibrate(model.apply, variables, [(ids[:4], mask[:4])], method="max")
    t = quantization.int8()
    variables8 = t.init(jax.random.key(0), calibrated, model.apply, ids[:1])
    apply8, fake_apply = t.wrap(model.apply), quantization.fake_quant().wrap(model.apply)

    f32 = jax.jit(lambda v, i, m: model.apply(v, i, attention_mask=m).last_hidden_state)
    i8 = jax.jit(lambda v, i, m: apply8(v, i, attention_mask=m).last_hidden_state)
    fake = jax.jit(lambda v, i, m: fake_apply(v, i, attention_mask=m).last_hidden_state)
    out8, out_fake = i8(variables8, ids, mask), fake(calibrated, ids, mask)
    drift = float(jnp.max(jnp.abs(out8 - out_fake)))
    scale = float(jnp.max(jnp.abs(out_fake)))
    del out8, out_fake

    x = jax.random.normal(jax.random.key(1), (batch * seq, cfg.hidden_size))
    w = jax.random.normal(jax.random.key(2), (cfg.hidden_size, cfg.ffn_size(0)))
    x_q, w_q = (x * 30).astype(jnp.int8), (w * 30).astype(jnp.int8)
    gemm_f32 = jax.jit(lambda a, b: a @ b)
    gemm_i8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                                       preferred_element_type=jnp.int32))
    candidates = {"float32": lambda: f32(variables, ids, mask), "int8": lambda: i8(variables8, ids, mask),
                  "gemm_float32": lambda: gemm_f32(x, w), "gemm_int8": lambda: gemm_i8(x_q, w_q)}
    if with_torch:
        candidates.update(_torch_candidates(cfg, ids_np, np.ones((batch, seq), np.int32)))
    times = measuring.time_interleaved(candidates, rounds=rounds,
                                    block=lambda r: r if hasattr(r, "detach") else jax.block_until_ready(r))
    med = {k: measuring.median(v) for k, v in times.items()}
    out = {"float32_ms": 1e3 * med["float32"], "int8_ms": 1e3 * med["int8"],
           "speedup": med["float32"] / med["int8"], "tokens_per_s_float32": batch * seq / med["float32"],
           "tokens_per_s_int8": batch * seq / med["int8"], "ffn_gemm_speedup": med["gemm_float32"] / med["gemm_int8"],
           "int8_vs_fake_quant_max_abs_diff": drift, "int8_vs_fake_quant_rel_diff": drift / max(scale, 1e-30),
           "cpu_int8_isa": hardware.cpu_isa(), "times_s": times}
    if "torch_int8_dynamic" in med:
        out["torch_float32_ms"] = 1e3 * med["torch_float32"]
        out["torch_int8_dynamic_ms"] = 1e3 * med["torch_int8_dynamic"]
        out["torch_int8_speedup"] = med["torch_float32"] / med["torch_int8_dynamic"]
    return out


def _run_variant(name: str, fv: flags.FlagValues) -> dict:
    """Runs :func:`measure` in a subprocess with the variant's XLA flags."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "variant.json")
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {VARIANTS[name]}".strip()}
        cmd = [sys.executable, "-m", "experiments.benchmarks.bench_int8", "--variants=default",
               f"--batch={fv.batch}", f"--seq={fv.seq}", f"--rounds={fv.rounds}", "--quiet", "--notorch",
               f"--out={out}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout)[-2000:]}
        with open(out) as f:
            return json.load(f)["results"]["default"]


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_integer("batch", 32, "batch size (calibration uses four rows)", lower_bound=4, flag_values=fv)
    flags.DEFINE_integer("seq", 128, "sequence length", lower_bound=1, upper_bound=MAX_SEQ, flag_values=fv)
    flags.DEFINE_integer("rounds", 7, "interleaved timing rounds", lower_bound=1, flag_values=fv)
    flags.DEFINE_list("variants", ["default", "onednn"], f"XLA flag variants among {','.join(sorted(VARIANTS))}",
                      flag_values=fv)
    flags.DEFINE_bool("torch", True, "also time PyTorch float32 vs dynamic int8 (default process only)",
                      flag_values=fv)
    flags.DEFINE_bool("quiet", False, "no table (used by the variant subprocesses)", flag_values=fv)
    flags.DEFINE_string("out", None, "JSON results path", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "write OUT_DIR/bench_int8.json (when --out is not given)", flag_values=fv)
    cli.subset(fv, "variants", sorted(VARIANTS))


def run(fv: flags.FlagValues):
    """The benchmark on parsed flags ``fv`` (:func:`define_flags`)."""
    names = fv.variants
    out_path = fv.out or (os.path.join(fv.out_dir, "bench_int8.json") if fv.out_dir else None)

    results = {}
    for name in names:
        if name == "default":
            results[name] = measure(fv.batch, fv.seq, fv.rounds, fv.torch)
        else:
            results[name] = _run_variant(name, fv)
    if not fv.quiet:
        rows = [{"xla_flags": name, **{k: v for k, v in r.items() if k not in ("times_s", "cpu_int8_isa")}}
                for name, r in results.items()]
        measuring.print_table(rows, ["xla_flags", "float32_ms", "int8_ms", "speedup", "tokens_per_s_int8",
                                  "ffn_gemm_speedup", "torch_int8_speedup", "int8_vs_fake_quant_rel_diff",
                                  "error"],
                           f"int8 vs float32 inference, MiniLM shape, batch {fv.batch} x seq {fv.seq}")
        best = max((r["speedup"] for r in results.values() if "speedup" in r), default=float("nan"))
        isa = next((r["cpu_int8_isa"] for r in results.values() if "cpu_int8_isa" in r), [])
        print(f"best int8 speed-up: {best:.2f}x (target >= 2.5x); CPU int8-relevant ISA: {', '.join(isa) or '?'}")
    measuring.write_json(out_path, {"batch": fv.batch, "seq": fv.seq, "results": results})



if __name__ == "__main__":
    cli.run_script(define_flags, run)
