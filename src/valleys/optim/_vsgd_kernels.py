"""VSGD's per-coordinate step as plain tensor code (see :class:`valleys.optim.VSGD`).

* ``_reference_update``: one tensor at a time, written from the equations; the specification
  the other implementations are tested against.
* ``_foreach_update``: ``torch._foreach_*`` over tensor lists, the same kernels in the same
  order, hence bit-identical results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from valleys import linalg

# The original adds this to the doubled Gamma shape 2a = 2γ + 1 so that 2a − 1 > 0 at t = 1.
_SHAPE_OFFSET = 1e-4


@dataclass(frozen=True)
class _Constants:
    """The scalars of one step of one group, derived from the group's hyperparameters."""

    lr: float
    decay: float  # 1 − lr·weight_decay, the decoupled weight-decay factor
    pa2: float  # 2a = 2γ + 1 + 1e-4, the (fixed) doubled Gamma shape
    prior_g: float  # 2·b0,g = 2γ
    prior_hg: float  # 2·b0,ĝ = 2·K_g·γ
    first_g: float  # s_g at t = 1: 2γ / (2a − 1)
    first_hg: float  # s_ĝ at t = 1: 2·K_g·γ / (2a − 1)
    eps: float

    @classmethod
    def of(cls, group: dict[str, Any]) -> _Constants:
        lr, gamma = float(group["lr"]), float(group["ps"])
        pa2 = 2.0 * gamma + 1.0 + _SHAPE_OFFSET
        prior_g = 2.0 * gamma
        prior_hg = 2.0 * float(group["ghattg"]) * gamma
        return cls(
            lr=lr,
            decay=1.0 - lr * float(group["weight_decay"]),
            pa2=pa2,
            prior_g=prior_g,
            prior_hg=prior_hg,
            first_g=prior_g / (pa2 - 1.0),
            first_hg=prior_hg / (pa2 - 1.0),
            eps=float(group["eps"]),
        )


def _rates(step: int, group: dict[str, Any]) -> tuple[float, float]:
    """Robbins–Monro step sizes ρ1 = t^(−κ1), ρ2 = t^(−κ2), as Python floats (no device sync)."""
    return step ** -float(group["tau1"]), step ** -float(group["tau2"])


# ----------------------------------------------------------------------------------------------
# Reference and foreach: the same elementwise kernels (mul, div, addcmul, lerp, …) in the same
# order, so that "foreach" reproduces "reference" bit for bit.
# ----------------------------------------------------------------------------------------------


def _reference_update(
    p: Tensor,
    g: Tensor,
    mug: Tensor,
    bg: Tensor,
    bhg: Tensor,
    t: int,
    c: _Constants,
    rho: tuple[float, float],
) -> None:
    """One VSGD step on one tensor, in place on p, mug, bg, bhg (bg, bhg hold 2·b)."""
    rho1, rho2 = rho
    if c.decay != 1.0:
        p.mul_(c.decay)  # decoupled weight decay, before the update
    if t == 1:
        s_g = torch.full_like(g, c.first_g)  # 2γ / (2a − 1)
        s_hg = torch.full_like(g, c.first_hg)  # 2K_gγ / (2a − 1)
    else:
        s_g = bg / c.pa2  # b_g / a: variance of the random walk g_t − g_{t−1}
        s_hg = bhg / c.pa2  # b_ĝ / a: variance of the observation noise ĝ_t − g_t
    total = s_g + s_hg
    # μ = (ĝ s_g + μ_old s_ĝ) / (s_g + s_ĝ): precision-weighted fusion of prediction and datum
    mu = torch.addcmul(g * s_g, mug, s_hg) / total
    # σ² = s_g s_ĝ / (s_g + s_ĝ);  E[g²] = σ² + μ²
    var = s_g * s_hg / total
    second = torch.addcmul(var, mu, mu)
    # bg'  = 2γ    + E[g²] − 2μμ_old + μ_old² = 2γ    + σ² + (μ − μ_old)²
    # bhg' = 2K_gγ + E[g²] − 2ĝμ     + ĝ²     = 2K_gγ + σ² + (μ − ĝ)²
    d_g = mu - mug
    d_hg = mu - g
    bg.lerp_(torch.addcmul(var + c.prior_g, d_g, d_g), rho1)  # (1 − ρ1)·bg + ρ1·bg'
    bhg.lerp_(torch.addcmul(var + c.prior_hg, d_hg, d_hg), rho2)  # (1 − ρ2)·bhg + ρ2·bhg'
    mug.copy_(mu)
    p.addcdiv_(mu, second.sqrt() + c.eps, value=-c.lr)  # p − lr·μ / (sqrt(E[g²]) + eps)


# On CPU the foreach path runs over sub-lists of whole tensors holding at most this many
# elements: its scratch lists then stay small enough for malloc to recycle them instead of
# returning them to the system and faulting them in again on every step (about 2x faster on
# the ResNet-18 benchmark). On GPUs the caching allocator makes that moot and one launch per
# kernel is better.
_FOREACH_CHUNK_CPU = 1 << 20


def _foreach_update(
    ps: list[Tensor],
    gs: list[Tensor],
    mugs: list[Tensor],
    bgs: list[Tensor],
    bhgs: list[Tensor],
    t: int,
    c: _Constants,
    rho: tuple[float, float],
) -> None:
    """``_reference_update`` over lists that share one device, dtype and step t."""
    if ps[0].device.type != "cpu":
        _foreach_lists(ps, gs, mugs, bgs, bhgs, t, c, rho)
        return
    start, total = 0, 0
    for i, p in enumerate(ps):
        if total and total + p.numel() > _FOREACH_CHUNK_CPU:
            cut = slice(start, i)
            _foreach_lists(ps[cut], gs[cut], mugs[cut], bgs[cut], bhgs[cut], t, c, rho)
            start, total = i, 0
        total += p.numel()
    cut = slice(start, len(ps))
    _foreach_lists(ps[cut], gs[cut], mugs[cut], bgs[cut], bhgs[cut], t, c, rho)


def _foreach_lists(
    ps: list[Tensor],
    gs: list[Tensor],
    mugs: list[Tensor],
    bgs: list[Tensor],
    bhgs: list[Tensor],
    t: int,
    c: _Constants,
    rho: tuple[float, float],
) -> None:
    """The same kernels as ``_reference_update`` in the same order, over tensor lists: the
    results are identical bit for bit.

    Temporaries are updated in place wherever a kernel has an in-place form and dropped as
    soon as they are dead: at most four temporary lists are alive at once, where the
    reference holds about one per term of the equations.
    """
    rho1, rho2 = rho
    if c.decay != 1.0:
        torch._foreach_mul_(ps, c.decay)
    if t == 1:
        a = [torch.full_like(g, c.first_g) for g in gs]
        b = [torch.full_like(g, c.first_hg) for g in gs]
    else:
        a = torch._foreach_div(bgs, c.pa2)  # s_g
        b = torch._foreach_div(bhgs, c.pa2)  # s_ĝ
    e = torch._foreach_add(a, b)  # s_g + s_ĝ
    m = torch._foreach_mul(gs, a)
    torch._foreach_addcmul_(m, mugs, b)
    torch._foreach_div_(m, e)  # m = μ
    torch._foreach_mul_(a, b)
    del b
    torch._foreach_div_(a, e)  # a = σ²
    e = torch._foreach_addcmul(a, m, m)  # e = E[g²]
    # mug is overwritten with μ at the end, so meanwhile it can hold μ_old − μ: a square does
    # not depend on the sign of what is squared, bit for bit
    torch._foreach_sub_(mugs, m)
    b = torch._foreach_add(a, c.prior_g)
    torch._foreach_addcmul_(b, mugs, mugs)  # bg'
    torch._foreach_lerp_(bgs, b, rho1)
    del b
    b = torch._foreach_sub(m, gs)  # μ − ĝ
    torch._foreach_add_(a, c.prior_hg)
    torch._foreach_addcmul_(a, b, b)  # bhg'
    torch._foreach_lerp_(bhgs, a, rho2)
    del a, b
    linalg.copy_(mugs, m)
    torch._foreach_sqrt_(e)
    torch._foreach_add_(e, c.eps)
    torch._foreach_addcdiv_(ps, m, e, value=-c.lr)
