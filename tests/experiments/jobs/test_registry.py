"""The job registry that experiments.main and recipes share: every job's schema, dispatch, the workdir lock."""

import subprocess
import sys
import time

import pytest

from experiments.jobs import recipes, registry
from experiments.runtime.config_validation import ConfigError
from experiments.runtime.workdir import WorkdirBusyError
from tests.experiments.runtime.test_workdir import HOLD
from tests.experiments.tiny import tiny_config
from tests.multidevice import REPO


@pytest.mark.parametrize("name", sorted(registry.JOBS))
def test_every_job_validates_its_own_default_config(name):
    """The schema is derived from the job's config and its constraints name only fields it has."""
    job = registry.JOBS[name]
    config = job.module.get_config()
    job.validate(config)
    assert config.job == name


def test_an_unknown_job_names_the_closest():
    config = tiny_config()
    config.job = "finetun"
    with pytest.raises(ConfigError, match="config.job='finetun' is not a known job \\(did you mean 'finetune'\\?\\)"):
        registry.run(config, "/nonexistent/run")


def test_recipes_take_every_registered_job_as_a_stage_kind():
    """No job list in the recipe code: a kind is valid exactly when the registry has it."""
    import ml_collections
    for kind in sorted(set(registry.JOBS) - {"recipe", "claims"}):  # jobs made of stages are no stage
        c = ml_collections.ConfigDict({"stages": "first", "task": "synthetic", "first": {
            "kind": kind, "source": "", "config": registry.JOBS[kind].module.get_config()}})
        job = registry.JOBS[kind]
        if kind in ("finetune", "multitask") or not (job.source_fields or job.link):  # may start a recipe
            assert recipes.check_recipe(c) == ["first"]
        else:  # every other job starts from an earlier stage's model
            with pytest.raises(recipes.RecipeError, match="needs a source"):
                recipes.check_recipe(c)
    for kind in ("distil", "claims", "recipe"):
        c.first.kind = kind
        with pytest.raises(recipes.RecipeError, match=f"kind '{kind}' is not one of"):
            recipes.check_recipe(c)


def test_a_second_launch_on_a_busy_workdir_stops_at_once(tmp_path):
    """A relaunch while the first run still holds the workdir (a double submit) stops before touching it."""
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (workdir / "in_flight").write_text("the first run's files")
        start = time.monotonic()
        with pytest.raises(WorkdirBusyError, match=f"in use by pid {holder.pid}"):
            registry.run(tiny_config(num_train_steps=2), str(workdir))
        assert time.monotonic() - start < 5.0
        assert sorted(p.name for p in workdir.iterdir()) == [".lock", "in_flight"]
    finally:
        holder.kill()
        holder.wait()
