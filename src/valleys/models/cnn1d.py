"""The small 1-D CNN published with MNIST-1D (Greydanus 2020)."""

from __future__ import annotations

from torch import nn

from valleys import _validate as check
from valleys.models._common import conv_out, smallest_side

# (kernel, stride, padding) of the three convolutions of the published network
LAYERS = ((5, 2, 1), (3, 2, 1), (3, 2, 1))


def _final_length(n: int) -> int:
    for kernel, stride, padding in LAYERS:
        n = conv_out(n, kernel, stride, padding)
    return n


def build_cnn1d(
    input_shape: tuple[int, ...], num_outputs: int, *, channels: int = 25
) -> nn.Sequential:
    """Registry entry ``cnn1d``: three ``Conv1d(channels) → ReLU`` layers with stride 2 and
    padding 1, kernels 5, 3, 3 (as published; the paper reports about 94 % on MNIST-1D), then
    one linear layer over the flattened features.

    Takes a sequence shaped ``(L,)`` (one channel is added) or ``(C, L)``. On MNIST-1D's
    ``(40,)`` the lengths are 40 → 19 → 10 → 5, the features 25×5 = 125 and the model has 5,210
    parameters. Needs L >= 3.
    """
    channels = check.count("channels", channels, 1)
    shape = tuple(input_shape)
    if len(shape) not in (1, 2) or _final_length(shape[-1]) < 1:
        need = smallest_side(_final_length)
        check.fail(
            "input_shape",
            input_shape,
            f"cnn1d takes sequences shaped (L,) or (C, L) with L >= {need}",
        )
    length = shape[-1]
    in_channels = 1 if len(shape) == 1 else shape[0]
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))] if len(shape) == 1 else []
    prev = in_channels
    for kernel, stride, padding in LAYERS:
        layers += [nn.Conv1d(prev, channels, kernel, stride, padding), nn.ReLU()]
        prev = channels
    layers += [nn.Flatten(), nn.Linear(channels * _final_length(length), num_outputs)]
    return nn.Sequential(*layers)
