r"""SGN: stochastic generalised Gauss–Newton (Gargiani, Zanelli, Diehl, Hutter 2020).

M. Gargiani, A. Zanelli, M. Diehl, F. Hutter, "On the Promise of the Stochastic Generalized
Gauss-Newton Method for Training DNNs", arXiv:2006.02409. Each step approximately solves a
Levenberg–Marquardt-damped GGN system on the current mini-batch with a few conjugate-gradient
iterations, then sets the step size by a backtracking line search and the damping by a
trust-region rule. The GGN products come from :func:`valleys.curvature.ggn_fn`, the solver
from :func:`valleys.linalg.cg`; the pure functions :func:`scheduled_damping` and
:func:`trust_region_update` hold the two damping rules.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from valleys import _validate as check
from valleys import curvature, distributed, linalg
from valleys.optim._sgn_rules import (
    DAMPING_SCHEDULES,
    scheduled_damping,
    trust_region_update,
    validated,
)

__all__ = ["DAMPING_SCHEDULES", "SGN", "scheduled_damping", "trust_region_update"]


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


class _Checked:
    """A GGN product that records in ``overflow`` (a 0-d bool tensor, no host sync) whether
    any result held inf/NaN."""

    def __init__(self, prod: curvature.Products, overflow: Tensor) -> None:
        self.prod, self.overflow = prod, overflow

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        out = self.prod(v)
        self.overflow = self.overflow | ~torch.isfinite(linalg.norm(out, math.inf))
        return out


class SGN(torch.optim.Optimizer):
    r"""Stochastic generalised Gauss–Newton (Gargiani et al. 2020), for any ``nn.Module``.

    **Update.** With ``z = f(x; θ)`` the model outputs on the batch, ``ℓ`` the mean loss,
    ``J = ∂z/∂θ``, ``H_ℓ = ∂²ℓ/∂z²`` and ``G = Jᵀ H_ℓ J`` (the GGN), a step on the batch B::

        ℓ_0, g ← loss and gradient on B;  t ← t + 1
        m ← β m + (1 − β) g;  m̂ ← m / (1 − β^t)                  (β = 0: m̂ = g)
        ρ_t ← ρ (trust region) or the damping schedule at t
        k_max ← cg_warmup_iters during the first cg_warmup_steps steps, cg_max_iters after
        Δ ← CG on (G + ρ_t I) Δ = −m̂ from Δ = 0, at most k_max iterations or ‖r‖_∞ ≤ cg_tol,
            preconditioned by M = (m̂ ⊙ m̂ + ρ_t)^(−precond_exponent) if ``precondition``
        α ← α_0;  ℓ_1 ← ℓ(θ + α Δ; B)                              (if LS or TR)
        TR:  pred = α<g, Δ> + ½ α² Δᵀ(G + ρ_t I)Δ;  r = (ℓ_1 − ℓ_0)/pred
             ρ ← 1.5 ρ if r < 1/4;  ρ ← max(⅔ ρ, ρ_min) if r > 3/4
        LS:  while ℓ_1 > ℓ_0 + c α <m̂, Δ> and i < ls_max_iters:  α ← γ α;  ℓ_1 ← ℓ(θ + α Δ; B)
        θ ← θ + α Δ

    **Symbols and arguments.** α_0 — ``lr`` (the original ALPHA, default 1: the Gauss–Newton
    step; a learning-rate schedule scales it). ρ_0 — ``damping`` (DAMP_RHO, 1e-3; the paper's
    runs use 1e-4). ρ_min — ``damping_min`` (DAMP_RHO_MIN, 0; the runs use 1e-6). TR —
    ``trust_region`` (default on, as the README and scripts; the original class defaults to
    off). Schedule — ``damping_schedule`` ∈ {"const", "linear", "cos"} over K =
    ``damping_schedule_steps`` steps (RHO_DECAY, K; used only with the trust region off; see
    :func:`scheduled_damping`). ``cg_max_iters`` (MAX_CG_ITERS, 10; the paper uses 1–10),
    ``cg_warmup_iters`` and ``cg_warmup_steps`` (the original's MIN_CG_ITERS and K_CG, which
    had no defaults; the scripts' 10 and 10), ``cg_tol`` (CG_TOL, an absolute max-norm
    tolerance, 1e-6: in practice every step runs k_max iterations). ``precondition``
    (CG_PREC, off) and ``precond_exponent`` (ALPHA_EXP ∈ [0, 1], 1). β — ``momentum`` (BETA,
    0). LS — ``line_search`` (on), c — ``ls_c`` (C_LS, 1e-4), γ — ``ls_factor`` (RHO_LS,
    0.5), ``ls_max_iters`` (MAX_LS_ITERS, 10). The trust-region rule runs on the α_0 trial
    point, before the line search, as in the original.

    **Differences from the original** (``faithful=True`` restores its behaviour):

    1. Armijo: the bound is ``ℓ_0 + c α <m̂, Δ>`` with the current α; the original computes it
       once with α_0, so backtracking never tightens it.
    2. A step whose loss has not decreased after the last backtrack (Armijo still failing and
       ``ℓ_1 ≥ ℓ_0``), or whose trial loss is not finite, is rejected (θ unchanged, α = 0);
       the original keeps the last, tiny step whatever its loss (and lets a NaN loss pass the
       test, as ``NaN > bound`` is false).
    3. Trust region: the ratio is used only when ``pred < 0`` and ``ℓ_1`` is finite; otherwise
       the model promised no decrease and ρ grows by 1.5 (the original divides by any
       ``pred``, and a positive ``pred`` with an increased loss could shrink ρ). ``pred`` is
       the damped quadratic model of the loss with the gradient g at the trial point αΔ; the
       original's ``½ <r + g, Δ>`` (r its CG residual ``(G + ρI)Δ + m̂``) equals it for
       β = 0 and α_0 = 1 only.
    4. A non-finite CG solution rejects the step (and grows ρ under the trust region); the
       original raises (``faithful=True`` raises ``FloatingPointError``).
    5. Warm-up length: cg_warmup_iters are used for steps t = 1 … cg_warmup_steps; the
       original's test ``t ≥ K_CG`` (after incrementing t) gives K_CG − 1 warm-up steps.

    **Calling.** ``loss = opt.step(inputs, targets)`` returns ℓ_0 (the pre-step loss, a 0-d
    tensor). Every evaluation of a step uses that one batch: the gradient, the CG products,
    the trust-region and line-search losses. ``model`` and ``loss_fn`` are given to the
    constructor; ``loss_fn`` is ``"cross_entropy"``, ``"mse"``, a torch loss or any
    ``loss(z, y)`` (:func:`valleys.curvature.output_loss`). The closure form
    ``opt.step(closure)`` takes an object whose ``batch()`` returns the step's
    ``(inputs, targets)`` (``valleys.train.make_closure(..., same_batch=True)``); SGN never
    calls the closure itself, since it computes every pass through the model on its own, and
    reports the step's passes to ``closure.add_passes(n)`` if the closure has it.

    **Cost.** One forward and backward pass for loss and gradient (the same pass prepares the
    GGN products), one GGN product per CG iteration (about one gradient each), one forward
    pass per trial loss (1 + backtracks with LS or TR). BatchNorm running statistics are
    updated once per step; dropout uses one set of masks for all of a step's evaluations (see
    :mod:`valleys.curvature`).

    **State.** In ``state[first parameter]``: ``step`` (t) and ``damping`` (the adaptive ρ);
    in ``state[p]``: ``momentum_buffer`` (m) when β > 0. ``state_dict`` resumes exactly. SGN
    has one parameter group: the trainable parameters of ``model`` (``requires_grad``),
    solved as one system. Between steps it also keeps scratch storage (not state): four
    parameter-sized buffers, six with the preconditioner, seven with momentum.

    **Several processes** (data parallelism, each holding the whole model and its part of the
    batch): the loss and gradient, every GGN product inside CG and every trial loss of the
    line search and trust region are averaged over the processes (:attr:`reduce`), so that
    every process runs the same global CG on the global batch's GGN and takes the same step.
    A sharded model (FSDP) is refused: CG and the products act on full parameter vectors.

    **Mixed precision.** ``step(..., autocast=ctx)`` (a callable returning a context manager,
    e.g. ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``; or the closure's
    ``autocast``, or an autocast region around the call) runs every forward pass of the step
    (gradient, GGN products, trial losses) under autocast; the loss and its output-space
    derivatives are computed in float32, and g, m̂, CG's vectors, Δ and the losses compared
    by the line search and trust region are float32 master values (the parameters' dtype).
    ``step(..., scaler=s)`` (an object with a ``scale`` attribute such as
    ``valleys.train.LossScaler``, or the closure's ``scaler``) adds fp16 loss scaling: the
    gradient's and each GGN product's backward pass carry the scale (``Jᵀ(sH_ℓ)Jv = sGv``:
    the scale enters through H_ℓ only, see :mod:`valleys.curvature`), which is divided out
    again. If the gradient or any product holds inf/NaN, the step is skipped as a whole —
    θ, momentum, ρ and t stay as they were — ``found_inf`` is True (and the closure's
    ``found_inf`` is set), and the caller updates the scale (``scaler.update(opt.found_inf)``;
    the training loop does). A trial loss is a forward pass only, untouched by the scale: a
    non-finite trial loss is no overflow to skip for but a failed trial point, which the line
    search backtracks from and the trust region counts as no decrease, as in full precision.

    **Compiled models.** Given ``torch.compile(model)``, SGN works on the module inside it
    (the same parameters): its passes are one traced graph per model already
    (:mod:`valleys.curvature`), which cannot be made through a dynamo-optimized module.

    **Statistics.** :meth:`stats` (see there).

    Example::

        opt = SGN(model, "cross_entropy", damping=1e-4, damping_min=1e-6, cg_max_iters=3)
        for x, y in loader:
            loss = opt.step(x, y)
    """

    # The curvature products' method (valleys.curvature.ggn_fn) and how often CG tests its
    # tolerance (1: every iteration, as the original; higher values save host syncs on GPUs).
    curvature_method: str = "auto"
    cg_check_every: int = 1
    # How a step's passes are averaged over processes: "auto" takes the closure's ``reduce``
    # when it has one (the training loop's, weighted by each rank's share of the batch), else
    # the mean over the process group when one is initialised (equal shards), else nothing;
    # None never reduces; a callable (valleys.distributed.Reduce) is used as it is.
    reduce: Any = "auto"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 1.0,
        damping: float = 1e-3,
        damping_min: float = 0.0,
        trust_region: bool = True,
        damping_schedule: str = "const",
        damping_schedule_steps: int = 10,
        cg_max_iters: int = 10,
        cg_warmup_iters: int = 10,
        cg_warmup_steps: int = 10,
        cg_tol: float = 1e-6,
        precondition: bool = False,
        precond_exponent: float = 1.0,
        momentum: float = 0.0,
        line_search: bool = True,
        ls_c: float = 1e-4,
        ls_factor: float = 0.5,
        ls_max_iters: int = 10,
        faithful: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            check.fail("model", type(model).__name__, "SGN needs the torch.nn.Module itself")
        if distributed.is_sharded(model):
            check.fail(
                "model",
                type(model).__name__,
                "SGN cannot run on a sharded (FSDP) model: its CG and GGN products act on the "
                "full parameter vector; replicate the model on every process (data parallel)",
            )
        # torch.compile's wrapper: SGN's passes are its own traced graph of the plain module
        # (a dynamo-optimized module cannot be traced and would fall back to eager products)
        plain = getattr(model, "_orig_mod", None)
        self.model = plain if isinstance(plain, nn.Module) else model
        self.loss = curvature.output_loss(loss_fn)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        defaults = validated(dict(locals()))  # every argument from lr on
        self._last_stats: dict[str, Tensor | float] = {}
        self.found_inf = False  # the last step overflowed under loss scaling and was skipped
        super().__init__([p for _, p in named], defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """SGN has exactly one group (built by the constructor)."""
        if self.param_groups:
            raise ValueError(
                "Invalid param group: SGN solves one system over all trainable parameters of "
                "its model and takes no further groups"
            )
        super().add_param_group(param_group)

    def stats(self) -> dict[str, float]:
        """Statistics of the last step (empty before the first):

        * ``damping`` — ρ_t used by the step; ``damping_next`` — ρ after the trust region;
        * ``alpha`` — the accepted step size α (0 if the step was rejected);
        * ``cg_iters``, ``cg_residual`` — CG iterations and the final ‖r‖_∞;
        * ``ls_iters`` — backtracks; ``tr_ratio`` — actual/predicted decrease (trust region
          on; NaN when undefined);
        * ``passes`` — passes over the batch: 1 (gradient) + CG products + trial losses;
        * ``rejected`` — 1 if θ was left unchanged; ``skipped`` — 1 if the step was skipped
          because a pass overflowed under loss scaling (then only ``damping``, ``alpha``,
          ``cg_iters`` (products made), ``passes`` and these two).
        """
        return {k: float(v) for k, v in self._last_stats.items()}

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        inputs: Any = None,
        targets: Tensor | None = None,
        *,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        scaler: Any = None,
    ) -> Tensor:
        """One SGN step on the batch ``(inputs, targets)`` (or ``closure.batch()``); returns
        the loss before the step. ``autocast`` and ``scaler``: see "Mixed precision" in the
        class docstring (a closure's ``autocast`` and ``scaler`` are used when not given)."""
        closure = None
        if targets is None and callable(getattr(inputs, "batch", None)):
            closure = inputs
            inputs, targets = closure.batch()
            autocast = autocast or getattr(closure, "autocast", None)
            scaler = scaler if scaler is not None else getattr(closure, "scaler", None)
        if inputs is None or targets is None:
            raise TypeError(
                "SGN.step needs the mini-batch: opt.step(inputs, targets), or a closure with a "
                "batch() method such as valleys.train.make_closure(..., same_batch=True)"
            )
        group = self.param_groups[0]
        params: list[Tensor] = group["params"]
        gstate = self.state[params[0]]
        t = int(gstate.get("step", 0)) + 1
        rho_adaptive = float(gstate.get("damping", group["damping"]))
        faithful = group["faithful"]

        self.found_inf = False
        if scaler is not None and not isinstance(getattr(scaler, "scale", None), (int, float)):
            check.fail(
                "scaler",
                type(scaler).__name__,
                "SGN scales its own passes: pass an object with a numeric `scale` attribute "
                "such as valleys.train.loop.LossScaler (torch's GradScaler cannot reach them)",
            )
        with autocast() if autocast is not None else contextlib.nullcontext():
            prod = curvature.ggn_fn(
                self.model,
                self.loss,
                inputs,
                targets,
                params=dict(zip(self._names, params, strict=True)),
                method=self.curvature_method,
                update_buffers=True,
                reduce=self._reducer(closure),
                loss_scale=None if scaler is None else scaler.scale,
            )
        loss0, grad = prod.loss, prod.grad
        matvec: Any = prod
        if scaler is not None:  # fp16: a pass that overflowed skips the step
            overflow = ~torch.isfinite(linalg.norm([loss0.reshape(1), *grad], math.inf))
            if bool(overflow):
                return self._skip(closure, loss0, rho_adaptive, 0)
            matvec = _Checked(prod, overflow)
        mhat = self._momentum(params, grad, group["momentum"], t)

        if group["trust_region"]:
            rho = rho_adaptive
        else:
            rho = scheduled_damping(
                t,
                group["damping"],
                group["damping_min"],
                group["damping_schedule"],
                group["damping_schedule_steps"],
            )
        warm = t < group["cg_warmup_steps"] if faithful else t <= group["cg_warmup_steps"]
        kmax = group["cg_warmup_iters"] if warm else group["cg_max_iters"]
        b, *workspace = self._buffers(params, "b", "x", "r", "p")
        torch._foreach_copy_(b, mhat)
        torch._foreach_neg_(b)
        precond = None
        if group["precondition"]:  # M = (m̂ ⊙ m̂ + ρ)^(−exponent)
            precond, y = self._buffers(params, "precond", "y")
            torch._foreach_copy_(precond, mhat)
            torch._foreach_mul_(precond, mhat)
            torch._foreach_add_(precond, rho)
            torch._foreach_pow_(precond, -group["precond_exponent"])
            workspace.append(y)
        res = linalg.cg(
            matvec,
            b,
            max_iters=kmax,
            tol=group["cg_tol"],
            norm_ord=math.inf,
            shift=rho,
            precond=precond,
            check_every=self.cg_check_every,
            workspace=workspace,
        )
        if scaler is not None and bool(matvec.overflow):
            return self._skip(closure, loss0, rho_adaptive, res.iters)
        self._commit_momentum(params, grad, group["momentum"])
        delta: list[Tensor] = res.x  # type: ignore[assignment]
        # b is free once CG has copied it: it holds the trial points
        outcome = self._apply(prod, params, grad, mhat, delta, res.residual, rho, group, b)

        stats: dict[str, Tensor | float] = {
            "damping": rho,
            "alpha": outcome["alpha"],
            "cg_iters": res.iters,
            "cg_residual": res.residual_norms[-1],
            "ls_iters": outcome["ls_iters"],
            "passes": 1 + res.iters + outcome["evals"],
            "rejected": float(outcome["rejected"]),
            "skipped": 0.0,
        }
        if group["trust_region"]:
            ratio = outcome["ratio"]
            rho_adaptive = (
                1.5 * rho_adaptive
                if ratio is None
                else trust_region_update(rho_adaptive, ratio, group["damping_min"])
            )
            stats["tr_ratio"] = math.nan if ratio is None else ratio
        stats["damping_next"] = rho_adaptive if group["trust_region"] else rho
        gstate["step"] = t
        gstate["damping"] = rho_adaptive
        self._last_stats = stats
        add_passes = getattr(closure, "add_passes", None)
        if callable(add_passes):
            add_passes(int(stats["passes"]))
        return loss0

    def _reducer(self, closure: Any) -> distributed.Reduce | None:
        """The averaging over processes of this step's passes (see ``reduce``)."""
        if self.reduce != "auto":
            return self.reduce
        if closure is not None and hasattr(closure, "reduce"):
            return closure.reduce
        return distributed.mean_reducer()

    def _skip(self, closure: Any, loss0: Tensor, rho: float, products: int) -> Tensor:
        """End a step whose gradient or a GGN product overflowed under loss scaling: θ, the
        momentum and the state stay as they were; ``found_inf`` tells the caller."""
        self.found_inf = True
        passes = 1 + products
        self._last_stats = {
            "damping": rho,
            "alpha": 0.0,
            "cg_iters": products,
            "passes": passes,
            "rejected": 1.0,
            "skipped": 1.0,
        }
        if closure is not None and hasattr(closure, "found_inf"):
            flag = torch.ones((), dtype=torch.bool, device=loss0.device)
            closure.found_inf = flag if closure.found_inf is None else closure.found_inf | flag
        add_passes = getattr(closure, "add_passes", None)
        if callable(add_passes):
            add_passes(passes)
        return loss0

    def _momentum(self, params: list[Tensor], grad: list[Tensor], beta: float, t: int):
        """m̂: the bias-corrected EMA of the gradients (the gradient itself when β = 0),
        computed without storing the new m (:meth:`_commit_momentum` does, once the step
        cannot be skipped any more)."""
        if beta == 0:
            return grad
        (mhat,) = self._buffers(params, "mhat")
        if "momentum_buffer" in self.state[params[0]]:
            torch._foreach_copy_(mhat, [self.state[p]["momentum_buffer"] for p in params])
        else:
            torch._foreach_zero_(mhat)
        torch._foreach_mul_(mhat, beta)
        torch._foreach_add_(mhat, grad, alpha=1.0 - beta)
        torch._foreach_div_(mhat, 1.0 - beta**t)
        return mhat

    def _commit_momentum(self, params: list[Tensor], grad: list[Tensor], beta: float) -> None:
        """m ← β m + (1 − β) g in the state (the same operations as :meth:`_momentum`)."""
        if beta == 0:
            return
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, beta)
        torch._foreach_add_(bufs, grad, alpha=1.0 - beta)

    def _buffers(self, params: list[Tensor], *names: str) -> list[list[Tensor]]:
        """Parameter-shaped storage kept between steps (scratch, not state): on a CPU, fresh
        parameter-sized allocations at every step cost page faults comparable to the vector
        arithmetic of CG. Four buffers (right-hand side and trial points, Δ, r, p), two more
        with the preconditioner, one more with momentum."""
        work: dict[str, list[Tensor]] = self.__dict__.setdefault("_work", {})
        out = []
        for name in names:
            buf = work.get(name)
            fits = buf is not None and len(buf) == len(params)
            if fits:
                fits = all(
                    b.shape == p.shape and b.dtype == p.dtype and b.device == p.device
                    for b, p in zip(buf, params, strict=True)
                )
            if not fits:
                buf = [torch.empty_like(p) for p in params]
                work[name] = buf
            out.append(buf)
        return out

    def _apply(
        self,
        prod: curvature.Products,
        params: list[Tensor],
        grad: list[Tensor],
        mhat: list[Tensor],
        delta: list[Tensor],
        residual: list[Tensor],
        rho: float,
        group: dict[str, Any],
        point: list[Tensor],
    ) -> dict[str, Any]:
        """Trust-region ratio, line search and the update of θ, the trial points θ + αΔ being
        built in ``point``. Returns α, the ratio (None when undefined), backtracks, trial
        evaluations and whether θ was left unchanged."""
        faithful = group["faithful"]
        alpha0 = float(group["lr"])
        out = {"alpha": alpha0, "ratio": None, "ls_iters": 0, "evals": 0, "rejected": False}
        if not _finite(linalg.norm(delta, math.inf)):
            if faithful:
                raise FloatingPointError(
                    "SGN: the CG solution is not finite (raise damping or lower lr)"
                )
            out.update(alpha=0.0, rejected=True)
            return out
        use_ls, use_tr = group["line_search"], group["trust_region"]
        if not (use_ls or use_tr):
            torch._foreach_add_(params, delta, alpha=alpha0)
            return out

        loss0 = prod.loss

        def trial_at(alpha: float) -> tuple[list[Tensor], Tensor]:
            torch._foreach_copy_(point, params)
            torch._foreach_add_(point, delta, alpha=alpha)
            out["evals"] += 1
            return point, prod.loss_at(point)

        point, loss1 = trial_at(alpha0)
        if use_tr:
            g_delta, r_delta = linalg.dot(grad, delta), linalg.dot(residual, delta)
            if faithful:  # ½ <r + g, Δ> with the original's residual r = (G + ρI)Δ + m̂ = −r_cg
                pred = 0.5 * (g_delta - r_delta)
                ratio = float((loss1 - loss0) / pred)
                out["ratio"] = ratio
            else:  # α<g, Δ> + ½α² Δᵀ(G + ρI)Δ, with (G + ρI)Δ = −m̂ − r_cg
                curv = -(linalg.dot(mhat, delta) + r_delta)
                pred = float(alpha0 * g_delta + 0.5 * alpha0**2 * curv)
                actual = float(loss1 - loss0)
                if pred < 0 and math.isfinite(actual):
                    out["ratio"] = actual / pred
        accept = True
        if use_ls:
            slope = float(linalg.dot(mhat, delta))
            c, alpha, start = group["ls_c"], alpha0, float(loss0)

            def fails(value: Tensor, a: float) -> bool:
                bound = start + c * (alpha0 if faithful else a) * slope
                v = float(value)
                return v > bound if faithful else not v <= bound

            while fails(loss1, alpha) and out["ls_iters"] < group["ls_max_iters"]:
                out["ls_iters"] += 1
                alpha *= group["ls_factor"]
                point, loss1 = trial_at(alpha)
            out["alpha"] = alpha
            if not faithful and fails(loss1, alpha) and not bool(loss1 < loss0):
                accept = False
        elif not faithful and not _finite(loss1):
            accept = False
        if accept:
            torch._foreach_copy_(params, point)
        else:
            out.update(alpha=0.0, rejected=True)
        return out
