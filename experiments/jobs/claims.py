"""The claims study job (``config.job = "claims"``): run each claim's arms times seeds, then write the table.

The study's runs are recipe stages (:func:`experiments.jobs.recipes.run_stages`) in one workdir: each claim's
teacher, then its arms, claim by claim, in ``config.claims`` order; a run shared by two claims runs once;
finished runs are skipped by their keys (a changed arm reruns only its runs) and an interrupted one resumes from
its checkpoints. After each claim the table is written again (``WORKDIR/claims.md`` and ``claims.json``, and
``config.publish``), over every claim of the seed (:data:`experiments.configs.claims.CLAIMS`): a run counts only
if the key it recorded is the key of its current definition.

Statistics, per claim (figures in points of the task's headline metric on dev):

* each arm: the mean and the sample standard deviation over seeds;
* the paired margin per seed ``d = treatment - ratio x baseline + tolerance`` (the baseline of seed s is the same
  seed's run; a teacher baseline is the one teacher), its mean and a 95% Student-t interval over seeds;
* the verdict: ``better`` claims hold when the interval lies above 0, ``retain`` claims when the mean margin is
  >= 0; either is contradicted when the whole interval lies below 0, and not shown otherwise (one seed gives no
  interval: a ``better`` claim is then not shown).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import time

import numpy as np
from absl import logging
from scipy import stats

from experiments.configs import claims as catalogue
from experiments.jobs import recipes
from experiments.runtime import observe
from models import storage

TABLE, JSON = "claims.md", "claims.json"


# -- statistics ------------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    """``{"n", "mean", "sd"}`` of ``values`` (sd: sample standard deviation, None for one value)."""
    n = len(values)
    return {"n": n, "mean": float(np.mean(values)) if n else None,
            "sd": float(np.std(values, ddof=1)) if n > 1 else None}


def interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The Student-t confidence interval of the mean of ``values`` (None for fewer than two)."""
    n = len(values)
    if n < 2:
        return None
    half = stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
    mean = float(np.mean(values))
    return mean - half, mean + half


def verdict(rule: str, margins: list[float]) -> str:
    """``"holds"``, ``"contradicted"`` or ``"not shown"`` from the paired margins (see the module docstring)."""
    if not margins:
        return "not run"
    ci = interval(margins)
    if ci is not None and ci[1] < 0:
        return "contradicted"
    if rule == "better":
        return "holds" if ci is not None and ci[0] > 0 else "not shown"
    return "holds" if np.mean(margins) >= 0 else "not shown"


def check_target(target: dict, differences: list[float]) -> dict | None:
    """The study's numeric target for a claim against the paired differences (treatment - baseline, points):
    ``min_gain``: mean gain at least that, with the spread (sd) below the mean gain; ``max_gap``: mean shortfall
    at most that."""
    if not target or not differences:
        return None
    mean, sd = float(np.mean(differences)), (float(np.std(differences, ddof=1)) if len(differences) > 1 else None)
    if "min_gain" in target:
        met = mean >= target["min_gain"] and sd is not None and sd < mean
        text = f"gain >= {target['min_gain']:g} points with sd below it: {mean:+.2f} (sd {_fmt(sd)})"
    else:
        met = -mean <= target["max_gap"]
        text = f"gap <= {target['max_gap']:g} points: {-mean:.2f}"
    return {"target": target, "met": bool(met), "text": text}


# -- reading the runs ------------------------------------------------------------------------------------

def reported(results: dict, metric: str) -> float | None:
    """The dev figure a run reports for ``metric``: the exported step's (training jobs: the best or the last
    evaluation, whichever was exported), else ``final`` (prune, quantize)."""
    if "exported_step" in results:
        best = results.get("best") or {}
        chosen = best if best.get("step") == results["exported_step"] else results.get("final") or {}
    else:
        chosen = results.get("final") or {}
    value = chosen.get(metric)
    return None if value is None else float(value)


def _run_record(workdir: str, name: str, key: str, metric: str, seed: int | None) -> dict | None:
    """A finished run whose recorded key is ``key``: its figure, steps, selection and hardware (else None)."""
    stage_dir = os.path.join(workdir, name)
    results = recipes.read_results(stage_dir)
    if results is None or recipes.recorded_key(stage_dir) != key:
        return None
    stage = json.loads(storage.read_text(os.path.join(stage_dir, recipes.STAGE_FILE)))
    return {"run": name, "seed": seed, "value": reported(results, metric), "steps": results.get("steps"),
            "selection": results.get("selection"), "hardware": stage.get("hardware"),
            "finished": stage.get("finished")}


def _full_config(config):
    """Every claim of ``config.budget`` with ``config``'s seeds, data root and overridden runs: the definitions
    the runs on disk are checked against."""
    full = catalogue.get_config(config.budget)
    with full.unlocked():
        full.seeds, full.data_root = config.seeds, config.data_root
        full.claims = ",".join(c.name for c in catalogue.CLAIMS if config.budget in c.budgets and not c.missing)
        for name in config:
            if isinstance(config[name], type(config)) and "kind" in config[name]:
                full[name] = copy.deepcopy(config[name])
        full.stages = ",".join(catalogue.add_runs(full))
    return full


def claim_table(config, workdir: str) -> dict:
    """The study's table as a dict (``claims.json``): every claim, its arms' runs found in ``workdir``, the
    statistics and verdicts."""
    full = _full_config(config)
    names = recipes.check_recipe(full, workdir)
    keys = recipes.stage_keys(full, names, workdir)
    rows = []
    for claim in catalogue.CLAIMS:
        row = {"claim": claim.name, "paper": claim.paper, "statement": claim.statement, "figure": claim.figure,
               "rule": claim.rule, "ratio": claim.ratio, "tolerance": claim.tolerance}
        if claim.missing:
            rows.append({**row, "verdict": f"not built yet: {claim.missing}"})
            continue
        if config.budget not in claim.budgets:
            rows.append({**row, "verdict": f"not run at the {config.budget} budget (runs at "
                                          f"{', '.join(claim.budgets)})"})
            continue
        task = claim.tasks[config.budget]
        metric = "span_f1" if task in ("wikiann", "wnut17", "synthetic_ner") else "accuracy"
        arms = {}
        for arm, runs in catalogue.runs_of(claim, config.budget, config.seeds).items():
            seeds = [None] if arm == "teacher" else range(len(runs))
            found = [r for r in (_run_record(workdir, n, keys[n], metric, s) for n, s in zip(runs, seeds))
                     if r is not None]
            values = [100 * r["value"] for r in found if r["value"] is not None]
            arms[arm] = {"runs": found, "expected": len(runs), "run_names": runs, **spread(values)}
        margins, differences = _paired(claim, arms)
        ci = interval(margins)
        row.update(task=task, metric=metric, arms=arms, margins=margins,
                   margin_mean=float(np.mean(margins)) if margins else None,
                   margin_interval=None if ci is None else list(ci),
                   difference_mean=float(np.mean(differences)) if differences else None,
                   verdict=verdict(claim.rule, margins), target=check_target(claim.target, differences),
                   complete=all(len(a["runs"]) == a["expected"] for a in arms.values()))
        rows.append(row)
    return {"budget": config.budget, "seeds": config.seeds, "rows": rows, "commit": _commit(),
            "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _by_seed(arm: dict) -> dict[int, float]:
    """``{seed: figure in points}`` of an arm's runs (the teacher: seed ``None``, one run)."""
    return {r["seed"]: 100 * r["value"] for r in arm["runs"] if r["value"] is not None}


def _paired(claim, arms: dict) -> tuple[list[float], list[float]]:
    """Per seed present in both arms: the margin ``t - ratio b + tolerance`` and the difference ``t - b``."""
    treat, base = _by_seed(arms[claim.treatment]), _by_seed(arms[claim.baseline])
    if claim.baseline == "teacher" and None in base:
        base = {seed: base[None] for seed in treat}
    if claim.treatment == "teacher" and None in treat:
        treat = {seed: treat[None] for seed in base}
    seeds = sorted(set(treat) & set(base), key=lambda s: (s is None, s))
    margins = [treat[s] - claim.ratio * base[s] + claim.tolerance for s in seeds]
    return margins, [treat[s] - base[s] for s in seeds]


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- the table as text -----------------------------------------------------------------------------------

def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _rule_text(row: dict) -> str:
    if row["rule"] == "better":
        return "treatment above baseline (95% interval of the paired difference above 0)"
    parts = [f"{row['ratio']:g} x baseline" if row["ratio"] != 1 else "baseline"]
    if row["tolerance"]:
        parts.append(f"- {row['tolerance']:g} points")
    return f"treatment >= {' '.join(parts)} (mean paired margin >= 0)"


def _selection_text(runs: list[dict]) -> str:
    if not runs:
        return "no run finished yet"
    chosen = [r["selection"] for r in runs if r.get("selection")]
    if not chosen:
        return "no choice made (fixed settings)"
    s = chosen[0]
    if s.get("split") != "holdout":
        return f"{s.get('split')} ({s.get('examples')} examples)"
    return (f"held-out whole training texts ({s['examples']} of {s.get('candidates', '?')} candidates; "
            f"{s.get('left_out', '?')} rows sharing their text left out of training)")


def _hardware_text(runs: list[dict]) -> str:
    seen = []
    for r in runs:
        h = r.get("hardware") or {}
        text = f"{h.get('cpu_model') or h.get('device', '?')}, {h.get('threads', '?')} threads, JAX {h.get('jax', '?')}"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) or "-"


def render(table: dict, command: str) -> str:
    """``claims.md``: a summary table, then one section per claim with every arm's runs."""
    lines = [
        "# The seed's claims, measured",
        "",
        f"Generated by `{command}` (commit {table['commit']}, {table['written']}); budget `{table['budget']}`, "
        f"{table['seeds']} seeds per arm. Every figure is the task's dev metric in points; every choice a run made "
        "(its best checkpoint, a pruning point) was made on the selection split named in its section, never on dev. "
        "Verdict rules: a claim that one arm is *better* holds when the 95% Student-t interval of the paired "
        "difference over seeds lies above 0; a claim that an arm *retains* the baseline holds when the mean paired "
        "margin (treatment - ratio x baseline + tolerance) is >= 0; either is contradicted when the whole interval "
        "lies below 0, and not shown otherwise.",
        "",
        f"Runs finished: {_runs_done(table)}.",
        "",
        "| claim | paper | task | treatment | baseline | difference | margin [95% interval] | verdict | study target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        if "arms" not in row:
            lines.append(f"| {row['claim']} | {row['paper']} | - | - | - | - | - | {row['verdict']} | - |")
            continue
        t, b = row["arms"][_treatment(row)], row["arms"][_baseline(row)]
        ci = row["margin_interval"]
        done = "" if row["complete"] else " (partial)"
        target = row["target"]
        lines.append(
            f"| {row['claim']} | {row['paper']} | {row['task']} | {_treatment(row)} {_fmt(t['mean'])} | "
            f"{_baseline(row)} {_fmt(b['mean'])} | {_fmt(row['difference_mean'])} | {_fmt(row['margin_mean'])} "
            f"[{_fmt(ci[0]) if ci else '-'}, {_fmt(ci[1]) if ci else '-'}] | {row['verdict']}{done} | "
            f"{'-' if not target else ('met' if target['met'] else 'missed') + ': ' + target['text']} |")
    for row in table["rows"]:
        if "arms" not in row:
            continue
        runs = [r for a in row["arms"].values() for r in a["runs"]]
        lines += ["", f"## {row['claim']}", "",
                  f"- Claim ({row['paper']}): {row['statement']}. The paper's figure: {row['figure']}.",
                  f"- Tested as: {_rule_text(row)}; metric `{row['metric']}` on `{row['task']}` dev.",
                  f"- Chosen on: {_selection_text(runs)}. Reported on: dev.",
                  f"- Hardware: {_hardware_text(runs)}.",
                  "", "| arm | runs | per seed | mean | sd | steps |", "|---|---|---|---|---|---|"]
        for arm, a in row["arms"].items():
            per_seed = " / ".join(_fmt(100 * r["value"]) for r in a["runs"] if r["value"] is not None) or "-"
            steps = sorted({r["steps"] for r in a["runs"] if r.get("steps") is not None})
            role = {_treatment(row): " (treatment)", _baseline(row): " (baseline)"}.get(arm, " (context)")
            lines.append(f"| {arm}{role} | {len(a['runs'])}/{a['expected']} | {per_seed} | {_fmt(a['mean'])} | "
                         f"{_fmt(a['sd'])} | {', '.join(map(str, steps)) or '-'} |")
    return "\n".join(lines) + "\n"


def _runs_done(table: dict) -> str:
    """``"N of M"`` distinct runs of the table's claims finished (a run two claims share counts once)."""
    done, expected = set(), set()
    for row in table["rows"]:
        for a in row.get("arms", {}).values():
            done |= {r["run"] for r in a["runs"]}
            expected |= set(a["run_names"])
    return f"{len(done)} of {len(expected)}"


def _treatment(row) -> str:
    return next(c.treatment for c in catalogue.CLAIMS if c.name == row["claim"])


def _baseline(row) -> str:
    return next(c.baseline for c in catalogue.CLAIMS if c.name == row["claim"])


def write_table(config, workdir: str, command: str) -> dict:
    """Writes ``claims.md`` and ``claims.json`` into ``workdir`` (and ``config.publish``); returns the table."""
    table = claim_table(config, workdir)
    text = render(table, command)
    for path in [os.path.join(workdir, TABLE)] + ([config.publish] if config.publish else []):
        publish(text, table, path)
    return table


def publish(text: str, table: dict, path: str) -> None:
    """Writes the table's text to ``path`` and its JSON beside it (``.json``)."""
    storage.write_text(path, text)
    observe.write_json(os.path.splitext(path)[0] + ".json", table)
    logging.info("claims table: %s", path)


def run_claims(config, workdir: str) -> dict:
    """Runs ``config.claims`` claim by claim (their unfinished runs), writing the table after each; returns it."""
    workdir = storage.absolute(workdir)
    config = copy.deepcopy(config)
    with config.unlocked():
        names = catalogue.add_runs(config)
        config.stages = ",".join(names)
    recipes.check_recipe(config, workdir)  # every run fits before any runs
    default = catalogue.get_config(config.budget).claims
    arg = config.budget + ("" if config.claims == default else "," + config.claims.replace(",", "+"))
    command = (f"python -m experiments.main --config=experiments/configs/claims.py:{arg} --workdir=WORKDIR "
               f"--config.seeds={config.seeds}")
    table = None
    for claim in catalogue.claims_to_run(config):
        wanted = set(catalogue.stages_of(claim, config.budget, config.seeds))
        stages = [n for n in names if n in wanted]
        logging.info("claim %s: %d runs (%s)", claim.name, len(stages), ", ".join(stages))
        recipes.run_stages(config, workdir, stages)
        if observe.is_writer():
            table = write_table(config, workdir, command)
    return table or {}
