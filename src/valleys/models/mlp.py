"""Multi-layer perceptrons with configurable widths and activation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from valleys import _validate as check

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def mlp(
    in_features: int, out_features: int, widths: Sequence[int] = (128,), activation: str = "relu"
) -> nn.Sequential:
    """``Linear → activation`` for each hidden width, then a linear output layer.

    Inputs with more than two dimensions are flattened first, so image tensors can be fed as
    they are.
    """
    check.count("in_features", in_features, 1)
    check.count("out_features", out_features, 1)
    check.choice("activation", activation, ACTIVATIONS)
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for i, width in enumerate(widths):
        check.count(f"widths[{i}]", width, 1)
        layers += [nn.Linear(prev, width), ACTIVATIONS[activation]()]
        prev = width
    layers.append(nn.Linear(prev, out_features))
    return nn.Sequential(*layers)
