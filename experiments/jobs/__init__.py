"""Training jobs (``config.job``) and compression recipes, run by ``experiments.main``."""
