"""Suite-wide settings, made by the first process (the xdist controller) and inherited through the
environment by the workers and the subprocesses tests start (``tests.multidevice.device_env``).

* XLA compiles without its LLVM optimisation passes (``--xla_backend_optimization_level=0``, unless
  XLA_FLAGS names a level): the tiny test programs spent more time being optimised than running, and the
  flag changes how fast the compiled code runs, not what it computes. Benchmarks never run under it.
* One JAX persistent compilation cache per test run. Tests that run a program compiled earlier in the run
  (a resumed or rerun job, a subprocess repeating a reference run) would compile it again: each builds its
  own closures, so the in-memory jit caches miss, while the programs are the same (the cache is keyed on the
  program, compile options and backend). A hit loads the executable XLA produced for that very program, so
  no result changes. The directory is made fresh for each run and removed at its end: a warm cache from an
  earlier run never hides how long the suite takes.
"""

import os
import shutil
import tempfile

import jax
import pytest

OWNER_ENV = "NLPRESS_TEST_JAX_CACHE_OWNER"  # pid of the process that made the cache and removes it
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def pytest_configure(config):
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:  # an explicit level is kept
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ.update(JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="nlpress-jax-cache-"),
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                          **{OWNER_ENV: str(os.getpid())})
    # Workers and subprocesses inherit the environment; this process may have read it before it was set.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    # Thresholds only where set: a cache directory the user gave keeps JAX's defaults.
    for option, parse in (("jax_persistent_cache_min_compile_time_secs", float),
                          ("jax_persistent_cache_min_entry_size_bytes", int)):
        if option.upper() in os.environ:
            jax.config.update(option, parse(os.environ[option.upper()]))


def pytest_unconfigure(config):
    if os.environ.get(OWNER_ENV) == str(os.getpid()):
        shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), ignore_errors=True)


@pytest.fixture(scope="session")
def gcs_bucket():
    """``("gs://<bucket>", environment for subprocesses)`` of one emulated bucket per test process
    (:mod:`tests.object_store`); tests write under their own prefixes."""
    from tests.object_store import emulated_bucket

    with emulated_bucket() as bucket:
        yield bucket
