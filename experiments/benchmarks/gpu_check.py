"""The GPU check: one command that measures what the project's precision and compression choices buy on
whatever backend JAX has, writes one JSON and prints one table.

    python -m experiments.benchmarks.gpu_check --out=bench_results/gpu_check.json          # on a GPU
    python -m experiments.benchmarks.gpu_check --shapes=tiny --out=/tmp/gpu_check.json      # any CPU, seconds
    launch/gpu_session.sh                                       # a lent GPU machine: this check, then the tests

Rows, measured one after another in this priority order (each compiled, warmed up, then timed over
``rounds`` calls; a call repeats the step until it lasts about ``target_call_s``; the figure is the median):

1. ``train/teacher/{float32,bfloat16,float16}``: the project's own train step
   (:func:`experiments.runtime.trainer.make_train_step`: AdamW, dropout, cross-entropy on a 2-class sequence
   head, run by :class:`~experiments.runtime.parallel.DataParallel` on one device) of a BERT-base-sized
   Transformer (12 layers, hidden 768, 12 heads, FFN 3072) at batch 32 x seq 128: float32; the bfloat16 policy
   with its float32 islands (softmax, attention scores, LayerNorm, logits: :mod:`compression.precision`) over
   float32 master weights; float16 under the same policy with dynamic loss scaling
   (:mod:`compression.loss_scale`).
2. ``infer/teacher/{float32,bfloat16}``: the teacher's forward pass (inference, no dropout).
3. ``fp8/ffn/{bfloat16,fp8->float32,fp8->bfloat16}``: the two Dense layers of a BERT-base FFN
   (``[B*S, 768] @ [768, 3072]`` and ``[B*S, 3072] @ [3072, 768]``, bias added): bfloat16 operands, against
   float8_e4m3fn operands with per-tensor scales (:func:`fp8_dense`) accumulating to float32 or bfloat16
   (``preferred_element_type``). XLA's CPU backend emulates float8, so there the rows only show that it runs.
4. ``infer/{int8,compacted,student,mqa,bilstm}/{float32,bfloat16}``, the compressed shapes the project makes
   from that teacher: real int8 Dense layers (calibrated, :func:`compression.quantization.int8`: int8 x int8 ->
   int32 products); the compacted model with 40% of the heads and 50% of the FFN units removed
   (:func:`compression.pruning.compaction.compact`); a 3-layer student initialised from the teacher's layers
   (:func:`models.theseus.successor_from_predecessor`); the same with one key/value head (multi-query
   successor); the BiLSTM student (:class:`models.bilstm.BiLSTMClassifier`, default shape). bfloat16 rows run
   under the bfloat16 policy with the parameters cast once ahead (as a deployment would).

Budget (``--budget_s``, 420 s by default): before a row starts, its cost is estimated from the rows measured so
far (:func:`estimate_s`); a row that would end past the budget is not run and is marked ``skipped-for-budget`` in
the JSON and the table, and later, cheaper rows are still tried; a row's timed calls stop at the budget. A row whose
compilation or run fails is marked ``error`` with the message. No row is ever left out.

Figures per row: ``tokens_per_s`` (``tokens`` = batch x seq per step, divided by the median time of a step);
``ratio`` = ``tokens_per_s`` / that of the row named in ``ratio_to`` (the float32 row of the same model, or the
bfloat16 row for fp8); for compressed models ``speedup_vs_teacher`` (against the teacher at the same precision)
beside ``flop_ratio_vs_teacher``; ``mfu`` = model FLOPs per second / the chip's published dense bf16 peak
(:mod:`experiments.benchmarks.accelerator`; every row is measured against that one peak, whatever its
precision; chips not in the table report tokens/s only).

FLOP convention (:mod:`experiments.benchmarks.model_flops`): model FLOPs count matrix products only, ``2*m*n*k``
for an ``[m, k] @ [k, n]`` product (Q/K/V/output projections, attention scores and context, FFN, pooler and
classifier; LSTM input and recurrent products, MLP); embeddings, softmax, LayerNorm, GELU and elementwise work
do not count; a training step is 3 forward passes (backward = gradients of inputs + gradients of weights).

On a GPU every row also gets a one-line verdict on the claim the project makes for it (:data:`CLAIMS`), e.g.
bfloat16 training at least 2x float32; compacted and student models faster than the teacher in proportion to
their FLOPs (at least 80% of the FLOP ratio). Float32 rows use JAX's default matmul precision (recorded as
``versions.jax_default_matmul_precision``): on Ampere and later GPUs that is TF32 tensor-core math.

``--shapes=full`` (the default) refuses to start on a CPU backend unless ``--allow_cpu`` is given: BERT-base
training on a CPU takes many minutes per row and measures nothing this check is for. ``--shapes=tiny`` runs the
same rows on a 4-layer, hidden-32 teacher in seconds (compiled without XLA's LLVM optimisation passes, as the
test suite compiles: its timings mean nothing, compiling is most of its time); the test suite runs it and checks
the JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from compression import loss_scale, precision, quantization
from compression.pruning import compaction
from experiments.benchmarks import accelerator, model_flops
from experiments.runtime import measuring, trainer
from experiments.runtime.parallel import DataParallel
from models import theseus
from models.bilstm import BiLSTMClassifier, BiLSTMConfig
from models.transformer import Transformer, TransformerConfig

E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448: the largest finite float8_e4m3fn
SKIPPED = "skipped-for-budget"
DEFAULT_BUDGET_S = 420.0
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"  # --shapes=tiny only (see run())


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Model and batch shapes of one ``--shapes`` choice."""

    teacher: TransformerConfig  # the BERT-base-sized teacher (sequence head)
    bilstm: BiLSTMConfig  # the BiLSTM student
    batch: int
    seq: int
    student_layers: int  # layers of the student and of the multi-query successor
    head_fraction: float  # share of each layer's heads the compacted model removes
    ffn_fraction: float  # share of each layer's FFN units the compacted model removes
    rounds: int  # timed calls per row
    target_call_s: float  # one timed call repeats the step until it lasts about this long


SHAPES = {
    "full": Shapes(
        teacher=TransformerConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                                  intermediate_size=3072, max_position_embeddings=512, head="sequence", num_labels=2),
        bilstm=BiLSTMConfig(vocab_size=30522), batch=32, seq=128, student_layers=3, head_fraction=0.4,
        ffn_fraction=0.5, rounds=5, target_call_s=0.2),
    "tiny": Shapes(
        teacher=TransformerConfig(vocab_size=128, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                                  max_position_embeddings=16, head="sequence", num_labels=2),
        bilstm=BiLSTMConfig(vocab_size=128, embed_dim=16, hidden_size=8, mlp_hidden=16), batch=2, seq=8,
        student_layers=3, head_fraction=0.5, ffn_fraction=0.5, rounds=3, target_call_s=0.0),
}


@dataclasses.dataclass(frozen=True)
class Claim:
    """What the project expects of a row on a GPU: ``value(row) >= threshold``."""

    text: str
    field: str  # the row field compared: "ratio" or "speedup_vs_teacher"
    threshold: float | None = None  # a number; None: ``flop_share`` x the row's flop_ratio_vs_teacher
    flop_share: float = 0.8

    def target(self, row: dict) -> float | None:
        if self.threshold is not None:
            return self.threshold
        ratio = row.get("flop_ratio_vs_teacher")
        return None if ratio is None else self.flop_share * ratio


PROPORTIONAL = Claim("faster than the teacher in proportion to FLOPs (>= 80% of the FLOP ratio)",
                     "speedup_vs_teacher")
CLAIMS = {  # row name -> claim; rows not listed are baselines
    "train/teacher/bfloat16": Claim("bf16 training >= 2x float32", "ratio", 2.0),
    "train/teacher/float16": Claim("fp16 training with loss scaling >= 2x float32", "ratio", 2.0),
    "infer/teacher/bfloat16": Claim("bf16 inference >= 1.5x float32", "ratio", 1.5),
    "fp8/ffn/fp8->float32": Claim("fp8 Dense faster than bf16 Dense", "ratio", 1.0),
    "fp8/ffn/fp8->bfloat16": Claim("fp8 Dense faster than bf16 Dense", "ratio", 1.0),
    "infer/int8/float32": Claim("int8 Dense layers faster than the float32 teacher", "speedup_vs_teacher", 1.0),
    "infer/int8/bfloat16": Claim("int8 Dense layers faster than the bf16 teacher", "speedup_vs_teacher", 1.0),
    "infer/bilstm/float32": Claim("BiLSTM faster than the teacher", "speedup_vs_teacher", 1.0),
    "infer/bilstm/bfloat16": Claim("BiLSTM faster than the teacher", "speedup_vs_teacher", 1.0),
    **{f"infer/{m}/{p}": PROPORTIONAL for m in ("compacted", "student", "mqa") for p in ("float32", "bfloat16")},
}


@dataclasses.dataclass
class Case:
    """One row to measure.

    ``build()`` prepares everything (compiles lazily on the first call) and returns ``step()``, a zero-argument
    function doing one step whose result ``jax.block_until_ready`` waits for.
    """

    name: str
    group: str  # "train" | "infer" | "fp8"
    model: str
    precision: str
    tokens: int  # tokens one step processes (batch x seq)
    flops: float  # model FLOPs of one step (module docstring)
    build: Callable[[], Callable[[], Any]]
    ratio_to: str | None = None  # the row whose tokens/s the ratio divides by
    teacher_row: str | None = None  # the teacher row at the same precision (compressed inference rows)
    teacher_flops: float | None = None


def fp8_dense(x: jax.Array, w8: jax.Array, w_scale: jax.Array, x_scale: jax.Array, bias: jax.Array,
              out_dtype) -> jax.Array:
    """``x @ w + bias`` with float8_e4m3fn operands and per-tensor scales.

    Args:
      x: [M, K] activations (bfloat16 or float32), quantized here with the static scale ``x_scale`` (float32 [],
        the calibrated amax / 448: what delayed scaling keeps from earlier steps), clipped to +-448.
      w8: [K, N] float8_e4m3fn weights, quantized ahead with ``w_scale`` (float32 []).
      bias: [N], added in ``out_dtype``.
      out_dtype: the dtype the product is written in (``preferred_element_type``): float32 or bfloat16; the
        tensor cores accumulate in float32 either way.

    Returns:
      [M, N] ``out_dtype``: ``(q(x) . w8) * (x_scale * w_scale) + bias``.
    """
    x8 = jnp.clip(x.astype(jnp.float32) / x_scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    acc = jax.lax.dot_general(x8, w8, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    return acc * (x_scale * w_scale).astype(out_dtype) + bias.astype(out_dtype)


def quantize_fp8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-tensor float8_e4m3fn quantization: ``(w8, scale)`` with ``scale = amax(|w|) / 448`` (float32 [])."""
    scale = jnp.maximum(jnp.max(jnp.abs(w)).astype(jnp.float32), 1e-12) / E4M3_MAX
    return jnp.clip(w.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn), scale


class Models:
    """The teacher and the compressed models made from it, built on first use (a skipped row builds nothing)."""

    def __init__(self, shapes: Shapes, seed: int = 0):
        self.shapes = shapes
        cfg = shapes.teacher
        rng = np.random.default_rng(seed)
        b, s = shapes.batch, shapes.seq
        self.ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, s)), jnp.int32)
        self.mask = jnp.ones((b, s), jnp.int32)
        self.batch = {"input_ids": np.asarray(self.ids), "attention_mask": np.asarray(self.mask),
                      "token_type_ids": np.zeros((b, s), np.int32),
                      "labels": rng.integers(0, cfg.num_labels, (b,)).astype(np.int32),
                      "example_weight": np.ones((b,), np.float32)}
        self.word_ids = jnp.asarray(rng.integers(1, shapes.bilstm.vocab_size, (b, s)), jnp.int32)

    @functools.cached_property
    def teacher(self) -> tuple[TransformerConfig, dict]:
        cfg = self.shapes.teacher
        return cfg, jax.jit(Transformer(cfg).init)(jax.random.key(0), self.ids[:1])["params"]

    @functools.cached_property
    def int8(self) -> tuple[Callable, dict]:
        """(int8 apply, converted variables): max calibration on up to four rows, then int8 kernels."""
        cfg, params = self.teacher
        model = Transformer(cfg)
        rows = min(4, self.shapes.batch)
        calibrated = quantization.calibrate(model.apply, {"params": params},
                                            [(self.ids[:rows], self.mask[:rows])], method="max")
        t = quantization.int8()
        return t.wrap(model.apply), t.init(jax.random.key(0), calibrated, model.apply, self.ids[:1])

    @functools.cached_property
    def compacted(self) -> tuple[TransformerConfig, dict]:
        """The teacher compacted to :func:`compacted_config`'s sizes, keeping each layer's first heads and FFN
        units (which units go does not change the speed)."""
        cfg, params = self.teacher
        small = compacted_config(self.shapes)
        heads = {i: (np.arange(cfg.heads(i)) < small.heads(i)).astype(np.float32) for i in range(cfg.num_layers)}
        ffn = {i: (np.arange(cfg.ffn_size(i)) < small.ffn_size(i)).astype(np.float32) for i in range(cfg.num_layers)}
        return compaction.compact(cfg, jax.tree.map(np.asarray, params), heads, ffn)

    def successor(self, num_kv_heads: int | None) -> tuple[TransformerConfig, dict]:
        """A ``student_layers``-layer successor initialised from the teacher's first layers (one replacement
        module), with ``num_kv_heads`` key/value heads (None: as many as query heads)."""
        cfg, params = self.teacher
        succ = theseus.successor_from_predecessor(cfg, self.shapes.student_layers, num_kv_heads=num_kv_heads)
        both = theseus.init_from_predecessor(cfg, jax.tree.map(np.asarray, params), succ, num_modules=1)
        return theseus.extract_successor(cfg, succ, both, num_modules=1)

    @functools.cached_property
    def student(self):
        return self.successor(None)

    @functools.cached_property
    def mqa(self):
        return self.successor(1)

    @functools.cached_property
    def bilstm(self) -> tuple[BiLSTMConfig, dict]:
        cfg = self.shapes.bilstm
        return cfg, jax.jit(BiLSTMClassifier(cfg).init)(jax.random.key(0), self.word_ids[:1])["params"]


def _cast_params(variables: dict, name: str) -> dict:
    """The variables with their ``params`` cast once to the policy's compute dtype (other collections kept)."""
    dtype = precision.dtype_from_name(name)
    return {**variables, "params": precision.cast_floating(variables["params"], dtype)}


def _transformer_forward(apply_fn, variables: dict, name: str, ids, mask) -> Callable[[], Any]:
    apply = precision.policy(name).wrap(apply_fn)
    # The hidden states are returned with the logits, so that no part of the last layer is dead code.
    fwd = jax.jit(lambda v, i, m: (lambda o: (o.logits, o.last_hidden_state))(apply(v, i, attention_mask=m)))
    variables = _cast_params(variables, name)
    return lambda: fwd(variables, ids, mask)


def _train_step(cfg: TransformerConfig, params: dict, name: str, batch: dict) -> Callable[[], Any]:
    """The project's train step (AdamW 5e-5, weight decay 0.01, dropout on) under precision policy ``name``;
    float16 with dynamic loss scaling."""
    apply = precision.policy(name).wrap(Transformer(cfg).apply)
    tx = trainer.make_optimizer(params, schedule=optax.constant_schedule(5e-5), weight_decay=0.01)
    scale = loss_scale.dynamic_scale() if name == "float16" else None
    state = trainer.TrainState.create(params, tx, jax.random.key(1), dynamic_scale=scale)
    par = DataParallel("shard_map", devices=jax.devices()[:1])
    step = par.compile(trainer.make_train_step(trainer.classification_loss(apply), tx, steps_per_epoch=1 << 30),
                       donate_state=True)
    box = [par.replicate(state)]
    device_batch = par.shard_batch(batch)

    def run():
        box[0], _ = step(box[0], device_batch)
        return box[0]

    return run


def _fp8_ffn(shapes: Shapes, variant: str, errors: dict) -> Callable[[], Any]:
    """Both FFN Dense layers of the teacher's shape; ``variant``: "bfloat16", "fp8->float32", "fp8->bfloat16".

    Weights are cast or quantized once ahead and passed as arguments (a closed-over constant could be folded or
    converted on every call). Records ``errors[variant]``: max |y - y_bf16| / max |y_bf16| over both outputs.
    """
    cfg = shapes.teacher
    m, h, f = shapes.batch * shapes.seq, cfg.hidden_size, cfg.ffn_size(0)
    keys = jax.random.split(jax.random.key(2), 6)
    x = jax.random.normal(keys[0], (m, h), jnp.bfloat16)
    x2 = jax.random.normal(keys[1], (m, f), jnp.bfloat16)
    w1 = cfg.initializer_range * jax.random.normal(keys[2], (h, f))
    w2 = cfg.initializer_range * jax.random.normal(keys[3], (f, h))
    b1, b2 = 0.02 * jax.random.normal(keys[4], (f,)), 0.02 * jax.random.normal(keys[5], (h,))

    def bf16_ffn(a, a2, p):
        return tuple(jnp.dot(u, w, preferred_element_type=jnp.bfloat16) + b for u, (w, b) in zip((a, a2), p))

    bf16_weights = jax.tree.map(lambda t: t.astype(jnp.bfloat16), ((w1, b1), (w2, b2)))
    reference = jax.jit(bf16_ffn)(x, x2, bf16_weights)
    if variant == "bfloat16":
        fn, weights = jax.jit(bf16_ffn), bf16_weights
    else:
        out = {"fp8->float32": jnp.float32, "fp8->bfloat16": jnp.bfloat16}[variant]
        weights = tuple((*quantize_fp8(w), jnp.max(jnp.abs(u)).astype(jnp.float32) / E4M3_MAX, b.astype(out))
                        for u, w, b in ((x, w1, b1), (x2, w2, b2)))  # (w8, w_scale, static x_scale, bias)

        def fp8_ffn(a, a2, p):
            return tuple(fp8_dense(u, w8, sw, sx, b, out) for u, (w8, sw, sx, b) in zip((a, a2), p))

        fn = jax.jit(fp8_ffn)
    y = fn(x, x2, weights)
    errors[variant] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)))
                                / jnp.max(jnp.abs(r.astype(jnp.float32)))) for a, r in zip(y, reference))
    return lambda: fn(x, x2, weights)


def cases(shapes: Shapes, models: Models, fp8_errors: dict) -> list[Case]:
    """Every row, in priority order (module docstring)."""
    cfg, b, s = shapes.teacher, shapes.batch, shapes.seq
    tokens = b * s
    fwd_teacher = model_flops.transformer_forward_flops(cfg, b, s)
    out = []
    for p in ("float32", "bfloat16", "float16"):
        out.append(Case(f"train/teacher/{p}", "train", "teacher", p, tokens,
                        model_flops.TRAIN_MULTIPLIER * fwd_teacher,
                        functools.partial(lambda p: _train_step(*models.teacher, p, models.batch), p),
                        ratio_to="train/teacher/float32"))

    def infer(model: str, p: str, flops: float, build: Callable) -> Case:
        return Case(f"infer/{model}/{p}", "infer", model, p, tokens, flops, build, ratio_to=f"infer/{model}/float32",
                    teacher_row=None if model == "teacher" else f"infer/teacher/{p}", teacher_flops=fwd_teacher)

    def transformer(model: str, get: Callable[[], tuple[TransformerConfig, dict]], flops: float):
        return [infer(model, p, flops, functools.partial(
            lambda p: _transformer_forward(Transformer(get()[0]).apply, {"params": get()[1]}, p, models.ids,
                                           models.mask), p)) for p in ("float32", "bfloat16")]

    out += transformer("teacher", lambda: models.teacher, fwd_teacher)
    ffn_flops = 2 * model_flops.matmul_flops(tokens, cfg.hidden_size, cfg.ffn_size(0))
    for v in ("bfloat16", "fp8->float32", "fp8->bfloat16"):
        out.append(Case(f"fp8/ffn/{v}", "fp8", "ffn", v, tokens, ffn_flops,
                        functools.partial(_fp8_ffn, shapes, v, fp8_errors), ratio_to="fp8/ffn/bfloat16"))
    out += [infer("int8", p, fwd_teacher, functools.partial(
        lambda p: _transformer_forward(models.int8[0], models.int8[1], p, models.ids, models.mask), p))
        for p in ("float32", "bfloat16")]

    # The compressed configs (and so their FLOPs) come without parameters: a skipped row builds nothing.
    for name, get, small in (
            ("compacted", lambda: models.compacted, compacted_config(shapes)),
            ("student", lambda: models.student, theseus.successor_from_predecessor(cfg, shapes.student_layers)),
            ("mqa", lambda: models.mqa,
             theseus.successor_from_predecessor(cfg, shapes.student_layers, num_kv_heads=1))):
        out += transformer(name, get, model_flops.transformer_forward_flops(small, b, s))

    bl_flops = model_flops.bilstm_forward_flops(shapes.bilstm, b, s)

    def bilstm_forward(p):
        bcfg, params = models.bilstm
        apply = precision.policy(p).wrap(BiLSTMClassifier(bcfg).apply)
        fwd = jax.jit(lambda v, i, m: apply(v, i, m).logits)
        variables = _cast_params({"params": params}, p)
        return lambda: fwd(variables, models.word_ids, models.mask)

    out += [infer("bilstm", p, bl_flops, functools.partial(bilstm_forward, p)) for p in ("float32", "bfloat16")]
    return out


def compacted_config(shapes: Shapes) -> TransformerConfig:
    """The compacted model's config: each layer keeps ``1 - head_fraction`` of its heads and ``1 - ffn_fraction``
    of its FFN units (rounded); :meth:`Models.compacted` keeps exactly these."""
    cfg = shapes.teacher
    heads = tuple(cfg.heads(i) - round(cfg.heads(i) * shapes.head_fraction) for i in range(cfg.num_layers))
    ffn = tuple(cfg.ffn_size(i) - round(cfg.ffn_size(i) * shapes.ffn_fraction) for i in range(cfg.num_layers))
    return cfg.replace(num_heads=heads, intermediate_size=ffn, head_dim=cfg.dim_per_head)


def now() -> float:
    """The clock the budget is kept on (seconds; tests replace it)."""
    return time.perf_counter()


class Clock:
    """Seconds since the check started, the budget's deadline, and progress lines on stdout."""

    def __init__(self, budget_s: float):
        self.start = now()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return now() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)


def measure(case: Case, rounds: int, target_call_s: float, clock: Clock) -> dict:
    """Builds, compiles and times ``case``; returns its row fields (times per step, median, tokens/s).

    The first call (compilation included) gives ``compile_s``; a second call sets how many steps one timed call
    repeats (``iters``: about ``target_call_s`` per call); then up to ``rounds`` timed calls, stopping early
    (after at least one) when the next would pass the budget."""
    start = time.perf_counter()
    step = case.build()
    jax.block_until_ready(step())
    compile_s = time.perf_counter() - start
    t = time.perf_counter()
    jax.block_until_ready(step())
    one = time.perf_counter() - t
    iters = max(1, min(1000, math.ceil(target_call_s / max(one, 1e-9))))
    times = []
    for r in range(rounds):
        if r and clock.left() < iters * one:
            break
        t = time.perf_counter()
        for _ in range(iters):
            out = step()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / iters)
    med = measuring.median(times)
    return {"status": "ok", "compile_s": compile_s, "iters_per_call": iters, "rounds": len(times), "times_s": times,
            "median_s": med, "tokens_per_s": case.tokens / med, "flops_per_s": case.flops / med}


def estimate_s(case: Case, costs: dict[str, tuple[str, float]]) -> float:
    """The expected cost of ``case`` in seconds: the largest cost among measured rows of its group; for a group
    not measured yet, the smallest cost of any measured row (a first row of a cheaper group is not judged by the
    training rows' compilation); 0 before any row."""
    same = [c for group, c in costs.values() if group == case.group]
    if same:
        return max(same)
    return min((c for _, c in costs.values()), default=0.0)


def _verdict(row: dict, gpu: bool) -> dict | None:
    claim = CLAIMS.get(row["name"])
    if claim is None:
        return {"claim": None, "holds": None, "text": "baseline"}
    if not gpu:
        return {"claim": claim.text, "holds": None, "text": f"n/a (not a GPU): {claim.text}"}
    value, target = row.get(claim.field), claim.target(row)
    if row["status"] != "ok" or value is None or target is None:
        return {"claim": claim.text, "holds": None, "text": f"n/a ({row['status']}): {claim.text}"}
    holds = value >= target
    return {"claim": claim.text, "holds": holds,
            "text": f"{'holds' if holds else 'FAILS'}: {claim.text} (measured {value:.2f}x, needs >= {target:.2f}x)"}


def finish_rows(rows: list[dict], peak: float | None, gpu: bool) -> None:
    """Adds ratios, teacher comparisons, MFU and verdicts to measured rows, in place."""
    by_name = {r["name"]: r for r in rows}

    def tps(name):
        r = by_name.get(name)
        return r["tokens_per_s"] if r and r["status"] == "ok" else None

    for r in rows:
        ok = r["status"] == "ok"
        base = tps(r["ratio_to"]) if r.get("ratio_to") else None
        r["ratio"] = r["tokens_per_s"] / base if ok and base else None
        if r.get("teacher_row"):
            teacher = tps(r["teacher_row"])
            r["speedup_vs_teacher"] = r["tokens_per_s"] / teacher if ok and teacher else None
            r["flop_ratio_vs_teacher"] = r.pop("teacher_flops") / r["flops"]
        else:
            r.pop("teacher_flops", None)
        r["mfu"] = r["flops_per_s"] / peak if ok and peak else None
        r["verdict"] = _verdict(r, gpu)


def refusal(shapes: str, allow_cpu: bool) -> str | None:
    """Why the check will not run these shapes on this backend (full shapes on a CPU without ``--allow_cpu``),
    or None."""
    device = jax.devices()[0]
    if shapes != "full" or allow_cpu or device.platform != "cpu":
        return None
    return (f"gpu_check: refusing the full BERT-base shapes on JAX's {device.platform} backend "
            f"({device.device_kind}): each training row would take many minutes here and measure nothing this "
            "check is for (GPU speed). Run --shapes=tiny for a quick CPU run (make bench-gpu "
            "GPU_CHECK_ARGS=--shapes=tiny), or pass --allow_cpu to measure the full shapes on the CPU anyway.")


def table_rows(rows: list[dict]) -> list[dict]:
    """The printed table's cells of ``rows``."""
    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    out = []
    for r in rows:
        ok = r["status"] == "ok"
        out.append({"row": r["name"], "status": r["status"],
                    "ms/step": 1e3 * r["median_s"] if ok else "-", "tokens/s": r["tokens_per_s"] if ok else "-",
                    "ratio": f"{x(r.get('ratio'))} vs {r['ratio_to'].rsplit('/', 1)[-1]}"
                    if r.get("ratio") is not None else "-",
                    "vs teacher": x(r.get("speedup_vs_teacher")), "FLOP ratio": x(r.get("flop_ratio_vs_teacher")),
                    "MFU": f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
                    "verdict": r.get("error") or r["verdict"]["text"]})
    return out


TABLE_COLUMNS = ["row", "status", "ms/step", "tokens/s", "ratio", "vs teacher", "FLOP ratio", "MFU", "verdict"]


def run_check(shapes_name: str, budget_s: float, out: str | None, rounds: int | None = None) -> dict:
    """Measures every row of ``SHAPES[shapes_name]`` within ``budget_s``; prints the table, writes ``out``
    (JSON; nothing when None) and returns the payload."""
    clock = Clock(budget_s)
    shapes = SHAPES[shapes_name]
    device = accelerator.device_info()
    versions = accelerator.software_versions()
    gpu = accelerator.is_gpu()
    clock.log(f"gpu_check --shapes={shapes_name}: {device['platform']} {device['device_kind']} "
              f"(peak bf16 {device['peak_bf16_flops'] / 1e12 if device['peak_bf16_flops'] else 'unknown'} TFLOP/s), "
              f"jax {versions['jax']}, jaxlib {versions['jaxlib']}, CUDA {versions['cuda_runtime']}; "
              f"budget {budget_s:.0f} s")
    models, fp8_errors = Models(shapes), {}
    rows, costs = [], {}
    for case in cases(shapes, models, fp8_errors):
        row = {"name": case.name, "group": case.group, "model": case.model, "precision": case.precision,
               "batch": shapes.batch, "seq": shapes.seq, "tokens": case.tokens, "flops": case.flops,
               "ratio_to": case.ratio_to, "teacher_row": case.teacher_row, "teacher_flops": case.teacher_flops}
        estimate = estimate_s(case, costs)
        if estimate > clock.left():
            row["status"] = SKIPPED
            clock.log(f"{case.name}: {SKIPPED} (about {estimate:.0f} s needed, {max(clock.left(), 0):.0f} s left)")
            rows.append(row)
            continue
        clock.log(f"{case.name}: compiling and timing ...")
        start = now()
        try:
            row.update(measure(case, rounds or shapes.rounds, shapes.target_call_s, clock))
        except Exception as e:  # noqa: BLE001 - one row's failure (e.g. no fp8 kernels on the chip) is reported
            row.update(status="error", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        costs[case.name] = (case.group, now() - start)
        if row["status"] == "ok":
            clock.log(f"{case.name}: {row['tokens_per_s']:,.0f} tokens/s, {1e3 * row['median_s']:.3f} ms/step "
                      f"(compile {row['compile_s']:.1f} s, {row['rounds']} rounds x {row['iters_per_call']} steps)")
        else:
            clock.log(f"{case.name}: {row['error']}")
        rows.append(row)
    finish_rows(rows, device["peak_bf16_flops"], gpu)
    for r in rows:
        variant = r["name"].rsplit("/", 1)[-1]
        if r["group"] == "fp8" and variant in fp8_errors:
            r["max_rel_err_vs_bfloat16"] = fp8_errors[variant]

    peak = device["peak_bf16_flops"]
    measuring.print_table(table_rows(rows), TABLE_COLUMNS,
                       f"GPU check ({shapes_name} shapes: teacher {shapes.teacher.num_layers} layers, hidden "
                       f"{shapes.teacher.hidden_size}, batch {shapes.batch} x seq {shapes.seq}) on {device['device_kind']}"
                       f"; MFU vs dense bf16 peak {peak / 1e12 if peak else 'unknown'} TFLOP/s")
    payload = {
        "benchmark": "gpu_check", "shapes": shapes_name, "date": accelerator.now_utc(),
        "git_commit": accelerator.git_commit(), "device": device, "versions": versions, "budget_s": budget_s,
        "wall_s": clock.elapsed(), "flop_convention": model_flops.CONVENTION,
        "config": {"teacher": shapes.teacher.to_dict(), "bilstm": shapes.bilstm.to_dict(),
                   "batch": shapes.batch, "seq": shapes.seq, "student_layers": shapes.student_layers,
                   "head_fraction": shapes.head_fraction, "ffn_fraction": shapes.ffn_fraction},
        "rows": rows,
    }
    clock.log(f"done in {clock.elapsed():.0f} s ({sum(r['status'] == 'ok' for r in rows)} of {len(rows)} rows "
              "measured)")
    measuring.write_json(out, payload)
    return payload


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags and their checks (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_enum("shapes", "full", sorted(SHAPES), "full: BERT-base at batch 32 x seq 128 (a GPU); tiny: a "
                      "4-layer hidden-32 teacher at batch 2 x seq 8 (any CPU, seconds)", flag_values=fv)
    flags.DEFINE_float("budget_s", DEFAULT_BUDGET_S, "seconds the check stays within: rows that would overrun "
                       "are skipped and marked skipped-for-budget", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_string("out", "bench_results/gpu_check.json", "the JSON results path (local or gs://)",
                        flag_values=fv)
    flags.DEFINE_bool("allow_cpu", False, "run --shapes=full on a CPU backend too (refused without it)",
                      flag_values=fv)
    flags.DEFINE_integer("rounds", None, "timed calls per row (default: 5 full, 3 tiny)", lower_bound=1,
                         flag_values=fv)


def run(fv: flags.FlagValues) -> dict:
    """The check on parsed flags ``fv`` (:func:`define_flags`); exits with the reason when :func:`refusal`
    refuses."""
    if fv.shapes == "tiny" and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # Tiny timings mean nothing and compiling is most of the run: skip XLA's LLVM passes, as the test suite
        # does (takes effect when JAX's backend starts after this, i.e. from the command line).
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()
    why = refusal(fv.shapes, fv.allow_cpu)
    if why:
        print(why, file=sys.stderr, flush=True)
        raise SystemExit(2)
    return run_check(fv.shapes, fv.budget_s, fv.out, fv.rounds)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(FLAGS)


if __name__ == "__main__":
    define_flags(FLAGS)
    app.run(main)
