"""ConvMixer (Trockman & Kolter 2022), VSGD's ConvMixer-256/8 by default."""

from __future__ import annotations

import torch
from torch import nn

from valleys import _validate as check
from valleys.models._common import conv_out, image_input


class Residual(nn.Module):
    """``x + fn(x)``."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


def convmixer(
    in_channels: int,
    num_outputs: int,
    dim: int = 256,
    depth: int = 8,
    kernel_size: int = 5,
    patch_size: int = 2,
) -> nn.Sequential:
    """Patch embedding ``Conv(patch×patch, stride patch) → GELU → BN``; ``depth`` mixer layers
    of ``x + BN(GELU(depthwise conv k×k, 'same'))`` followed by ``BN(GELU(pointwise 1×1
    conv))``; global average pooling and ``Linear(dim, num_outputs)``. PyTorch's default
    initialisation.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, dim, patch_size, stride=patch_size),
        nn.GELU(),
        nn.BatchNorm2d(dim),
    ]
    for _ in range(depth):
        layers += [
            Residual(
                nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                    nn.GELU(),
                    nn.BatchNorm2d(dim),
                )
            ),
            nn.Conv2d(dim, dim, 1),
            nn.GELU(),
            nn.BatchNorm2d(dim),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_outputs)]
    return nn.Sequential(*layers)


def build_convmixer(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    dim: int = 256,
    depth: int = 8,
    kernel_size: int = 5,
    patch_size: int = 2,
) -> nn.Sequential:
    """Registry entry ``convmixer``: :func:`convmixer`, ConvMixer-256/8 with kernel 5 and
    patch 2 by default (594,186 parameters on 3×32×32 with 10 classes). VSGD's MNIST demo uses
    ``dim=16, depth=4, kernel_size=3, patch_size=2``. Images need H, W >= ``patch_size``.
    """
    dim = check.count("dim", dim, 1)
    depth = check.count("depth", depth, 0)
    kernel_size = check.count("kernel_size", kernel_size, 1)
    patch_size = check.count("patch_size", patch_size, 1)
    c, _, _ = image_input("convmixer", input_shape, lambda n: conv_out(n, patch_size, patch_size))
    return convmixer(c, num_outputs, dim, depth, kernel_size, patch_size)
