"""The compression report: every model of one or more runs, measured side by side.

For each model directory (a stage's ``model/``) the report gives the task's dev metric (from the stage's
``results.json``) and where the stage made its choices (``chosen on``: the held-out selection split or dev),
parameters, size on disk, FLOPs of one batch (XLA's cost analysis) and inference
throughput, measured in one process with the models' timed calls interleaved round by round (so machine
noise hits all of them alike), and the throughput ratio against the reference model (the teacher). It writes
``report.md``, ``report.html``, ``report.json`` and two PNG plots: metric vs throughput (Pareto front,
teacher marked) and metric vs size.

Command line, over the stage folders of one recipe workdir or several runs::

    python -m experiments.tools.report /tmp/recipe            # every stage folder with a model/ inside
    python -m experiments.tools.report /tmp/sst2 /tmp/d3 /tmp/bilstm --out_dir=/tmp/report --reference=/tmp/sst2

The run directories, ``--reference`` (one of them, or a stage folder's name inside one) and the numbers are
checked before any model is loaded. Nothing is cached: the measurement is the point, so every run times anew.
Run directories and ``--out_dir`` may be local or in a bucket (``gs://``, :mod:`models.storage`).
"""

from __future__ import annotations

import base64
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
from experiments.runtime import measuring
from experiments.runtime import hardware, trainer
from models import storage


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
    chosen_on: str = "-"  # where the run chose what it reports (best step, pruning point): "holdout (N)" / "dev"
    runtime: str = "jax"  # "jax" (XLA) or "onnxruntime" (an exported file, ``onnx_path``)
    onnx_path: str | None = None
    apply: Callable | None = None
    variables: dict | None = None
    tokens_per_s: float | None = None  # at the report's batch x seq
    latency_ms: float | None = None  # one call at the report's batch x seq
    latency_b1_ms: float | None = None  # one call at batch 1 x seq
    gflops: float | None = None
    ratio: float | None = None


def _tree_bytes(path) -> int:
    """Bytes of the files under directory ``path`` (local or remote)."""
    return sum(_tree_bytes(c) if c.is_dir() else storage.size(c) for c in storage.as_path(path).iterdir())


def _dir_size_mb(path: str) -> float:
    return _tree_bytes(path) / 2 ** 20


def _metric(results: dict, model_eval: dict | None = None) -> tuple[str | None, float | None]:
    """The stage's headline dev metric: the saved model's own (its metadata's ``eval``: measured after
    compaction or successor extraction), else the exported step's, else best, else final."""
    names = results.get("metric_names") or []
    for values in (model_eval or {}, *(results.get(s) or {} for s in ("exported", "best", "final"))):
        for name in list(names) + ["accuracy", "span_f1", "f1"]:
            if name in values:
                return name, float(values[name])
    return None, None


def _chosen_on(results: dict, model_extra: dict) -> str:
    """Where the stage made its choices (:mod:`experiments.runtime.selection`): "holdout (N)", "dev" or "-"."""
    record = results.get("selection") or model_extra.get("selection")
    if not record or "split" not in record:
        return "-"
    return f"holdout ({record['examples']})" if record["split"] == "holdout" else record["split"]


def _stage_dirs_without_model(run: str) -> list[str]:
    """Stage folders of a recipe workdir with results.json but no model/ (quantize, export)."""
    if storage.is_dir(os.path.join(run, "model")):
        return []
    return sorted(os.path.join(run, d) for d in storage.listdir(run)
                  if storage.is_file(os.path.join(run, d, "results.json"))
                  and not storage.is_dir(os.path.join(run, d, "model")))


def collect(run_dirs: list[str]) -> list[Entry]:
    """Entries for every ``run_dir`` that holds ``model/`` (or a recipe workdir's stage folders that do)."""
    entries = []
    for run in run_dirs:
        if storage.is_file(os.path.join(run, "results.json")) and not storage.is_dir(os.path.join(run, "model")):
            entries.extend(_stage_rows(run))
            continue
        if not storage.is_dir(run):
            raise FileNotFoundError(f"{run} is not a directory")
        candidates = [run] if storage.is_dir(os.path.join(run, "model")) else sorted(
            os.path.join(run, d) for d in storage.listdir(run) if storage.is_dir(os.path.join(run, d, "model")))
        if not candidates and not _stage_dirs_without_model(run):
            raise FileNotFoundError(f"{run} holds no model/ directory (nor stage folders with one)")
        for c in candidates:
            results_path, model_dir = os.path.join(c, "results.json"), os.path.join(c, "model")
            results = json.loads(storage.read_text(results_path)) if storage.exists(results_path) else {}
            model, cfg, params = models.load(model_dir)
            if getattr(cfg, "head", None) in ("none", "mlm"):  # a pretrained body has no task figure to report
                logging.info("report: %s has no task head (a general-distillation student): no row", model_dir)
                continue
            extra = models.read_meta(model_dir).get("extra", {})
            name, value = _metric(results, extra.get("eval"))
            entries.append(Entry(os.path.basename(os.path.normpath(c)), c, model_dir, cfg.family,
                                 name, value, measuring.param_count(params), _dir_size_mb(model_dir),
                                 chosen_on=_chosen_on(results, extra), apply=model.apply,
                                 variables={"params": params}))
        for c in _stage_dirs_without_model(run):
            entries.extend(_stage_rows(c))
    return _unique_names(entries)


def _unique_names(entries: list[Entry]) -> list[Entry]:
    """Entries whose names collide (runs with the same folder name) get their parent folder as a prefix."""
    counts = {}
    for e in entries:
        counts[e.name] = counts.get(e.name, 0) + 1
    for e in entries:
        if counts[e.name] > 1:
            e.name = f"{os.path.basename(os.path.dirname(os.path.normpath(e.run_dir)))}/{e.name}"
    seen = [e.name for e in entries]
    if len(set(seen)) != len(seen):
        raise ValueError(f"report rows with the same name: {sorted(n for n in seen if seen.count(n) > 1)}")
    return entries


def _stage_rows(stage_dir: str) -> list[Entry]:
    """The rows of a stage that saved no model: int8 variants (quantize) and ONNX files (export)."""
    results = json.loads(storage.read_text(os.path.join(stage_dir, "results.json")))
    return collect_variants(stage_dir, results) + collect_onnx(stage_dir, results)


def collect_onnx(run_dir: str, results: dict) -> list[Entry]:
    """Rows of an export stage (``results["models"]``): every ONNX file, with the task metric it scored in
    onnxruntime on dev (``config.evaluate``; None otherwise) and its size on disk."""
    out = []
    for name, record in results.get("models", {}).items():
        meta = models.read_meta(record["model_dir"])
        cfg = models.io.config_class(meta["family"]).from_dict(meta["config"])
        params = measuring.param_count(models.load(record["model_dir"])[2])
        for file, info in sorted(record["files"].items()):
            metric_name, metric = _metric({"metric_names": meta.get("extra", {}).get("metric_names", [])},
                                          info.get("metrics"))
            path = os.path.join(run_dir, name, file)
            out.append(Entry(f"{name} (onnx {info['precision']})", run_dir, record["model_dir"], cfg.family,
                             metric_name, metric, params, storage.size(path) / 2 ** 20,
                             variant=info["precision"], chosen_on=_chosen_on({}, meta.get("extra", {})),
                             runtime="onnxruntime", onnx_path=path))
    return out



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
                         v.get("metric_name"), v.get("metric"), measuring.param_count(params), size, variant="int8",
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


def _forward(e: Entry) -> Callable:
    """The entry's jitted eval-mode ``(variables, batch) -> logits``."""
    def fwd(v, d):
        extras = {k: x for k, x in v.items() if k != "params"}
        return trainer.model_outputs(e.apply, v["params"], extras, d, train=False).logits
    return jax.jit(fwd)


def _jax_call(e: Entry, data: dict) -> Callable[[], object]:
    fwd = _forward(e)
    return lambda: fwd(e.variables, data)


def _onnx_call(e: Entry, data: dict) -> Callable[[], object]:
    import onnxruntime as ort
    from experiments.tools.export import onnx_feed
    with storage.local_copy(e.onnx_path) as path:  # the session reads the whole file when made
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = onnx_feed(data, [i.name for i in sess.get_inputs()])
    return lambda: sess.run(None, feed)


def time_entries(entries: list[Entry], *, batch: int = 32, seq: int = 128, rounds: int = 5) -> None:
    """Fills ``latency_ms``, ``tokens_per_s`` (batch x seq), ``latency_b1_ms`` (1 x seq) and, for JAX rows,
    ``gflops`` of every entry: one process, every call of every row interleaved round by round."""
    fns = {}
    for e in entries:
        cfg = models.io.config_class(e.family).from_dict(models.read_meta(e.model_dir)["config"])
        for b in (batch, 1):
            data = _sample_batch(e.family, cfg, b, seq)
            fns[(e.name, b)] = _onnx_call(e, data) if e.runtime == "onnxruntime" else _jax_call(e, data)
        if e.runtime == "jax":
            try:
                sample = _sample_batch(e.family, cfg, batch, seq)
                e.gflops = measuring.compiled_flops(_forward(e), e.variables, sample) / 1e9
            except Exception as err:  # cost analysis is best effort (some backends return none)
                logging.warning("no FLOP count for %s: %s", e.name, err)
    times = measuring.time_interleaved(fns, rounds=rounds, warmup=1, block=_block)
    for e in entries:
        e.latency_ms = 1e3 * measuring.median(times[(e.name, batch)])
        e.latency_b1_ms = 1e3 * measuring.median(times[(e.name, 1)])
        e.tokens_per_s = batch * seq / (e.latency_ms / 1e3)


def _block(out):
    """Waits for JAX results; onnxruntime returns numpy arrays, already there."""
    return jax.block_until_ready(out) if not isinstance(out, list) else out


def pareto(entries: list[Entry]) -> set[str]:
    """Names of entries no other entry beats on both metric and throughput."""
    pts = [e for e in entries if e.metric is not None and e.tokens_per_s]
    front = set()
    for e in pts:
        if not any((o.metric >= e.metric and o.tokens_per_s >= e.tokens_per_s) and
                   (o.metric > e.metric or o.tokens_per_s > e.tokens_per_s) for o in pts):
            front.add(e.name)
    return front


LABEL_OFFSETS = [(dx, dy) for r in (6, 14, 24, 36, 52, 72, 96, 124) for dx, dy in
                 ((r, r), (r, -r), (-r, r), (-r, -r), (r, 0), (-r, 0), (0, r), (0, -r))]


LEADER = dict(arrowstyle="-", color="0.35", lw=0.6, shrinkA=0, shrinkB=3)  # label -> point line


def text_box(ann, renderer):
    """The display box of an annotation's text alone (``Annotation.get_window_extent`` adds its arrow)."""
    from matplotlib import text as mtext
    ann.update_positions(renderer)  # offset-points text is placed at draw time: place it now
    return mtext.Text.get_window_extent(ann, renderer)


def place_labels(ax, points: list[tuple[float, float]], texts: list[str], fontsize: float = 7) -> list:
    """Annotates each point with its text where the text's box overlaps no other label and no marker and stays
    inside the axes: candidate offsets (:data:`LABEL_OFFSETS`, nearest first) are tried in turn against the boxes
    the renderer reports; a label placed away from its point gets a thin leader line. Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    markers = [ax.transData.transform(p) for p in points]
    placed, boxes = [], []

    def free(box) -> bool:
        if box.x0 < inside.x0 or box.x1 > inside.x1 or box.y0 < inside.y0 or box.y1 > inside.y1:
            return False
        if any(box.overlaps(b) for b in boxes):
            return False
        return not any(box.x0 - 3 <= x <= box.x1 + 3 and box.y0 - 3 <= y <= box.y1 + 3 for x, y in markers)

    for (x, y), text in zip(points, texts):
        for dx, dy in LABEL_OFFSETS:
            far = max(abs(dx), abs(dy)) > LABEL_OFFSETS[0][0]  # beyond the nearest ring: a leader line to its point
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                              arrowprops=LEADER if far else None)
            box = text_box(ann, renderer)
            if free(box):
                break
            ann.remove()
        else:  # no free place within reach (a very crowded plot): the farthest candidate, overlapping
            ann = ax.annotate(text, (x, y), xytext=LABEL_OFFSETS[-1], textcoords="offset points", fontsize=fontsize,
                              arrowprops=LEADER)
            box = text_box(ann, renderer)
            logging.warning("report plot: no free place for the label %r", text)
        placed.append(ann)
        boxes.append(box)
    return placed


def _padded_limits(values: list[float], log: bool = False) -> tuple[float, float]:
    """Axis limits around ``values`` with room for labels; a flat set gets a small span, not matplotlib's +-4%."""
    lo, hi = min(values), max(values)
    if log:
        lo, hi = np.log10(lo), np.log10(hi)
    span = max(hi - lo, 0.02 if not log else 0.1)
    lo, hi = lo - 0.25 * span, hi + 0.25 * span
    return (10 ** lo, 10 ** hi) if log else (lo, hi)


PLOTS = {  # file -> (x of an entry, x label)
    "metric_vs_throughput.png": (lambda e: e.tokens_per_s, "inference tokens/s (higher is faster; log scale)"),
    "metric_vs_size.png": (lambda e: e.size_mb, "size on disk, MB (log scale)"),
}


def metric_figure(entries: list[Entry], reference: Entry, front: set[str], plot: str):
    """The figure of ``plot`` (a :data:`PLOTS` key), or None when no entry has both coordinates: the teacher a
    red star, ONNX files diamonds, the Pareto front blue with the staircase it dominates drawn (throughput plot),
    axes fitted to the values, labels placed by :func:`place_labels`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_of, xlabel = PLOTS[plot]
    shown = [e for e in entries if e.metric is not None and x_of(e)]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    xs, ys = [x_of(e) for e in shown], [e.metric for e in shown]
    ax.set_xscale("log")
    ax.set_xlim(*_padded_limits(xs, log=True))
    ax.set_ylim(*_padded_limits(ys))
    for e in shown:
        teacher = e is reference
        color = "crimson" if teacher else ("tab:blue" if e.name in front else "gray")
        ax.scatter(x_of(e), e.metric, s=90 if teacher else 36, color=color, zorder=3,
                   marker="*" if teacher else ("D" if e.runtime == "onnxruntime" else "o"))
    if plot == "metric_vs_throughput.png" and front:
        f = sorted((e for e in shown if e.name in front), key=lambda e: e.tokens_per_s)
        # the boundary of what the front dominates: from the left edge, then right and down from each point
        stair_x, stair_y = [ax.get_xlim()[0]], [f[0].metric]
        for a, b in zip(f, f[1:] + [None]):
            stair_x += [a.tokens_per_s, a.tokens_per_s]
            stair_y += [a.metric, b.metric if b else ax.get_ylim()[0]]
        ax.plot(stair_x, stair_y, "--", color="tab:blue", lw=1, label="Pareto front (nothing beats these on both)")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"dev {shown[0].metric_name}")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.canvas.draw()
    place_labels(ax, list(zip(xs, ys)), [e.name if e is not reference or "teacher" in e.name
                                         else f"{e.name} (reference)" for e in shown])
    return fig


def _plots(entries: list[Entry], reference: Entry, out_dir: str, front: set[str]) -> dict[str, bytes]:
    """Writes the :data:`PLOTS` PNGs into ``out_dir``; returns ``{file name: PNG bytes}``."""
    import matplotlib.pyplot as plt

    images = {}
    for plot in PLOTS:
        fig = metric_figure(entries, reference, front, plot)
        if fig is None:
            continue
        with storage.atomic_file(os.path.join(out_dir, plot)) as tmp:
            fig.savefig(tmp, dpi=120)
            images[plot] = tmp.read_bytes()  # for report.html, which embeds them
        plt.close(fig)
    return images


COLUMNS = ("model", "runtime", "family", "variant", "metric (dev)", "chosen on", "vs teacher", "params", "size MB",
           "GFLOPs", "latency b1 ms", "latency ms", "tokens/s", "speed vs teacher")


def _rows(entries: list[Entry], reference: Entry) -> list[list[str]]:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = []
    for e in entries:
        rel = (f"{100 * e.metric / reference.metric:.1f}%" if e.metric is not None and reference.metric else "-")
        rows.append([e.name, e.runtime, e.family, e.variant,
                     "-" if e.metric is None else f"{e.metric_name} {e.metric:.4f}", e.chosen_on, rel,
                     f"{e.params:,}", f"{e.size_mb:.1f}", num(e.gflops, ".2f"), num(e.latency_b1_ms, ".1f"),
                     num(e.latency_ms, ".1f"), num(e.tokens_per_s, ",.0f"),
                     "-" if e.ratio is None else f"{e.ratio:.2f}x"])
    return rows


def hardware_line(env: dict) -> str:
    """One line naming what the speeds were measured on, with the instructions that decide int8/fp16 speed."""
    isa = ", ".join(env.get("cpu_isa") or []) or "none of " + ", ".join(hardware.INT8_ISA_FLAGS)
    return (f"Hardware: {env.get('cpu_model') or 'unknown CPU'} ({env.get('machine')}), {env.get('threads')} "
            f"threads; int8/fp16 instructions: {isa}; JAX {env.get('jax')} on {env.get('platform')}.")


def hardware_notes(entries: list[Entry], env: dict) -> list[str]:
    """One line for each figure the hardware explains (int8 without int8 dot products, fp16 ONNX files on a CPU
    without fp16 arithmetic)."""
    isa, notes = set(env.get("cpu_isa") or []), []
    if env.get("platform") != "cpu":
        return notes
    if any("int8" in e.variant for e in entries) and not isa & set(hardware.INT8_DOT_FLAGS):
        notes.append("int8 rows: this CPU has no int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX), so "
                     "int8 matrix products run at about float32 speed here; int8 buys size, and speed on CPUs that "
                     "have them (or on GPUs through TensorRT).")
    if any(e.variant == "fp16" and e.runtime == "onnxruntime" for e in entries) and not isa & {"avx512_fp16",
                                                                                                 "amx_fp16"}:
        notes.append("fp16 ONNX rows: this CPU has no fp16 arithmetic (AVX-512 FP16 or AMX-FP16), so onnxruntime runs "
                     "fp16 operators converted to float32 here: fp16 halves the file, and its speed on this machine "
                     "says nothing of a GPU (TensorRT), where it is meant to run.")
    return notes


def _embedded_image(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_report(entries: list[Entry], reference: Entry, out_dir: str, *, batch: int, seq: int,
                 title: str = "Compression report") -> dict:
    """Writes report.md, a self-contained report.html (plots embedded), report.json and the plots into
    ``out_dir``; returns the JSON payload."""
    storage.makedirs(out_dir)
    env = measuring.environment()
    for e in entries:
        e.ratio = e.tokens_per_s / reference.tokens_per_s if e.tokens_per_s and reference.tokens_per_s else None
    front = pareto(entries)
    plots = _plots(entries, reference, out_dir, front)
    rows = _rows(entries, reference)
    note = (f"Speed: inference at batch {batch} x seq {seq} (latency, tokens/s) and at batch 1 x seq {seq} "
            f"(latency b1), every model and ONNX file timed in one process with interleaved rounds (median). "
            f"Reference: {reference.name}. Pareto front (metric vs throughput): {', '.join(sorted(front)) or '-'}.")
    notes = [hardware_line(env)] + hardware_notes(entries, env)
    md = [f"# {title}", "", note, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"- {n}" for n in notes] + [""]
    md += [f"![{p}]({p})" for p in plots] + [""]
    storage.write_text(os.path.join(out_dir, "report.md"), "\n".join(md))
    cells = lambda r, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in r)  # noqa: E731
    page = (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(note)}</p><table><tr>{cells(COLUMNS, 'th')}</tr>"
            + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</table><ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
            + "".join(f"<p><img alt='{html.escape(p)}' src='{_embedded_image(png)}'></p>"
                      for p, png in plots.items()) + "</body></html>")
    storage.write_text(os.path.join(out_dir, "report.html"), page)
    payload = {"reference": reference.name, "batch": batch, "seq": seq, "pareto": sorted(front),
               "environment": env, "notes": notes,
               "models": [{k: v for k, v in dataclasses.asdict(e).items() if k not in ("apply", "variables")}
                          for e in entries]}
    measuring.write_json(os.path.join(out_dir, "report.json"), payload)
    print("\n".join(md[:len(rows) + 7 + len(notes)]))
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
    entries = [ref] + [e for e in entries if e is not ref]  # the reference first, then in the runs' order
    time_entries(entries, batch=batch, seq=seq, rounds=rounds)
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
    missing = [r for r in runs if not storage.is_dir(r)]
    if missing:
        raise app.UsageError(f"run directories {missing} do not exist")
    if reference is None:
        return
    names = {os.path.normpath(r) for r in runs} | {os.path.basename(os.path.normpath(r)) for r in runs}
    names |= {d for r in runs for d in storage.listdir(r) if storage.is_dir(os.path.join(r, d))}
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
