"""Mixed precision for the curvature products: the autocast region in effect, float32 losses,
and loss scaling of the backward passes (see "Mixed precision" in :mod:`valleys.curvature`).

Private: :mod:`valleys._objective` and :mod:`valleys.curvature` use it. Every rescaling here
is by a power of two, so that with a power-of-two loss scale nothing is rounded beyond the
unscaled computation, and none needs a host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from valleys import linalg

__all__ = [
    "autocast_dtype",
    "binade",
    "master",
    "scale_tensor",
    "scaled_seed",
    "unit_tangent",
    "unseed",
]

_LOW = (torch.float16, torch.bfloat16)

Product = Callable[[list[Tensor]], list[Tensor]]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the ``torch.autocast`` region in effect for ``device``'s type, ``None``
    outside one."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
        return torch.get_autocast_dtype(device.type)
    except (RuntimeError, TypeError, AttributeError):  # a device type autocast does not know
        return None


def master(z: Tensor) -> Tensor:
    """``z`` in float32 if it is float16/bfloat16 (losses and their derivatives are computed
    in float32, as autocast computes losses), else ``z`` itself."""
    return z.float() if z.dtype in _LOW else z


def scale_tensor(loss_scale: float, device: torch.device) -> Tensor:
    """The loss scale as a 0-d float32 tensor: an input of the traced products, so that a new
    scale needs no new trace."""
    return torch.full((), float(loss_scale), dtype=torch.float32, device=device)


def binade(t: Tensor) -> Tensor:
    """``e`` with ``max|t| = m · 2^e``, ``m ∈ [0.5, 1)`` (0 for a zero ``t``), 0-d int."""
    return torch.frexp(t.detach().abs().amax()).exponent


def scaled_seed(w: Tensor, like: int | Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The backward vector of a scaled GGN product: ``w`` moved by a power of two into the
    binade ``like`` (that of ``∂ℓ/∂z``, whose scaled backward pass the loss scale is tuned
    for) and times the scale; returns it with the shift that :func:`unseed` undoes."""
    shift = like - binade(w)
    return torch.ldexp(w, shift) * scale, shift


def unseed(prods: Sequence[Tensor], shift: Tensor, scale: Tensor) -> list[Tensor]:
    """Products computed from :func:`scaled_seed`'s vector, brought back to ``Jᵀ w``."""
    return [torch.ldexp(p, -shift) / scale for p in prods]


def unit_tangent(product: Product) -> Product:
    """``product`` evaluated at ``v · 2^−e``, ``2^e`` the power of two at ``v``'s max-norm,
    and multiplied back by ``2^e``: the tangent pass ``J v`` of an fp16 forward neither
    underflows for a tiny CG vector nor overflows for a large one."""

    def rescaled(v: list[Tensor]) -> list[Tensor]:
        exponent = torch.frexp(linalg.norm(v, math.inf)).exponent
        one = torch.ones((), dtype=v[0].dtype, device=v[0].device)
        out = product(list(torch._foreach_mul(v, torch.ldexp(one, -exponent))))
        torch._foreach_mul_(out, torch.ldexp(one, exponent))
        return out

    return rescaled
