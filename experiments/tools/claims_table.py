"""Writes the claims study's table from the runs finished so far in a study's workdir, without running any.

    python -m experiments.tools.claims_table --workdir=runs/claims --budget=cpu --out=docs/claims.md

The study itself (``claims.py:BUDGET``) writes the same table after each claim; this reads a workdir while the
study is still running (it takes no lock and writes nothing there), e.g. to publish the claims finished so far:
a claim whose runs are not all done is marked partial, one not started shows no figures. Only runs whose recorded
key is their current definition's count (:func:`experiments.jobs.claims.claim_table`).
"""

from __future__ import annotations

from absl import flags

from experiments.configs import claims as catalogue
from experiments.jobs import claims
from experiments.runtime import cli
from models import storage


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "the claims study's workdir", required=True, flag_values=fv)
    flags.DEFINE_enum("budget", "cpu", list(catalogue.BUDGETS), "the budget the study ran at", flag_values=fv)
    flags.DEFINE_integer("seeds", 0, "seeds per arm the study ran (0: the budget's default)", flag_values=fv)
    flags.DEFINE_string("data_root", None, "the study's data root (default: the budget's, ../shared/data)",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "also write the table here (claims.md, with claims.json beside it)",
                        flag_values=fv)
    cli.directory(fv, "workdir")
    cli.check(fv, "seeds", lambda v: v >= 0, "must be >= 0")


def main(fv: flags.FlagValues) -> dict:
    config = catalogue.get_config(fv.budget)
    with config.unlocked():
        if fv.seeds:
            config.seeds = fv.seeds
        if fv.data_root:
            config.data_root = fv.data_root
    workdir = storage.absolute(fv.workdir)
    table = claims.claim_table(config, workdir)
    text = claims.render(table, f"python -m experiments.main --config=experiments/configs/claims.py:{fv.budget} "
                                f"--workdir=WORKDIR --config.seeds={config.seeds}")
    if fv.out:
        claims.publish(text, table, fv.out)
    print(text)
    return table


if __name__ == "__main__":
    cli.run_script(define_flags, main)
