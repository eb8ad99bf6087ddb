"""Every job, in one registry that ``experiments.main`` and recipes both read.

A :class:`Job` declares only what differs between jobs: its config module (``experiments/configs/<x>.py``:
``get_config`` declares every field once, ``CONSTRAINTS`` their ranges and choices; the schema is derived from
them), the model family it produces, and either ``build`` (training jobs: the runner,
:mod:`experiments.jobs.runner`, does the rest) or ``run`` (jobs without a training loop). For recipes it also
says which config fields a stage fills from its source stages (``source_fields``, or a ``link`` function) and
which source families it accepts. A new job is one entry in :data:`JOBS`; recipes take it as a stage kind
without a change to the recipe code.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from experiments.runtime import config_validation
from models import storage


@dataclasses.dataclass(frozen=True)
class RecipeView:
    """What a stage's ``link`` sees of its recipe: the config, the workdir and the stage names in order."""

    config: Any
    workdir: str
    names: tuple[str, ...]

    def model_dir(self, stage: str) -> str:
        """The model directory stage ``stage`` writes."""
        st = self.config[stage]
        return JOBS[st.kind].model_dir(os.path.join(self.workdir, stage), st.config)

    def sources(self, stage: str) -> list[str]:
        return [s.strip() for s in str(self.config[stage].get("source") or "").split(",") if s.strip()]


def _fill_source_fields(fields: tuple[str, ...]):
    def link(stage_config, sources: list[str], recipe: RecipeView) -> None:
        model_dir = recipe.model_dir(sources[0])
        with stage_config.unlocked():
            for f in fields:
                stage_config[f] = model_dir

    return link


def _link_export(stage_config, sources: list[str], recipe: RecipeView) -> None:
    """Export: every source's model, and the int8 scales of a quantize stage of the same model."""
    quant = {}
    for name in recipe.names:
        st = recipe.config[name]
        if st.kind == "quantize" and recipe.sources(name) and recipe.sources(name)[0] in sources:
            quant[recipe.sources(name)[0]] = os.path.join(recipe.workdir, name, "quant_state.npz")
    with stage_config.unlocked():
        stage_config.models = ",".join(f"{s}={recipe.model_dir(s)}" for s in sources)
        stage_config.quant_states = ",".join(f"{s}={p}" for s, p in quant.items())


STUDENT_SOURCES = ("general_distill", "distill")  # stage kinds whose model a distill stage starts from


def _link_distill(stage_config, sources: list[str], recipe: RecipeView) -> None:
    """Distillation: the teacher from its source stage; a general-distillation or distillation source is instead
    the student the stage starts from (``student.model_dir``: TinyBERT's pipelines, general then task
    distillation, and intermediate-layer then prediction-layer distillation)."""
    general = [s for s in sources if recipe.config[s].kind in STUDENT_SOURCES]
    teachers = [s for s in sources if s not in general]
    if len(general) > 1 or len(teachers) > 1:
        raise config_validation.ConfigError(f"a distill stage takes one teacher stage and at most one student "
                                            f"stage (general_distill or distill) as sources, got {sources}")
    with stage_config.unlocked():
        if teachers:
            stage_config.teacher_dir = recipe.model_dir(teachers[0])
        if general:
            stage_config.student.model_dir = recipe.model_dir(general[0])


@dataclasses.dataclass(frozen=True)
class Job:
    """One job.

    Attributes:
      name: ``config.job`` and the recipe stage ``kind``.
      config_module: the module with ``get_config`` and ``CONSTRAINTS``.
      build: training jobs: ``(config, workdir, key) -> Run`` (see :mod:`experiments.techniques.base`).
      run_fn: other jobs: ``(config, workdir) -> results``.
      family: ``config -> family`` of the model it writes to ``model/`` (None: it writes no model).
      accepts: families of source models it can start from (recipes check this before any stage runs).
      source_fields: config fields a recipe stage fills with its source stage's model directory.
      link: replaces the default filling (e.g. export: several sources, quant states).
      max_sources: sources a recipe stage may name (0: none, the first stage of a recipe).
      source_optional: a stage of it may also start from nothing but its config (fine-tuning from a pretrained
        checkpoint, a multi-task teacher): a recipe's first stage.
      reference: ``config -> reference config`` the schema is derived from (default: ``get_config()``).
      model_subdir: ``config -> directory name`` of the model it writes (default ``model``).
      check: ``config -> None``, raising ConfigError: the job's own checks that need no work (paths exist,
        devices divide the batch), run with validation, before the workdir is created.
      single_process: a job without collectives (pruning, PTQ, export): in a multi-host run process 0 runs
        it and writes its files while the others wait for its outcome, however long it takes
        (:mod:`experiments.runtime.single_process`), then read its ``results.json``; if it fails there, every
        process stops with its error.
    """

    name: str
    config_module: str
    build: Callable | None = None
    run_fn: Callable | None = None
    family: Callable[[Any], str | None] = lambda config: "transformer"
    accepts: tuple[str, ...] = ("transformer",)
    source_fields: tuple[str, ...] = ("model_dir",)
    link: Callable | None = None
    max_sources: int = 1
    source_optional: bool = False
    reference: Callable | None = None
    model_subdir: Callable[[Any], str] = lambda config: "model"
    check: Callable[[Any], None] | None = None
    single_process: bool = False

    @property
    def module(self):
        return importlib.import_module(self.config_module)

    def schema(self, config) -> config_validation.Schema:
        reference = self.reference(config) if self.reference else self.module.get_config()
        return config_validation.derive_schema(reference, self.module.CONSTRAINTS)

    def validate(self, config) -> None:
        config_validation.validate(config, self.schema(config))

    def run(self, config: ml_collections.ConfigDict, workdir: str) -> dict:
        """Validates ``config`` (before anything is created), then runs the job holding ``workdir``'s lock (a
        second run on the same workdir stops at once, naming the holder); leftovers of killed writes in the
        workdir are removed first."""
        import jax

        from experiments.runtime import workdir as workdir_lock
        self.validate(config)
        if self.check is not None:
            self.check(config)
        if self.build is not None:
            from experiments.jobs import runner
            runner.check_techniques(config, self.family(config))
        writer = jax.process_index() == 0
        created = not storage.exists(workdir)
        try:
            with workdir_lock.lock_for_run(workdir):  # process 0 holds it; a refusal stops every process
                if writer:
                    workdir_lock.remove_stale_temporaries(workdir)
                if self.build is not None:
                    return runner.train_and_evaluate(self, config, workdir)
                if not (self.single_process and jax.process_count() > 1):
                    return self.run_fn(config, workdir)
                from experiments.runtime import observe, single_process
                results = single_process.run_on_process_0(self.name, lambda: self.run_fn(config, workdir), workdir)
                return results if writer else observe.read_results(workdir)  # process 0 wrote its files
        except Exception:
            # A run that failed before writing anything (e.g. a check that needs the data) leaves no workdir.
            if (writer and created and not storage.is_remote(workdir) and os.path.isdir(workdir)
                    and os.listdir(workdir) == [workdir_lock.LOCK_FILE]):
                os.remove(os.path.join(workdir, workdir_lock.LOCK_FILE))
                os.rmdir(workdir)
            raise

    def model_dir(self, workdir: str, config) -> str:
        return os.path.join(workdir, self.model_subdir(config))

    def link_sources(self, stage_config, sources: list[str], recipe: RecipeView) -> None:
        (self.link or _fill_source_fields(self.source_fields))(stage_config, sources, recipe)


def _lazy(module: str, attr: str) -> Callable:
    """``module.attr``, imported at call time (so that ``--help`` and the registry stay light)."""
    return lambda *args, **kwargs: getattr(importlib.import_module(module), attr)(*args, **kwargs)


def _multitask_reference(config):
    from experiments.configs import multitask
    from experiments.jobs.multitask import parse_tasks
    return multitask.get_config(",".join(parse_tasks(config.get("tasks", ""))))  # ConfigError for a bad list


_TRAIN = _lazy("experiments.jobs.train", "build")
JOBS: dict[str, Job] = {job.name: job for job in (
    Job("finetune", "experiments.configs.finetune", build=_TRAIN, max_sources=1, source_optional=True),
    Job("qat", "experiments.configs.qat", build=_TRAIN),
    Job("theseus", "experiments.configs.theseus", build=_TRAIN),
    Job("l0", "experiments.configs.l0", build=_TRAIN),
    Job("distill", "experiments.configs.distill", build=_lazy("experiments.jobs.distill", "build"),
        family=lambda c: c.student.family, source_fields=("teacher_dir",), link=_link_distill, max_sources=2),
    Job("general_distill", "experiments.configs.general_distill", build=_lazy("experiments.jobs.general_distill",
                                                                             "build"),
        check=_lazy("experiments.jobs.general_distill", "check_config"), accepts=(), source_fields=(), max_sources=0),
    Job("multitask", "experiments.configs.multitask", run_fn=_lazy("experiments.jobs.multitask",
                                                                   "multitask_and_evaluate"),
        reference=_multitask_reference, check=_lazy("experiments.jobs.multitask", "_check_config"),
        model_subdir=lambda c: f"model_{[t.strip() for t in c.tasks.split(',')][0]}", source_optional=True),
    Job("prune", "experiments.configs.prune", run_fn=_lazy("experiments.jobs.stages", "prune"), single_process=True),
    Job("quantize", "experiments.configs.quantize", run_fn=_lazy("experiments.jobs.stages", "quantize"),
        family=lambda c: None, single_process=True),
    Job("export", "experiments.configs.export", run_fn=_lazy("experiments.jobs.stages", "export"), single_process=True,
        family=lambda c: None, accepts=("transformer", "bilstm", "cnn_lstm"), source_fields=(), link=_link_export,
        max_sources=64),
    # The claims study's runs are recipe stages, validated against their own jobs' schemas.
    Job("claims", "experiments.configs.claims", run_fn=_lazy("experiments.jobs.claims", "run_claims"),
        family=lambda c: None, accepts=(), source_fields=(), max_sources=0, reference=lambda config: config),
    # A recipe's stages are validated against their own jobs' schemas (experiments.jobs.recipes).
    Job("recipe", "experiments.configs.recipe", run_fn=_lazy("experiments.jobs.recipes", "run_recipe"),
        family=lambda c: None, accepts=(), source_fields=(), max_sources=0, reference=lambda config: config),
)}


def get(name: str) -> Job:
    """The job called ``name``; a ConfigError naming the known jobs (and the closest) otherwise."""
    if name not in JOBS:
        close = difflib.get_close_matches(str(name), list(JOBS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise config_validation.ConfigError(f"config.job={name!r} is not a known job{hint}; known: {sorted(JOBS)}")
    return JOBS[name]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs ``config.job`` (every config names its job) in ``workdir``."""
    if "job" not in config:
        raise config_validation.ConfigError(f"the config names no job (config.job); known: {sorted(JOBS)}")
    return get(config.job).run(config, workdir)
