"""Multi-layer perceptrons: the configurable ``mlp`` and Entropy-SGD's ``mnistfc``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from valleys import _validate as check
from valleys.models._common import maybe_dropout, rate

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


def _widths(value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        check.fail("widths", value, "expected a sequence of hidden-layer widths, e.g. (128,)")
    return tuple(value)


def build_mlp(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    widths: Sequence[int] = (128,),
    activation: str = "relu",
) -> nn.Sequential:
    """Registry entry ``mlp``: :func:`mlp` over the flattened input.

    SGN's sigmoid MLPs are ``widths=(20, 20, 20)``, ``(10, 10)`` or ``(100, 100)`` with
    ``activation="sigmoid"``.
    """
    return mlp(math.prod(input_shape), num_outputs, _widths(widths), activation)


MNISTFC_VARIANTS = ("lua", "python")


def build_mnistfc(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    variant: str = "lua",
    width: int = 1024,
    dropout: float = 0.5,
    input_dropout: float | None = None,
) -> nn.Sequential:
    """Registry entry ``mnistfc``: Entropy-SGD's 784-1024-1024-10 MLP with BatchNorm and dropout.

    The two original codes differ (ALGORITHMS.md §1.6 item 10); ``variant`` picks one:

    - ``"lua"`` (default; the code behind the paper's numbers): ``Linear → ReLU → BN →
      Dropout(dropout)`` per hidden layer, no input dropout.
    - ``"python"`` (the PyTorch port): ``Dropout(0.2)`` on the input, then ``Linear → BN →
      ReLU → Dropout(dropout)`` per hidden layer.

    ``input_dropout`` overrides the variant's input dropout (0 for Lua, 0.2 for python). Both
    variants have the same parameters: 1,867,786 for 784 inputs and 10 classes. The input is
    flattened, so any ``input_shape`` works.
    """
    check.choice("variant", variant, MNISTFC_VARIANTS)
    check.count("width", width, 1)
    p = rate("dropout", dropout)
    p_in = (0.2 if variant == "python" else 0.0) if input_dropout is None else input_dropout
    p_in = rate("input_dropout", p_in)
    layers: list[nn.Module] = [nn.Flatten(), *maybe_dropout(p_in)]
    prev = math.prod(input_shape)
    for _ in range(2):
        if variant == "lua":
            layers += [nn.Linear(prev, width), nn.ReLU(), nn.BatchNorm1d(width)]
        else:
            layers += [nn.Linear(prev, width), nn.BatchNorm1d(width), nn.ReLU()]
        layers += maybe_dropout(p)
        prev = width
    layers.append(nn.Linear(prev, num_outputs))
    return nn.Sequential(*layers)
