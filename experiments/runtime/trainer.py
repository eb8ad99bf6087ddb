"""Train state, optimizer and the per-device train/eval steps over the named axis ``"batch"``.

The steps are plain functions of ``(state, batch)`` written for one device with collectives over
:data:`experiments.runtime.parallel.AXIS`; :class:`experiments.runtime.parallel.DataParallel` runs them under pmap or
shard_map. The loss is pluggable::

    loss_fn(params, batch, rng, extras) -> (loss, LossAux)

``loss`` is this device's float32 scalar, a weighted mean over its examples (or tokens) whose normaliser is
``LossAux.weight``; the step combines devices as ``sum_d w_d loss_d / sum_d w_d`` (and the same for the
gradients), which is the global weighted mean whatever the per-device counts. ``extras`` are the variable
collections besides ``params`` that a transform adds (gates, quantization scales, loss-scale state);
distillation, L0 gates and fake quantization plug in by passing another ``loss_fn``.

Batches are dicts of arrays: ``input_ids``/``attention_mask``/``token_type_ids`` int32 [B, S], ``labels``
int32 [B] (sequence tasks) or [B, S] (token tasks, -100 = ignored), ``example_weight`` float32 [B].
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training.dynamic_scale import DynamicScale
from jax import lax

from compression import loss_scale
from experiments.runtime.metrics import IGNORE_INDEX
from experiments.runtime.parallel import AXIS

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, as one pytree.

    Attributes:
      step: int32 [], optimizer steps taken.
      params: the trained parameters (float32 master weights).
      opt_state: the optax state.
      rng: typed PRNG key []; step ``t`` on device ``d`` uses ``fold_in(fold_in(rng, t), d)``.
      epoch: int32 [], data position: the epoch of the next training batch.
      batch_in_epoch: int32 [], data position: the index of the next batch within that epoch.
      extras: other variable collections / trainer state (e.g. gates); ``{}`` if none.
      dynamic_scale: float16 loss-scale state (:func:`compression.loss_scale.dynamic_scale`: float32
        ``scale`` and int32 ``fin_steps``), or ``None`` without loss scaling (then it adds no leaves, so
        checkpoints of runs without it keep their structure).
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    epoch: jax.Array
    batch_in_epoch: jax.Array
    extras: PyTree
    dynamic_scale: DynamicScale | None = None

    @classmethod
    def create(cls, params: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
               extras: PyTree | None = None, dynamic_scale: DynamicScale | None = None) -> "TrainState":
        if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            raise TypeError("TrainState.rng must be a typed key (jax.random.key), not raw uint32 key data")
        zero = jnp.zeros((), jnp.int32)
        return cls(step=zero, params=params, opt_state=tx.init(params), rng=rng, epoch=zero,
                   batch_in_epoch=zero, extras={} if extras is None else extras, dynamic_scale=dynamic_scale)


@flax.struct.dataclass
class LossAux:
    """What a loss function returns besides the loss.

    Attributes:
      weight: float32 [], the normaliser behind this device's mean loss (sum of example or token weights).
      metrics: dict of float32 [] diagnostics, averaged across devices with the same weights.
      extras: updated extra collections, or ``None`` to keep them. They must agree across devices (reduce
        them over ``"batch"`` inside the loss if they depend on the batch).
    """

    weight: jax.Array
    metrics: dict = flax.struct.field(default_factory=dict)
    extras: PyTree | None = None


LossFn = Callable[[PyTree, dict, jax.Array, PyTree], tuple[jax.Array, LossAux]]


# -- parameter selection by regex over paths -------------------------------------------------------------

def path_str(path) -> str:
    """A tree path as ``"encoder/layer_0/attention/query/kernel"``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def regex_mask(regex: str, tree: PyTree) -> PyTree:
    """Bool tree: True where ``re.search(regex, path)`` matches the leaf's path (empty regex: none)."""
    pattern = re.compile(regex) if regex else None
    return jax.tree_util.tree_map_with_path(
        lambda p, _: bool(pattern and pattern.search(path_str(p))), tree)


# -- optimizer -----------------------------------------------------------------------------------------

SCHEDULES = ("linear", "cosine", "constant")


def make_schedule(learning_rate: float, total_steps: int, warmup_steps: int,
                  kind: str = "linear") -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then ``kind`` decay to 0 at ``total_steps``."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {list(SCHEDULES)}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "linear":
        decay = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps)
    else:
        decay = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def optimizer_from_config(opt, params: PyTree, total_steps: int):
    """``(tx, schedule)`` from a config's ``optimizer`` section (see experiments/configs/finetune.py)."""
    schedule = make_schedule(opt.learning_rate, total_steps, round(opt.warmup_fraction * total_steps), opt.schedule)
    tx = make_optimizer(params, schedule=schedule, weight_decay=opt.weight_decay, no_decay_regex=opt.no_decay_regex,
                        freeze_regex=opt.freeze_regex, grad_clip_norm=opt.grad_clip_norm, b1=opt.b1, b2=opt.b2,
                        eps=opt.eps)
    return tx, schedule


def make_optimizer(params: PyTree, *, schedule: optax.Schedule, weight_decay: float = 0.0,
                   no_decay_regex: str = "", freeze_regex: str = "", grad_clip_norm: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay off where ``no_decay_regex`` matches, gradient clipping by global
    norm (over the trainable parameters; 0 = off), and parameters matching ``freeze_regex`` frozen (no
    update, no optimizer state).
    """
    decay_mask = jax.tree.map(lambda m: not m, regex_mask(no_decay_regex, params))
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    if not freeze_regex:
        return tx
    frozen = regex_mask(freeze_regex, params)
    n_frozen = sum(jax.tree.leaves(frozen))
    if n_frozen == 0:
        raise ValueError(f"freeze_regex {freeze_regex!r} matches no parameter path")
    if n_frozen == len(jax.tree.leaves(frozen)):
        raise ValueError(f"freeze_regex {freeze_regex!r} freezes every parameter: nothing left to train")
    labels = jax.tree.map(lambda f: "frozen" if f else "trainable", frozen)
    return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


# -- losses and predictions for classification heads -------------------------------------------------------

def model_outputs(apply_fn, params, extras, batch, *, train: bool, rng=None, **kwargs):
    """Calls a model of any family on its batch keys (``train=True`` needs ``rng`` for dropout).

    ``input_ids``: the Transformer; ``char_ids``: the CNN-LSTM tagger; ``word_ids``: the BiLSTM classifier
    (``word_ids_b`` for pairs). ``kwargs`` go to the model (e.g. ``output_hidden_states=True``).
    """
    variables = {"params": params, **extras}
    rngs = {"dropout": rng} if train else None
    if "input_ids" in batch:
        return apply_fn(variables, batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], train=train, rngs=rngs, **kwargs)
    if "char_ids" in batch:
        return apply_fn(variables, batch["word_ids"], batch["char_ids"], batch["word_mask"], train=train,
                        rngs=rngs, **kwargs)
    if "word_ids" in batch:
        return apply_fn(variables, batch["word_ids"], batch["word_mask"], batch.get("word_ids_b"),
                        batch.get("word_mask_b"), train=train, rngs=rngs, **kwargs)
    raise ValueError(f"batch has no model inputs (input_ids, word_ids or char_ids): keys {sorted(batch)}")


def token_mask(batch) -> jax.Array:
    """The batch's token mask: ``attention_mask`` (sub-words) or ``word_mask`` (words)."""
    return batch["attention_mask"] if "attention_mask" in batch else batch["word_mask"]


def _weighted_cross_entropy(logits, labels, example_weight):
    """Per-position cross entropy and weights, float32. logits [B, C] or [B, S, C]; labels [B] or [B, S]."""
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    w = example_weight.reshape(example_weight.shape + (1,) * (labels.ndim - 1)) * valid
    return ce, w.astype(jnp.float32)


def classification_loss(apply_fn: Callable) -> LossFn:
    """Mean cross entropy of a classification head (sequence [B, C] or token [B, S, C] logits) under dropout.

    Weights: ``example_weight`` times (label != -100); the weight sum is the normaliser.
    """

    def loss_fn(params, batch, rng, extras):
        out = model_outputs(apply_fn, params, extras, batch, train=True, rng=rng)
        loss, weight, metrics = cross_entropy_terms(out.logits, batch)
        return loss, LossAux(weight=weight, metrics=metrics)

    return loss_fn


def classification_predict(apply_fn: Callable) -> Callable:
    """``predict(params, extras, batch) -> (predictions int32 [B] or [B, S], loss_sum [], weight_sum [])``."""

    def predict(params, extras, batch):
        out = model_outputs(apply_fn, params, extras, batch, train=False)
        ce, w = _weighted_cross_entropy(out.logits, batch["labels"], batch["example_weight"])
        return jnp.argmax(out.logits, -1).astype(jnp.int32), jnp.sum(ce * w), jnp.sum(w)

    return predict


# -- per-device steps ------------------------------------------------------------------------------------

def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, steps_per_epoch: int,
                    schedule: optax.Schedule | None = None):
    """Per-device ``train_step(state, batch) -> (state, metrics)`` over :data:`AXIS`.

    metrics (replicated float32 []): ``loss`` (global weighted mean), ``grad_norm`` (of the averaged
    gradient, before clipping), ``learning_rate`` (if ``schedule`` is given), ``examples`` and ``tokens``
    (global sums of example weights and attention-mask entries), and the loss's own metrics.

    With ``state.dynamic_scale`` set (float16 training), the gradient is taken of the loss times the loss
    scale and unscaled (:func:`compression.loss_scale.scaled_value_and_grad`); a step whose averaged gradient
    is not finite leaves ``params``, ``opt_state`` and ``extras`` as they were and lowers the scale (every
    device agrees: the finiteness check is on the averaged gradient). It still counts as a step (the batch
    is consumed and ``step`` advances). Extra metrics: ``loss_scale`` (the scale the step used) and
    ``skipped`` (1.0 for a skipped step).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))

        def weighted_loss(params):
            # Weighted pmean: each device's share is w_d / mean_d(w), so the pmean of the gradients of
            # share * loss_d is sum_d w_d g_d / sum_d w_d. The share is a constant of the batch.
            loss, aux = loss_fn(params, batch, rng, state.extras)
            weight = aux.weight.astype(jnp.float32)
            share = lax.stop_gradient(weight / jnp.maximum(lax.pmean(weight, AXIS), 1e-12))
            return loss * share, (loss, aux, share)

        finite = None
        if state.dynamic_scale is None:
            (_, (loss, aux, share)), grads = jax.value_and_grad(weighted_loss, has_aux=True)(state.params)
            grads = lax.pmean(grads, AXIS)
        else:
            new_scale, finite, (_, (loss, aux, share)), grads = loss_scale.scaled_value_and_grad(
                weighted_loss, state.dynamic_scale, axis_name=AXIS)(state.params)
        metrics = {k: lax.pmean(v * share, AXIS) for k, v in aux.metrics.items()}
        metrics["loss"] = lax.pmean(loss * share, AXIS)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["examples"] = lax.psum(jnp.sum(batch["example_weight"]), AXIS)
        metrics["tokens"] = lax.psum(jnp.sum(token_mask(batch)).astype(jnp.float32), AXIS)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extras = state.extras if aux.extras is None else aux.extras
        dynamic_scale = None
        if finite is not None:
            params, opt_state, extras = loss_scale.select_finite(
                finite, (params, opt_state, extras), (state.params, state.opt_state, state.extras))
            metrics["loss_scale"] = state.dynamic_scale.scale
            metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
            dynamic_scale = new_scale
        next_batch = state.batch_in_epoch + 1
        rollover = next_batch >= steps_per_epoch
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            epoch=state.epoch + rollover.astype(jnp.int32), batch_in_epoch=jnp.where(rollover, 0, next_batch),
            extras=extras, dynamic_scale=dynamic_scale)
        return new_state, metrics

    return train_step


def make_eval_step(predict_fn: Callable):
    """Per-device ``eval_step(state, batch) -> outputs`` over :data:`AXIS`, gathered from every device.

    outputs: ``predictions`` and ``labels`` [B_global] or [B_global, S], ``example_weight`` [B_global] in
    device order (process-major), and the global ``loss_sum``/``weight_sum`` scalars.
    """

    def eval_step(state: TrainState, batch: dict):
        preds, loss_sum, weight_sum = predict_fn(state.params, state.extras, batch)
        gather = lambda x: lax.all_gather(x, AXIS, tiled=True)  # noqa: E731
        return {"predictions": gather(preds), "labels": gather(batch["labels"]),
                "example_weight": gather(batch["example_weight"]),
                "loss_sum": lax.psum(loss_sum, AXIS), "weight_sum": lax.psum(weight_sum, AXIS)}

    return eval_step


# -- composition helpers used by the job runner -----------------------------------------------------------

def cross_entropy_terms(logits, batch) -> tuple[jax.Array, jax.Array, dict]:
    """``(mean cross entropy, weight, metrics)`` of a classification head on the batch's gold ``labels``
    (weights: ``example_weight`` times label != -100), as :func:`classification_loss` computes it."""
    ce, w = _weighted_cross_entropy(logits, batch["labels"], batch["example_weight"])
    total = jnp.sum(w)
    denom = jnp.maximum(total, 1e-12)
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return jnp.sum(ce * w) / denom, total, {"train_accuracy": jnp.sum(correct * w) / denom}


def by_key(parts: dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """One optimizer per top-level key of the trainable tree, each seeing only its own sub-tree (so the model's
    regex masks and gradient clipping are computed over the model's parameters alone)."""

    def init(params):
        return {k: t.init(params[k]) for k, t in parts.items()}

    def update(updates, state, params=None):
        out = {k: t.update(updates[k], state[k], None if params is None else params[k]) for k, t in parts.items()}
        return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}

    return optax.GradientTransformation(init, update)
