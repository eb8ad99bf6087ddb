"""Structured L0 pruning (``config.l0``) of a Transformer: hard-concrete gates on heads and FFN units, then
compaction.

Hard-concrete gates (:func:`compression.pruning.l0.l0_gates`, Louizos et al. 2018) sit on every attention head
and every FFN unit of the trained Transformer (McCarley et al. 2019). The trainable tree gains::

    "gates": the gates' log_alpha (float32 [N] per head site, [F] per FFN site)
    "lambdas": {"ffn" | "heads": {"lambda_1": float32 [], "lambda_2": float32 []}}

and the loss the term ``sum_k lambda_1k (s_k - t_k) + lambda_2k (s_k - t_k)^2`` (Wang et al. 2020; CoFi, Xia et
al. 2022): ``s_k`` is the expected fraction of pruned units of kind ``k``, ``t_k`` its target. The model and
gates descend; the multipliers ascend (their Adam sees the negated gradient), so a constraint that is not met
is penalised ever harder until it is. The task loss is whatever the job's is (gold labels, or distillation
from a teacher with ``config.distill``).

One target per kind, not CoFi's single target: CoFi constrains the expected remaining *parameter count* of
the whole model, so it may trade heads for FFN units freely and "50% of FFN units" is not something it can be
asked for. So FFN units and heads each get a target (``l0.target_ffn``, ``l0.target_heads``) and their own
pair of multipliers, as McCarley et al. report them. Both targets ramp linearly from 0 over the first
``l0.warmup_fraction`` of the steps (CoFi's ``lagrangian_warmup``); the ramp ``r(step)`` is computed on the
host from the global step and travels with each batch as ``sparsity_ramp`` float32 [B], so the compiled step
never changes and a resumed run continues the same schedule. As in CoFi, the multipliers start at 0, the gates
and multipliers have their own constant learning rates (Adam, no weight decay, no clipping), and
``log_alpha`` is kept in ``[-4.6, 4.6]`` (log 100; ``l0.max_abs_log_alpha``).

Gates are sampled (their own RNG stream) in training; evaluation, the reported metrics and compaction use the
deterministic gates. At the end a unit whose deterministic gate is 0 is removed (the hard decision), and the
remaining gate values are folded into the output projections (:mod:`compression.pruning.compaction`), so the saved
plain Transformer computes what the gated model computed at evaluation; the run evaluates it and checks that its
metrics equal the gated model's (``compacted_matches_gated``). Exactly so in float32 without QAT; with QAT the
folded gate values change what int8 quantizes (the output projections' per-channel weight scales and their input
activations), and bfloat16 rounds differently, so the compacted model's metrics may differ a little: the saved,
compacted model's own metrics are the ones reported (``compacted``, the model's ``eval``). A layer whose heads (or
FFN units) are all closed keeps one unit, the one with the largest ``log_alpha``, with its output-projection rows
zeroed: it contributes nothing, exactly as its closed gate did (removing the layer would drop its biases too).

Results: ``achieved_sparsity`` (fraction of FFN units / heads whose gate is 0), ``expected_sparsity``,
``heads_per_layer`` / ``ffn_per_layer`` of the compacted model, parameter counts before/after and the
compacted model's dev metrics (``compacted``). Export the last step (``export = "last"``): an earlier "best"
checkpoint would not meet the targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from compression.pruning import compaction, l0
from compression.pruning.site_masks import masks_by_path, unflatten
from experiments.runtime import evaluation
from experiments.techniques.base import Exported, Run, Technique

SITES = {"ffn": "ffn_site", "heads": "heads_site"}  # kind -> the site name its gates' paths end with
RAMP = "sparsity_ramp"  # batch key of the target ramp r(step), float32 [B]
METRIC_ATOL = 1e-6  # the compacted model's dev metrics must equal the gated model's to this tolerance


def section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.enabled = False  # on: gates on every head and FFN unit, pruned to the targets, compacted at the end
    s.target_ffn = 0.5  # fraction of FFN units to prune, in [0, 1)
    s.target_heads = 0.3  # fraction of attention heads to prune, in [0, 1)
    s.warmup_fraction = 0.3  # share of the steps over which the targets ramp linearly from 0 (CoFi's warmup)
    s.drop_init = 0.1  # initial P(gate closed) per unit; sets the starting log_alpha = log((1 - p) / p)
    # CoFi uses 0.01 for both over 20 epochs; a run here is about 1 epoch, so the gates and multipliers move faster
    s.gate_learning_rate = 0.1  # Adam learning rate of the gates' log_alpha (constant)
    s.lambda_learning_rate = 0.1  # Adam learning rate of the Lagrange multipliers (gradient ascent)
    s.max_abs_log_alpha = 4.6  # log_alpha is kept in [-x, x] after each step (CoFi: log 100); 0: no bound
    return s


CONSTRAINTS = {"target_ffn": dict(min=0.0, max=0.999), "target_heads": dict(min=0.0, max=0.999),
               "warmup_fraction": dict(min=0.0, max=1.0), "drop_init": dict(min=1e-6, max=1.0 - 1e-6),
               "gate_learning_rate": dict(min=0.0), "lambda_learning_rate": dict(min=0.0),
               "max_abs_log_alpha": dict(min=0.0)}


# -- schedule, penalty, optimizer -------------------------------------------------------------------------

def target_ramp(step: int, warmup_steps: int) -> float:
    """The fraction of the targets in force at ``step``: ``min(1, step / warmup_steps)`` (1 without warm-up)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def initial_gates(gates_t, apply_fn, params, drop_init: float) -> dict:
    """The ``gates`` collection of ``gates_t`` (:func:`compression.pruning.l0.l0_gates`) over the model: every
    unit at ``init_log_alpha(drop_init)``. The sites' shapes come from an abstract trace (nothing runs)."""
    sample = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda p: gates_t.init(jax.random.key(0), {"params": p}, apply_fn, sample,
                                                   attention_mask=jnp.ones_like(sample))[l0.GATES], params)
    return jax.tree.map(lambda s: jnp.full(s.shape, l0.init_log_alpha(drop_init), s.dtype), shapes)


def init_lambdas() -> dict:
    """Zero multipliers, one pair per kind: ``{kind: {"lambda_1": float32 [], "lambda_2": float32 []}}``."""
    return {kind: {"lambda_1": jnp.zeros((), jnp.float32), "lambda_2": jnp.zeros((), jnp.float32)} for kind in SITES}


def sparsity_penalty(gates: dict, lambdas: dict, targets: dict) -> tuple[jax.Array, dict]:
    """``(sum over kinds of the Lagrangian term, metrics)``; ``targets``: {kind: float32 [] in [0, 1)}.

    metrics (float32 []): ``lagrangian`` and, per kind, ``expected_sparsity_<kind>``, ``target_<kind>``,
    ``lambda_1_<kind>``, ``lambda_2_<kind>``.
    """
    total, metrics = jnp.zeros((), jnp.float32), {}
    for kind, site in SITES.items():
        s = l0.expected_sparsity(gates, site)
        lam = lambdas[kind]
        total = total + l0.lagrangian_penalty(s, targets[kind], lam["lambda_1"], lam["lambda_2"])
        metrics.update({f"expected_sparsity_{kind}": s, f"target_{kind}": jnp.asarray(targets[kind], jnp.float32),
                        f"lambda_1_{kind}": lam["lambda_1"], f"lambda_2_{kind}": lam["lambda_2"]})
    metrics["lagrangian"] = total
    return total, metrics


def _keep_within(bound: float) -> optax.GradientTransformation:
    """Shortens updates so that ``params + updates`` stays in ``[-bound, bound]`` (``bound`` 0: no bound)."""

    def update(updates, state, params=None):
        if bound <= 0:
            return updates, state
        return jax.tree.map(lambda u, p: jnp.clip(p + u, -bound, bound) - p, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def gate_optimizers(c) -> dict[str, optax.GradientTransformation]:
    """Adam at ``gate_learning_rate`` on the gates (log_alpha kept in bounds); Adam on the negated gradient
    (ascent) at ``lambda_learning_rate`` on the multipliers. ``c``: ``config.l0``."""
    return {"gates": optax.chain(optax.adam(c.gate_learning_rate), _keep_within(c.max_abs_log_alpha)),
            "lambdas": optax.chain(optax.scale(-1.0), optax.adam(c.lambda_learning_rate))}


# -- compaction ------------------------------------------------------------------------------------------

def achieved_sparsity(masks: dict) -> dict[str, float]:
    """{kind: fraction of its units whose deterministic gate is 0} from a masks tree of deterministic gates."""
    by_site = masks_by_path(masks)
    return {kind: float(np.mean(np.concatenate([np.asarray(v) == 0 for p, v in by_site.items() if p.endswith(site)])))
            for kind, site in SITES.items()}


def param_count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


@jax.jit
def gate_summary(gates: dict) -> tuple[dict, dict]:
    """(deterministic gate values as a masks tree, {kind: expected sparsity}) in one compiled call."""
    return l0.deterministic_masks(gates), {kind: l0.expected_sparsity(gates, site) for kind, site in SITES.items()}


def compact_gated(config, params: dict, gates: dict, masks: dict | None = None):
    """``(config, params, inert)`` of the compacted Transformer that computes what the gated model computes
    with deterministic gates: units whose gate is 0 removed, the other gate values folded into the output
    projections. A layer with every head (FFN unit) closed keeps its head (unit) with the largest log_alpha,
    its output rows zeroed; ``inert`` names those units (``"layer_i/head_j"``, ``"layer_i/ffn_j"``).
    ``masks``: ``l0.deterministic_masks(gates)`` if already computed."""
    heads, ffn = compaction.layer_masks(gate_summary(gates)[0] if masks is None else masks)
    heads, ffn = ({i: np.array(m) for i, m in per_layer.items()} for per_layer in (heads, ffn))  # writable
    alpha_heads, alpha_ffn = compaction.layer_masks(unflatten(masks_by_path(gates)))  # log_alpha, same layout
    params = jax.tree.map(np.array, params)  # writable copies
    d, inert = config.dim_per_head, []
    for kind, by_layer, alphas in (("head", heads, alpha_heads), ("ffn", ffn, alpha_ffn)):
        for i, mask in by_layer.items():
            if mask.any():
                continue
            j = int(np.argmax(alphas[i]))
            mask[j] = 1.0
            layer = params["encoder"][f"layer_{i}"]
            if kind == "head":
                layer["attention"]["output"]["kernel"][j * d:(j + 1) * d] = 0.0
            else:
                layer["output"]["kernel"][j] = 0.0
            inert.append(f"layer_{i}/{kind}_{j}")
    new_config, new_params = compaction.compact(config, params, head_masks=heads, ffn_masks=ffn)
    return new_config, new_params, inert


# -- the component -----------------------------------------------------------------------------------------

def _check(config, family: str) -> list[str]:
    problems = []
    if family != "transformer":
        problems.append(f"config.l0.enabled: L0 gates sit on Transformer heads and FFN units; the trained model "
                        f"is a {family}")
    if config.get("theseus") is not None and config.theseus.enabled:
        problems.append("config.l0.enabled with config.theseus.enabled: gate the successor after replacement "
                        "(an l0 stage on the theseus stage's model), not the mixed model")
    if config.get("layerdrop") is not None and config.layerdrop.rate > 0:
        problems.append("config.l0.enabled with config.layerdrop.rate > 0: a dropped layer's gates get no "
                        "signal; use one or the other")
    if config.export != "last":
        problems.append(f"config.export={config.export!r} with config.l0.enabled: only the last step meets the "
                        "sparsity targets; set export='last'")
    return problems


def _setup(run: Run) -> None:
    c = run.config.l0
    cfg = run.model_cfg
    if cfg.fused_qkv or any(cfg.kv_heads(i) != cfg.heads(i) for i in range(cfg.num_layers)):
        raise ValueError("the model has fused QKV or grouped-query attention, which compaction cannot prune heads "
                         "of; unfuse it / use a multi-head attention model")
    gates_t = l0.l0_gates("heads|ffn", c.drop_init)
    run.tree["gates"] = initial_gates(gates_t, run.apply_fn(), run.tree["model"], c.drop_init)
    run.tree["lambdas"] = init_lambdas()
    run.wrappers.append(gates_t.wrap)
    run.collections.append(lambda tree, extras: {l0.GATES: tree["gates"]})
    run.rng_streams.append(l0.GATES_RNG)
    run.optimizers.update(gate_optimizers(c))
    warmup_steps = round(c.warmup_fraction * run.total_steps)
    run.batch_fields.append(lambda batch, step: {
        RAMP: np.full(len(batch["example_weight"]), target_ramp(step, warmup_steps), np.float32)})
    targets = {kind: c[f"target_{kind}"] for kind in SITES}

    def penalty(tree, batch):
        ramp = batch[RAMP][0]
        return sparsity_penalty(tree["gates"], tree["lambdas"], {k: t * ramp for k, t in targets.items()})

    run.loss_terms.append(penalty)
    gates_wrap = gates_t.wrap
    run.results["l0"] = {"targets": targets, "warmup_steps": warmup_steps}

    def compact(exported: Exported) -> None:
        masks, expected = gate_summary(exported.tree["gates"])
        before = exported.params
        cfg, params, inert = compact_gated(exported.model_cfg, before, exported.tree["gates"], masks)
        # The compacted model under every other technique (QAT scales, precision), without the gates.
        others = [w for w in run.wrappers if w is not gates_wrap]
        fixed = {k: v for k, v in run.variables(exported.tree, run.extras).items() if k != l0.GATES}
        model = type(run.model)(cfg)
        compacted = evaluation.dev_metrics(run.apply_fn(others, model), {"params": params, **fixed}, run.model_task,
                                           run.inputs, run.config.eval_batch_size)
        matches = all(abs(v - exported.eval.get(k, v)) <= METRIC_ATOL for k, v in compacted.items())
        if not matches:
            logging.warning("the compacted model's dev metrics %s differ from the gated model's %s: a compaction "
                            "error (or a near-tie flipped by float rounding)", compacted, exported.eval)
        run.results["l0"].update({
            "achieved_sparsity": achieved_sparsity(masks),
            "expected_sparsity": {kind: float(v) for kind, v in expected.items()},
            "lambdas": {kind: {k: float(v) for k, v in lam.items()} for kind, lam in exported.tree["lambdas"].items()},
            "heads_per_layer": [cfg.heads(i) for i in range(cfg.num_layers)],
            "ffn_per_layer": [cfg.ffn_size(i) for i in range(cfg.num_layers)],
            "inert_units_kept": inert,
            "params_before": param_count(before), "params_after": param_count(params),
            "encoder_params_before": param_count(before["encoder"]),
            "encoder_params_after": param_count(params["encoder"]),
            "compacted": compacted, "compacted_matches_gated": matches})
        exported.model_cfg, exported.params, exported.eval = cfg, params, compacted
        logging.info("L0: achieved sparsity %s; %d -> %d parameters; compacted %s", run.results["l0"]
                     ["achieved_sparsity"], param_count(before), param_count(params), compacted)

    run.finalizers.append(compact)


TECHNIQUE = Technique("l0", section=section, constraints=CONSTRAINTS, active=lambda c: c.l0.enabled, check=_check,
                      setup=_setup)
