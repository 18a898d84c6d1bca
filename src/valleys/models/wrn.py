"""Wide residual networks (Zagoruyko & Komodakis 2016), WRN-28-10 by default.

Two blocks are offered (``block=``):

- ``"standard"`` (default): the paper's pre-activation block, ``BN → ReLU → conv3×3 → BN →
  ReLU → Dropout → conv3×3`` plus the shortcut; the shortcut is the identity, or a bias-free
  1×1 conv on the pre-activated input where the width or stride changes. Convs have no bias;
  the network ends ``BN → ReLU → global average pool → Linear``. 36,479,194 parameters for
  WRN-28-10 with 10 classes.
- ``"tf_port"``: the non-standard block of the Entropy-SGD TensorFlow port (ALGORITHMS.md §2),
  ``BN → conv3×3 → ReLU → BN → Dropout → conv3×3 → ReLU`` plus the shortcut, where the first
  block of every group has a 1×1 projection conv (with bias, no BN) and the others the
  identity. Its convs have biases, its stem conv is followed by a ReLU, and every conv and
  linear weight is Xavier-uniform with zero bias. Same head as the standard one.

The TF port trained with dropout 0.3 (``conv_keep_prob 0.7``); the default here is 0.
"""

from __future__ import annotations

import torch
from torch import nn

from valleys import _validate as check
from valleys.models._common import he_normal_fan_out_, image_input, rate

BLOCKS = ("standard", "tf_port")


class WideBlock(nn.Module):
    """The standard pre-activation wide block."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.project = None
        if stride != 1 or in_channels != out_channels:
            self.project = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        # where the shape changes the projection sees the pre-activated input, as in the paper
        return out + (x if self.project is None else self.project(pre))


class TFPortBlock(nn.Module):
    """The TensorFlow port's block: ``relu(conv(drop(bn(relu(conv(bn(x))))))) + shortcut(x)``."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, dropout: float, project: bool
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1)
        self.project = nn.Conv2d(in_channels, out_channels, 1, stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(self.bn1(x)))
        out = torch.relu(self.conv2(self.dropout(self.bn2(out))))
        return out + (x if self.project is None else self.project(x))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: a 3×3 conv with 16 channels, three groups of
    ``(depth - 4) / 6`` blocks with widths ``16k, 32k, 64k`` and strides (1, 2, 2), then
    ``BN → ReLU → global average pool → Linear``. See the module docstring for ``block``.
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        block: str = "standard",
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        tf_port = block == "tf_port"
        stem: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1, bias=tf_port)]
        if tf_port:
            stem.append(nn.ReLU())
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        prev = 16
        for g, width in enumerate(widths):
            for i in range(n):
                stride = 2 if g > 0 and i == 0 else 1
                if tf_port:
                    blocks.append(TFPortBlock(prev, width, stride, dropout, project=i == 0))
                else:
                    blocks.append(WideBlock(prev, width, stride, dropout))
                prev = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(prev), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(prev, num_outputs)
        if tf_port:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        else:
            he_normal_fan_out_(self)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))))


def build_wrn(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
    block: str = "standard",
) -> WideResNet:
    """Registry entry ``wrn``: :class:`WideResNet`, WRN-28-10 by default.

    ``depth`` must be 6n + 4 (10, 16, 22, 28, 40, …). Global average pooling takes any image
    size (the originals pool 8×8, which is global on 32×32).
    """
    depth = check.count("depth", depth, 10)
    if (depth - 4) % 6:
        check.fail("depth", depth, "must be 6n + 4, e.g. 16, 22, 28 or 40")
    widen_factor = check.count("widen_factor", widen_factor, 1)
    p = rate("dropout", dropout)
    check.choice("block", block, BLOCKS)
    c, _, _ = image_input("wrn", input_shape)
    return WideResNet(c, num_outputs, depth, widen_factor, p, block)
