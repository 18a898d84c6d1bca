"""All-CNN-C with BatchNorm ("All-CNN-BN"), Entropy-SGD's CIFAR-10 network (``cifarconv``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from valleys import _validate as check
from valleys.models._common import image_input, maybe_dropout, rate


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


def build_allcnn(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    input_dropout: float = 0.2,
    dropout: float = 0.5,
    channels: Sequence[int] = (96, 192),
) -> nn.Sequential:
    """Registry entry ``allcnn``: All-CNN-BN as in Entropy-SGD's Lua ``cifarconv`` and
    python ``allcnn`` (they agree).

    ``Dropout(input_dropout)``; 3×3 convs c1, c1, c1/stride 2; ``Dropout(dropout)``; 3×3 convs
    c2, c2, c2/stride 2; ``Dropout(dropout)``; 3×3 convs c2, c2; 1×1 conv ``num_outputs``;
    global average pooling. ``(c1, c2) = channels``. Every conv (the last one included, as in
    the original) is followed by BatchNorm and ReLU, and every 3×3 conv is padded by 1.

    The eighth conv is 3×3 here where All-CNN-C has 1×1 (ALGORITHMS.md §1.7). The original
    averages over a fixed 8×8 window, which on 32×32 inputs is the global average used here;
    global pooling lets other image sizes through. 1,667,166 parameters on 3×32×32 with 10
    classes.
    """
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        check.fail("channels", channels, "expected two channel counts (c1, c2)")
    if len(channels) != 2:
        check.fail("channels", channels, "expected two channel counts (c1, c2)")
    c1 = check.count("channels[0]", channels[0], 1)
    c2 = check.count("channels[1]", channels[1], 1)
    p_in, p = rate("input_dropout", input_dropout), rate("dropout", dropout)
    c, _, _ = image_input("allcnn", input_shape)
    return nn.Sequential(
        *maybe_dropout(p_in),
        *_conv_bn_relu(c, c1, 3),
        *_conv_bn_relu(c1, c1, 3),
        *_conv_bn_relu(c1, c1, 3, stride=2),
        *maybe_dropout(p),
        *_conv_bn_relu(c1, c2, 3),
        *_conv_bn_relu(c2, c2, 3),
        *_conv_bn_relu(c2, c2, 3, stride=2),
        *maybe_dropout(p),
        *_conv_bn_relu(c2, c2, 3),
        *_conv_bn_relu(c2, c2, 3),
        *_conv_bn_relu(c2, num_outputs, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
