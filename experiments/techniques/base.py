"""The component interface: how a compression technique plugs into every training job.

The runner (:mod:`experiments.jobs.runner`) builds a :class:`Run` (task, training rows, model, trainable tree)
and hands it to each active :class:`Technique` in :data:`experiments.techniques.TECHNIQUES` order. A technique
reads its own config section and extends the run through the hooks below; it never edits the runner. One
jitted train step then composes every active technique: the model's apply is wrapped by each technique's
library :class:`~compression.transform.Transform` (innermost first), the trainable tree carries each
technique's trainable state under its own key, and the loss is the task loss plus each technique's terms.

Trainable tree (``TrainState.params``)::

    {"model": the model's params, <technique key>: its trainable state, e.g. "gates", "lambdas"}

The model's optimizer (``config.optimizer``) sees ``tree["model"]`` alone (its regexes and gradient clipping
are over model paths); every other key has the optimizer its technique registers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
import optax

from experiments.data import Split, TaskData

PyTree = Any
ApplyFn = Callable[..., Any]


@dataclasses.dataclass
class Run:
    """A training run as the runner built it, extended by the techniques.

    Built by the runner:
      config: the job's config (validated).
      workdir: the run directory (absolute).
      task: the task as a Transformer reads it (sub-tokens of the teacher's / model's tokenizer); None for a
        run that trains on something else than a labelled task (see ``feed``).
      model_task: the task as the trained model reads it (``task`` for Transformers; word views for LSTMs).
      train: the training rows, with ``example_index`` (int32 [B], row in the split) in every batch.
      teacher_rows: the same rows as the teacher reads them, in ``example_index`` order (splits one after
        another): what cached teacher logits are computed over.
      feed: None for a labelled task; else the :class:`Feed` that replaces ``task``/``train``'s batches, the
        evaluation and the saved model's task metadata (general distillation on raw text), and ``task``,
        ``model_task`` and ``train`` are None: techniques that read them are not offered by such a job.
      family: ``"transformer"``, ``"bilstm"`` or ``"cnn_lstm"`` (the trained model's).
      model_cfg: the trained model's config; ``model``: its Flax module.
      inputs: the batch keys the model reads.
      tree: the trainable tree, ``{"model": params}`` before the techniques.
      steps_per_epoch, total_steps: the run's length.
      key: a typed PRNG key for techniques that initialise something at random.
      tokenizer_dir: the directory whose tokenizer / vocabulary files ``model/`` gets.
      metadata: what the saved model's ``extra`` records besides the task (e.g. ``distilled_from``).

    Extended by the techniques (see each field):
      dynamic_scale: float16 loss-scale state for ``TrainState`` (None: no loss scaling).
      extras: non-trainable state carried in ``TrainState.extras`` (checkpointed with the run), e.g. a live
        teacher's frozen params.
      wrappers: ``apply -> apply`` in order, innermost first (library transforms' ``wrap``).
      collections: ``(tree, extras) -> {collection: value}`` passed to the model with its params.
      rng_streams: extra RNG stream names drawn in training (each gets its own key from the step's key).
      apply_kwargs: ``(batch, train) -> kwargs`` for the model call (e.g. Theseus's mode and probability).
      batch_fields: host-side ``(batch, step) -> {name: array [B, ...]}`` added to each training batch (step:
        the global step of that batch; e.g. a schedule's value, cached teacher logits).
      task_loss: replaces the gold-label cross-entropy: ``(outputs, tree, batch, extras) -> (loss, metrics)``
        (distillation).
      output_kwargs: keyword arguments of the training forward (``output_hidden_states=True``...).
      loss_terms: added to the task loss: ``(tree, batch) -> (loss, metrics)`` (a Lagrangian).
      optimizers: ``{tree key: optax transformation}`` for the techniques' trainable state.
      freeze_regex: regexes over model parameter paths frozen in the model's optimizer.
      model_updates: optax transformations chained after the model's optimizer, in order (they see the
        model's params; e.g. magnitude masks that keep pruned weights at zero).
      calibration_apply: ``(variables, **inputs) -> outputs`` with every wrapper but quantization, for QAT.
      finalizers: ``(Exported) -> None`` in order, after training (turn the trained tree into the saved model).
      results: extra entries of ``results.json`` and of the saved model's metadata.
      model_files: ``{file name: writer(path)}`` published inside ``model/`` with the params.
      fingerprints: content fingerprints of inputs the config names by path (e.g. the teacher's weights), part
        of the run's fingerprint (a moved file is the same input; a retrained one is not).
    """

    config: ml_collections.ConfigDict
    workdir: str
    task: TaskData
    model_task: TaskData
    train: Split
    teacher_rows: list[Split]
    family: str
    model_cfg: Any
    model: Any
    inputs: tuple[str, ...]
    tree: dict
    steps_per_epoch: int
    total_steps: int
    key: Any
    tokenizer_dir: str
    metadata: dict = dataclasses.field(default_factory=dict)
    dynamic_scale: Any = None
    extras: dict = dataclasses.field(default_factory=dict)
    wrappers: list[Callable[[ApplyFn], ApplyFn]] = dataclasses.field(default_factory=list)
    collections: list[Callable[[dict, dict], dict]] = dataclasses.field(default_factory=list)
    rng_streams: list[str] = dataclasses.field(default_factory=list)
    apply_kwargs: list[Callable[[dict, bool], dict]] = dataclasses.field(default_factory=list)
    batch_fields: list[Callable[[dict, int], dict[str, np.ndarray]]] = dataclasses.field(default_factory=list)
    task_loss: Callable | None = None
    output_kwargs: dict = dataclasses.field(default_factory=dict)
    loss_terms: list[Callable[[dict, dict], tuple[Any, dict]]] = dataclasses.field(default_factory=list)
    optimizers: dict[str, optax.GradientTransformation] = dataclasses.field(default_factory=dict)
    freeze_regex: list[str] = dataclasses.field(default_factory=list)
    model_updates: list[optax.GradientTransformation] = dataclasses.field(default_factory=list)
    finalizers: list[Callable[["Exported"], None]] = dataclasses.field(default_factory=list)
    results: dict = dataclasses.field(default_factory=dict)
    model_files: dict[str, Callable[[str], None]] = dataclasses.field(default_factory=dict)
    fingerprints: dict = dataclasses.field(default_factory=dict)
    feed: "Feed | None" = None

    def apply_fn(self, wrappers: list[Callable[[ApplyFn], ApplyFn]] | None = None, model=None) -> ApplyFn:
        """``model``'s apply (default: the run's) wrapped by ``wrappers`` (default: every registered one),
        innermost first."""
        fn = (model or self.model).apply
        for wrap in self.wrappers if wrappers is None else wrappers:
            fn = wrap(fn)
        return fn

    def variables(self, tree: dict, extras: dict) -> dict:
        """The variable collections besides ``params`` that the wrapped model reads."""
        out = {}
        for fn in self.collections:
            out.update(fn(tree, extras))
        return out


@dataclasses.dataclass
class Feed:
    """The data of a run that does not train on a labelled task (general distillation on raw text): what the
    runner takes from it instead of ``Run.task`` and ``Run.train``.

    Attributes:
      name: what logs and ``results.json`` call the data (e.g. the corpus).
      describe: the data in the start-up overview (rows, held-out part).
      batches: ``(epoch, start_batch) -> iterator`` of this host's rows of each global training batch, from
        batch ``start_batch`` of epoch ``epoch`` on: the model's inputs, ``example_weight`` (float32 [B]) and what
        ``Run.task_loss`` reads; batch ``b`` of epoch ``e`` is global step ``e * steps_per_epoch + b``.
      make_evaluate: ``(run, par) -> evaluate``, called once the techniques have set up (so it sees the wrapped
        model): ``evaluate(device_state) -> {metric: value}``, global over every host, on the feed's held-out
        data.
      metric_names: the evaluation's metrics, the headline first (``checkpoint.best_metric`` must be one).
      model_extra: what the saved model's metadata records in place of a task (e.g. ``max_length``).
    """

    name: str
    describe: str
    batches: Callable[[int, int], Any]
    make_evaluate: Callable[..., Callable[[Any], dict]]
    metric_names: list[str]
    model_extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Exported:
    """The trained model on its way to ``model/``: finalizers replace ``model_cfg``/``params`` (compaction,
    successor extraction) and may record what they did in ``results``.

    Attributes:
      run: the run.
      tree: the exported trainable tree (best or last step, as the config says).
      model_cfg, params: the model to save (start: the run's config and ``tree["model"]``).
      eval: the exported step's dev metrics as the loop measured them.
    """

    run: Run
    tree: dict
    model_cfg: Any
    params: PyTree
    eval: dict


@dataclasses.dataclass(frozen=True)
class Technique:
    """A compression technique as a config component of the training jobs.

    Attributes:
      name: its config section (``config.<name>``).
      section: ``() -> ConfigDict``: the section with its defaults, every field commented (the one place a
        field is declared; its type is its default's).
      constraints: ``{field: {"min"|"max"|"choices": ...}}`` of the section's fields that have them.
      active: ``config -> bool``: whether the run uses it.
      check: ``(config, family) -> [problem, ...]``: what cannot work, found before any work (the family of
        the trained model, combinations with other techniques); each problem names the fields.
      setup: ``(run) -> None``: extends the run (see :class:`Run`).
    """

    name: str
    section: Callable[[], ml_collections.ConfigDict]
    constraints: dict
    active: Callable[[ml_collections.ConfigDict], bool]
    check: Callable[[ml_collections.ConfigDict, str], list[str]]
    setup: Callable[[Run], None]
