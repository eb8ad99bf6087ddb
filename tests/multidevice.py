"""Runs a snippet in a fresh Python with N forced CPU devices (XLA_FLAGS must be set before jax starts)."""

import os
import subprocess
import sys
import textwrap

from launch.local_multiprocess import process_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_env(n: int) -> dict:
    """Environment for a subprocess with ``n`` forced CPU devices (the local multi-process runner's worker
    environment); it inherits the rest, the suite's JAX compilation cache and XLA flags (``tests/conftest.py``)
    included."""
    return process_env(n)


def run_with_devices(code: str, n: int = 8, timeout: int = 300) -> str:
    """Runs ``code`` with ``n`` CPU devices; fails the test with its output when it exits non-zero."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=device_env(n),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
