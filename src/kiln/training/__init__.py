"""Training: one session and one trainer for every kind of data, its plans (epochs or steps), objectives,
optimisers and schedules, precision, checkpoints and metrics."""
