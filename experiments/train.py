"""``train_and_evaluate(config, workdir)``: fine-tune (or train from scratch) a Transformer on a task.

The run is restartable by design: it resumes from the newest verified checkpoint in ``workdir`` (step,
optimizer state, RNG and data position), so a preempted or killed run restarted with the same command
continues the same trajectory. It writes into ``workdir``::

    checkpoints/     Orbax checkpoints: the newest ``checkpoint.keep`` plus the best by ``checkpoint.best_metric``
    metrics.jsonl    one JSON line per train log step and per evaluation
    tensorboard/     TensorBoard event files
    results.json     {"final": {...}, "best": {...}, "steps": N, "wall_time_s": T, ...}
    model/           the trained model as a self-describing directory (models.save), with its tokenizer
                     (and ``quant_state.npz``, the calibrated int8 scales, after quantization-aware training)

``model_dir`` is either a Hugging Face BERT checkpoint (a new task head is initialised) or a model directory
written by this job (``models.save``; its head is kept, so the task must have the same labels): the second
continues training a fine-tuned model, which is how quantization-aware training (``config.qat``) runs.

Quantization-aware training (``config.qat.enabled``): see :mod:`experiments.qat`; dev metrics during and after
training are those of the fake-quantized model.

Depth (``config.layers``): ``init`` ``"every_other"`` fine-tunes only the pretrained layers 0, 2, 4, ... (a
half-depth model, the baseline LayerDrop is compared with); ``layerdrop`` > 0 trains with LayerDrop (Fan et al.
2019: each layer skipped with that probability), after which ``results.json`` also reports the model pruned on
load to every other layer (``pruned_every_other``: dev metrics of :func:`compression.pruning.keep_layers`).

Config fields are documented in ``experiments/configs/finetune.py`` and checked against
:data:`experiments.config_validation.FINETUNE_SCHEMA` before anything else happens.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import models
from compression import loss_scale, precision
from compression.pruning import compaction, layerdrop
from experiments import config_validation, evaluation, loop, observe, qat, trainer
from experiments.data import TaskData, load_task
from experiments.loop import NonFiniteLossError  # noqa: F401  (raised by the loop; part of this module's API)
from experiments.parallel import DataParallel
from models import hf
from models.transformer import Transformer, TransformerConfig

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "example_weight")
WORD_LEVEL_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


# -- inputs and model ------------------------------------------------------------------------------------

def _word_level_tokenizer(task_name: str, config, out_dir: str):
    """A word-level ``tokenizers.Tokenizer`` over the task's train words, saved as ``out_dir/tokenizer.json``.

    Used when training from scratch (no ``model_dir``), so that ``DIR/model`` still carries its tokenizer.
    Words are split as :func:`experiments.data.split_words` splits them (pre-split NER words pass through).
    """
    import tokenizers
    from tokenizers import models as tok_models
    from tokenizers import normalizers, pre_tokenizers

    probe = load_task(task_name, config.data_dir, word_vocab="build", max_length=config.max_length,
                      seed=config.seed, synthetic_size=config.synthetic_size)
    words = [u for u in probe.word_vocab.units[2:]]
    vocab = {tok: i for i, tok in enumerate(WORD_LEVEL_SPECIALS + tuple(words))}
    tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(tokenizers.Regex(r"\w+(?:'\w+)*|'\w+|[^\w\s]"), behavior="isolated")])
    if observe.is_writer():
        os.makedirs(out_dir, exist_ok=True)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
    return tok


def is_saved_model(path: str | None) -> bool:
    """Whether ``path`` is a model directory written by ``models.save`` (not a Hugging Face checkpoint)."""
    if not path or not os.path.isfile(os.path.join(path, models.io.CONFIG_FILE)):
        return False
    try:
        models.read_meta(path)
    except (ValueError, FileNotFoundError):
        return False
    return True


def _load_inputs(config, workdir: str) -> tuple[TaskData, str, int | None]:
    """(task encoded for the Transformer, directory holding its tokenizer files, vocabulary size of a
    from-scratch word-level tokenizer or ``None`` with a pretrained ``model_dir``)."""
    vocab_size = None
    if config.model_dir:
        if not os.path.isdir(config.model_dir):
            raise FileNotFoundError(f"config.model_dir {config.model_dir} is not a directory")
        tokenizer, tokenizer_dir = config.model_dir, config.model_dir
    else:
        tokenizer_dir = os.path.join(workdir, "tokenizer")
        tokenizer = _word_level_tokenizer(config.task, config, tokenizer_dir)
        vocab_size = tokenizer.get_vocab_size()
    task = load_task(config.task, config.data_dir, tokenizer=tokenizer, max_length=config.max_length,
                     seed=config.seed, synthetic_size=config.synthetic_size)
    return task, tokenizer_dir, vocab_size


def _build_model(config, task: TaskData, vocab_size: int | None, key) -> tuple[TransformerConfig, Any]:
    """Pretrained body from ``config.model_dir`` with a fresh head, or a from-scratch ``config.model``."""
    head = "token" if task.kind == "token" else "sequence"
    if is_saved_model(config.model_dir):
        return _saved_model(config, task, head)
    if config.model_dir:
        model_cfg, params = hf.load_bert(config.model_dir, head=head, num_labels=task.num_labels,
                                                init_key=key)
        if model_cfg.max_position_embeddings < config.max_length:
            raise ValueError(f"max_length={config.max_length} exceeds the model's position table "
                             f"({model_cfg.max_position_embeddings})")
        return model_cfg, params
    m = config.model
    model_cfg = TransformerConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
        intermediate_size=m.intermediate_size, max_position_embeddings=config.max_length,
        hidden_dropout_rate=m.dropout_rate, attention_dropout_rate=m.dropout_rate, head=head,
        num_labels=task.num_labels)
    ids = np.zeros((1, 8), np.int32)
    params = jax.jit(Transformer(model_cfg).init)(key, ids)["params"]  # jit: one compile, not one per op
    return model_cfg, params


def _saved_model(config, task: TaskData, head: str) -> tuple[TransformerConfig, Any]:
    """The config and params (head included) of a saved Transformer, checked against the task."""
    meta = models.read_meta(config.model_dir)
    if meta["family"] != "transformer":
        raise ValueError(f"config.model_dir {config.model_dir} holds a {meta['family']!r} model; this job "
                         "trains Transformers")
    _, model_cfg, params = models.load(config.model_dir)
    saved_labels = meta.get("extra", {}).get("label_names")
    if model_cfg.head != head or model_cfg.num_labels != task.num_labels or (
            saved_labels is not None and list(saved_labels) != list(task.label_names)):
        raise ValueError(f"config.model_dir {config.model_dir} has a {model_cfg.head} head over labels "
                         f"{saved_labels or model_cfg.num_labels}; task {task.name!r} needs a {head} head over "
                         f"{list(task.label_names)}")
    if model_cfg.max_position_embeddings < config.max_length:
        raise ValueError(f"max_length={config.max_length} exceeds the model's position table "
                         f"({model_cfg.max_position_embeddings})")
    return model_cfg, params


def _with_layerdrop(apply_fn, rate: float):
    """``apply_fn`` with LayerDrop at ``rate`` in training (when a dropout RNG is passed); unchanged if 0."""
    if rate == 0.0:
        return apply_fn
    dropped = layerdrop.layerdrop(rate).wrap(apply_fn)

    def apply(variables, *args, rngs=None, **kwargs):
        if rngs and "dropout" in rngs:  # training: a layer-drop stream derived from the dropout stream
            rngs = {**rngs, layerdrop.LAYERDROP_RNG: jax.random.fold_in(rngs["dropout"], 1)}
        return dropped(variables, *args, rngs=rngs, **kwargs)

    return apply


def _pruned_every_other(model_cfg: TransformerConfig, params, task: TaskData) -> dict:
    """Dev metrics of the model pruned on load to layers 0, 2, 4, ... (LayerDrop's every-other strategy)."""
    cfg, kept = compaction.keep_layers(model_cfg, params, layerdrop.every_other(model_cfg.num_layers))
    return evaluation.dev_metrics(Transformer(cfg).apply, {"params": kept}, task, evaluation.TRANSFORMER_INPUTS)


def _check_sizes(config, par: DataParallel) -> None:
    for name in ("batch_size", "eval_batch_size"):
        value = config[name]
        if value % par.num_devices:
            raise ValueError(f"config.{name}={value} must be a multiple of the {par.num_devices} devices "
                             f"({jax.process_count()} process(es))")


# -- the run ---------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains and evaluates as ``config`` says, in ``workdir``; returns the results dict (see results.json)."""
    config_validation.validate(config, config_validation.FINETUNE_SCHEMA)
    policy = precision.policy(config.precision)
    precision.check_loss_scaling(config.precision, config.loss_scale.dynamic)  # float16 without it: warns
    ls = config.loss_scale
    try:
        dynamic_scale = (loss_scale.dynamic_scale(init_scale=ls.init_scale, growth_interval=ls.growth_interval,
                                                  minimum_scale=ls.minimum_scale) if ls.dynamic else None)
    except ValueError as e:
        raise config_validation.ConfigError(f"invalid config.loss_scale: {e}") from e
    observe.quiet_library_logs()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    par = DataParallel(config.parallelism)
    _check_sizes(config, par)
    task, tokenizer_dir, vocab_size = _load_inputs(config, workdir)
    if config.checkpoint.best_metric and config.checkpoint.best_metric not in task.metric_names + ["loss"]:
        raise config_validation.ConfigError(
            f"config.checkpoint.best_metric={config.checkpoint.best_metric!r} is not a metric of task "
            f"{task.name!r}; allowed: {task.metric_names + ['loss']}")

    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model_cfg, params = _build_model(config, task, vocab_size, init_key)
    if config.layers.init == "every_other":
        model_cfg, params = compaction.keep_layers(model_cfg, params, layerdrop.every_other(model_cfg.num_layers))
    model = Transformer(model_cfg)
    base_apply, quant_state = qat.quantization_aware(config.qat, model.apply, params, task.train,
                                                     evaluation.TRANSFORMER_INPUTS, config.batch_size, config.seed)
    apply_fn = policy.wrap(_with_layerdrop(base_apply, config.layers.layerdrop))
    steps_per_epoch, total_steps = loop.run_length(config, task.train)
    tx, schedule = trainer.optimizer_from_config(config.optimizer, params, total_steps)
    state = jax.jit(lambda p, k, d: trainer.TrainState.create(p, tx, k, dynamic_scale=d))(
        params, train_key, dynamic_scale)
    state = loop.host_state(state)

    loss_fn = trainer.classification_loss(apply_fn)
    eval_step = par.compile(trainer.make_eval_step(trainer.classification_predict(apply_fn)))
    settings = loop.LoopSettings.from_config(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                             headline_metric=task.metric_names[0],
                                             minimum_loss_scale=ls.minimum_scale)

    def train_batches(epoch: int, start_batch: int):
        for batch in task.train.batches(config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                        start_batch=start_batch, drop_remainder=True,
                                        process_index=jax.process_index(), process_count=jax.process_count()):
            yield {k: batch[k] for k in MODEL_INPUTS}

    result = loop.fit(
        workdir, par=par, state=state, settings=settings,
        train_step=trainer.make_train_step(loss_fn, tx, steps_per_epoch, schedule), train_batches=train_batches,
        evaluate=lambda d: loop.evaluate(par, eval_step, d, task, config.eval_batch_size, MODEL_INPUTS),
        extra_overview=f"task {task.name}: {len(task.train)} train / {len(task.dev)} dev examples, "
                       f"{task.num_labels} labels, metrics {task.metric_names}")
    if result.preempted_at_step is not None:
        return {"preempted_at_step": result.preempted_at_step}
    final, best, step, exported_step, params = (result.final, result.best, result.steps, result.exported_step,
                                                result.params)
    wall = result.wall_time_s
    extra = {"task": task.name, "metric_names": task.metric_names, "exported_step": exported_step,
             "num_devices": par.num_devices, "num_processes": jax.process_count(), "parallelism": par.mode}
    if config.layers.layerdrop > 0 and model_cfg.num_layers > 1 and quant_state is None:
        extra["pruned_every_other"] = _pruned_every_other(model_cfg, params, task)
        logging.info("pruned on load to every other layer: %s", extra["pruned_every_other"])
    results_path = observe.write_results(workdir, final=final, best=best, steps=step, wall_time_s=wall,
                                         extra=extra)
    if observe.is_writer():
        models.save(os.path.join(workdir, "model"), "transformer", model_cfg, params, tokenizer_dir=tokenizer_dir,
                    extra={"task": task.name, "kind": task.kind, "label_names": list(task.label_names),
                           "max_length": config.max_length, "step": exported_step, "eval": best
                           if exported_step == best.get("step") else final,
                           **(qat.model_extra(config.qat) if quant_state is not None else {})},
                    overwrite=True)
        if quant_state is not None:
            qat.save_state(os.path.join(workdir, "model"), quant_state)
        logging.info("done: %d steps in %.1f s; final %s; best %s; results in %s", step, wall, final, best,
                     results_path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train_and_evaluate_done")
    return {"final": final, "best": best, "steps": step, "wall_time_s": wall, **extra}
