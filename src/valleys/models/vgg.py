"""VGG with BatchNorm and no fully connected layers, as in VSGD's CIFAR-100/TinyImageNet runs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from valleys.models._common import he_normal_fan_out_, image_input, pool_out

# (width, number of 3×3 convs) per stage; every stage ends in a 2×2 max-pool
CONFIGS: dict[str, tuple[tuple[int, int], ...]] = {
    "D": ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)),  # VGG-16 (Simonyan & Zisserman)
    "E": ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4)),  # VGG-19
}


def vgg_bn(in_channels: int, num_outputs: int, stages: Sequence[tuple[int, int]]) -> nn.Sequential:
    """For each ``(width, n)`` in ``stages``, n times ``Conv3×3(pad 1) → BN → ReLU`` and a 2×2
    max-pool; then global average pooling and one ``Linear(last width, num_outputs)``.

    Initialisation as in the VSGD code: He normal with fan-out, N(0, 2 / (9·out)), for the
    convs with zero biases; BatchNorm 1/0; the linear head N(0, 0.01²) with zero bias.
    """
    layers: list[nn.Module] = []
    prev = in_channels
    for width, n in stages:
        for _ in range(n):
            layers += [nn.Conv2d(prev, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            prev = width
        layers.append(nn.MaxPool2d(2))
    head = nn.Linear(prev, num_outputs)
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    he_normal_fan_out_(model)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    return model


def _build(name: str, config: str, input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
    pools = len(CONFIGS[config])

    def final_side(n: int) -> int:
        for _ in range(pools):
            n = pool_out(n, 2)
        return n

    c, _, _ = image_input(name, input_shape, final_side)
    return vgg_bn(c, num_outputs, CONFIGS[config])


def build_vgg16_bn(input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
    """Registry entry ``vgg16_bn``: VGG-16 (config D) with BatchNorm, GAP and Linear(512, C).

    14,728,266 parameters on 3×32×32 with 10 classes. Five 2×2 poolings: H, W >= 32.
    """
    return _build("vgg16_bn", "D", input_shape, num_outputs)


def build_vgg19_bn(input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
    """Registry entry ``vgg19_bn``: VGG-19 (config E) with BatchNorm, GAP and Linear(512, C).

    20,040,522 parameters on 3×32×32 with 10 classes. Five 2×2 poolings: H, W >= 32.
    """
    return _build("vgg19_bn", "E", input_shape, num_outputs)
