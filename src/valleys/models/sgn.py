"""The small convolutional networks of SGN's ``conv_net.py`` (architecture_1 and _4).

Convolutions are 'valid' with stride 1 and max-poolings have stride equal to their size (2),
as in the original; the flattened size follows from the input shape. SGN's sigmoid MLPs are the
``mlp`` registry entry with ``activation="sigmoid"``.
"""

from __future__ import annotations

from torch import nn

from valleys.models._common import conv_out, image_input, pool_out


def _fashion_side(n: int) -> int:
    return pool_out(conv_out(pool_out(conv_out(n, 5), 2), 5), 2)


def build_sgn_conv_fashion(input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
    """Registry entry ``sgn_conv_fashion`` (SGN architecture_1, used on Fashion-MNIST).

    LeNet-5-like: conv 6@5×5 → ReLU → max-pool 2 → conv 16@5×5 → ReLU → max-pool 2 → FC 120 →
    ReLU → FC 84 → ReLU → FC ``num_outputs``. On 1×28×28 the features are 16×4×4 = 256 and the
    model has 44,426 parameters. Images need H, W >= 16.
    """
    c, h, w = image_input("sgn_conv_fashion", input_shape, _fashion_side)
    flat = 16 * _fashion_side(h) * _fashion_side(w)
    return nn.Sequential(
        nn.Conv2d(c, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_outputs),
    )


def _cifar_side(n: int) -> int:
    return conv_out(pool_out(conv_out(pool_out(conv_out(n, 3), 2), 3), 2), 3)


def build_sgn_conv_cifar(input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
    """Registry entry ``sgn_conv_cifar`` (SGN architecture_4, the "VGG-type" CIFAR-10 net).

    conv 32@3×3 → ReLU → max-pool 2 → conv 64@3×3 → ReLU → max-pool 2 → conv 64@3×3 → ReLU →
    FC 64 → ReLU → FC ``num_outputs``. On 3×32×32 the features are 64×4×4 = 1,024 and the
    model has 122,570 parameters. Images need H, W >= 18.
    """
    c, h, w = image_input("sgn_conv_cifar", input_shape, _cifar_side)
    flat = 64 * _cifar_side(h) * _cifar_side(w)
    return nn.Sequential(
        nn.Conv2d(c, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 64),
        nn.ReLU(),
        nn.Linear(64, num_outputs),
    )
