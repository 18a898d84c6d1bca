"""Models of the papers and their registry, built from the dataset's input shape and classes.

Every entry is built by one call::

    model = valleys.models.get("lenet", (1, 28, 28), 10, variant="lua")

``input_shape`` excludes the batch dimension: ``(C, H, W)`` for images, ``(L,)`` or ``(C, L)``
for sequences, anything for the MLPs (they flatten). Each model adapts its input channels,
flattened size and output layer to the shapes it is given and raises a one-line ``ValueError``
saying which shapes it takes when it cannot. Every model returns logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from valleys import _validate as check
from valleys.models.allcnn import build_allcnn
from valleys.models.cnn1d import build_cnn1d
from valleys.models.convmixer import build_convmixer
from valleys.models.lenet import build_lenet, build_lenet_small
from valleys.models.mlp import build_mlp, build_mnistfc, mlp
from valleys.models.resnet import build_resnet18
from valleys.models.resnext import build_resnext18
from valleys.models.sgn import build_sgn_conv_cifar, build_sgn_conv_fashion
from valleys.models.vgg import build_vgg16_bn, build_vgg19_bn
from valleys.models.wrn import build_wrn

__all__ = ["ModelSpec", "get", "mlp", "names", "param_count", "spec"]


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: ``build(input_shape, num_outputs, **kwargs)`` makes the model."""

    name: str
    build: Callable[..., nn.Module]
    summary: str

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments this entry accepts, with their defaults."""
        params = inspect.signature(self.build).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


_REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("mlp", build_mlp, "MLP over the flattened input (SGN's sigmoid MLPs)"),
        ModelSpec("mnistfc", build_mnistfc, "Entropy-SGD 784-1024-1024-10 MLP, BN, dropout"),
        ModelSpec("lenet", build_lenet, "Entropy-SGD mnistconv LeNet 20-50-500, BN, dropout"),
        ModelSpec("lenet_small", build_lenet_small, "Entropy-SGD Hessian LeNet, 47,658 weights"),
        ModelSpec("sgn_conv_fashion", build_sgn_conv_fashion, "SGN architecture_1 (6-16-120-84)"),
        ModelSpec("sgn_conv_cifar", build_sgn_conv_cifar, "SGN architecture_4 (32-64-64-FC64)"),
        ModelSpec("allcnn", build_allcnn, "All-CNN-C with BN (Entropy-SGD cifarconv)"),
        ModelSpec("vgg16_bn", build_vgg16_bn, "VGG-16 BN, GAP + Linear head (VSGD)"),
        ModelSpec("vgg19_bn", build_vgg19_bn, "VGG-19 BN, GAP + Linear head (VSGD)"),
        ModelSpec("resnet18", build_resnet18, "ResNet-18 with a CIFAR stem"),
        ModelSpec("wrn", build_wrn, "Wide ResNet, WRN-28-10 by default"),
        ModelSpec("convmixer", build_convmixer, "ConvMixer, 256/8 kernel 5 patch 2 by default"),
        ModelSpec("resnext18", build_resnext18, "CIFAR ResNeXt, cardinality 8, widen 4 (VSGD)"),
        ModelSpec("cnn1d", build_cnn1d, "MNIST-1D's three-layer 1-D CNN"),
    )
}


def names() -> list[str]:
    """The registered model names, in registry order."""
    return list(_REGISTRY)


def spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ``ValueError`` naming the valid ones if unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise check.unknown("model", name, _REGISTRY) from None


def _input_shape(value: Any) -> tuple[int, ...]:
    expected = "expected a non-empty tuple of sizes without the batch dimension, e.g. (1, 28, 28)"
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value:
        check.fail("input_shape", value, expected)
    return tuple(check.count(f"input_shape[{i}]", n, 1) for i, n in enumerate(value))


def get(name: str, input_shape: tuple[int, ...], num_outputs: int, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` for inputs shaped ``input_shape`` (no batch
    dimension) and ``num_outputs`` outputs.

    ``kwargs`` override the entry's defaults (``spec(name).kwargs()`` lists them). An unknown
    name or keyword, a bad value or an input shape the model cannot take raises a one-line
    ``ValueError``.
    """
    entry = spec(name)
    accepted: Mapping[str, Any] = entry.kwargs()
    for key in kwargs:
        if key not in accepted:
            if not accepted:
                raise ValueError(f"Unknown kwarg of model {name!r}: {key!r} (it takes none)")
            raise check.unknown(f"kwarg of model {name!r}", key, accepted)
    shape = _input_shape(input_shape)
    outputs = check.count("num_outputs", num_outputs, 1)
    return entry.build(shape, outputs, **kwargs)


def param_count(model: nn.Module) -> int:
    """The number of parameters (weights, biases, BatchNorm scales and shifts; not buffers),
    each shared tensor counted once.
    """
    return sum(p.numel() for p in model.parameters())
