"""Training: the loop, optimisers and schedules, precision, checkpoints, metrics."""
