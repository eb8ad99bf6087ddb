"""What a benchmark ran on, for accelerator figures: the chip's published peak, the software versions (CUDA
included where the JAX install has it), the date and the checkout's commit.

The peak table holds dense bfloat16 tensor-core TFLOP/s without structured sparsity, read off NVIDIA's data
sheets (the "with sparsity" figures there are twice these): H100 SXM5 989.4 ("NVIDIA H100 80GB HBM3"), H100 PCIe
756.5, H200 SXM 989.4 (same compute as H100 SXM, more and faster memory), A100 (SXM4 and PCIe, 40 and 80 GB)
312, L4 121. A device kind that matches no entry (H100 NVL, H200 NVL, other chips, TPUs, CPUs) has no peak,
so its rows report tokens/s without model FLOP utilisation rather than a utilisation against a wrong peak.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess

import jax

# (regex over the device kind, as jax.devices()[0].device_kind spells it; the chip; dense bf16 TFLOP/s).
# Order matters: the first match wins, so the PCIe and NVL variants come before the plain H100/H200 patterns.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float | None], ...] = (
    (r"H100.*NVL", "H100 NVL", None),  # not in the table: a different clock and power envelope
    (r"H200.*NVL", "H200 NVL", None),
    (r"H100.*PCIe", "H100 PCIe", 756.5),
    (r"H100", "H100 SXM", 989.4),  # "NVIDIA H100 80GB HBM3" is the SXM5 board
    (r"H200", "H200", 989.4),
    (r"A100", "A100", 312.0),
    (r"\bL4\b", "L4", 121.0),
)
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")
GIT_COMMIT_ENV = "NLPRESS_GIT_COMMIT"  # the commit, for copies of the tree without .git (a device machine)


def chip(device_kind: str) -> tuple[str | None, float | None]:
    """``(chip name, dense bf16 peak in FLOP/s)`` for a device kind, ``(None, None)`` when the table has no
    entry and ``(name, None)`` for a known chip whose peak the table deliberately leaves out."""
    for pattern, name, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            return name, None if tflops is None else tflops * 1e12
    return None, None


def is_gpu(device: jax.Device | None = None) -> bool:
    """Whether ``device`` (default: JAX's first device) is a GPU."""
    return (device or jax.devices()[0]).platform in GPU_PLATFORMS


def _cuda_versions() -> dict:
    """CUDA runtime, cuDNN and driver versions as jaxlib's CUDA plugin reports them ("n/a" without one)."""
    out = {"cuda_runtime": "n/a", "cudnn": "n/a", "cuda_driver": "n/a", "cuda_plugin": "n/a"}
    for package in CUDA_PLUGINS:
        try:
            out["cuda_plugin"] = f"{package} {importlib.metadata.version(package)}"
            break
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        from jax._src.lib import cuda_versions  # private, but the one place jaxlib exposes these numbers
    except ImportError:
        return out
    if cuda_versions is None:
        return out

    def cuda(v: int) -> str:  # CUDA's encoding: 1000 * major + 10 * minor
        return f"{v // 1000}.{v % 1000 // 10}"

    def cudnn(v: int) -> str:  # cuDNN 9: 10000 * major + 100 * minor + patch; cuDNN 8: 1000 * major + ...
        major, rest = (v // 10000, v % 10000) if v >= 10000 else (v // 1000, v % 1000)
        return f"{major}.{rest // 100}.{rest % 100}"

    for key, getter, fmt in (("cuda_runtime", "cuda_runtime_get_version", cuda),
                             ("cuda_driver", "cuda_driver_get_version", cuda),
                             ("cudnn", "cudnn_get_version", cudnn)):
        try:
            out[key] = fmt(int(getattr(cuda_versions, getter)()))
        except Exception:  # noqa: BLE001 - a plugin without the call, or no driver: the figure is simply unknown
            pass
    return out


def software_versions() -> dict:
    """Python, jax, jaxlib, flax, optax and the CUDA versions (``"n/a"`` where not installed / on a CPU)."""
    out = {"python": platform.python_version(), "jax": jax.__version__}
    for package in ("jaxlib", "flax", "optax", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "n/a"
    out.update(_cuda_versions())
    out["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    return out


def git_commit() -> str:
    """The checkout's commit (with ``-dirty`` when tracked files differ from it), else ``$NLPRESS_GIT_COMMIT``,
    else ``"unknown"``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(GIT_COMMIT_ENV, "unknown")


def now_utc() -> str:
    """The current time, ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def device_info() -> dict:
    """JAX's first device: platform, kind, count, and the chip and peak of :data:`PEAK_BF16_TFLOPS`."""
    device = jax.devices()[0]
    name, peak = chip(str(device.device_kind))
    return {"platform": device.platform, "device_kind": str(device.device_kind), "device_count": jax.device_count(),
            "chip": name, "peak_bf16_flops": peak,
            "peak_source": "NVIDIA data sheet, dense bf16 tensor core (no sparsity)" if peak else None}
