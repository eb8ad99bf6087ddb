"""Compression recipes: a chain of stages over one model, each a registered job reading earlier stages' models.

A recipe config (``experiments/configs/recipe.py``) lists ``stages`` in order; each stage has a section of the
same name with ``kind`` (any job of :data:`experiments.jobs.registry.JOBS`: finetune, distill, theseus, l0, qat,
multitask, prune, quantize, export), ``source`` (the earlier stage(s) whose model it starts from; none for a
first fine-tuning stage) and ``config`` (that job's config). The job itself says which of its fields a source
fills (``model_dir``, ``teacher_dir``, or export's lists) and which source families it accepts, so a new job
is a stage kind with no change here.

Each stage writes ``WORKDIR/<stage>/`` (its model directory where it makes one, ``results.json`` and, last,
``stage.json`` with the stage's key, the hardware it ran on and when it finished). The key is a hash of the stage's config (the fields that change its result;
paths excluded), of the content of the files it reads from outside the workdir (data, a pretrained checkpoint) and
of its sources' keys, so it changes when any of those or any earlier stage it depends on changes. A stage whose
``results.json`` parses, whose model exists and whose recorded key is the current one is skipped on a rerun; one
whose key changed is moved aside (``<stage>.stale-<time>``, nothing is deleted) and runs again, and so does every
stage after it that depends on it; an interrupted stage resumes from its checkpoints. The workdir may be a
``gs://`` URL (:mod:`models.storage`: a model directory counts only once its completion marker is written).

In a multi-host run every process runs the recipe: process 0 decides what is done and tells the others, writes
the shared files (``recipe.json``, ``stage.json``, the report) and runs the single-process stages (prune,
quantize, export) and the report while the others wait for its outcome, however long it takes (no barrier timeout
limits it), stopping with its error if it fails (:mod:`experiments.runtime.single_process`); the
processes meet at a barrier after each stage, before anyone reads what it wrote. ``WORKDIR/recipe.json``
records the recipe: running a different recipe in the same workdir is an error before any stage runs, as is a recipe
whose stages do not fit together (a source that is not an earlier stage, a source family the stage's job does not
accept, a stage config its job's schema rejects). At the end the report (:mod:`experiments.tools.report`) measures
every model side by side and writes ``report.md``, ``report.html`` and the plots at the top of the workdir.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from experiments.jobs import registry
from experiments.runtime import config_validation, fingerprint, hardware, observe, single_process
from models import storage

STAGE_FILE = "stage.json"  # written into a stage's folder when it finishes: the key it ran with
NOT_STAGES = ("recipe", "claims")  # jobs made of stages, not stages themselves


class RecipeError(ValueError):
    """A recipe whose stages do not fit together, or a workdir that belongs to another recipe."""


def stage_names(config) -> list[str]:
    names = [s.strip() for s in config.stages.split(",") if s.strip()]
    if not names:
        raise RecipeError("config.stages lists no stage")
    if len(set(names)) != len(names):
        raise RecipeError(f"config.stages names a stage twice: {names}")
    return names


def check_recipe(config, workdir: str = "") -> list[str]:
    """Raises :class:`RecipeError` naming the first stage that does not fit; returns the stage names."""
    names = stage_names(config)
    view = registry.RecipeView(config, workdir, tuple(names))
    for i, name in enumerate(names):
        if name not in config:
            raise RecipeError(f"stage {name!r} has no config section config.{name}")
        stage = config[name]
        kind = stage.get("kind")
        if kind not in registry.JOBS or kind in NOT_STAGES:
            raise RecipeError(f"stage {name!r}: kind {kind!r} is not one of "
                              f"{sorted(k for k in registry.JOBS if k not in NOT_STAGES)}")
        job = registry.JOBS[kind]
        sources = view.sources(name)
        if len(sources) > job.max_sources or (sources and not (job.source_fields or job.link)):
            raise RecipeError(f"stage {name!r} ({kind}) names {len(sources)} source(s) {sources}; a {kind} stage "
                              f"takes at most {job.max_sources}")
        if not sources and (job.source_fields or job.link) and not job.source_optional:
            raise RecipeError(f"stage {name!r} ({kind}) needs a source: the earlier stage whose model it starts from")
        for src in sources:
            if src not in names[:i]:
                raise RecipeError(f"stage {name!r} ({kind}) starts from {src!r}, which is not an earlier stage of "
                                  f"{names}")
            family = registry.JOBS[config[src].kind].family(config[src].config)
            if family is None:
                raise RecipeError(f"stage {name!r} ({kind}) starts from {src!r}, a {config[src].kind} stage that "
                                  "makes no model")
            if family not in job.accepts:
                raise RecipeError(f"stage {name!r} ({kind}) cannot start from {src!r}: a {family} model (accepts "
                                  f"{list(job.accepts)})")
    return names


def _recipe_record(config, names) -> dict:
    return {"stages": names, "kinds": {n: config[n].kind for n in names},
            "sources": {n: config[n].get("source") for n in names}, "task": config.task}


def _claim_workdir(workdir: str, record: dict) -> None:
    path = os.path.join(workdir, "recipe.json")
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        if old != record:
            raise RecipeError(f"{workdir} holds a different recipe ({old['stages']} on {old['task']}); use a new "
                              f"workdir for {record['stages']} on {record['task']}")
        return
    if observe.is_writer():
        storage.makedirs(workdir)
        observe.write_json(path, record)


def read_results(stage_dir: str) -> dict | None:
    """The stage's ``results.json`` if it exists and parses (a torn write is not a finished stage)."""
    return observe.read_results(stage_dir)


# Config fields a recipe fills with paths of earlier stages, or that name inputs by path: the key covers the
# stages they come from instead (a copied workdir keeps its keys).
PATH_FIELDS = ("data_dir", "model_dir", "teacher_dir", "transfer_file", "models", "quant_states", "corpus",
               "student.model_dir")


def _external_inputs(stage_config, workdir: str) -> dict[str, str]:
    """Content hashes of the files a stage reads from outside the recipe's workdir (data folder, a pretrained
    checkpoint, a transfer file), keyed by field; paths inside the workdir are earlier stages' outputs, which
    their own keys cover."""
    out = {}
    for field in PATH_FIELDS:
        value = stage_config.get(field)
        if not isinstance(value, str) or not value or not storage.exists(value):
            continue
        if storage.absolute(value).startswith(storage.absolute(workdir) + "/"):
            continue
        out[field] = fingerprint.content_digest(value)
    return out


def stage_keys(config, names: list[str], workdir: str = "") -> dict[str, str]:
    """``{stage: key}``: a hash of each stage's config fingerprint, the content of the files it reads from
    outside the workdir, and its sources' keys, in stage order (call after the sources are linked)."""
    view = registry.RecipeView(config, workdir, tuple(names))
    keys: dict[str, str] = {}
    for name in names:
        stage = config[name]
        fp = fingerprint.config_fingerprint(stage.config, exclude=fingerprint.TRAJECTORY_NEUTRAL + PATH_FIELDS)
        record = {"kind": stage.kind, "config": fp, "inputs": _external_inputs(stage.config, workdir),
                  "sources": {s: keys[s] for s in view.sources(name)}}
        keys[name] = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return keys


def recorded_key(stage_dir: str) -> str | None:
    try:
        return json.loads(storage.read_text(os.path.join(stage_dir, STAGE_FILE)))["key"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def is_done(stage_dir: str, job: registry.Job, stage_config, key: str | None = None) -> bool:
    """A stage is finished when its results.json parses, its model directory is complete (on a bucket: marked)
    and (given ``key``) the key it recorded when it finished is ``key``."""
    if read_results(stage_dir) is None or (key is not None and recorded_key(stage_dir) != key):
        return False
    if job.family(stage_config) is None:
        return True
    model_dir = job.model_dir(stage_dir, stage_config)
    return storage.is_complete(model_dir) and storage.is_file(os.path.join(model_dir, "config.json"))


def _set_aside(stage_dir: str) -> str:
    """Moves a stage's outputs of an earlier config aside (never deleted); returns the new path."""
    aside = f"{stage_dir}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    storage.move(stage_dir, aside)
    return aside


def _sync(name: str) -> None:
    """A barrier of all processes of a multi-host run (nothing with one process), with the run's barrier timeout."""
    single_process.barrier(name)


def _process0_says(value: bool) -> bool:
    """Process 0's ``value`` on every process: the processes must take the same branch (run or skip a
    stage) even when a file changes between their reads."""
    if jax.process_count() == 1:
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.array(value)))


def run_recipe(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the recipe's unfinished stages in order, then the report; returns ``{stage: results}``."""
    workdir = storage.absolute(workdir)
    names = check_recipe(config, workdir)
    out = run_stages(config, workdir, names, record=_recipe_record(config, names))
    if config.report.enabled:
        single_process.run_on_process_0("recipe_report", lambda: _report(config, workdir, names), workdir)
    else:
        _sync("recipe_report_done")
    return out


def _report(config, workdir: str, names: list[str]) -> None:
    from experiments.tools import report
    # this recipe's stages in order (not every folder: outputs set aside as *.stale-* are not in the report)
    report.build_report([os.path.join(workdir, n) for n in names], workdir, reference=names[0],
                        batch=config.report.batch,
                        seq=config.report.seq, rounds=config.report.rounds,
                        title=f"Compression report: {config.task}")
    logging.info("report: %s (and report.html, plots)", os.path.join(workdir, "report.md"))


def run_stages(config: ml_collections.ConfigDict, workdir: str, names: list[str], record: dict | None = None) -> dict:
    """Links, validates and runs the unfinished ones of stages ``names`` (checked by :func:`check_recipe`) in
    order, skipping finished stages by their keys; returns ``{stage: results}``. ``record`` (the recipe's
    ``recipe.json``) claims the workdir for one recipe; None leaves it open to other stage lists over the same
    stages (the claims study: each claim runs its own stages, shared ones once)."""
    view = registry.RecipeView(config, workdir, tuple(names))
    for name in names:  # every stage config linked and validated before any stage runs
        stage = config[name]
        job = registry.JOBS[stage.kind]
        if view.sources(name):
            job.link_sources(stage.config, view.sources(name), view)
        try:
            job.validate(stage.config)
        except config_validation.ConfigError as e:
            raise config_validation.ConfigError(f"stage {name!r}: {e}") from e
    if record is not None:
        _claim_workdir(workdir, record)
    keys = stage_keys(config, names, workdir)
    writer = observe.is_writer()
    out = {}
    for i, name in enumerate(names):
        stage_dir = os.path.join(workdir, name)
        stage = config[name]
        job = registry.JOBS[stage.kind]
        if _process0_says(is_done(stage_dir, job, stage.config, keys[name])):
            logging.info("[%d/%d] %s (%s): done, skipped", i + 1, len(names), name, stage.kind)
        else:
            old = recorded_key(stage_dir)
            if writer and old is not None and old != keys[name]:
                logging.warning("[%d/%d] %s: its config or an earlier stage it depends on changed; the old outputs "
                                "move to %s and the stage runs again", i + 1, len(names), name, _set_aside(stage_dir))
            _sync(f"recipe_{name}_ready")  # nobody resumes from a folder being moved aside
            logging.info("[%d/%d] %s (%s): running in %s", i + 1, len(names), name, stage.kind, stage_dir)
            start = time.time()
            job.run(stage.config, stage_dir)
            if writer:
                observe.write_json(os.path.join(stage_dir, STAGE_FILE),
                                   {"key": keys[name], "kind": stage.kind, "hardware": hardware.environment(),
                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
            logging.info("[%d/%d] %s finished in %.1f s", i + 1, len(names), name, time.time() - start)
        _sync(f"recipe_{name}_done")
        out[name] = read_results(stage_dir)
    return out
