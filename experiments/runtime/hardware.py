"""What a figure was measured on: the CPU model, the instructions that decide int8/fp16 speed, threads, JAX.

Benchmarks, the report and the claims study record :func:`environment` beside every figure: the machines
differ between sessions (AVX2-only EPYC, AMX-class Xeon), and a speed or accuracy figure without its hardware
cannot be compared with another.
"""

from __future__ import annotations

import os
import platform

import jax

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
