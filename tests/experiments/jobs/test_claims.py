"""The claims study at the smoke budget: its table equals figures worked out here from the saved models (dev
accuracy computed directly with ``model.apply``), the statistics by hand; a rerun skips every finished run, and
a changed arm reruns only its own run."""

import json
import math

import numpy as np
import pytest

import models
from experiments.configs import claims as claims_config
from experiments.data import load_task
from experiments.jobs import registry
from tests.experiments.tiny import dev_argmax

T_975_DF1 = 12.706204736174706  # Student-t 97.5% quantile, 1 degree of freedom (two seeds)


def _accuracy(model_dir: str, seed: int) -> float:
    """Dev accuracy of a saved model in points, on the smoke budget's generated task for ``seed``."""
    model, _, params = models.load(model_dir)
    task = load_task("synthetic", None, tokenizer=model_dir, max_length=16, synthetic_size=256, seed=seed)
    preds, labels = dev_argmax(model, params, task)
    return 100 * float(np.mean(preds == labels))


def _stage_record(study, name):
    return json.loads((study / name / "stage.json").read_text())


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    study = tmp_path_factory.mktemp("claims")
    config = claims_config.get_config("smoke,hinton_3pct+int8_ptq")
    table = registry.run(config, str(study))
    return study, config, table


def test_the_smoke_table_equals_figures_worked_out_here(study):
    workdir, _, table = study
    rows = {r["claim"]: r for r in table["rows"]}
    assert json.loads((workdir / "claims.json").read_text())["rows"] == json.loads(json.dumps(table["rows"]))
    md = (workdir / "claims.md").read_text()
    assert "| hinton_3pct |" in md and "not built yet" in md and "not run at the smoke budget" in md

    teacher = _accuracy(str(workdir / "synthetic_teacher" / "model"), 0)
    kd = [_accuracy(str(workdir / f"synthetic_kd_3pct_s{s}" / "model"), s) for s in (0, 1)]
    gold = [_accuracy(str(workdir / f"synthetic_gold_3pct_s{s}" / "model"), s) for s in (0, 1)]
    int8 = [100 * json.loads((workdir / f"synthetic_int8_s{s}" / "results.json").read_text())["int8"]["accuracy"]
            for s in (0, 1)]

    hinton = rows["hinton_3pct"]
    assert [r["value"] * 100 for r in hinton["arms"]["kd_3pct"]["runs"]] == pytest.approx(kd)
    assert [r["value"] * 100 for r in hinton["arms"]["gold_3pct"]["runs"]] == pytest.approx(gold)
    diffs = [k - g for k, g in zip(kd, gold)]
    assert hinton["arms"]["kd_3pct"]["mean"] == pytest.approx(sum(kd) / 2)
    assert hinton["arms"]["kd_3pct"]["sd"] == pytest.approx(abs(kd[0] - kd[1]) / math.sqrt(2))
    assert hinton["difference_mean"] == pytest.approx(sum(diffs) / 2)
    half = T_975_DF1 * (abs(diffs[0] - diffs[1]) / math.sqrt(2)) / math.sqrt(2)
    assert hinton["margin_interval"] == pytest.approx([sum(diffs) / 2 - half, sum(diffs) / 2 + half])
    lo, hi = hinton["margin_interval"]
    assert hinton["verdict"] == ("holds" if lo > 0 else "contradicted" if hi < 0 else "not shown")
    gain_met = sum(diffs) / 2 >= 2.0 and abs(diffs[0] - diffs[1]) / math.sqrt(2) < sum(diffs) / 2
    assert hinton["target"]["met"] == gain_met

    quant = rows["int8_ptq"]  # retains the teacher within 1 point: margin = int8 - teacher + 1
    assert quant["arms"]["teacher"]["mean"] == pytest.approx(teacher)
    margins = [q - teacher + 1.0 for q in int8]
    assert quant["margins"] == pytest.approx(margins)
    expected = "contradicted" if quant["margin_interval"][1] < 0 else "holds" if np.mean(margins) >= 0 else "not shown"
    assert quant["verdict"] == expected
    for row in (hinton, quant):
        assert row["complete"] and all(r["selection"]["method"] == "whole_texts"
                                       for a in row["arms"].values() for r in a["runs"] if r["selection"])


def test_a_rerun_skips_finished_runs_and_a_changed_arm_reruns_alone(study):
    workdir, config, _ = study
    runs = [p.name for p in workdir.iterdir() if (p / "stage.json").exists()]
    before = {name: _stage_record(workdir, name) for name in runs}
    registry.run(config, str(workdir))
    assert {name: _stage_record(workdir, name) for name in runs} == before  # nothing ran again

    changed = claims_config.get_config("smoke,hinton_3pct+int8_ptq")
    changed.synthetic_int8_s1.config.calibration_batches = 3
    table = registry.run(changed, str(workdir))
    after = {name: _stage_record(workdir, name) for name in runs}
    assert [n for n in runs if after[n] != before[n]] == ["synthetic_int8_s1"]
    assert any(p.name.startswith("synthetic_int8_s1.stale-") for p in workdir.iterdir())  # set aside, not lost
    assert {r["claim"]: r for r in table["rows"]}["int8_ptq"]["complete"]


@pytest.mark.parametrize("budget", claims_config.BUDGETS)
def test_every_budget_builds_runs_that_fit_their_jobs(budget, tmp_path):
    """Every run of every claim at every budget is a valid stage of its job (the cpu and paper studies are
    checked here before anyone spends hours on them); claims that are not built are refused by name."""
    from experiments.jobs import recipes
    config = claims_config.get_config(budget)
    names = claims_config.add_runs(config)
    config.stages = ",".join(names)
    recipes.check_recipe(config, str(tmp_path))
    view = registry.RecipeView(config, str(tmp_path), tuple(names))
    for name in names:
        job = registry.JOBS[config[name].kind]
        if view.sources(name):
            job.link_sources(config[name].config, view.sources(name), view)
        job.validate(config[name].config)
    with pytest.raises(ValueError, match="multitask_teacher.*not built"):
        claims_config.get_config(f"{budget},multitask_teacher")
