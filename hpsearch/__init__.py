"""hpsearch: hyperparameter search for BP networks (multi-layer perceptrons)."""

__version__ = "0.1.0"
