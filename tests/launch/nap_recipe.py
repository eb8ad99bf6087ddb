"""A recipe of one ``nap`` stage (``tests/launch/nap_stage.py``), an ``experiments.main`` config file; no report."""

from experiments.configs import recipe
from tests.launch import nap_stage


def get_config():
    c = recipe.get_config("demo")
    c.stages = "nap"
    c.nap = dict(kind="nap", config=nap_stage.get_config())
    c.report.enabled = False
    return c
