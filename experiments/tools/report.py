"""The compression report: every model of one or more runs, measured side by side.

For each model directory (a stage's ``model/``) the report gives the task metric (from the stage's
``results.json``), parameters, size on disk, FLOPs of one batch (XLA's cost analysis) and inference
throughput, measured in one process with the models' timed calls interleaved round by round (so machine
noise hits all of them alike), and the throughput ratio against the reference model (the teacher). It writes
``report.md``, ``report.html``, ``report.json`` and two PNG plots: metric vs throughput (Pareto front,
teacher marked) and metric vs size.

Command line, over the stage folders of one recipe workdir or several runs::

    python -m experiments.tools.report /tmp/recipe            # every stage folder with a model/ inside
    python -m experiments.tools.report /tmp/sst2 /tmp/d3 /tmp/bilstm --out_dir=/tmp/report --reference=/tmp/sst2

The run directories, ``--reference`` (one of them, or a stage folder's name inside one) and the numbers are
checked before any model is loaded. Nothing is cached: the measurement is the point, so every run times anew.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import models
from experiments.benchmarks import common
from experiments.runtime import trainer


@dataclasses.dataclass
class Entry:
    """One model in the report. ``metric`` is the stage's reported dev metric (None if it reported none)."""

    name: str
    run_dir: str
    model_dir: str
    family: str
    metric_name: str | None
    metric: float | None
    params: int
    size_mb: float
    variant: str = "float32"
    apply: Callable | None = None
    variables: dict | None = None
    tokens_per_s: float | None = None
    gflops: float | None = None
    ratio: float | None = None


def _dir_size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20


def _metric(results: dict, model_eval: dict | None = None) -> tuple[str | None, float | None]:
    """The stage's headline dev metric: the saved model's own (its metadata's ``eval``: measured after
    compaction or successor extraction), else the exported step's, else best, else final."""
    names = results.get("metric_names") or []
    for values in (model_eval or {}, *(results.get(s) or {} for s in ("exported", "best", "final"))):
        for name in list(names) + ["accuracy", "span_f1", "f1"]:
            if name in values:
                return name, float(values[name])
    return None, None


def _stage_dirs_without_model(run: str) -> list[str]:
    """Stage folders of a recipe workdir with results.json but no model/ (quantize, export)."""
    if os.path.isdir(os.path.join(run, "model")):
        return []
    return sorted(os.path.join(run, d) for d in os.listdir(run)
                  if os.path.isfile(os.path.join(run, d, "results.json"))
                  and not os.path.isdir(os.path.join(run, d, "model")))


def collect(run_dirs: list[str]) -> list[Entry]:
    """Entries for every ``run_dir`` that holds ``model/`` (or a recipe workdir's stage folders that do)."""
    entries = []
    for run in run_dirs:
        if os.path.isfile(os.path.join(run, "results.json")) and not os.path.isdir(os.path.join(run, "model")):
            entries.extend(collect_variants(run, json.load(open(os.path.join(run, "results.json")))))
            continue
        if not os.path.isdir(run):
            raise FileNotFoundError(f"{run} is not a directory")
        candidates = [run] if os.path.isdir(os.path.join(run, "model")) else sorted(
            os.path.join(run, d) for d in os.listdir(run) if os.path.isdir(os.path.join(run, d, "model")))
        if not candidates and not _stage_dirs_without_model(run):
            raise FileNotFoundError(f"{run} holds no model/ directory (nor stage folders with one)")
        for c in candidates:
            results_path = os.path.join(c, "results.json")
            results = json.load(open(results_path)) if os.path.exists(results_path) else {}
            model, cfg, params = models.load(os.path.join(c, "model"))
            name, value = _metric(results, models.read_meta(os.path.join(c, "model")).get("extra", {}).get("eval"))
            entries.append(Entry(os.path.basename(os.path.normpath(c)), c, os.path.join(c, "model"), cfg.family,
                                 name, value, common.param_count(params), _dir_size_mb(os.path.join(c, "model")),
                                 apply=model.apply, variables={"params": params}))
        for c in _stage_dirs_without_model(run):
            entries.extend(collect_variants(c, json.load(open(os.path.join(c, "results.json")))))
    return entries


def collect_variants(run_dir: str, results: dict) -> list[Entry]:
    """Rows a stage reports for a model it did not save anew: the quantize stage's real int8 execution of
    its source model (``results["variants"]``, with the saved ``quant`` collection)."""
    from compression import quantization as q
    from experiments.techniques import qat

    out = []
    for v in results.get("variants", []):
        if v.get("kind") != "int8":
            continue
        model, cfg, params = models.load(v["source_model"])
        variables = {"params": params, q.QUANT: qat.load_quant_state(os.path.join(run_dir, v["quant_state"]))}
        sample = _sample_batch(cfg.family, cfg, 2, 16)
        v8 = q.int8_variables(model.apply, variables, sample, inputs=tuple(sample))
        size = sum(x.nbytes for x in jax.tree.leaves(v8)) / 2 ** 20
        out.append(Entry(os.path.basename(os.path.normpath(run_dir)), run_dir, v["source_model"], cfg.family,
                         v.get("metric_name"), v.get("metric"), common.param_count(params), size, variant="int8",
                         apply=q.int8().wrap(model.apply), variables=v8))
    return out


def _sample_batch(family: str, cfg, batch: int, seq: int) -> dict:
    """A generated batch of the inputs a model of ``family`` reads (token ids within its vocabulary)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, max(cfg.vocab_size - 1, 2), (batch, seq)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    if family == "transformer":
        return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(ones),
                "token_type_ids": jnp.zeros_like(jnp.asarray(ids))}
    if family == "cnn_lstm":
        chars = rng.integers(1, max(cfg.char_vocab_size - 1, 2), (batch, seq, cfg.max_chars_per_token))
        chars = chars.astype(np.int32)
        return {"word_ids": jnp.asarray(ids), "char_ids": jnp.asarray(chars), "word_mask": jnp.asarray(ones)}
    out = {"word_ids": jnp.asarray(ids), "word_mask": jnp.asarray(ones)}
    if getattr(cfg, "pair", False):
        out.update(word_ids_b=jnp.asarray(ids), word_mask_b=jnp.asarray(ones))
    return out


def measure(entries: list[Entry], *, batch: int = 32, seq: int = 128, rounds: int = 5) -> None:
    """Fills ``tokens_per_s`` and ``gflops`` of every entry: one process, interleaved rounds."""
    fns = {}
    for e in entries:
        cfg = models.io.config_class(e.family).from_dict(models.read_meta(e.model_dir)["config"])
        data = _sample_batch(e.family, cfg, batch, seq)
        fwd = jax.jit(lambda v, d, e=e: trainer.model_outputs(e.apply, v["params"],
                                                              {k: x for k, x in v.items() if k != "params"}, d,
                                                              train=False).logits)
        fns[e.name] = (lambda f=fwd, v=e.variables, d=data: f(v, d))
        try:
            e.gflops = common.compiled_flops(lambda v, d, f=fwd: f(v, d), e.variables, data) / 1e9
        except Exception as err:  # cost analysis is best effort (some backends return none)
            logging.warning("no FLOP count for %s: %s", e.name, err)
    times = common.time_interleaved(fns, rounds=rounds, warmup=1)
    for e in entries:
        e.tokens_per_s = batch * seq / common.median(times[e.name])


def pareto(entries: list[Entry]) -> set[str]:
    """Names of entries no other entry beats on both metric and throughput."""
    pts = [e for e in entries if e.metric is not None and e.tokens_per_s]
    front = set()
    for e in pts:
        if not any((o.metric >= e.metric and o.tokens_per_s >= e.tokens_per_s) and
                   (o.metric > e.metric or o.tokens_per_s > e.tokens_per_s) for o in pts):
            front.add(e.name)
    return front


def _plots(entries: list[Entry], reference: Entry, out_dir: str, front: set[str]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [e for e in entries if e.metric is not None]
    paths = []
    for x_of, xlabel, fname in ((lambda e: e.tokens_per_s, "inference tokens/s (higher is faster)",
                                 "metric_vs_throughput.png"),
                                (lambda e: e.size_mb, "size on disk (MB)", "metric_vs_size.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for e in pts:
            teacher = e is reference
            ax.scatter(x_of(e), e.metric, s=80 if teacher else 40, marker="*" if teacher else "o",
                       color="crimson" if teacher else ("tab:blue" if e.name in front else "gray"), zorder=3)
            ax.annotate(e.name + (" (teacher)" if teacher else ""), (x_of(e), e.metric), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        if fname.startswith("metric_vs_throughput") and front:
            f = sorted((e for e in pts if e.name in front), key=lambda e: e.tokens_per_s)
            ax.plot([e.tokens_per_s for e in f], [e.metric for e in f], "--", color="tab:blue", label="Pareto front")
            ax.legend(loc="lower left", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(pts[0].metric_name if pts else "metric")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


COLUMNS = ("model", "family", "variant", "metric", "vs teacher", "params", "size MB", "GFLOPs", "tokens/s",
           "speed vs teacher")


def _rows(entries: list[Entry], reference: Entry) -> list[list[str]]:
    rows = []
    for e in entries:
        rel = (f"{100 * e.metric / reference.metric:.1f}%" if e.metric is not None and reference.metric else "-")
        rows.append([e.name, e.family, e.variant,
                     "-" if e.metric is None else f"{e.metric_name} {e.metric:.4f}", rel, f"{e.params:,}",
                     f"{e.size_mb:.1f}", "-" if e.gflops is None else f"{e.gflops:.2f}",
                     "-" if e.tokens_per_s is None else f"{e.tokens_per_s:,.0f}",
                     "-" if e.ratio is None else f"{e.ratio:.2f}x"])
    return rows


def write_report(entries: list[Entry], reference: Entry, out_dir: str, *, batch: int, seq: int,
                 title: str = "Compression report") -> dict:
    """Writes report.md/.html/.json and the plots into ``out_dir``; returns the JSON payload."""
    os.makedirs(out_dir, exist_ok=True)
    for e in entries:
        e.ratio = e.tokens_per_s / reference.tokens_per_s if e.tokens_per_s and reference.tokens_per_s else None
    front = pareto(entries)
    plots = _plots(entries, reference, out_dir, front)
    rows = _rows(entries, reference)
    note = (f"Throughput: inference at batch {batch} x seq {seq}, all models timed in one process with interleaved "
            f"rounds (median), on {common.environment()['device']} ({jax.default_backend()}). Reference: "
            f"{reference.name}. Pareto front (metric vs throughput): {', '.join(sorted(front)) or '-'}.")
    md = [f"# {title}", "", note, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md))
    cells = lambda r, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in r)  # noqa: E731
    page = (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(note)}</p><table><tr>{cells(COLUMNS, 'th')}</tr>"
            + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</table>"
            + "".join(f"<p><img src='{os.path.basename(p)}'></p>" for p in plots) + "</body></html>")
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(page)
    payload = {"reference": reference.name, "batch": batch, "seq": seq, "pareto": sorted(front),
               "environment": common.environment(),
               "models": [{k: v for k, v in dataclasses.asdict(e).items() if k not in ("apply", "variables")}
                          for e in entries]}
    common.write_json(os.path.join(out_dir, "report.json"), payload)
    print("\n".join(md[:len(rows) + 6]))
    return payload


def build_report(run_dirs: list[str], out_dir: str, *, reference: str | None = None, batch: int = 32,
                 seq: int = 128, rounds: int = 5, title: str = "Compression report") -> dict:
    """Collects, measures and writes the report; ``reference`` names a run dir or entry (default: the first)."""
    entries = collect(run_dirs)
    ref = entries[0]
    if reference:
        matches = [e for e in entries if reference in (e.name, e.run_dir, os.path.normpath(e.run_dir))]
        if not matches:
            raise ValueError(f"reference {reference!r} is none of {[e.name for e in entries]}")
        ref = matches[0]
    measure(entries, batch=batch, seq=seq, rounds=rounds)
    return write_report(entries, ref, out_dir, batch=batch, seq=seq, title=title)


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Command-line flags (defined only when run as a script, so that importing defines none)."""
    flags.DEFINE_string("out_dir", None, "where the report goes (default: the first run directory)", flag_values=fv)
    flags.DEFINE_string("reference", None, "the reference (teacher) run directory or stage name (default: first)",
                        flag_values=fv)
    flags.DEFINE_integer("batch", 32, "inference batch for throughput", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seq", 128, "sequence length for throughput", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("rounds", 5, "interleaved timing rounds", lower_bound=1, flag_values=fv)


def check_runs(runs: list[str], reference: str | None) -> None:
    """Raises ``app.UsageError`` unless every run is a directory and ``reference`` is one of them or a stage
    folder inside one (listing folders only: no model is read)."""
    if not runs:
        raise app.UsageError("give one or more run directories (or a recipe workdir)")
    missing = [r for r in runs if not os.path.isdir(r)]
    if missing:
        raise app.UsageError(f"run directories {missing} do not exist")
    if reference is None:
        return
    names = {os.path.normpath(r) for r in runs} | {os.path.basename(os.path.normpath(r)) for r in runs}
    names |= {d for r in runs for d in os.listdir(r) if os.path.isdir(os.path.join(r, d))}
    if reference not in names and os.path.normpath(reference) not in names:
        raise app.UsageError(f"--reference={reference} is neither a run directory given nor a stage folder in one")


def run(fv: flags.FlagValues, runs: list[str]) -> dict:
    """The command line's work on parsed flags ``fv`` (:func:`define_flags`) and run directories ``runs``."""
    check_runs(runs, fv.reference)
    out = fv.out_dir or runs[0]
    payload = build_report(runs, out, reference=fv.reference, batch=fv.batch, seq=fv.seq, rounds=fv.rounds)
    print(f"report: {os.path.join(out, 'report.md')} and report.html")
    return payload


def main(argv):
    run(FLAGS, argv[1:])


if __name__ == "__main__":
    define_flags()
    app.run(main)
