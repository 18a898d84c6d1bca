"""Keskar ε-sharpness: how much the full loss can rise inside a small box around the weights.

Keskar et al. (2017), "On Large-Batch Training for Deep Learning: Generalization Gap and
Sharp Minima", metric 2.1 in the full space (A = I)::

    C_ε = { z : |z_i| ≤ ε (|x_i| + 1) }
    φ(x, ε) = 100 · ( max_{z ∈ C_ε} f(x + z) − f(x) ) / ( 1 + f(x) )

``x`` are the parameters (buffers such as BatchNorm statistics are not perturbed), ``f`` the
full-dataset mean loss in eval mode (:func:`~valleys.landscape.common.full_loss`).

Two ways to approximate the inner maximum, both reporting the largest full loss they saw
(never less than ``f(x)``, since ``z = 0`` is in the box):

* :func:`keskar_sharpness`: projected gradient ascent on ``z`` with its own optimizer
  (Iyer et al., "Wide-minima density hypothesis", arXiv 2003.03977, the Knee-schedule paper's
  first-order replacement), clamping ``z`` onto the box after every step;
* :func:`keskar_sharpness_lbfgsb`: Keskar's bounded L-BFGS-B (SciPy) on the full loss, for
  models small enough to hand SciPy a float64 copy of the parameters.

Both are local methods: they climb to a local maximum over the box, which for small ε (the
loss nearly linear over the box) is the global one, but for a wide box may not be (a convex
loss has its box maximum at a vertex, and the ascent reaches the vertex its gradient points
to). The sharpness reported is thus a lower bound on φ.

Differences from the released ascent code (``ComputeKeskarSharpness``): the ascent never reuses
the training optimizer (whose momentum and weight decay would leak in), runs in eval mode
(dropout off, BatchNorm on its running statistics, which stay untouched) instead of train mode,
perturbs parameters only, and reports the running maximum of the full loss instead of the full
loss at the final iterate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from valleys import _validate as check
from valleys.landscape.common import (
    Batches,
    LossFn,
    as_stream,
    batch_source,
    call_with,
    eval_mode,
    full_loss,
    full_loss_and_grad,
    trainable_parameters,
)

__all__ = [
    "OBJECTIVES",
    "SMALL_DATASET",
    "SharpnessResult",
    "keskar_sharpness",
    "keskar_sharpness_lbfgsb",
    "sharpness_value",
]

OBJECTIVES = ("batch", "full")

#: Datasets up to this many samples get a full-loss evaluation after every ascent step by
#: default; larger ones about 20 in all (see ``eval_every``).
SMALL_DATASET = 10_000


def sharpness_value(f0: float, fmax: float) -> float:
    """``100 (fmax − f0) / (1 + f0)``."""
    return 100.0 * (fmax - f0) / (1.0 + f0)


@dataclass
class SharpnessResult:
    """The outcome of a sharpness computation.

    ``sharpness`` is φ computed from ``f0`` (the full loss at the weights) and ``fmax`` (the
    largest full loss evaluated inside the box); ``final`` is the full loss at the last
    iterate (for L-BFGS-B at the point SciPy returns), ``best_step`` the step (ascent) or
    evaluation (L-BFGS-B) where ``fmax`` was seen.
    ``history`` lists ``(step, full loss)`` for every full-loss evaluation, ``(0, f0)`` first;
    for L-BFGS-B the "step" is the evaluation's index. ``steps`` counts ascent steps or
    L-BFGS-B iterations, ``evaluations`` full-loss evaluations (f0 included).
    """

    sharpness: float
    f0: float
    fmax: float
    final: float
    best_step: int
    epsilon: float
    method: str
    steps: int
    evaluations: int
    history: list[tuple[int, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        out = asdict(self)
        out["history"] = [list(h) for h in self.history]
        return out


def _box(base: list[Tensor], epsilon: float) -> list[Tensor]:
    return [epsilon * (b.abs() + 1) for b in base]


def _result(
    losses: list[Tensor],
    at: list[int],
    *,
    epsilon: float,
    method: str,
    steps: int,
    info: dict[str, Any],
) -> SharpnessResult:
    values = torch.stack([v.reshape(()) for v in losses]).double().cpu().tolist()  # one sync
    finite = [v if math.isfinite(v) else math.inf for v in values]
    best = max(range(len(finite)), key=lambda i: finite[i])
    f0, fmax = values[0], finite[best]
    return SharpnessResult(
        sharpness=sharpness_value(f0, fmax),
        f0=f0,
        fmax=fmax,
        final=values[-1],
        best_step=at[best],
        epsilon=epsilon,
        method=method,
        steps=steps,
        evaluations=len(values),
        history=list(zip(at, values, strict=True)),
        info=info,
    )


def keskar_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    epsilon: float = 1e-4,
    lr: float = 1e-3,
    steps: int = 1000,
    params: Iterable[Tensor] | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    objective: str = "batch",
    ascent_batches: Batches | None = None,
    eval_every: int | None = None,
    callback: Callable[[int], None] | None = None,
) -> SharpnessResult:
    """Keskar ε-sharpness by projected gradient ascent (see the module docstring).

    A perturbation ``z`` (zero at first, one tensor per parameter) is driven up the loss by
    ``optimizer(z, lr=lr, **optimizer_kwargs)`` (plain SGD by default; a fresh optimizer,
    never the training one) and clamped elementwise onto ``|z_i| ≤ ε(|x_i| + 1)`` after every
    step. The model is evaluated at ``x + z`` through ``torch.func.functional_call``: its
    parameters, buffers, ``.grad`` and training flag are the same afterwards.

    Args:
        model, loss_fn, batches: the model, a mean-reduced loss ``loss_fn(output, target)``
            and the dataset defining ``f`` (see :mod:`valleys.landscape.common`), on the
            model's device. Keskar's definition uses the training set.
        epsilon: ε, the relative box radius (Keskar: 1e-3 and 5e-4; Iyer et al.: 1e-4).
        lr: the ascent optimizer's learning rate (Iyer et al.: 1e-3, tuned on CIFAR-10 /
            ResNet-18 with momentum SGD; re-tune elsewhere).
        steps: ascent steps (Iyer et al.: 1000).
        params: the parameters to perturb (default: all that require grad); the others stay.
        optimizer, optimizer_kwargs: the ascent optimizer's class (or factory) and its
            arguments besides ``lr``, e.g. ``{"momentum": 0.9}``.
        objective: what each step ascends: ``"batch"``, the loss of the next mini-batch of
            ``ascent_batches`` (as the original); ``"full"``, the full loss ``f`` (one forward
            and backward pass over ``batches`` per step, which also gives ``f`` at each
            iterate for free).
        ascent_batches: the mini-batches of the ``"batch"`` objective: an endless stream (an
            iterator, e.g. a shuffling ``BatchStream``) or a collection passed over again and
            again. Default: ``batches``, cycled in order.
        eval_every: with ``"batch"``, evaluate ``f`` at the iterate after every
            ``eval_every``-th step and after the last. Each evaluation is one forward pass over
            the whole dataset, as much as ``N/B`` ascent steps of batch ``B``, so evaluating
            every step multiplies the cost by about ``1 + N/(3B)``; the running maximum is only
            taken over evaluated iterates. Default: 1 for datasets of at most
            :data:`SMALL_DATASET` samples, else ``max(1, steps // 20)``.
        callback: called with the step number after each step (progress bars); nothing in
            the loop synchronises with the device.

    Returns:
        :class:`SharpnessResult` with ``method="ascent"``.
    """
    epsilon = check.positive("epsilon", epsilon)
    lr = check.positive("lr", lr)
    steps = check.count("steps", steps, 0)
    objective = check.choice("objective", objective, OBJECTIVES)
    if eval_every is not None:
        eval_every = check.count("eval_every", eval_every, 1)
    named = trainable_parameters(model, params)
    names = list(named)
    base = [p.detach() for p in named.values()]
    radius = _box(base, epsilon)
    z = [torch.zeros_like(b, requires_grad=True) for b in base]
    opt = optimizer(z, lr=lr, **dict(optimizer_kwargs or {}))
    source = batch_source(batches)

    def current() -> dict[str, Tensor]:
        return {n: b + zi for n, b, zi in zip(names, base, z, strict=True)}

    with eval_mode(model):
        first = full_loss(model, loss_fn, source)
        losses, at = [first.loss], [0]
        if eval_every is None:
            eval_every = 1 if first.count <= SMALL_DATASET else max(1, steps // 20)
        stream = as_stream(ascent_batches if ascent_batches is not None else source)
        for k in range(1, steps + 1):
            if objective == "batch":
                x, y = next(stream)
                loss = loss_fn(call_with(model, current(), x), y)
                grads = torch.autograd.grad(loss, z)
            else:
                loss, grads = full_loss_and_grad(model, loss_fn, source, z, current)
                if k > 1:  # the iterate reached by step k − 1
                    losses.append(loss)
                    at.append(k - 1)
            for zi, g in zip(z, grads, strict=True):
                zi.grad = -g  # ascent: the optimizer minimises −loss
            opt.step()
            with torch.no_grad():
                for zi, r in zip(z, radius, strict=True):
                    torch.clamp(zi, -r, r, out=zi)
            if k == steps or (objective == "batch" and k % eval_every == 0):
                with torch.no_grad():
                    losses.append(full_loss(model, loss_fn, source, current()).loss)
                at.append(k)
            if callback is not None:
                callback(k)
    info = {
        "lr": lr,
        "objective": objective,
        "eval_every": eval_every if objective == "batch" else 1,
        "optimizer": getattr(optimizer, "__name__", type(opt).__name__),
        "optimizer_kwargs": dict(optimizer_kwargs or {}),
        "samples": first.count,
        "num_params": sum(b.numel() for b in base),
    }
    return _result(losses, at, epsilon=epsilon, method="ascent", steps=steps, info=info)


def keskar_sharpness_lbfgsb(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    epsilon: float = 1e-4,
    params: Iterable[Tensor] | None = None,
    max_iterations: int = 10,
    max_params: int | None = 1_000_000,
    callback: Callable[[int], None] | None = None,
) -> SharpnessResult:
    """Keskar ε-sharpness with the box maximum found by SciPy's L-BFGS-B (Keskar's method).

    Minimises ``−f(x + z)`` over ``z`` in the box with ``scipy.optimize.minimize(method=
    "L-BFGS-B", jac=True, bounds=…)`` starting from ``z = 0``, for at most ``max_iterations``
    iterations (Keskar et al. maximise inexactly with a few iterations; raise it for a tighter
    maximum). ``f`` and its gradient are full passes over ``batches`` in eval mode through
    :func:`~valleys.landscape.common.full_loss_and_grad`; SciPy works on a flattened float64
    copy of the parameters, so every evaluation copies them between device and host (one
    synchronisation per evaluation, inherent to SciPy). ``fmax`` is the largest loss of all
    evaluations (every point L-BFGS-B evaluates lies in the box).

    ``max_params``: models with more perturbed parameters are refused with a ``ValueError``
    (SciPy holds several float64 vectors of that size, about ``2 m + 4`` with memory ``m = 10``);
    ``None`` lifts the limit. Other arguments as in :func:`keskar_sharpness`; ``callback`` is
    called with the evaluation count after each evaluation.
    """
    import numpy as np

    try:
        from scipy.optimize import Bounds, minimize
    except ImportError:  # pragma: no cover - scipy is a dependency
        raise ImportError("keskar_sharpness_lbfgsb needs SciPy: pip install scipy") from None

    epsilon = check.positive("epsilon", epsilon)
    max_iterations = check.count("max_iterations", max_iterations, 1)
    named = trainable_parameters(model, params)
    names = list(named)
    base = [p.detach() for p in named.values()]
    sizes = [b.numel() for b in base]
    n = sum(sizes)
    if max_params is not None and n > max_params:
        raise ValueError(
            f"Invalid model for L-BFGS-B sharpness: {n} parameters (more than "
            f"max_params={max_params}; use the projected ascent, or raise max_params)"
        )
    if n > 100_000:
        warnings.warn(
            f"L-BFGS-B sharpness on {n} parameters: every evaluation copies them to the host",
            RuntimeWarning,
            stacklevel=2,
        )
    radius = torch.cat([r.reshape(-1) for r in _box(base, epsilon)]).double().cpu().numpy()
    source = batch_source(batches)
    losses: list[Tensor] = []

    def unflatten(vec: np.ndarray) -> list[Tensor]:
        flat = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float64))
        parts = torch.split(flat, sizes)
        return [
            p.reshape(b.shape).to(device=b.device, dtype=b.dtype)
            for p, b in zip(parts, base, strict=True)
        ]

    def objective(vec: np.ndarray) -> tuple[float, np.ndarray]:
        z = [t.requires_grad_() for t in unflatten(vec)]

        def current() -> dict[str, Tensor]:
            return {n: b + zi for n, b, zi in zip(names, base, z, strict=True)}

        loss, grads = full_loss_and_grad(model, loss_fn, source, z, current)
        losses.append(loss.detach())
        if callback is not None:
            callback(len(losses))
        grad = torch.cat([g.reshape(-1) for g in grads]).double().cpu().numpy()
        return -float(loss), -grad

    with eval_mode(model):
        f0 = full_loss(model, loss_fn, source)
        res = minimize(
            objective,
            np.zeros(n),
            jac=True,
            method="L-BFGS-B",
            bounds=Bounds(-radius, radius),
            options={"maxiter": max_iterations},
        )
    all_losses = [f0.loss, *losses]
    at = list(range(len(all_losses)))
    info = {
        "max_iterations": max_iterations,
        "scipy_message": str(res.message),
        "samples": f0.count,
        "num_params": n,
    }
    steps = int(res.nit)
    result = _result(all_losses, at, epsilon=epsilon, method="lbfgsb", steps=steps, info=info)
    result.final = -float(res.fun)  # the loss at SciPy's answer, one of the evaluations
    return result
