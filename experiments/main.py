"""Entry point: ``python -m experiments.main --config=experiments/configs/finetune.py:TASK --workdir=DIR``.

Parses flags and runs the config's job (``config.job``: fine-tuning by default, ``distill``, ``theseus``,
``l0``, ``recipe``, ``multitask``; see :data:`JOBS`); everything else lives in the library.
Override config fields with ``--config.a.b=value``. Multi-host runs join the cluster first: on TPU VMs and
pod slices pass ``--distributed`` (JAX finds the coordinator); on one machine ``launch/local_multiprocess.py``
passes ``--coordinator_address``, ``--num_processes``, ``--process_id`` and ``--cpu_collectives=gloo``.
"""

from __future__ import annotations

import importlib

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
flags.mark_flags_as_required(["config", "workdir"])

# config.job -> (module, function(config, workdir)); configs without ``job`` fine-tune.
JOBS = {"finetune": ("experiments.train", "train_and_evaluate"),
        "distill": ("experiments.distill", "distill_and_evaluate"),
        "theseus": ("experiments.theseus", "theseus_and_evaluate"),
        "l0": ("experiments.l0", "l0_and_evaluate"),
        "recipe": ("experiments.recipes", "run_recipe"),
        "multitask": ("experiments.multitask", "multitask_and_evaluate")}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Imported here so that --help is fast and jax.distributed.initialize() precedes any JAX call.
    from experiments import parallel
    if _DISTRIBUTED.value or _COORDINATOR.value:
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                        _CPU_COLLECTIVES.value)
    import jax

    config = _CONFIG.value
    job = config.get("job", "finetune")
    if job not in JOBS:
        raise app.UsageError(f"config.job={job!r} is not a known job; known: {sorted(JOBS)}")
    module, function = JOBS[job]
    run = getattr(importlib.import_module(module), function)
    logging.info("process %d of %d, %d local / %d global devices (%s); job %s", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend(), job)
    run(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
