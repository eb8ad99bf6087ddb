"""What every job shares: the training loop, train state and steps, checkpoints, data parallelism,
observability, metrics, config validation and dev-set evaluation."""
