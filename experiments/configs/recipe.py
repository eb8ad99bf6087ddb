"""The main job: fine-tune a teacher, distil it into a BiLSTM and a 3-layer Transformer, compress it to 3 layers
by module replacement (BERT-of-Theseus), prune its heads, quantize it to int8, export everything to ONNX, and
report every model side by side.

Launch (``make demo`` runs the first; it needs no data files and finishes in under 15 minutes on 2 CPU cores)::

    python -m experiments.main --config=experiments/configs/recipe.py:demo --workdir=runs/demo
    python -m experiments.main --config=experiments/configs/recipe.py:sst2 --workdir=runs/sst2 \\
        --config.data_dir=../shared/data/sst2

``demo`` runs on a generated sentiment task of graded difficulty (``synthetic_graded``: negation, contrast,
double negation, 4% label noise), so that the models' figures differ the way they do on real data: with the
MiniLM package installed the teacher is MiniLM fine-tuned briefly; without it, a small Transformer trained from
scratch.
``sst2`` is the same recipe on real SST-2 with MiniLM, plus the two students trained without distillation
(``transformer3_nokd``, ``bilstm_nokd``) as baselines: about 3.5 hours on 2 CPU cores (measured: teacher 92
minutes, the other stages 109 minutes; results in the README).
``tinybert`` is TinyBERT's pipeline on SST-2 (docs/general_distillation.md): the MiniLM teacher fine-tuned, MiniLM
distilled on raw text into TinyBERT-4's shape (general distillation, ``--config.corpus=FILE``), then the task
distilled from the teacher into that student (intermediate layers through a learned projection, and soft targets)::

    python -m experiments.main --config=experiments/configs/recipe.py:tinybert --workdir=runs/tinybert \
        --config.corpus=runs/corpus/tasks.txt --config.data_dir=../shared/data/sst2
Rerunning the same command skips finished stages and resumes an interrupted one. Override any stage field with e.g.
``--config.teacher.config.num_epochs=1`` or drop stages with ``--config.stages=teacher,bilstm,report``.

Each stage writes ``WORKDIR/<stage>/`` (``model/``, ``results.json``); ``report.md``, ``report.html`` and the
plots are written at the top of the workdir.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import distill, export, finetune, general_distill, l0, prune, qat, quantize, theseus

PROFILES = ("demo", "sst2", "tinybert")


def get_config(profile: str = "demo") -> ml_collections.ConfigDict:
    if profile not in PROFILES:
        raise ValueError(f"unknown recipe profile {profile!r}; allowed: {list(PROFILES)}")
    if profile == "tinybert":
        return tinybert_config()
    task = "synthetic" if profile == "demo" else "sst2"  # the stage configs' presets
    c = ml_collections.ConfigDict()
    c.job = "recipe"  # experiments.main runs experiments.jobs.recipes.run_recipe
    # the task every stage uses; the demo's is generated with graded difficulty (experiments/data/synthetic.py)
    c.task = "synthetic_graded" if profile == "demo" else task
    c.data_dir = finetune._optional_str(finetune.default_data_dir(task))  # the task's data folder (None: generated)
    c.synthetic_size = 2000  # training examples of the generated task
    c.seed = 0  # data generation / order seed shared by the stages
    # stage names in order (each has a section below)
    c.stages = "teacher,transformer3,bilstm,theseus,pruned,int8,onnx"
    if profile == "sst2":
        c.stages = "teacher,transformer3,transformer3_nokd,bilstm,bilstm_nokd,theseus,pruned,int8,onnx"

    # 1. The teacher: fine-tuning (experiments/configs/finetune.py fields).
    c.teacher = ml_collections.ConfigDict()
    c.teacher.kind = "finetune"
    c.teacher.config = finetune.get_config(task)

    # 2. Students (experiments/configs/distill.py fields); teacher_dir is filled in from the source stage.
    c.transformer3 = ml_collections.ConfigDict()
    c.transformer3.kind = "distill"
    c.transformer3.source = "teacher"
    c.transformer3.config = distill.get_config(f"{task},transformer3")

    c.bilstm = ml_collections.ConfigDict()
    c.bilstm.kind = "distill"
    c.bilstm.source = "teacher"
    c.bilstm.config = distill.get_config(f"{task},bilstm")

    # The same students on gold labels only: the baseline each distillation figure is compared with
    # (listed in the sst2 profile's stages; the demo leaves them out to stay short).
    for student in ("transformer3", "bilstm"):
        c[f"{student}_nokd"] = ml_collections.ConfigDict()
        c[f"{student}_nokd"].kind = "distill"
        c[f"{student}_nokd"].source = "teacher"
        c[f"{student}_nokd"].config = distill.get_config(f"{task},{student}_nokd")

    c.theseus = ml_collections.ConfigDict()  # module replacement, 6 -> 3 layers (experiments/configs/theseus.py)
    c.theseus.kind = "theseus"
    c.theseus.source = "teacher"
    c.theseus.config = theseus.get_config(f"{task},linear")  # model_dir: filled in from the source stage

    # 3. Head pruning of the teacher to a dev-metric budget, then compaction (experiments/configs/prune.py).
    c.pruned = ml_collections.ConfigDict()
    c.pruned.kind = "prune"
    c.pruned.source = "teacher"
    c.pruned.config = prune.get_config(task)
    c.pruned.config.max_drop = 1.0  # largest dev-metric drop allowed, in points
    c.pruned.config.max_fraction = 0.5  # end of the curve

    # 4. Post-training int8 quantization of the teacher (experiments/configs/quantize.py).
    c.int8 = ml_collections.ConfigDict()
    c.int8.kind = "quantize"
    c.int8.source = "teacher"
    c.int8.config = quantize.get_config(task)

    # 5. ONNX export of the teacher and the students (experiments/configs/export.py); a source with a quantize
    # stage also gets its int8 Q/DQ file.
    c.onnx = ml_collections.ConfigDict()
    c.onnx.kind = "export"
    c.onnx.source = "teacher,transformer3,bilstm,theseus,pruned"
    c.onnx.config = export.get_config()
    c.onnx.config.precisions = "fp32,fp16"  # fp32 | fp16
    c.onnx.config.evaluate = True  # each file's dev metrics in onnxruntime: the report's ONNX rows
    c.onnx.config.data_dir = c.get_ref("data_dir")
    c.onnx.config.seed = c.get_ref("seed")
    c.onnx.config.synthetic_size = c.get_ref("synthetic_size")

    # Stages not in the default lists (add them with --config.stages=...): L0 gates on the teacher's heads and FFN
    # units with KD from it, then quantization-aware training of the pruned model (its int8 scales travel with
    # its model directory, so an export stage of it also writes int8 Q/DQ).
    c.l0 = ml_collections.ConfigDict()
    c.l0.kind = "l0"
    c.l0.source = "teacher"
    c.l0.config = l0.get_config(task)
    c.qat = ml_collections.ConfigDict()
    c.qat.kind = "qat"
    c.qat.source = "l0"
    c.qat.config = qat.get_config(task)

    c.report = ml_collections.ConfigDict()
    c.report.enabled = True  # write report.md/.html and plots at the end
    c.report.batch = 32  # throughput batch
    c.report.seq = 128  # throughput sequence length
    c.report.rounds = 5  # interleaved timing rounds

    stage_configs = [c.teacher.config, c.transformer3.config, c.bilstm.config, c.theseus.config,
                     c.transformer3_nokd.config, c.bilstm_nokd.config]
    # linked: --config.task=..., --config.data_dir=... reach every stage
    for sc in stage_configs + [c.l0.config, c.qat.config, c.pruned.config, c.int8.config]:
        sc.task = c.get_ref("task")
        sc.data_dir = c.get_ref("data_dir")
        sc.seed = c.get_ref("seed")
        sc.synthetic_size = c.get_ref("synthetic_size")
    if profile == "demo":
        minilm = finetune.minilm_dir()
        t = c.teacher.config
        if minilm:
            t.model_dir = minilm  # MiniLM fine-tuned briefly on the generated task
            t.optimizer.learning_rate = 1e-4
            c.theseus.config.optimizer.learning_rate = 1e-4  # pretrained layers: the from-scratch 2e-3 diverges
            t.num_train_steps = 120
            t.eval_every_steps = 60
            t.checkpoint.every_steps = 60
        else:  # the from-scratch teacher has 2 layers: 1-layer Transformer student and successor
            c.transformer3.config.student.num_layers = 1
            c.transformer3_nokd.config.student.num_layers = 1
            c.theseus.config.theseus.successor_layers = 1
        t.max_length = 32
        for sc in stage_configs[1:] + [c.l0.config, c.qat.config]:
            sc.max_length = 32
            sc.num_train_steps = 200
            sc.eval_every_steps = 100
            sc.checkpoint.every_steps = 100
            sc.log_every_steps = 20
        c.bilstm.config.augment.n_per_example = 1
        c.report.seq = 64
        c.report.rounds = 3
    return c


def tinybert_config() -> ml_collections.ConfigDict:
    """TinyBERT's two stages on SST-2: teacher, general distillation, task distillation into the general student."""
    c = ml_collections.ConfigDict()
    c.job = "recipe"  # experiments.main runs experiments.jobs.recipes.run_recipe
    c.task = "sst2"  # the task of the teacher and the task-distillation stage
    c.data_dir = finetune._optional_str(finetune.default_data_dir("sst2"))  # the task's data folder
    c.corpus = finetune._optional_str(None)  # raw text of the general distillation (one sentence or document a line)
    c.synthetic_size = 2000  # training examples of a generated task
    c.seed = 0  # data order and initialisation seed shared by the stages
    c.stages = "teacher,general,student"  # stage names in order (each has a section below)

    c.teacher = ml_collections.ConfigDict()  # 1. MiniLM fine-tuned on the task (experiments/configs/finetune.py)
    c.teacher.kind = "finetune"
    c.teacher.config = finetune.get_config("sst2")

    c.general = ml_collections.ConfigDict()  # 2. MiniLM distilled on raw text (experiments/configs/general_distill.py)
    c.general.kind = "general_distill"
    c.general.config = general_distill.get_config("tinybert")
    c.general.config.corpus = c.get_ref("corpus")
    c.general.config.seed = c.get_ref("seed")

    # 3. The task distilled from the teacher (first source) into the general student (second source):
    # experiments/configs/distill.py's TinyBERT student, its student.model_dir filled in from the general stage
    c.student = ml_collections.ConfigDict()
    c.student.kind = "distill"
    c.student.source = "teacher,general"
    c.student.config = distill.get_config("sst2,transformer3_tinybert")

    c.report = ml_collections.ConfigDict()
    c.report.enabled = True  # write report.md/.html and plots at the end (the teacher and the task student)
    c.report.batch = 32  # throughput batch
    c.report.seq = 128  # throughput sequence length
    c.report.rounds = 5  # interleaved timing rounds
    for sc in (c.teacher.config, c.student.config):
        sc.task = c.get_ref("task")
        sc.data_dir = c.get_ref("data_dir")
        sc.seed = c.get_ref("seed")
        sc.synthetic_size = c.get_ref("synthetic_size")
    return c


CONSTRAINTS = {}  # each stage's config is checked against its own job's schema (experiments/jobs/recipes.py)
