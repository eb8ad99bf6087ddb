"""Shared machinery of the benchmarks: interleaved repeated timing, tables, JSON results.

Benchmarks compare things side by side in one process: each candidate runs once per round, rounds repeat, and
the reported figure is the median over rounds (and ratios of medians), so that a noisy shared machine affects
all candidates alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import jax

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


INT8_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "avx512_fp16",
                  "amx_fp16")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products: int8 GEMMs beat float32 with one


def _cpuinfo_field(name: str) -> str:
    """The first ``name`` line of Linux ``/proc/cpuinfo`` ("" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), "")
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name ("" where the OS does not say), e.g. "AMD EPYC 7B13"."""
    return _cpuinfo_field("model name") or platform.processor()


def cpu_isa() -> list[str]:
    """Which of :data:`INT8_ISA_FLAGS` the CPU reports: the instructions that decide int8 and fp16 speed."""
    flags = _cpuinfo_field("flags").split()
    return [f for f in INT8_ISA_FLAGS if f in flags]


def threads() -> int:
    """CPU threads this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment() -> dict:
    """What the figures were measured on (benchmarks' and the report's JSON)."""
    return {
        "platform": jax.devices()[0].platform,
        "device": str(jax.devices()[0].device_kind),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "threads": threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


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
