"""``l0_and_evaluate(config, workdir)``: structured L0 pruning of a fine-tuned Transformer, then compaction.

Hard-concrete gates (:func:`compression.pruning.l0.l0_gates`, Louizos et al. 2018) sit on every attention head
and every FFN unit of the fine-tuned model (McCarley et al. 2019). One trainable tree is optimised::

    {"model": the Transformer's params, "gates": the gates' log_alpha (float32 [N] per head site, [F] per FFN
     site), "lambdas": {"ffn" | "heads": {"lambda_1": float32 [], "lambda_2": float32 []}}}

with the loss ``task + sum_k lambda_1k (s_k - t_k) + lambda_2k (s_k - t_k)^2`` (Wang et al. 2020; CoFi, Xia et
al. 2022): ``s_k`` is the expected fraction of pruned units of kind ``k``, ``t_k`` its target. The model and
gates descend; the multipliers ascend (their Adam sees the negated gradient), so a constraint that is not met
is penalised ever harder until it is. The task loss is cross-entropy on the gold labels, or a
:mod:`compression.distillation` preset against the unpruned teacher's logits, computed once over the training
split and cached in ``workdir/teacher_logits.npz`` (the functions of :mod:`experiments.distill`).

One target per kind, not CoFi's single target: CoFi constrains the expected remaining *parameter count* of
the whole model, so it may trade heads for FFN units freely and "50% of FFN units" is not something it can be
asked for. The issue asks exactly that (a 50% FFN-unit target, plus head gates), and McCarley et al. report
FFN and head sparsity separately; so FFN units and heads each get a target (``l0.target_ffn``,
``l0.target_heads``) and their own pair of multipliers. Both targets ramp linearly from 0 over the first
``l0.warmup_fraction`` of the steps (CoFi's ``lagrangian_warmup``); the ramp ``r(step)`` is computed on the
host from the global step and travels with each batch as ``sparsity_ramp`` float32 [B], so the compiled step
never changes and a resumed run continues the same schedule. As in CoFi, the multipliers start at 0, the gates
and multipliers have their own constant learning rates (Adam, no weight decay, no clipping: the model's
gradient clipping covers the model alone), and ``log_alpha`` is kept in ``[-4.6, 4.6]`` (log 100;
``l0.max_abs_log_alpha``).

Gates are sampled (their own RNG stream) in training; evaluation, the reported metrics and compaction use the
deterministic gates. At the end a unit whose deterministic gate is 0 is removed (the hard decision), and the
remaining gate values are folded into the output projections (:mod:`compression.pruning.compaction`), so the
saved plain Transformer computes what the gated model computed at evaluation; the job evaluates it on the dev
set and checks that its metrics equal the gated model's final ones (``compacted_matches_gated``). A layer
whose heads (or FFN units) are all closed cannot be compacted as it is (compaction refuses an empty layer: keep
one unit or remove the layer); removing the layer would change the function (its attention output bias and FFN
still act), so one unit is kept, the one with the largest ``log_alpha``, with its output-projection rows
zeroed: it contributes nothing, exactly as its closed gate did.

Writes ``checkpoints/``, ``metrics.jsonl``, ``results.json`` and ``model/`` into ``workdir``. ``results.json``
holds the final/best dev metrics of the gated model (deterministic gates), ``achieved_sparsity`` (fraction of
FFN units / heads whose gate is 0: what the model lost, inert kept units included), ``heads_per_layer`` and
``ffn_per_layer`` of the compacted model (what it physically has), parameter counts before/after, and the
compacted model's dev metrics (``compacted``). The exported model is the last step's (``export = "last"``): an
earlier "best" checkpoint would not meet the targets.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

import models
from compression.distillation import presets
from compression.pruning import compaction, l0
from compression.pruning.site_masks import masks_by_path, unflatten
from experiments import config_validation, distill, evaluation, loop, observe, trainer
from experiments.config_validation import Field
from experiments.configs.l0 import UNREAD_FIELDS
from experiments.data import TaskData, load_task
from experiments.parallel import DataParallel

SITES = {"ffn": "ffn_site", "heads": "heads_site"}  # kind -> the site name its gates' paths end with
RAMP = "sparsity_ramp"  # batch key of the target ramp r(step), float32 [B]
INPUTS = evaluation.TRANSFORMER_INPUTS
METRIC_ATOL = 1e-6  # the compacted model's dev metrics must equal the gated model's to this tolerance
# Presets on logits alone: the cached teacher logits are all the teacher provides.
LOGIT_PRESETS = tuple(n for n, p in presets.PRESETS.items()
                      if not any(p.weights[t] for t in ("cos", "hidden", "attention", "pkd")))

L0_SCHEMA = {
    **{k: v for k, v in config_validation.FINETUNE_SCHEMA.items() if k not in UNREAD_FIELDS},
    "job": Field(str, choices=("l0",)),
    "teacher_dir": Field(str),
    "export": Field(str, choices=("last",)),
    "l0": {
        "target_ffn": Field(float, min=0.0, max=1.0),  # < 1 is checked by _check_targets, with its own message
        "target_heads": Field(float, min=0.0, max=1.0),
        "warmup_fraction": Field(float, min=0.0, max=1.0),
        "drop_init": Field(float, min=1e-6, max=1.0 - 1e-6),
        "gate_learning_rate": Field(float, min=0.0),
        "lambda_learning_rate": Field(float, min=0.0),
        "max_abs_log_alpha": Field(float, min=0.0),
    },
    "distill": {  # read by experiments.distill._preset, as in distill.py's config
        "preset": Field(str, choices=("none",) + LOGIT_PRESETS),
        "temperature": Field(float),
        "kd_weight": Field(float),
        "ce_weight": Field(float),
    },
}


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


def _by_key(parts: dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """One optimizer per top-level key of the tree, each seeing only its own sub-tree (so that the model's
    regex masks and gradient clipping are computed over the model's parameters alone)."""

    def init(params):
        return {k: t.init(params[k]) for k, t in parts.items()}

    def update(updates, state, params=None):
        out = {k: t.update(updates[k], state[k], None if params is None else params[k]) for k, t in parts.items()}
        return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}

    return optax.GradientTransformation(init, update)


def _keep_within(bound: float) -> optax.GradientTransformation:
    """Shortens updates so that ``params + updates`` stays in ``[-bound, bound]`` (``bound`` 0: no bound)."""

    def update(updates, state, params=None):
        if bound <= 0:
            return updates, state
        return jax.tree.map(lambda u, p: jnp.clip(p + u, -bound, bound) - p, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def l0_optimizer(optimizer_config, l0_config, tree: dict, total_steps: int):
    """``(tx, schedule)`` for the trainable ``tree`` (``model`` / ``gates`` / ``lambdas``, see the module
    docstring): ``config.optimizer``'s AdamW on the model; Adam at ``l0.gate_learning_rate`` on the gates;
    Adam on the negated gradient (ascent) at ``l0.lambda_learning_rate`` on the multipliers."""
    model_tx, schedule = trainer.optimizer_from_config(optimizer_config, tree["model"], total_steps)
    gates_tx = optax.chain(optax.adam(l0_config.gate_learning_rate), _keep_within(l0_config.max_abs_log_alpha))
    lambdas_tx = optax.chain(optax.scale(-1.0), optax.adam(l0_config.lambda_learning_rate))
    return _by_key({"model": model_tx, "gates": gates_tx, "lambdas": lambdas_tx}), schedule


# -- loss and prediction ---------------------------------------------------------------------------------

def l0_loss(gated_apply, preset, targets: dict[str, float]):
    """``loss_fn(tree, batch, rng, extras)`` for :func:`experiments.trainer.make_train_step`.

    The task loss of :func:`experiments.distill.distillation_loss` (gold labels when ``preset`` is None; else
    the batch carries ``teacher_logits`` float32 [B, C] and ``has_label`` int32 [B]) through the gated model
    with sampled gates, plus :func:`sparsity_penalty` at ``targets[k] * batch["sparsity_ramp"][0]``.
    """

    def loss_fn(tree, batch, rng, extras):
        del extras  # the gates live in the trainable tree
        rng, gate_rng = jax.random.split(rng)

        def sampled_apply(variables, *args, rngs, **kwargs):
            return gated_apply(variables, *args, rngs={**rngs, l0.GATES_RNG: gate_rng}, **kwargs)

        inputs = {k: v for k, v in batch.items() if k != RAMP}
        task_loss, aux = distill.distillation_loss(sampled_apply, preset)(tree["model"], inputs, rng,
                                                                          {l0.GATES: tree["gates"]})
        ramp = batch[RAMP][0]
        penalty, metrics = sparsity_penalty(tree["gates"], tree["lambdas"], {k: t * ramp for k, t in targets.items()})
        return task_loss + penalty, aux.replace(metrics={**aux.metrics, **metrics, "task_loss": task_loss})

    return loss_fn


def l0_predict(gated_apply):
    """``predict(tree, extras, batch)`` of the gated model with deterministic gates (no gate RNG in eval)."""
    predict = trainer.classification_predict(gated_apply)
    return lambda tree, extras, batch: predict(tree["model"], {l0.GATES: tree["gates"]}, batch)


# -- compaction ------------------------------------------------------------------------------------------

def _achieved_sparsity(masks: dict) -> dict[str, float]:
    """{kind: fraction of its units whose deterministic gate is 0} from a masks tree of deterministic gates."""
    by_site = masks_by_path(masks)
    return {kind: float(np.mean(np.concatenate([np.asarray(v) == 0 for p, v in by_site.items() if p.endswith(site)])))
            for kind, site in SITES.items()}


def _param_count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


@jax.jit
def _gate_summary(gates: dict) -> tuple[dict, dict]:
    """(deterministic gate values as a masks tree, {kind: expected sparsity}) in one compiled call."""
    return l0.deterministic_masks(gates), {kind: l0.expected_sparsity(gates, site) for kind, site in SITES.items()}


def compact_gated(config, params: dict, gates: dict, masks: dict | None = None):
    """``(config, params, inert)`` of the compacted Transformer that computes what the gated model computes
    with deterministic gates: units whose gate is 0 removed, the other gate values folded into the output
    projections. A layer with every head (FFN unit) closed keeps its head (unit) with the largest log_alpha,
    its output rows zeroed; ``inert`` names those units (``"layer_i/head_j"``, ``"layer_i/ffn_j"``).
    ``masks``: ``l0.deterministic_masks(gates)`` if already computed."""
    heads, ffn = compaction.layer_masks(_gate_summary(gates)[0] if masks is None else masks)
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


# -- the run ---------------------------------------------------------------------------------------------

def _check_targets(config) -> None:
    for kind in SITES:
        t = config.l0[f"target_{kind}"]
        if not 0.0 <= t < 1.0:
            raise config_validation.ConfigError(f"config.l0.target_{kind}={t} must be in [0, 1): the fraction "
                                                f"of {kind} units to prune (1 would remove them all)")


def _check_teacher(config, task: TaskData, teacher_cfg, teacher_meta: dict, preset) -> None:
    evaluation.check_fine_tuned_for(config.teacher_dir, teacher_cfg, teacher_meta, task, "teacher")
    if preset is not None and task.kind == "token":
        raise config_validation.ConfigError(f"task {task.name} is a token task: L0 pruning here distils sequence "
                                            "classifiers only; use config.distill.preset='none' (l0.py:TASK,nokd)")


def l0_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Prunes ``config.teacher_dir`` with L0 gates as ``config`` says, in ``workdir``; returns the results."""
    config_validation.validate(config, L0_SCHEMA)
    _check_targets(config)
    preset = distill._preset(config)
    c0 = config.l0
    observe.quiet_library_logs()
    start = time.time()
    workdir = os.path.abspath(workdir)
    teacher, teacher_cfg, teacher_params = models.load(config.teacher_dir)
    evaluation.require_transformer(config.teacher_dir, teacher_cfg, "teacher", "L0 head/FFN pruning")
    if teacher_cfg.fused_qkv or any(teacher_cfg.kv_heads(i) != teacher_cfg.heads(i)
                                    for i in range(teacher_cfg.num_layers)):
        raise ValueError(f"the teacher {config.teacher_dir} has fused QKV or grouped-query attention, which "
                         "compaction cannot prune heads of; unfuse it / use a multi-head attention teacher")
    teacher_meta = models.read_meta(config.teacher_dir).get("extra", {})
    task = load_task(config.task, config.data_dir, tokenizer=config.teacher_dir, max_length=config.max_length,
                     seed=config.seed, synthetic_size=config.synthetic_size)
    _check_teacher(config, task, teacher_cfg, teacher_meta, preset)
    os.makedirs(workdir, exist_ok=True)

    gates_t = l0.l0_gates("heads|ffn", c0.drop_init)
    gated_apply = gates_t.wrap(teacher.apply)
    train_key = jax.random.key(config.seed)  # dropout, gate samples; nothing is initialised at random
    tree = {"model": teacher_params, "gates": initial_gates(gates_t, teacher.apply, teacher_params, c0.drop_init),
            "lambdas": init_lambdas()}

    train = distill._with_index(task.train)
    t_logits = None
    if preset is not None:
        t_logits = distill.cached_teacher_logits(
            os.path.join(workdir, "teacher_logits.npz"), distill.transfer_key(config.teacher_dir, [task.train]),
            lambda: distill.teacher_logits(teacher.apply, teacher_params, task.train, progress_bar=config.progress_bar),
            (len(task.train), task.num_labels))

    par = DataParallel(config.parallelism)
    steps_per_epoch, total_steps = loop.run_length(config, train)
    warmup_steps = round(c0.warmup_fraction * total_steps)
    tx, lr_schedule = l0_optimizer(config.optimizer, c0, tree, total_steps)
    state = loop.host_state(jax.jit(lambda p, k: trainer.TrainState.create(p, tx, k))(tree, train_key))
    eval_feed = INPUTS + ("labels", "example_weight")
    feed = eval_feed + (("teacher_logits", "has_label") if preset is not None else ())

    def train_batches(epoch: int, start_batch: int):
        step = epoch * steps_per_epoch + start_batch
        for batch in train.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                   start_batch=start_batch, drop_remainder=True,
                                   process_index=jax.process_index(), process_count=jax.process_count()):
            if preset is not None:
                batch["teacher_logits"] = t_logits[batch["example_index"]]
                batch["has_label"] = np.ones(len(batch["labels"]), np.int32)
            out = {k: batch[k] for k in feed}
            out[RAMP] = np.full(len(batch["labels"]), target_ramp(step, warmup_steps), np.float32)
            step += 1
            yield out

    targets = {kind: c0[f"target_{kind}"] for kind in SITES}
    eval_step = par.compile(trainer.make_eval_step(l0_predict(gated_apply)))
    settings = loop.LoopSettings.from_config(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                             headline_metric=task.metric_names[0])
    result = loop.fit(
        workdir, par=par, state=state, settings=settings,
        train_step=trainer.make_train_step(l0_loss(gated_apply, preset, targets), tx, steps_per_epoch, lr_schedule),
        train_batches=train_batches,
        evaluate=lambda d: loop.evaluate(par, eval_step, d, task, config.eval_batch_size, eval_feed),
        extra_overview=f"L0 pruning of {config.teacher_dir} (targets: FFN {targets['ffn']}, heads "
                       f"{targets['heads']}; {config.distill.preset}) on {task.name}: {len(task.train)} train / "
                       f"{len(task.dev)} dev examples")
    if result.preempted_at_step is not None:
        return {"preempted_at_step": result.preempted_at_step}

    final_tree = result.params  # export "last": the parameters result.final evaluated
    masks, expected = _gate_summary(final_tree["gates"])
    cfg, params, inert = compact_gated(teacher_cfg, final_tree["model"], final_tree["gates"], masks)
    compacted = evaluation.dev_metrics(models.model_class("transformer")(cfg).apply, {"params": params}, task, INPUTS,
                                       config.eval_batch_size)
    matches = all(abs(v - result.final[k]) <= METRIC_ATOL for k, v in compacted.items())
    if not matches:
        logging.warning("the compacted model's dev metrics %s differ from the gated model's %s: a compaction error "
                        "(or a near-tie flipped by float rounding)", compacted, result.final)
    extra = {
        "task": task.name, "metric_names": task.metric_names, "exported_step": result.exported_step,
        "teacher_dir": config.teacher_dir, "preset": config.distill.preset, "targets": targets,
        "warmup_steps": warmup_steps,
        "achieved_sparsity": _achieved_sparsity(masks),
        "expected_sparsity": {kind: float(v) for kind, v in expected.items()},
        "lambdas": {kind: {k: float(v) for k, v in lam.items()} for kind, lam in final_tree["lambdas"].items()},
        "heads_per_layer": [cfg.heads(i) for i in range(cfg.num_layers)],
        "ffn_per_layer": [cfg.ffn_size(i) for i in range(cfg.num_layers)],
        "inert_units_kept": inert,
        "params_before": _param_count(teacher_params), "params_after": _param_count(params),
        "encoder_params_before": _param_count(teacher_params["encoder"]),
        "encoder_params_after": _param_count(params["encoder"]),
        "compacted": compacted, "compacted_matches_gated": matches,
        "num_devices": par.num_devices, "parallelism": par.mode, "teacher_eval": teacher_meta.get("eval", {}),
    }
    results_path = observe.write_results(workdir, final=result.final, best=result.best, steps=result.steps,
                                         wall_time_s=result.wall_time_s, extra=extra)
    if observe.is_writer():
        models.save(os.path.join(workdir, "model"), "transformer", cfg, params, tokenizer_dir=config.teacher_dir,
                    extra={"task": task.name, "kind": task.kind, "label_names": list(task.label_names),
                           "max_length": config.max_length, "step": result.exported_step, "eval": compacted,
                           "l0": {k: extra[k] for k in ("teacher_dir", "preset", "targets", "achieved_sparsity")}},
                    overwrite=True)
        logging.info("done in %.0f s: achieved sparsity %s; %d -> %d parameters; compacted %s; results in %s",
                     time.time() - start, extra["achieved_sparsity"], extra["params_before"], extra["params_after"],
                     compacted, results_path)
    return {"final": result.final, "best": result.best, "steps": result.steps, "wall_time_s": result.wall_time_s,
            **extra}
