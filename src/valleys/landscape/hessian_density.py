r"""The spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

Golub & Meurant (2010), "Matrices, Moments and Quadrature with Applications"; Ghorbani, Krishnan
& Xiao (2019), "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density".
``H`` is the Hessian of the full-dataset mean loss in eval mode, reached through
:class:`~valleys.landscape.hessian.HessianOperator`. For each unit Gaussian probe ``v``,
``m`` Lanczos steps started at ``v`` give a tridiagonal ``T = S Θ Sᵀ``; the quadrature nodes
are the Ritz values ``θ_j`` and the weights ``τ_j² = S_{1j}²`` (which sum to one). The
discrete measure ``Σ_j τ_j² δ(t − θ_j)`` reproduces ``vᵀ H^p v`` exactly for
``p ≤ 2m − 1`` (``e_1ᵀ T^p e_1``), and ``E[vᵀ H^p v] = tr(H^p)/n`` for a uniformly random unit
``v``: averaged over probes it estimates the spectral measure ``(1/n) Σ_i δ(t − λ_i)``.
The density is that measure broadened by Gaussians of width ``sigma``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from valleys import _validate as check
from valleys.landscape.common import Batches, LossFn, eval_mode
from valleys.landscape.hessian import HessianOperator, Progress, seeded
from valleys.linalg import lanczos

__all__ = ["DensityResult", "broaden", "spectral_density"]


@dataclass
class DensityResult:
    """Stochastic Lanczos quadrature (:func:`spectral_density`).

    ``nodes`` and ``weights`` (1-D, float64): the Ritz values of every probe and their
    quadrature weights divided by the number of probes, so that ``weights`` sums to one;
    ``probe`` the probe each node comes from. ``grid`` and ``density``: the measure
    broadened by Gaussians of standard deviation ``sigma``, ``φ(t) = Σ_j w_j N(t; θ_j,
    σ²)`` (integrates to one up to the tails outside the grid). ``n`` is the dimension.
    """

    nodes: Tensor
    weights: Tensor
    probe: Tensor
    grid: Tensor
    density: Tensor
    sigma: float
    num_probes: int
    lanczos_steps: int
    n: int
    products: int

    def moment(self, p: int) -> float:
        """``Σ_j w_j θ_j^p``, the estimate of ``tr(H^p)/n`` (exact in expectation for
        ``p ≤ 2·lanczos_steps − 1``)."""
        return float((self.weights * self.nodes**p).sum())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return {
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "probe": self.probe.tolist(),
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "sigma": self.sigma,
            "num_probes": self.num_probes,
            "lanczos_steps": self.lanczos_steps,
            "n": self.n,
            "products": self.products,
            "moments": [self.moment(1), self.moment(2)],
            "trace": self.n * self.moment(1),
        }


def broaden(
    nodes: Tensor, weights: Tensor, grid: Tensor | int = 1000, sigma: float | None = None
) -> tuple[Tensor, Tensor, float]:
    """``(grid, density, sigma)``: the discrete measure ``Σ_j w_j δ(t − θ_j)`` broadened by
    Gaussians of standard deviation ``sigma`` (default: 1% of the span of the nodes, or 1e-3
    of their magnitude when they coincide), evaluated on ``grid`` (a tensor, or a number of
    points spanning the nodes ± 5 sigma)."""
    nodes, weights = nodes.double().cpu(), weights.double().cpu()
    span = float(nodes.max() - nodes.min())
    if sigma is None:
        sigma = 0.01 * span if span > 0 else 1e-3 * max(float(nodes.abs().max()), 1.0)
    sigma = check.positive("sigma", sigma)
    if isinstance(grid, int):
        points = check.count("grid", grid, 2)
        grid = torch.linspace(
            float(nodes.min()) - 5 * sigma, float(nodes.max()) + 5 * sigma, points
        ).double()
    else:
        grid = torch.as_tensor(grid).double().cpu()
    z = (grid[:, None] - nodes[None, :]) / sigma
    density = (torch.exp(-0.5 * z**2) * weights).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return grid, density, sigma


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 60,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    cache: bool = True,
    hvp_method: str = "auto",
    progress: Progress = None,
) -> DensityResult:
    r"""The spectral density of the Hessian by stochastic Lanczos quadrature.

    For each of ``num_probes`` unit Gaussian probes, ``lanczos_steps`` Lanczos steps with full
    reorthogonalisation (fewer if the Krylov space becomes invariant; one product a step);
    see the module docstring. ``grid`` and ``sigma``: see :func:`broaden`. The Ritz values of
    each probe resolve the ends of the spectrum well (the top ones converge first) and the
    bulk only as a smoothed mass: ``sigma`` should not be much smaller than the spacing of the
    nodes there.
    """
    num_probes = check.count("num_probes", num_probes, 1)
    lanczos_steps = check.count("lanczos_steps", lanczos_steps, 1)
    op = HessianOperator(
        model, loss_fn, batches, params=params, cache=cache, method=hvp_method, progress=progress
    )
    gen = seeded(seed)
    nodes, weights, probe = [], [], []
    try:
        with eval_mode(model):
            for j in range(num_probes):
                v = torch.randn(op.numel, generator=gen, dtype=torch.float64)
                result = lanczos(
                    op.flat, v.to(op.device, op.dtype), lanczos_steps, keep_basis=False
                )
                theta, s = result.eigh()
                nodes.append(theta)
                weights.append(s[0] ** 2 / num_probes)
                probe.append(torch.full_like(theta, j, dtype=torch.long))
    finally:
        op.release()
    all_nodes, all_weights = torch.cat(nodes), torch.cat(weights)
    grid_t, density, sigma = broaden(all_nodes, all_weights, grid, sigma)
    return DensityResult(
        nodes=all_nodes,
        weights=all_weights,
        probe=torch.cat(probe),
        grid=grid_t,
        density=density,
        sigma=sigma,
        num_probes=num_probes,
        lanczos_steps=lanczos_steps,
        n=op.numel,
        products=op.products,
    )
