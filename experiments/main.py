"""Entry point: ``python -m experiments.main --config=experiments/configs/finetune.py:TASK --workdir=DIR``.

Parses flags and runs the config's job (``config.job``, one of :data:`experiments.jobs.registry.JOBS`:
``finetune``, ``distill``, ``general_distill``, ``theseus``, ``l0``, ``qat``, ``multitask``, ``prune``, ``quantize``,
``export``, ``recipe``); everything else lives in the library. Override config fields with ``--config.a.b=value``; an
unknown field is named with the closest known one before anything runs. Multi-host runs join the cluster
first: on TPU VMs and pod slices pass ``--distributed`` (JAX finds the coordinator); on one machine
``launch/local_multiprocess.py`` passes ``--coordinator_address``, ``--num_processes``, ``--process_id`` and
``--cpu_collectives=gloo``.

Four flags set how a run shares its workdir and lives with a flaky store and long single-process stages (they
change no result, so they are flags, not config fields): ``--lease_timeout_s`` (a bucket workdir's lease not
renewed for that long is taken over), ``--store_retry_budget_s`` (how long a failing object-store request is
retried before the run stops), ``--stage_wait_limit_s`` (how long the other processes of a multi-host run wait
for process 0's single-process stage) and ``--barrier_timeout_s`` (how long a barrier waits for every process).
"""

from __future__ import annotations

import difflib
import importlib.util

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:argument].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results and the model.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (auto-detected on TPU VMs / pod slices).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator_address).")
_CPU_COLLECTIVES = flags.DEFINE_enum("cpu_collectives", None, ["gloo", "mpi"],
                                     "Cross-process collectives for CPU devices (local multi-process runs).")
_LEASE_TIMEOUT = flags.DEFINE_float(
    "lease_timeout_s", 300.0, "A gs:// workdir's lease not renewed for this long (its run was killed) is taken over "
    "by the next run; the holder renews it every fifth of it.", lower_bound=1.0)
_STORE_RETRY_BUDGET = flags.DEFINE_float(
    "store_retry_budget_s", 300.0, "Seconds an object-store request failing with a transient error (429, 5xx, "
    "dropped connection, timeout) is retried before the run stops naming the object.", lower_bound=0.1)
_STAGE_WAIT_LIMIT = flags.DEFINE_float(
    "stage_wait_limit_s", 24 * 3600.0, "Multi-host runs: seconds the other processes wait for a single-process "
    "stage (prune, quantize, export, the report) on process 0.", lower_bound=1.0)
_BARRIER_TIMEOUT = flags.DEFINE_float(
    "barrier_timeout_s", 600.0, "Multi-host runs: seconds a barrier waits for every process to arrive.",
    lower_bound=1.0)
flags.mark_flags_as_required(["config", "workdir"])



def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config override of an unknown field (``--config.optimizer.learnin_rate=1``,
    which ml_collections rejects with an AttributeError inside the parser) reported as a usage error that names
    the field and the closest known one."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"FATAL Flags parsing error: {e}\nPass --help to see the flags.") from None
    except (AttributeError, KeyError):
        config = _config_from_argv(argv)
        for arg in argv[1:]:
            if config is not None and arg.startswith("--config."):
                problem = _unknown_field(config, arg.split("=", 1)[0][len("--"):])
                if problem:
                    raise SystemExit(f"FATAL {problem}") from None
        raise


def _config_from_argv(argv: list[str]):
    """The config that ``--config=FILE[:ARG]`` names, loaded as config_flags loads it (None if it cannot be)."""
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_nlpress_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _unknown_field(config, path: str) -> str | None:
    """A message naming ``path`` (``config.a.b``) and the closest known field, if ``config`` lacks it."""
    node = config
    parts = path.split(".")
    for i, part in enumerate(parts[1:], start=1):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1)
            where = ".".join(parts[:i])
            hint = f" (did you mean {where}.{close[0]}?)" if close else ""
            return f"unknown config field {path}{hint}; fields of {where}: {sorted(keys)}"
        node = node[part]
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Imported here so that --help is fast and jax.distributed.initialize() precedes any JAX call.
    from experiments.runtime import lease, parallel, single_process
    from models import retries
    retries.configure(_STORE_RETRY_BUDGET.value)
    lease.configure(_LEASE_TIMEOUT.value)
    single_process.configure(_STAGE_WAIT_LIMIT.value, _BARRIER_TIMEOUT.value)
    if _DISTRIBUTED.value or _COORDINATOR.value:
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                        _CPU_COLLECTIVES.value)
        parallel.check_same_versions()  # every worker must run the same software before any work
    import jax

    from experiments.jobs import registry

    config = _CONFIG.value
    job = registry.get(config.get("job", "<none>"))
    logging.info("process %d of %d, %d local / %d global devices (%s); job %s", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend(), job.name)
    try:
        job.run(config, _WORKDIR.value)
    finally:
        logging.info("%s", retries.summary())  # every retried object-store request of this process


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
