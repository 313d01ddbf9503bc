"""Search: the spec's space as Optuna distributions, the samplers and the pruners."""
