"""Command-line tools that evaluate, prune, quantize, export and report on saved models."""
