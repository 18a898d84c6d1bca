"""ResNeXt for CIFAR-sized images (Xie et al. 2017), as in VSGD's "ResNeXt-18"."""

from __future__ import annotations

import torch
from torch import nn

from valleys import _validate as check
from valleys.models._common import he_normal_fan_out_, image_input


class Bottleneck(nn.Module):
    """ResNeXt bottleneck (type C): ``1×1 → BN → ReLU → grouped 3×3 (stride) → BN → ReLU →
    1×1 → BN``, added to the shortcut (identity, or strided 1×1 conv + BN where the width
    changes), then ReLU. The inner width is ``cardinality · out_channels / widen_factor``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, cardinality: int, widen: int
    ) -> None:
        super().__init__()
        inner = cardinality * out_channels // widen
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(),
            nn.Conv2d(inner, inner, 3, stride, padding=1, groups=cardinality, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(),
            nn.Conv2d(inner, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNeXt(nn.Module):
    """CIFAR ResNeXt: 3×3 conv 64 → BN → ReLU, three stages of ``(depth - 2) // 9``
    bottlenecks with widths ``64w, 128w, 256w`` (``w = widen_factor``) and strides (1, 2, 2),
    global average pooling and a linear classifier.

    Initialisation as in the VSGD code: He normal with fan-out for convs, BatchNorm 1/0, He
    normal (fan-in) for the classifier weight with zero bias.
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        depth: int = 18,
        cardinality: int = 8,
        widen_factor: int = 4,
    ) -> None:
        super().__init__()
        per_stage = (depth - 2) // 9
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        prev = 64
        for s, base in enumerate((64, 128, 256)):
            out = base * widen_factor
            for i in range(per_stage):
                stride = 2 if s > 0 and i == 0 else 1
                blocks.append(Bottleneck(prev, out, stride, cardinality, widen_factor))
                prev = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(prev, num_outputs)
        he_normal_fan_out_(self)
        nn.init.kaiming_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))))


def build_resnext18(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    cardinality: int = 8,
    widen_factor: int = 4,
    depth: int = 18,
) -> ResNeXt:
    """Registry entry ``resnext18``: :class:`ResNeXt` with cardinality 8, widen factor 4 and
    depth 18. Bottlenecks per stage are ``(depth - 2) // 9``, floored as in the original code,
    so depth 18 gives one per stage (VSGD's "ResNeXt-18") and ``depth=29`` the usual ResNeXt-29
    with three. 10,994,506 parameters on 3×32×32 with 10 classes. Global average
    pooling takes any image size.
    """
    cardinality = check.count("cardinality", cardinality, 1)
    widen_factor = check.count("widen_factor", widen_factor, 1)
    depth = check.count("depth", depth, 11)
    c, _, _ = image_input("resnext18", input_shape)
    return ResNeXt(c, num_outputs, depth, cardinality, widen_factor)
