"""Measuring, shared by the benchmarks and the tools: interleaved repeated timing, FLOPs, tables, JSON results.

Benchmarks and the report compare things side by side in one process: each candidate runs once per round, rounds repeat, and
the reported figure is the median over rounds (and ratios of medians), so that a noisy shared machine affects
all candidates alike.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import jax

from experiments.runtime.hardware import environment
from models import storage


def time_interleaved(candidates: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
                     block: Callable[[object], object] = jax.block_until_ready) -> dict[str, list[float]]:
    """Runs each candidate ``warmup`` times, then ``rounds`` interleaved timed calls; returns seconds per call."""
    for fn in candidates.values():
        for _ in range(warmup):
            block(fn())
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    """Prints ``rows`` as a fixed-width table over ``columns``."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: str | None, payload: dict) -> None:
    """Writes ``payload`` (plus the environment) as JSON when ``path`` is given, atomically; ``path`` may be a
    gs:// URL (:mod:`models.storage`)."""
    if not path:
        return
    storage.write_text(path, json.dumps({"environment": environment(), **payload}, indent=2))
    print(f"wrote {path}")


def compiled_flops(fn: Callable, *args) -> float:
    """FLOPs of ``jax.jit(fn)(*args)`` from XLA's cost analysis of the compiled program."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list):  # older JAX returned one dict per device
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def param_count(params) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
