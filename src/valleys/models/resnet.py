"""ResNet-18 for CIFAR-sized images (3×3 stem, no max-pool), the Knee paper's network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from valleys import _validate as check
from valleys.models._common import image_input


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    The shortcut is the identity, or a strided 1×1 conv with BatchNorm when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3×3 conv stem (stride 1, no max-pool), four stages of
    :class:`BasicBlock` with widths ``width·(1, 2, 4, 8)`` and strides (1, 2, 2, 2), global
    average pooling and a linear classifier. PyTorch's default initialisation.
    """

    def __init__(
        self, in_channels: int, num_outputs: int, blocks: Sequence[int], width: int = 64
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        prev = width
        for i, n in enumerate(blocks):
            out = width * 2**i
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(prev, out, stride)]
            stages += [BasicBlock(out, out) for _ in range(n - 1)]
            prev = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(prev, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


def build_resnet18(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 64) -> ResNet:
    """Registry entry ``resnet18``: :class:`ResNet` with blocks (2, 2, 2, 2).

    11,173,962 parameters on 3×32×32 with 10 classes (``width=64``, the standard one); a
    smaller ``width`` gives a thinner copy. Global average pooling takes any image size.
    """
    check.count("width", width, 1)
    c, _, _ = image_input("resnet18", input_shape)
    return ResNet(c, num_outputs, (2, 2, 2, 2), width)
