"""A single-process job that sleeps, and with ``fail`` raises: the stand-in for a long export or report on process 0
in ``tests/launch/test_single_process_waits.py``. Importing this module registers it as job (and recipe stage
kind) ``nap``."""

import time

import ml_collections

from experiments.jobs import registry
from experiments.runtime import observe

FAILURE = "the nap stage failed on purpose"


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "nap"  # this module
    c.seconds = 4.0  # how long process 0 sleeps
    c.fail = False  # raise after sleeping, instead of writing results.json
    return c


CONSTRAINTS = {"job": dict(choices=("nap",)), "seconds": dict(min=0.0)}


def nap(config, workdir: str) -> dict:
    time.sleep(config.seconds)
    if config.fail:
        raise RuntimeError(FAILURE)
    observe.write_results(workdir, final={"slept_s": config.seconds}, best={}, steps=0, wall_time_s=config.seconds)
    return observe.read_results(workdir)


registry.JOBS.setdefault("nap", registry.Job("nap", __name__, run_fn=nap, family=lambda c: None, accepts=(),
                                             source_fields=(), max_sources=0, single_process=True))
