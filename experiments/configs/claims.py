"""The claims study: the seed papers' claims, each a set of arms (the technique and its baseline) times seeds.

Launch (one command regenerates every figure of ``docs/claims.md``; rerunning it resumes: finished runs are
skipped by their keys, an interrupted one resumes from its checkpoints, a changed arm reruns only its runs)::

    python -m experiments.main --config=experiments/configs/claims.py:cpu --workdir=runs/claims \\
        --config.data_root=../shared/data
    python -m experiments.main --config=experiments/configs/claims.py:cpu,hinton_3pct --workdir=runs/claims

The argument is ``BUDGET[,CLAIM+CLAIM...]``. Budgets:

* ``smoke``: generated tasks, tiny models, two seeds; runs in the test suite in about a minute and checks the
  machinery, not the papers;
* ``cpu``: the claims that can show on 2 CPU cores: a shared MiniLM teacher per task (SST-2: 700 steps, a third
  of an epoch; AG News: one epoch) and students of a few hundred steps, three seeds; several hours in all, run
  across sittings (the claims are run in the order listed, so the first ones finish first);
* ``paper``: the papers' epochs (teachers 3 epochs, students 3 epochs), for a TPU slice; not run yet.

A claim whose runs do not fit a budget is listed in the table as "not run at this budget" (and one whose
technique is not built yet says so), so the table always covers every claim of the seed.

Each run is a stage of :mod:`experiments.jobs.recipes` (``WORKDIR/<stage>/``); shared stages (a task's teacher,
an arm two claims compare) run once. Every run chooses its checkpoint on the selection split (whole training
sentences held out, :mod:`experiments.data.holdout`) and reports dev; :mod:`experiments.jobs.claims` writes
``WORKDIR/claims.md`` and ``claims.json`` (and ``config.publish``, e.g. ``docs/claims.md``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import ml_collections

from experiments.configs import distill, finetune, l0, prune, quantize, theseus

BUDGETS = ("smoke", "cpu", "paper")
VERDICT_RULES = ("better", "retain")


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of the seed and how it is tested.

    Attributes:
      name: the claim's id (``--config.claims``).
      paper: the paper it comes from.
      statement: what the paper claims, in its words' sense.
      figure: the paper's own figure.
      task: the task it is tested on (per budget: ``tasks[budget]``).
      treatment: the arm whose figure is tested; ``baseline``: the arm it is compared with (``"teacher"``:
        the task's teacher).
      rule: ``"better"``: treatment above baseline (holds when the 95% interval of the paired difference lies
        above 0); ``"retain"``: treatment >= ``ratio`` x baseline - ``tolerance`` points (holds when the mean
        paired margin is >= 0, contradicted when its whole interval is below 0).
      target: an extra numeric target of the study (e.g. ``{"min_gain": 2.0}`` points with the spread below the
        gap, ``{"max_gap": 3.0}`` points below the baseline), checked and reported beside the verdict.
      budgets: the budgets it runs at; ``missing``: what is not built yet (the claim is listed, not run).
      context: arms run and shown beside the compared two, outside the verdict.
    """

    name: str
    paper: str
    statement: str
    figure: str
    tasks: dict
    treatment: str
    baseline: str
    rule: str = "better"
    ratio: float = 1.0
    tolerance: float = 0.0
    target: dict = dataclasses.field(default_factory=dict)
    budgets: tuple[str, ...] = ("cpu", "paper")
    missing: str = ""
    context: tuple[str, ...] = ()  # arms shown beside the two compared (e.g. the few-label gold baseline)


SST2 = {"smoke": "synthetic", "cpu": "sst2", "paper": "sst2"}
AGNEWS = {"smoke": "synthetic", "cpu": "agnews", "paper": "agnews"}
WNUT = {"smoke": "synthetic_ner", "cpu": "wnut17", "paper": "wnut17"}
MRPC = {"smoke": "synthetic_pair", "cpu": "mrpc", "paper": "mrpc"}

CLAIMS = (
    Claim("hinton_3pct", "Hinton et al. 2015",
          "with soft targets, a model trained on 3% of the training data comes close to the full-data model",
          "speech: 3% of the data, 57.0% frame accuracy with soft targets vs 44.5% with hard targets (58.9% on all)",
          SST2, treatment="kd_3pct", baseline="gold_3pct", target={"min_gain": 2.0}, budgets=BUDGETS),
    Claim("xtremedistil_500", "Mukherjee & Awadallah 2020 (XtremeDistil)",
          "with unlabelled transfer data, about 500 labelled examples per class-task reach the teacher",
          "AG News: BiLSTM student with 500 labels + transfer data within about 1 point of the teacher",
          AGNEWS, treatment="kd_500_transfer", baseline="teacher", rule="retain", tolerance=3.0,
          target={"max_gap": 3.0}, budgets=BUDGETS, context=("gold_500",)),
    Claim("int8_ptq", "seed survey (Jacob et al. 2018; Wu et al. 2020)",
          "int8 post-training quantization with calibration is near-lossless",
          "BERT-class models lose under 1 point with int8 PTQ and good calibration",
          SST2, treatment="int8", baseline="teacher", rule="retain", tolerance=1.0, budgets=BUDGETS),
    Claim("head_pruning_30pct", "Michel et al. 2019",
          "20-40% of attention heads can be pruned with negligible loss",
          "BERT on MNLI: 40% of heads pruned, accuracy within about 1 point",
          SST2, treatment="heads_30pct", baseline="teacher", rule="retain", tolerance=1.0),
    Claim("distilbert_3layer", "Sanh et al. 2019 (DistilBERT)",
          "a student with half the layers keeps about 97% of the teacher's score",
          "97% of BERT-base on GLUE with 40% fewer parameters",
          SST2, treatment="kd_full", baseline="teacher", rule="retain", ratio=0.97, context=("gold_full",)),
    Claim("pkd_vs_kd", "Sun et al. 2019 (Patient KD)",
          "learning from intermediate layers (PKD) beats logit-only KD",
          "BERT6-PKD 92.0 vs BERT6-KD 91.5 on SST-2 (test)",
          SST2, treatment="pkd_full", baseline="kd_full"),
    Claim("mixed_precision", "Micikevicius et al. 2018",
          "mixed-precision training loses nothing against float32",
          "equal accuracy across vision, speech and language models",
          SST2, treatment="kd_full_bf16", baseline="kd_full", rule="retain", tolerance=0.5),
    Claim("tang_bilstm", "Tang et al. 2019",
          "a BiLSTM student with KD and data augmentation beats the same BiLSTM on gold labels",
          "SST-2: 90.7 with distillation vs 86.7 without (BiLSTM, 100x fewer parameters than BERT-large)",
          SST2, treatment="bilstm_kd", baseline="bilstm_gold"),
    Claim("theseus_linear", "Xu et al. 2020 (BERT-of-Theseus)",
          "a linear replacement curriculum beats a constant replacement rate",
          "GLUE dev average 82.7 (linear) vs 82.1 (constant)",
          SST2, treatment="theseus_linear", baseline="theseus_constant"),
    Claim("theseus_half_depth", "Xu et al. 2020 (BERT-of-Theseus)",
          "a half-depth model compressed by module replacement stays within about 1 point of the teacher",
          "6-layer Theseus: 98.4% of BERT-base on GLUE",
          SST2, treatment="theseus_linear", baseline="teacher", rule="retain", tolerance=1.0),
    Claim("cnn_lstm_ner", "Izsak et al. 2019",
          "a CNN-LSTM tagger distilled from a Transformer comes near the teacher on NER",
          "CoNLL-03 / OntoNotes: distilled tagger within 1-3 F1 of BERT",
          WNUT, treatment="tagger_kd", baseline="tagger_gold"),
    Claim("tinybert", "Jiao et al. 2020 (TinyBERT)",
          "TinyBERT's two-stage task distillation (intermediate layers, then the prediction layer) beats "
          "logit-only KD at equal student steps",
          "TinyBERT-4 keeps 96.8% of BERT-base on GLUE, above BERT4-KD and BERT4-PKD",
          SST2, treatment="tinybert_two_stage", baseline="kd_full", context=("gold_full",), budgets=BUDGETS),
    Claim("l0_ffn", "McCarley et al. 2019",
          "L0 gates remove about half of the FFN units with negligible loss, and KD recovers what pruning lost",
          "SQuAD: half of FFN activations removed, distillation recovers 1.5-2 F1",
          SST2, treatment="l0_ffn_kd", baseline="teacher", rule="retain", tolerance=1.0, budgets=("paper",),
          context=("l0_ffn_gold",)),
    Claim("multitask_teacher", "Liu et al. 2019 (MT-DNN distillation)",
          "a multi-task teacher helps an attentive student more than a single-task one",
          "MT-DNN ensemble distilled: GLUE +1 over single-task training",
          MRPC, treatment="student_of_multitask", baseline="student_of_single_task", budgets=("paper",),
          missing="a multi-task teacher as a claim's source stage (the arms share one single-task teacher today)"),
)
CLAIM_NAMES = tuple(c.name for c in CLAIMS)


# -- the runs --------------------------------------------------------------------------------------------

def _set(c: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    """``c`` with ``fields`` set (``a__b`` for ``a.b``)."""
    for key, value in fields.items():
        node = c
        *path, leaf = key.split("__")
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


def _data(c, data_root: str | None):
    """Points a stage config at its task's folder under ``data_root`` (generated tasks need none)."""
    folder = finetune.DATA_FOLDERS.get(c.task)
    if folder and data_root:
        c.data_dir = os.path.join(data_root, folder)
    return c


TINY = dict(max_length=16, synthetic_size=256, batch_size=16, eval_batch_size=32, log_every_steps=8,
            progress_bar="off")


def _tiny_run(c, steps: int):
    _set(c, **TINY, num_train_steps=steps, eval_every_steps=steps, checkpoint__every_steps=steps)
    return c


def teacher(task: str, budget: str) -> ml_collections.ConfigDict:
    """The task's shared teacher: MiniLM fine-tuned (a tiny Transformer from scratch at the smoke budget)."""
    if budget == "smoke":
        c = finetune.get_config("synthetic")
        c.task = task
        _set(c, model__hidden_size=32, model__num_layers=2, model__num_heads=2, model__intermediate_size=64)
        return _tiny_run(c, 48)
    c = finetune.get_config(task)
    c.parallelism = "shard_map"
    c.progress_bar = "off"
    if budget == "cpu" and task == "sst2":  # a third of an epoch: ~0.90 dev in about an hour on 2 cores
        _set(c, num_train_steps=700, eval_every_steps=350, checkpoint__every_steps=350)
    if budget == "paper":
        c.num_epochs = 3.0
    return c


def _student(task: str, student: str, budget: str, seed: int, **fields) -> ml_collections.ConfigDict:
    c = distill.get_config(f"{task},{student}")
    c.seed = seed
    if budget == "smoke":
        _tiny_run(c, 16)
        if student.startswith("transformer3"):
            c.student.num_layers = 1  # the smoke teacher has 2 layers
    else:
        c.parallelism = "shard_map"
        c.progress_bar = "off"
        if budget == "paper":
            c.num_train_steps = -1
            c.num_epochs = 3.0
    return _set(c, **fields)


def _fewer_labels(budget: str, examples: int) -> int:
    return 40 if budget == "smoke" else examples


# Each arm: (task, seed, budget) -> (job kind, config). The source is the task's teacher.
ARMS: dict[str, Callable] = {
    # Hinton's 3%: 1,800 of SST-2's 60,042 training rows (3.0%); 300 steps of 32 (5 passes over them)
    "gold_3pct": lambda task, seed, b: ("distill", _student(
        task, "transformer3_nokd", b, seed, labelled__examples=_fewer_labels(b, 1800),
        **({} if b == "smoke" else dict(num_train_steps=300, eval_every_steps=100, checkpoint__every_steps=100)))),
    "kd_3pct": lambda task, seed, b: ("distill", _student(
        task, "transformer3", b, seed, labelled__examples=_fewer_labels(b, 1800),
        **({} if b == "smoke" else dict(num_train_steps=300, eval_every_steps=100, checkpoint__every_steps=100)))),
    # XtremeDistil: 500 labels, the rest of train as teacher-labelled transfer text; equal steps for both
    "gold_500": lambda task, seed, b: ("distill", _student(
        task, "bilstm_nokd", b, seed, labelled__examples=_fewer_labels(b, 500),
        **({} if b == "smoke" else dict(num_train_steps=600, eval_every_steps=200, checkpoint__every_steps=200)))),
    "kd_500_transfer": lambda task, seed, b: ("distill", _student(
        task, "bilstm", b, seed, labelled__examples=_fewer_labels(b, 500), labelled__rest="transfer",
        **({} if b == "smoke" else dict(num_train_steps=600, eval_every_steps=200, checkpoint__every_steps=200)))),
    "int8": lambda task, seed, b: ("quantize", _set(quantize.get_config(task), seed=seed,
                                                    **(dict(synthetic_size=256, calibration_batches=2)
                                                       if b == "smoke" else {}))),
    "heads_30pct": lambda task, seed, b: ("prune", _set(prune.get_config(task), seed=seed, max_drop=100.0,
                                                        step=0.1, max_fraction=0.3,
                                                        **(dict(synthetic_size=256, importance_examples=64)
                                                           if b == "smoke" else dict(importance_examples=512)))),
    "kd_full": lambda task, seed, b: ("distill", _student(task, "transformer3", b, seed)),
    # TinyBERT's task distillation as its paper trains it: intermediate layers (embeddings, hidden states,
    # attention scores; live teacher) for half the steps, then the prediction layer from that student for the other
    # half; together the steps of kd_full (equal student steps; the teacher runs in every step of both)
    "tinybert_s1": lambda task, seed, b: ("distill", _half(_student(  # no head trained: export the last step
        task, "transformer3_tinybert", b, seed, distill__preset="tinybert_intermediate", export="last"), b)),
    "tinybert_two_stage": lambda task, seed, b: ("distill", _half(_student(
        task, "transformer3", b, seed, distill__preset="tinybert_prediction", distill__teacher="live"), b)),
    "gold_full": lambda task, seed, b: ("distill", _student(task, "transformer3_nokd", b, seed)),
    "pkd_full": lambda task, seed, b: ("distill", _student(task, "transformer3_pkd", b, seed)),
    "kd_full_bf16": lambda task, seed, b: ("distill", _student(task, "transformer3", b, seed, precision="bfloat16")),
    "bilstm_kd": lambda task, seed, b: ("distill", _student(task, "bilstm", b, seed)),
    "bilstm_gold": lambda task, seed, b: ("distill", _student(task, "bilstm_nokd", b, seed)),
    "theseus_linear": lambda task, seed, b: ("theseus", _theseus(task, "linear", b, seed)),
    "theseus_constant": lambda task, seed, b: ("theseus", _theseus(task, "constant", b, seed)),
    "l0_ffn_kd": lambda task, seed, b: ("l0", _set(l0.get_config(task), seed=seed, progress_bar="off")),
    "l0_ffn_gold": lambda task, seed, b: ("l0", _set(l0.get_config(f"{task},nokd"), seed=seed, progress_bar="off")),
    "tagger_kd": lambda task, seed, b: ("distill", _student(task, "cnn_lstm", b, seed)),
    "tagger_gold": lambda task, seed, b: ("distill", _student(task, "cnn_lstm_nokd", b, seed)),
}


# An arm whose runs start from another arm's run of the same seed (its second source, after the teacher).
STARTS_FROM = {"tinybert_two_stage": "tinybert_s1"}


def _half(c, budget: str):
    """Half of the run's steps (TinyBERT's two stages share one arm's budget)."""
    if c.num_train_steps > 0:
        c.num_train_steps = max(1, c.num_train_steps // 2)
        c.eval_every_steps = c.checkpoint.every_steps = c.num_train_steps
    else:
        c.num_epochs = c.num_epochs / 2
    return c


def _theseus(task: str, schedule: str, budget: str, seed: int) -> ml_collections.ConfigDict:
    c = theseus.get_config(f"{task},{schedule}")
    c.seed = seed
    if budget == "smoke":
        _tiny_run(c, 16)
        c.theseus.successor_layers = 1
    else:
        c.parallelism = "shard_map"
        c.progress_bar = "off"
    return c


def stage_name(arm: str, task: str, seed: int) -> str:
    return f"{task}_{arm}_s{seed}"


def teacher_stage(task: str) -> str:
    return f"{task}_teacher"


def arms_of(claim: Claim) -> tuple[str, ...]:
    """The arms a claim runs: treatment, baseline, then context arms (``"teacher"`` is the task's teacher)."""
    return (claim.treatment, claim.baseline, *claim.context)


def runs_of(claim: Claim, budget: str, seeds: int) -> dict[str, list[str]]:
    """``{arm: [stage name per seed]}`` of a claim (the teacher: its one stage)."""
    task = claim.tasks[budget]
    return {arm: [teacher_stage(task)] if arm == "teacher" else [stage_name(arm, task, s) for s in range(seeds)]
            for arm in arms_of(claim)}


def _stages_of(claim: Claim, budget: str, seeds: int) -> list[tuple[str, str | None, int | None]]:
    """``(stage, arm, seed)`` of every run a claim needs, in run order: the teacher (arm None), then per arm and
    seed the run it starts from (if any) and its own run."""
    task = claim.tasks[budget]
    wanted = [(teacher_stage(task), None, None)]
    for arm in arms_of(claim):
        for seed in range(seeds) if arm != "teacher" else ():
            if arm in STARTS_FROM:
                wanted.append((stage_name(STARTS_FROM[arm], task, seed), STARTS_FROM[arm], seed))
            wanted.append((stage_name(arm, task, seed), arm, seed))
    return wanted


def stages_of(claim: Claim, budget: str, seeds: int) -> list[str]:
    """The stage names of every run a claim needs, in run order (teacher first)."""
    return [name for name, _, _ in _stages_of(claim, budget, seeds)]


def add_runs(c: ml_collections.ConfigDict) -> list[str]:
    """Adds the stage sections of ``c.claims`` at ``c.budget`` with ``c.seeds`` seeds that ``c`` lacks (a section
    already there, e.g. overridden on the command line, is kept), points every run at ``c.data_root``, and
    returns the stage names in run order: each claim's teacher first, then its runs."""
    names = []
    for claim in claims_to_run(c):
        task = claim.tasks[c.budget]
        wanted = _stages_of(claim, c.budget, c.seeds)
        for name, arm, seed in wanted:
            if name not in c:
                if arm is None:
                    c[name] = ml_collections.ConfigDict({"kind": "finetune", "config": teacher(task, c.budget)})
                else:
                    kind, config = ARMS[arm](task, seed, c.budget)
                    sources = [teacher_stage(task)] + ([stage_name(STARTS_FROM[arm], task, seed)]
                                                       if arm in STARTS_FROM else [])
                    c[name] = ml_collections.ConfigDict({"kind": kind, "source": ",".join(sources),
                                                         "config": config})
            _data(c[name].config, c.data_root)
            if name not in names:
                names.append(name)
    return names


def claims_to_run(c) -> list[Claim]:
    """The claims ``c.claims`` names, checked: each must exist, fit ``c.budget`` and be built."""
    by_name = {claim.name: claim for claim in CLAIMS}
    out = []
    for name in (n.strip() for n in c.claims.split(",") if n.strip()):
        if name not in by_name:
            raise ValueError(f"config.claims: unknown claim {name!r}; known: {list(CLAIM_NAMES)}")
        claim = by_name[name]
        if claim.missing:
            raise ValueError(f"config.claims: {name!r} cannot run yet: not built: {claim.missing}")
        if c.budget not in claim.budgets:
            raise ValueError(f"config.claims: {name!r} does not run at the {c.budget!r} budget (only at "
                             f"{list(claim.budgets)})")
        out.append(claim)
    return out


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
    """``arg`` = ``BUDGET[,CLAIM+CLAIM...]``; see the module docstring."""
    budget, _, names = arg.partition(",")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r} for claims.py; allowed: {list(BUDGETS)}")
    wanted = [n for n in names.split("+") if n] or [c.name for c in CLAIMS if budget in c.budgets and not c.missing]
    c = ml_collections.ConfigDict()
    c.job = "claims"  # experiments/jobs/claims.py
    c.budget = budget  # smoke | cpu | paper: the run lengths and tasks (see the docstring)
    c.claims = ",".join(wanted)  # the claims to run, in order (the table lists every claim)
    c.seeds = 2 if budget == "smoke" else 3  # seeds per arm (0, 1, ...): the spread and the paired intervals
    # folder holding sst2/, agnews/, ... (../shared/data beside the checkout by default); every run reads its task
    # there. None: generated tasks only
    c.data_root = finetune._optional_str(finetune.default_data_root())
    c.publish = finetune._optional_str(None)  # also write the table here (e.g. docs/claims.md; its JSON beside it)
    c.task = "claims"  # the name the stage machinery records (the study's runs are recipe stages)
    # every run of the claims (stage sections: kind, source, config), overridable by name before the run, e.g.
    # --config.sst2_kd_3pct_s0.config.num_train_steps=400 (the job adds the runs of overridden claims/seeds)
    c.stages = ""  # filled by the job: the runs of config.claims, in order
    add_runs(c)
    return c


CONSTRAINTS = {"job": dict(choices=("claims",)), "budget": dict(choices=BUDGETS), "seeds": dict(min=1)}
