"""The recipe runner end to end on tiny models: stages, skipping, resume after a kill, report, bad recipes."""

import json
import os
import shutil

import pytest

from experiments.jobs import recipes
from experiments.configs import recipe as recipe_configs
from tests.experiments.tiny import TINY

STUDENT = {"max_length": 16, "synthetic_size": 256, "batch_size": 16, "eval_batch_size": 32, "num_train_steps": 12,
           "log_every_steps": 4, "eval_every_steps": 6, "checkpoint.every_steps": 6, "progress_bar": "off"}


def _set(config, values):
    for key, value in values.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value


def tiny_recipe(stages="teacher,transformer3,bilstm,theseus,pruned,int8,onnx"):
    c = recipe_configs.get_config("demo")
    c.stages = stages
    c.synthetic_size = 256
    c.teacher.config.model_dir = None
    _set(c.teacher.config, {**TINY, "num_train_steps": 36, "eval_every_steps": 18, "checkpoint.every_steps": 18})
    _set(c.transformer3.config, {**STUDENT, "student.num_layers": 1})
    _set(c.theseus.config, {**STUDENT, "theseus.successor_layers": 1})
    _set(c.bilstm.config, {**STUDENT, "student.embed_dim": 16, "student.hidden_size": 8, "student.mlp_hidden": 8,
                           "augment.n_per_example": 1})
    c.pruned.config.step, c.pruned.config.max_fraction, c.pruned.config.importance_examples = 0.25, 0.5, 32
    c.pruned.config.max_drop = 100.0  # take the whole curve: the test checks mechanics, not quality
    c.int8.config.calibration_batches = 2
    c.onnx.source = "teacher,bilstm"
    _set(c.l0.config, {**STUDENT, "export": "last"})
    _set(c.qat.config, {**STUDENT, "qat.calibration_batches": 2})
    c.report.batch, c.report.seq, c.report.rounds = 2, 16, 1
    return c


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recipe")
    out = recipes.run_recipe(tiny_recipe(), str(workdir))
    return workdir, out


def test_every_stage_writes_its_outputs_and_the_report(recipe_run):
    workdir, out = recipe_run
    assert list(out) == ["teacher", "transformer3", "bilstm", "theseus", "pruned", "int8", "onnx"]
    for stage in ("teacher", "transformer3", "bilstm", "theseus", "pruned"):
        assert (workdir / stage / "model" / "config.json").is_file()
    assert out["pruned"]["chosen"]["heads_pruned"] == 2  # max_fraction 0.5 of 4 heads
    assert set(out["int8"]) >= {"float32", "fake_quant", "int8"}
    assert (workdir / "int8" / "quant_state.npz").is_file()
    onnx = {name: record["files"] for name, record in out["onnx"]["models"].items()}
    assert set(onnx["teacher"]) == {"model_fp32.onnx", "model_fp16.onnx", "model_int8.onnx"}
    assert set(onnx["bilstm"]) == {"model_fp32.onnx", "model_fp16.onnx"}
    assert onnx["teacher"]["model_fp32.onnx"]["max_abs_diff"] <= 1e-4
    # each file scored in onnxruntime on dev: fp32 files predict what their JAX models predict
    assert onnx["teacher"]["model_fp32.onnx"]["metrics"]["accuracy"] == out["teacher"]["final"]["accuracy"]
    assert onnx["bilstm"]["model_fp32.onnx"]["metrics"]["accuracy"] == out["bilstm"]["final"]["accuracy"]
    for name in ("report.md", "report.html", "report.json", "metric_vs_throughput.png", "metric_vs_size.png"):
        assert (workdir / name).is_file(), name
    report = json.loads((workdir / "report.json").read_text())
    rows = {(m["name"], m["variant"]) for m in report["models"]}
    assert rows >= {("teacher", "float32"), ("transformer3", "float32"), ("bilstm", "float32"), ("theseus", "float32"),
                    ("pruned", "float32"), ("int8", "int8")}
    assert rows >= {("teacher (onnx fp32)", "fp32"), ("teacher (onnx int8)", "int8"), ("bilstm (onnx fp16)", "fp16")}
    assert [m["name"] for m in report["models"]][0] == "teacher"  # the reference first; no set-aside folder
    for m in report["models"]:
        assert m["latency_b1_ms"] > 0 and m["latency_ms"] > 0 and m["metric"] is not None, m["name"]
    teacher = next(m for m in report["models"] if m["name"] == "teacher")
    assert teacher["ratio"] == pytest.approx(1.0) and teacher["tokens_per_s"] > 0
    assert teacher["metric"] == out["teacher"]["best"]["accuracy"] or \
        teacher["metric"] == out["teacher"]["final"]["accuracy"]


def test_rerun_skips_finished_stages(recipe_run):
    workdir, out = recipe_run
    stamp = os.path.getmtime(workdir / "teacher" / "results.json")
    again = recipes.run_recipe(tiny_recipe("teacher,transformer3,bilstm,theseus,pruned,int8,onnx"), str(workdir))
    assert os.path.getmtime(workdir / "teacher" / "results.json") == stamp
    assert again["bilstm"]["final"] == out["bilstm"]["final"]


def test_killed_stage_resumes_to_the_same_final_metrics(recipe_run, tmp_path):
    """A kill after the student's step-6 checkpoint: its later outputs are lost; the rerun ends the same."""
    workdir, out = recipe_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    stage = copy / "transformer3"
    for name in ("results.json", "model"):
        p = stage / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    ckpts = stage / "checkpoints"
    for d in ckpts.iterdir():
        if d.name.isdigit() and int(d.name) > 6:
            shutil.rmtree(d)
    for later in ("pruned", "int8", "onnx"):
        shutil.rmtree(copy / later)
    again = recipes.run_recipe(tiny_recipe("teacher,transformer3,bilstm,theseus,pruned,int8,onnx"), str(copy))
    assert again["transformer3"]["final"] == out["transformer3"]["final"]
    assert again["transformer3"]["steps"] == out["transformer3"]["steps"]


def test_bad_recipes_fail_before_any_stage(tmp_path):
    c = tiny_recipe("teacher,int8")
    c.int8.source = "bilstm"
    with pytest.raises(recipes.RecipeError, match="not an earlier stage"):
        recipes.run_recipe(c, str(tmp_path / "a"))
    c = tiny_recipe("teacher,bilstm,int8")
    c.int8.source = "bilstm"
    with pytest.raises(recipes.RecipeError, match="cannot start from 'bilstm'"):
        recipes.run_recipe(c, str(tmp_path / "b"))
    c = tiny_recipe("teacher,onnx")
    c.onnx.source = "teacher,int8"
    with pytest.raises(recipes.RecipeError, match="not an earlier stage"):
        recipes.run_recipe(c, str(tmp_path / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_workdir_of_another_recipe_is_refused(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "recipe.json").write_text(json.dumps({"stages": ["teacher"], "kinds": {"teacher": "finetune"},
                                                            "sources": {"teacher": None}, "task": "sst2"}))
    with pytest.raises(recipes.RecipeError, match="different recipe"):
        recipes.run_recipe(tiny_recipe("teacher,bilstm"), str(tmp_path / "w"))


def test_sst2_profile_pairs_each_student_with_its_no_distillation_baseline():
    c = recipe_configs.get_config("sst2")
    names = recipes.check_recipe(c)
    c.data_dir = "/data/sst2"  # linked into every training stage
    for student in ("transformer3", "bilstm"):
        assert names.index(f"{student}_nokd") > names.index("teacher")
        kd, base = c[student].config, c[f"{student}_nokd"].config
        assert base.distill.preset == "none" and base.augment.n_per_example == 0
        assert kd.distill.preset != "none"
        assert kd.student == base.student and kd.optimizer == base.optimizer
        assert (kd.num_train_steps, kd.num_epochs, base.data_dir) == (base.num_train_steps, base.num_epochs,
                                                                      "/data/sst2")


def test_l0_and_qat_stages_run_from_the_recipe_config(tmp_path):
    """Jobs the recipe code never names (l0, qat) are stages: teacher -> L0 gates + KD -> QAT -> int8 ONNX."""
    c = tiny_recipe("teacher,l0,qat,onnx")
    c.onnx.source = "qat"
    out = recipes.run_recipe(c, str(tmp_path / "w"))
    l0_model = tmp_path / "w" / "l0" / "model"
    assert out["l0"]["techniques"] == ["l0", "distill"] and out["l0"]["l0"]["compacted_matches_gated"]
    assert out["l0"]["distill"]["teacher_dir"] == str(tmp_path / "w" / "teacher" / "model")
    assert out["qat"]["qat"]["quant_state"] == "quant_state.npz"
    assert (tmp_path / "w" / "qat" / "model" / "quant_state.npz").is_file()
    # the QAT stage started from the compacted L0 model: same per-layer sizes
    qat_meta = json.loads((tmp_path / "w" / "qat" / "model" / "config.json").read_text())
    l0_meta = json.loads((l0_model / "config.json").read_text())
    assert qat_meta["config"] == l0_meta["config"]
    assert set(out["onnx"]["models"]["qat"]["files"]) == {"model_fp32.onnx", "model_fp16.onnx", "model_int8.onnx"}


def test_a_changed_stage_reruns_with_every_stage_after_it(tmp_path):
    """Rerunning with a changed teacher config reruns the teacher and the stage built on it (old outputs set
    aside, not deleted); a change to the last stage alone reruns only that stage."""
    workdir = tmp_path / "w"
    first = recipes.run_recipe(tiny_recipe("teacher,int8"), str(workdir))
    teacher_stamp = os.path.getmtime(workdir / "teacher" / "results.json")

    c = tiny_recipe("teacher,int8")
    c.int8.config.calibrator = "max"  # was percentile:99.99
    second = recipes.run_recipe(c, str(workdir))
    assert os.path.getmtime(workdir / "teacher" / "results.json") == teacher_stamp  # the teacher did not rerun
    assert second["int8"]["calibrator"] == "max" and first["int8"]["calibrator"] != "max"
    assert len(list(tmp_path.glob("w/int8.stale-*"))) == 1 and not list(tmp_path.glob("w/teacher.stale-*"))

    c = tiny_recipe("teacher,int8")
    c.int8.config.calibrator = "max"
    c.teacher.config.seed = 1  # a different teacher: it and the stage built on it run again
    third = recipes.run_recipe(c, str(workdir))
    assert os.path.getmtime(workdir / "teacher" / "results.json") != teacher_stamp
    assert len(list(tmp_path.glob("w/teacher.stale-*"))) == 1 and len(list(tmp_path.glob("w/int8.stale-*"))) == 2
    assert third["int8"]["source_model"] == str(workdir / "teacher" / "model")
    assert third["teacher"]["fingerprint"]["seed"] == 1


def test_a_stage_key_follows_the_content_of_its_outside_inputs(tmp_path):
    """A data folder outside the workdir enters the key by content: edited data changes the key (the stage and
    those after it rerun); the same files in another folder do not."""
    c = tiny_recipe("teacher,int8")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\na fine film\t1\n")
    c.teacher.config.data_dir = str(data)  # linked: every stage's data_dir
    names = ["teacher", "int8"]
    key = recipes.stage_keys(c, names, str(tmp_path / "w"))
    shutil.copytree(data, tmp_path / "moved")
    c.teacher.config.data_dir = str(tmp_path / "moved")
    assert recipes.stage_keys(c, names, str(tmp_path / "w")) == key
    (tmp_path / "moved" / "train.tsv").write_text("sentence\tlabel\na dull film\t0\n")
    changed = recipes.stage_keys(c, names, str(tmp_path / "w"))
    assert changed["teacher"] != key["teacher"] and changed["int8"] != key["int8"]
