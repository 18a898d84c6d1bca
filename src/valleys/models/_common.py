"""Shape arithmetic, input-shape checks and initialisers shared by the model families."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from valleys import _validate as check

# Larger than any side a caller will give; only bounds the search for the smallest valid side.
_MAX_SIDE = 4096


def conv_out(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution (or pooling) along one axis; 0 when nothing is left."""
    if n < 1:
        return 0
    return max(0, (n + 2 * padding - kernel) // stride + 1)


def pool_out(n: int, size: int) -> int:
    """Output length of a max/avg pooling whose stride equals its size (floor mode)."""
    return conv_out(n, size, size)


def smallest_side(final_side: Callable[[int], int]) -> int:
    """The smallest input side for which ``final_side`` leaves at least one position."""
    return next((n for n in range(1, _MAX_SIDE) if final_side(n) >= 1), _MAX_SIDE)


def image_input(
    model: str, input_shape: tuple[int, ...], final_side: Callable[[int], int] | None = None
) -> tuple[int, int, int]:
    """Check that ``input_shape`` is ``(C, H, W)`` and large enough; return ``(C, H, W)``.

    ``final_side(n)`` maps an input side to the side of the last feature map (after every
    valid convolution and pooling); a model whose feature map would vanish is rejected with
    the smallest side that works.
    """
    if len(input_shape) != 3:
        hint = (
            "; load image sets unflattened (CLI: data.flatten=false)"
            if len(input_shape) == 1
            else ""
        )
        check.fail("input_shape", input_shape, f"{model} takes images shaped (C, H, W){hint}")
    c, h, w = input_shape
    if final_side is not None and min(final_side(h), final_side(w)) < 1:
        need = smallest_side(final_side)
        check.fail(
            "input_shape",
            input_shape,
            f"{model} takes images shaped (C, H, W) with H, W >= {need}: choose another model "
            "or a dataset with larger images",
        )
    return c, h, w


def rate(name: str, value: float) -> float:
    """A dropout probability in [0, 1)."""
    return check.interval(name, value, 0.0, 1.0, high_open=True)


def maybe_dropout(p: float) -> list[nn.Module]:
    """``[nn.Dropout(p)]``, or nothing when ``p`` is 0 so the layer list stays minimal."""
    return [nn.Dropout(p)] if p > 0 else []


def he_normal_fan_out_(module: nn.Module) -> None:
    """He (Kaiming) normal init with fan-out, N(0, 2 / (k·k·out)), for every conv; zero biases;
    BatchNorm scale 1 and shift 0. Linear layers are left to the caller.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            # torch's convention (kaiming_normal_, mode="fan_out"): groups are not divided out
            fan_out = m.out_channels * math.prod(m.kernel_size)
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
