"""The BP network: a multi-layer perceptron built from a handful of spec choices."""

from __future__ import annotations

import math

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

# Gains keep the variance of activations steady through the layers (Glorot, He et al.).
_GAINS: dict[str, float] = {
    "relu": math.sqrt(2.0),
    "leaky_relu": nn.init.calculate_gain("leaky_relu", 0.01),
    "elu": math.sqrt(2.0),
    "gelu": math.sqrt(2.0),
    "tanh": 5.0 / 3.0,
    "sigmoid": 1.0,
}


def build_mlp(
    n_features: int,
    n_outputs: int,
    hidden: list[int],
    *,
    activation: str = "relu",
    init: str = "he",
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden layer, then a linear head.

    The head has no activation: the loss (cross-entropy, BCE with logits, MSE) applies it.
    """
    layers: list[nn.Module] = []
    width = n_features
    for units in hidden:
        layers.append(nn.Linear(width, units))
        if batch_norm:
            layers.append(nn.BatchNorm1d(units))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = units
    layers.append(nn.Linear(width, n_outputs))
    model = nn.Sequential(*layers)
    if init != "default":
        for layer in model:
            if isinstance(layer, nn.Linear):
                _init_linear(layer, init, _GAINS[activation])
    return model


def _init_linear(layer: nn.Linear, init: str, gain: float) -> None:
    if init == "he":
        nn.init.normal_(layer.weight, std=gain / math.sqrt(layer.in_features))
    elif init == "xavier":
        nn.init.xavier_uniform_(layer.weight, gain=gain)
    elif init == "orthogonal":
        nn.init.orthogonal_(layer.weight, gain=gain)
    else:
        raise ValueError(f"unknown init {init!r}")
    nn.init.zeros_(layer.bias)
