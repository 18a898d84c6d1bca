r"""The Hessian of the full-dataset loss through its products: top eigenpairs and trace.

``H = ∇²_θ f`` for ``f(θ) = Σ_b n_b ℓ_b(θ) / Σ_b n_b``, the per-sample-weighted mean of the
mean-reduced batch losses ``ℓ_b = loss_fn(model(x_b; θ), y_b)`` (see
:mod:`valleys.landscape.common`), over the trainable parameters (or those given), with the
model in eval mode: BatchNorm uses its running statistics, which are never updated, dropout
is off, and every module's training flag is restored afterwards. ``H`` is reached only
through Hessian-vector products (:class:`HessianOperator`, built on
:func:`valleys.curvature.hvp_fn`), so nothing here stores an ``n × n`` matrix:

* :func:`top_eigen` — the ``k`` extreme eigenvalues and eigenvectors by Lanczos with full
  reorthogonalisation (default) or by power (subspace) iteration, stopped once every
  residual ``‖H y_i − θ_i y_i‖`` is at most ``tol·max|θ|``. For a symmetric matrix an
  eigenvalue then lies within that residual of each ``θ_i``, and within
  ``residual²/gap`` once the spectrum separates it from its neighbours.
* :func:`hutchinson_trace` — ``tr H ≈ (1/m) Σ_j z_jᵀ H z_j`` over Rademacher (or Gaussian)
  probes ``z_j`` (Hutchinson 1989), with Student's-t confidence interval.

The spectral density (stochastic Lanczos quadrature) is in
:mod:`valleys.landscape.hessian_density`, the dense Hessian and its full spectrum in
:mod:`valleys.landscape.hessian_dense`; both build on :class:`HessianOperator` or the same
conventions.

Random draws come from a CPU generator seeded with ``seed``, so results do not depend on the
device. Every function returns a result object with ``to_dict()`` (plain data) and counts the
dataset Hessian-vector ``products`` it used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from valleys import _validate as check
from valleys import distributed
from valleys.curvature import hvp_fn
from valleys.landscape.common import (
    Batches,
    LossFn,
    batch_source,
    eval_mode,
    local_pass,
    trainable_parameters,
)
from valleys.linalg import from_vector, lanczos, to_vector

__all__ = [
    "WHICH",
    "EigenResult",
    "HessianOperator",
    "TraceResult",
    "hutchinson_trace",
    "top_eigen",
]

WHICH = ("largest", "smallest", "magnitude")
METHODS = ("lanczos", "power")
PROBES = ("rademacher", "gaussian")

Progress = Callable[[int], None] | None


class HessianOperator:
    """``v ↦ H v``, ``H`` the Hessian of the full-dataset mean loss in eval mode.

    Callable on a vector shaped like the parameters (a sequence of tensors, in the order of
    ``names``); :meth:`flat` takes and returns 1-D tensors. Each product is the
    ``n_b``-weighted mean of the batches' products (:func:`valleys.curvature.hvp_fn` with
    ``method``). With ``cache=True`` each batch's forward and backward pass is run once, on
    the first product, and kept (its activations stay in memory) so that a later product
    costs about one gradient's worth of work; ``cache=False`` redoes them for every product
    and holds one batch at a time. ``products`` counts the products made; ``progress(k)``,
    if given, is called after the ``k``-th. With a process group each rank takes its share of
    the batches (and caches only those) and the sums are added up over the ranks: every rank
    gets ``H v`` (see :mod:`valleys.landscape.common`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Batches,
        *,
        params: Iterable[Tensor] | None = None,
        cache: bool = True,
        method: str = "auto",
        progress: Progress = None,
    ) -> None:
        named = trainable_parameters(model, params)
        self.model, self.loss_fn, self.method = model, loss_fn, method
        self.names = list(named)
        self.values = [p.detach() for p in named.values()]
        self.numel = sum(v.numel() for v in self.values)
        self.cache = check.flag("cache", cache)
        self.progress = progress
        self.products = 0
        self._source = batch_source(batches)
        self._kept: list[tuple[int, Any]] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.values[0].dtype

    @property
    def device(self) -> torch.device:
        return self.values[0].device

    def _pairs(self) -> Iterable[tuple[int, Any]]:
        if self._kept is not None:
            yield from self._kept
            return
        kept: list[tuple[int, Any]] = []
        point = dict(zip(self.names, self.values, strict=True))
        for x, y in local_pass(self._source):
            count = int(y.shape[0]) if y.dim() > 0 else 1
            products = hvp_fn(self.model, self.loss_fn, x, y, params=point, method=self.method)
            if self.cache:
                kept.append((count, products))
            yield count, products
        if self.cache:
            self._kept = kept

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        total: list[Tensor] | None = None
        samples = 0
        with eval_mode(self.model):
            for count, products in self._pairs():
                out = products(list(v))
                if total is None:
                    total = [o * count for o in out]
                else:
                    torch._foreach_add_(total, out, alpha=count)
                samples += count
        if distributed.world_size() > 1:
            if total is None:  # no batch fell to this rank
                total = [torch.zeros_like(p) for p in self.values]
            total, samples = distributed.all_reduce_sum_count(total, samples)
        if total is None or samples == 0:
            check.fail("batches", "empty", "the batches hold no samples")
        self.products += 1
        if self.progress is not None:
            self.progress(self.products)
        torch._foreach_div_(total, samples)
        return total

    def flat(self, v: Tensor) -> Tensor:
        """``H v`` for a 1-D ``v`` of ``numel`` entries."""
        return to_vector(self(from_vector(v, self.values)))

    def release(self) -> None:
        """Drop the kept batch products (their activations)."""
        self._kept = None


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the probes, and so the results, do not depend on
    the device."""
    return torch.Generator().manual_seed(check.count("seed", seed))


def _order(values: Tensor, which: str) -> Tensor:
    """Indices of ``values`` in the order ``which`` ranks them (best first)."""
    key = {"largest": values, "smallest": -values, "magnitude": values.abs()}[which]
    return torch.argsort(key, descending=True, stable=True)


@dataclass
class EigenResult:
    """Extreme eigenpairs of the Hessian (:func:`top_eigen`).

    ``eigenvalues`` (``k``, float64, CPU), ranked by ``which`` (largest first, smallest first
    or largest magnitude first); ``eigenvectors`` the unit eigenvectors as rows ``(k, n)`` of
    the flattened parameters (order of ``names``; :meth:`vector` unflattens one);
    ``residuals`` the estimates of ``‖H y_i − θ_i y_i‖``; ``iterations`` Lanczos steps or
    power iterations; ``products`` dataset Hessian-vector products; ``converged`` whether
    every residual reached ``tol·scale`` (``scale`` the largest ``|θ|`` seen).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    iterations: int
    products: int
    converged: bool
    method: str
    which: str
    tol: float
    scale: float
    names: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    def vector(self, i: int) -> dict[str, Tensor]:
        """Eigenvector ``i`` as ``{name: tensor}`` shaped like the parameters."""
        flat, out, start = self.eigenvectors[i], {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = flat[start : start + size].view(shape)
            start += size
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON), without the eigenvectors."""
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "iterations": self.iterations,
            "products": self.products,
            "converged": self.converged,
            "method": self.method,
            "which": self.which,
            "tol": self.tol,
            "scale": self.scale,
            "parameters": sum(math.prod(s) for s in self.shapes),
        }


def _lanczos_top(op: HessianOperator, k: int, which: str, tol: float, max_iters: int, gen):
    n = op.numel
    start = torch.randn(n, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
    state: dict[str, Any] = {"stopped": False}

    def stop(alphas: Tensor, betas: Tensor) -> bool:
        j = alphas.numel()
        if j < k:
            return False
        t = torch.diag(alphas) + torch.diag(betas[:-1], 1) + torch.diag(betas[:-1], -1)
        theta, s = torch.linalg.eigh(t)
        pick = _order(theta, which)[:k]
        state["residuals"] = betas[-1].abs() * s[-1, pick].abs()
        state["converged"] = bool((state["residuals"] <= tol * theta.abs().max()).all())
        state["stopped"] = state["converged"] or j >= max_iters
        return state["stopped"]

    result = lanczos(op.flat, start, min(max_iters + 1, n), keep_basis=True, stop=stop)
    theta, _ = result.eigh()
    pick = _order(theta, which)[:k]
    vectors = result.ritz_vectors()[pick.to(result.basis.device)]
    if state["stopped"]:
        residuals, converged = state["residuals"], state["converged"]
    else:  # the Krylov space became invariant (a breakdown, or all n directions): exact
        residuals, converged = torch.zeros(len(pick), dtype=torch.float64), True
    return theta[pick], vectors, residuals, result.iters, converged, float(theta.abs().max())


def _power_top(op: HessianOperator, k: int, which: str, tol: float, max_iters: int, gen):
    """Subspace iteration with Rayleigh–Ritz on ``σ H + s I`` (``σ = −1`` for "smallest"):
    first with ``s = 0``, which finds the eigenvalues of largest magnitude; if those include
    one of the wrong sign, again with ``s`` = the largest magnitude found, which makes the
    wanted end of the spectrum the dominant one (and convergence slower)."""
    sign = -1.0 if which == "smallest" else 1.0
    shift, iterations = 0.0, 0
    while True:
        # a fresh start for each phase: the first phase's subspace is invariant for the second
        q = torch.randn(op.numel, k, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
        q = torch.linalg.qr(q).Q
        for _ in range(max_iters):
            w = torch.stack([op.flat(q[:, i]) for i in range(k)], 1) * sign + shift * q
            iterations += 1
            t = q.T @ w
            theta, s = torch.linalg.eigh((t + t.T) / 2)
            y, hy = q @ s, w @ s
            residuals = torch.linalg.vector_norm(hy - y * theta, dim=0).double().cpu()
            theta = theta.double().cpu() - shift  # eigenvalues of σ H (one sync a step)
            scale = float(theta.abs().max())
            converged = bool((residuals <= tol * scale).all())
            q = torch.linalg.qr(hy).Q
            if converged:
                break
        if which == "magnitude" or shift != 0.0 or bool((theta >= 0).all()):
            break
        shift = scale
    pick = _order(theta, "magnitude" if which == "magnitude" else "largest")[:k]
    vectors = y.T[pick.to(y.device)]
    return theta[pick] * sign, vectors, residuals[pick], iterations, converged, scale


def top_eigen(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    k: int = 1,
    *,
    method: str = "lanczos",
    which: str = "largest",
    tol: float = 1e-6,
    max_iters: int | None = None,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    cache: bool = True,
    hvp_method: str = "auto",
    progress: Progress = None,
) -> EigenResult:
    r"""The ``k`` eigenvalues of the Hessian at one end of its spectrum, with eigenvectors.

    ``which``: ``"largest"`` (algebraic, the default), ``"smallest"`` or ``"magnitude"``.
    ``method="lanczos"`` runs Lanczos with full reorthogonalisation from a Gaussian start
    (one product a step) until the ``k`` wanted Ritz pairs have residual estimates
    ``β_m|s_{m,i}|`` at most ``tol·max|θ|``, or ``max_iters`` steps (default
    ``min(n, 300)``), keeping the ``(steps, n)`` basis. ``method="power"`` runs subspace
    iteration on ``k`` vectors (``k`` products an iteration) with the same test, up to
    ``max_iters`` iterations (default 1000) per phase; its convergence rate is the ratio of
    the ``(k+1)``-th to the ``k``-th eigenvalue, so it is much slower than Lanczos when those
    are close. ``cache``, ``hvp_method``: see :class:`HessianOperator`; ``progress(products)``
    after each product.
    """
    k = check.count("k", k, 1)
    method = check.choice("method", method, METHODS)
    which = check.choice("which", which, WHICH)
    tol = check.positive("tol", tol)
    op = HessianOperator(
        model, loss_fn, batches, params=params, cache=cache, method=hvp_method, progress=progress
    )
    if k > op.numel:
        check.fail("k", k, f"at most the number of parameters, {op.numel}")
    default = min(op.numel, 300) if method == "lanczos" else 1000
    max_iters = default if max_iters is None else check.count("max_iters", max_iters, 1)
    gen = seeded(seed)
    try:
        with eval_mode(model):
            solve = _lanczos_top if method == "lanczos" else _power_top
            values, vectors, residuals, iterations, converged, scale = solve(
                op, k, which, tol, max_iters, gen
            )
    finally:
        op.release()
    return EigenResult(
        eigenvalues=values.double().cpu(),
        eigenvectors=vectors,
        residuals=residuals,
        iterations=iterations,
        products=op.products,
        converged=converged,
        method=method,
        which=which,
        tol=tol,
        scale=scale,
        names=op.names,
        shapes=[tuple(v.shape) for v in op.values],
    )


@dataclass
class TraceResult:
    """Hutchinson's estimate of ``tr H`` (:func:`hutchinson_trace`): the mean ``estimate`` of
    the probe values ``values`` (``zᵀ H z``), its standard error and the two-sided Student-t
    confidence interval ``[ci_low, ci_high]`` at level ``confidence``."""

    estimate: float
    stderr: float
    ci_low: float
    ci_high: float
    samples: int
    confidence: float
    distribution: str
    values: list[float]
    products: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return dict(self.__dict__)


def _probe(n: int, distribution: str, gen: torch.Generator) -> Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return torch.randn(n, generator=gen, dtype=torch.float64)


def hutchinson_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    samples: int = 100,
    seed: int = 0,
    confidence: float = 0.95,
    distribution: str = "rademacher",
    params: Iterable[Tensor] | None = None,
    cache: bool = True,
    hvp_method: str = "auto",
    progress: Progress = None,
) -> TraceResult:
    r"""Hutchinson's estimator ``tr H ≈ (1/m) Σ_j z_jᵀ H z_j`` with ``m = samples`` probes.

    Rademacher probes (entries ±1, the default) give the smallest variance among i.i.d.
    probes, ``2 Σ_{i≠j} H_ij²``; Gaussian probes add ``2 Σ_i H_ii²``. The interval is
    ``estimate ± t_{(1+confidence)/2, m−1}·stderr`` with ``stderr = std(values)/√m``: it
    relies on the mean of the ``m`` values being near normal, which holds for tens of probes.
    One product per probe; ``cache``, ``hvp_method``, ``progress``: see :func:`top_eigen`.
    """
    from scipy import stats

    samples = check.count("samples", samples, 2)
    confidence = check.interval("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    distribution = check.choice("distribution", distribution, PROBES)
    op = HessianOperator(
        model, loss_fn, batches, params=params, cache=cache, method=hvp_method, progress=progress
    )
    gen = seeded(seed)
    values = []
    try:
        with eval_mode(model):
            for _ in range(samples):
                z = _probe(op.numel, distribution, gen).to(op.device, op.dtype)
                values.append(torch.dot(z, op.flat(z)))
    finally:
        op.release()
    vals = torch.stack(values).double().cpu()  # the one sync
    mean, stderr = float(vals.mean()), float(vals.std() / math.sqrt(samples))
    half = float(stats.t.ppf((1 + confidence) / 2, samples - 1)) * stderr
    return TraceResult(
        estimate=mean,
        stderr=stderr,
        ci_low=mean - half,
        ci_high=mean + half,
        samples=samples,
        confidence=confidence,
        distribution=distribution,
        values=vals.tolist(),
        products=op.products,
    )
