"""Entropy-SGD (Chaudhari et al., "Entropy-SGD: Biasing Gradient Descent Into Wide Valleys",
ICLR 2017).

The optimizer class is a thin shell around three plain functions that do the math on lists of
tensors: :func:`langevin_update` (one SGLD step of the inner loop), :func:`sgd_update` (the outer
step, which is exactly ``torch.optim.SGD``'s update) and the norm helpers behind
:meth:`EntropySGD.stats`. Each function has a per-tensor reference path and a ``torch._foreach_*``
path doing the same operations in the same order, so the two agree bit for bit on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from valleys import _validate as check
from valleys import linalg
from valleys.schedules import scope as scope_schedule

__all__ = ["VARIANTS", "EntropySGD", "langevin_update", "sgd_update"]

VARIANTS = ("paper", "port")


def _validated(hp: dict[str, Any]) -> dict[str, Any]:
    """Check every hyperparameter of ``hp`` and return them normalised (floats, int, bool)."""
    out = {
        "lr": check.nonneg("lr", hp["lr"]),
        "momentum": check.interval("momentum", hp["momentum"], 0.0, 1.0, high_open=True),
        "nesterov": check.flag("nesterov", hp["nesterov"]),
        "weight_decay": check.nonneg("weight_decay", hp["weight_decay"]),
        "langevin_steps": check.count("langevin_steps", hp["langevin_steps"]),
        "langevin_lr": check.positive("langevin_lr", hp["langevin_lr"]),
        "langevin_ema": check.interval(
            "langevin_ema", hp["langevin_ema"], 0.0, 1.0, high_open=True
        ),
        "scope": check.nonneg("scope", hp["scope"]),
        "scope_growth": check.nonneg("scope_growth", hp["scope_growth"]),
        "noise": check.nonneg("noise", hp["noise"]),
        "variant": check.choice("variant", hp["variant"], VARIANTS),
    }
    if out["nesterov"] and out["momentum"] == 0:
        raise ValueError(
            "Invalid nesterov: True with momentum 0 (Nesterov momentum needs momentum > 0; "
            "set nesterov=False or momentum > 0)"
        )
    return out


# ---------------------------------------------------------------------------------------------
# The math, on lists of tensors.
# ---------------------------------------------------------------------------------------------


def sgd_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    foreach: bool = False,
) -> None:
    """One step of ``torch.optim.SGD`` (dampening 0) on ``params`` along ``grads``, in place.

    ``d = g + λx``; ``v ← m v + d`` (``v`` starts as a copy of the first ``d``, as in torch);
    ``d = d + m v`` (Nesterov) or ``d = v``; ``x ← x − lr·d``. ``momentum_buffers`` is updated
    in place: a ``None`` entry is replaced by its new buffer when ``momentum > 0``. ``grads``
    are not modified.
    """
    if foreach:
        _sgd_foreach(params, grads, momentum_buffers, lr, momentum, nesterov, weight_decay)
    else:
        _sgd_single(params, grads, momentum_buffers, lr, momentum, nesterov, weight_decay)


def _sgd_single(params, grads, buffers, lr, momentum, nesterov, weight_decay) -> None:
    for i, x in enumerate(params):
        d = grads[i]
        if weight_decay != 0:
            d = d.add(x, alpha=weight_decay)
        if momentum != 0:
            buf = buffers[i]
            if buf is None:
                buf = torch.clone(d).detach()
                buffers[i] = buf
            else:
                buf.mul_(momentum).add_(d)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        x.add_(d, alpha=-lr)


def _sgd_foreach(params, grads, buffers, lr, momentum, nesterov, weight_decay) -> None:
    d = list(grads)
    if weight_decay != 0:
        d = list(torch._foreach_add(d, params, alpha=weight_decay))
    if momentum != 0:
        old = [i for i, b in enumerate(buffers) if b is not None]
        if old:
            old_bufs = [buffers[i] for i in old]
            torch._foreach_mul_(old_bufs, momentum)
            torch._foreach_add_(old_bufs, [d[i] for i in old])
        for i, b in enumerate(buffers):
            if b is None:
                buffers[i] = torch.clone(d[i]).detach()
        d = list(torch._foreach_add(d, buffers, alpha=momentum)) if nesterov else list(buffers)
    torch._foreach_add_(params, d, alpha=-lr)


def langevin_update(
    params: list[Tensor],
    grads: list[Tensor],
    anchors: list[Tensor],
    means: list[Tensor],
    velocities: list[Tensor] | None,
    *,
    gammas: list[float],
    langevin_lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    langevin_ema: float,
    noise: float,
    variant: str,
    foreach: bool = False,
) -> None:
    """One SGLD step of Entropy-SGD's inner loop, in place on ``params`` (x'), ``means`` (μ) and
    ``velocities`` (the inner momentum buffers, needed when ``momentum > 0``).

    With g the gradient at x', x the anchor, m the momentum, λ the weight decay, γ the scope::

        paper: d = M(g)        + γ(x' − x) + λx' + ε/√(η'/2)·ξ
        port:  d = M(g + λx')  + γ(x' − x)       + ε/√(η'/2)·ξ
        x' ← x' − η' d
        μ  ← β μ + (1 − β) x'

    where ``M`` is momentum on the inner buffer v (``v ← m v + d``, then ``d + m v`` for
    Nesterov or ``v`` for heavy ball; identity when m = 0), η' is ``langevin_lr``, β is
    ``langevin_ema``, ε is ``noise`` and ξ ~ N(0, I) is drawn per tensor, in order, from torch's
    global generator of the tensor's device (nothing is drawn when ε = 0). ``gammas`` holds one γ
    per tensor. ``grads`` are not modified.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r} (expected one of {VARIANTS})")
    kw = dict(
        gammas=gammas,
        langevin_lr=langevin_lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        langevin_ema=langevin_ema,
        noise=noise,
        variant=variant,
    )
    if foreach:
        _langevin_foreach(params, grads, anchors, means, velocities, **kw)
    else:
        _langevin_single(params, grads, anchors, means, velocities, **kw)


def _noise_scale(noise: float, langevin_lr: float) -> float:
    # Scaling ξ by ε/√(η'/2) before the step of size η' gives an increment of std ε·√(2η'):
    # SGLD at temperature ε², as in both original codes.
    return noise / math.sqrt(0.5 * langevin_lr)


def _langevin_single(
    params,
    grads,
    anchors,
    means,
    velocities,
    *,
    gammas,
    langevin_lr,
    momentum,
    nesterov,
    weight_decay,
    langevin_ema,
    noise,
    variant,
) -> None:
    decay_first = variant == "port" and weight_decay != 0
    decay_last = variant == "paper" and weight_decay != 0
    for i, xp in enumerate(params):
        d = grads[i]
        if decay_first:
            d = d.add(xp, alpha=weight_decay)
        if momentum != 0:
            v = velocities[i]
            v.mul_(momentum).add_(d)
            d = d.add(v, alpha=momentum) if nesterov else v
        d = d.add(xp.sub(anchors[i]).mul_(gammas[i]))  # a fresh tensor: in place from here on
        if decay_last:
            d.add_(xp, alpha=weight_decay)
        if noise != 0:
            d.add_(torch.randn_like(xp), alpha=_noise_scale(noise, langevin_lr))
        xp.add_(d, alpha=-langevin_lr)
        means[i].mul_(langevin_ema).add_(xp, alpha=1 - langevin_ema)


def _langevin_foreach(
    params,
    grads,
    anchors,
    means,
    velocities,
    *,
    gammas,
    langevin_lr,
    momentum,
    nesterov,
    weight_decay,
    langevin_ema,
    noise,
    variant,
) -> None:
    d = list(grads)
    if variant == "port" and weight_decay != 0:
        d = list(torch._foreach_add(d, params, alpha=weight_decay))
    if momentum != 0:
        torch._foreach_mul_(velocities, momentum)
        torch._foreach_add_(velocities, d)
        d = list(torch._foreach_add(d, velocities, alpha=momentum)) if nesterov else velocities
    coupling = torch._foreach_sub(params, anchors)
    torch._foreach_mul_(coupling, gammas)
    d = torch._foreach_add(d, coupling)  # a fresh list: in place from here on
    if variant == "paper" and weight_decay != 0:
        torch._foreach_add_(d, params, alpha=weight_decay)
    if noise != 0:
        xi = [torch.randn_like(xp) for xp in params]
        torch._foreach_add_(d, xi, alpha=_noise_scale(noise, langevin_lr))
    torch._foreach_add_(params, d, alpha=-langevin_lr)
    torch._foreach_mul_(means, langevin_ema)
    torch._foreach_add_(means, params, alpha=1 - langevin_ema)


def _global_norm(tensors: list[Tensor]) -> Tensor:
    """‖(t_1, …, t_n)‖ as one 0-d tensor (on the first tensor's device), without syncing."""
    norms = torch._foreach_norm(tensors)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def _global_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    device = a[0].device
    return torch.stack([(s * t).sum().to(device) for s, t in zip(a, b, strict=True)]).sum()


# ---------------------------------------------------------------------------------------------
# The optimizer.
# ---------------------------------------------------------------------------------------------


class EntropySGD(torch.optim.Optimizer):
    r"""Entropy-SGD: SGD on the negative local entropy, estimated by Langevin dynamics.

    Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun, Zecchina,
    "Entropy-SGD: Biasing Gradient Descent Into Wide Valleys", ICLR 2017 (arXiv 1611.01838).

    Entropy-SGD descends the negative local entropy
    ``−F(x; γ) = −log ∫ exp(−f(x') − (γ/2)‖x − x'‖²) dx'``, whose gradient is ``γ(x − <x'>)``;
    the mean ``<x'>`` is estimated by L steps of stochastic gradient Langevin dynamics (SGLD) on
    a copy x' of the weights anchored to x, so the method is drawn towards wide valleys.

    **Update rule.** Step k (k = 0, 1, 2, … counts this parameter's steps) with x the weights::

        γ_k = γ_0 (1 + γ_1)^k                                   (scoping)
        x' ← x;  μ ← x;  v ← 0
        for ℓ = 1 … L:                                          (one closure call each)
            g  = ∇f_{B_ℓ}(x')                                   (B_ℓ: the ℓ-th mini-batch)
            paper: d = M(g)       + γ_k (x' − x) + λ x' + ε/√(η'/2) ξ
            port:  d = M(g + λx') + γ_k (x' − x)        + ε/√(η'/2) ξ
            x' ← x' − η' d                                      (noise std per step ε√(2η'))
            μ  ← β μ + (1 − β) x'
        paper: x ← x − η (x − μ)                                (no momentum, no weight decay)
        port:  x ← SGD(η, m, nesterov, λ) step along d = x − μ  (persistent momentum buffer)

    ``M`` is momentum on v: ``v ← m v + d`` then ``d + m v`` (Nesterov) or ``v`` (heavy ball);
    it is the identity when m = 0. ξ ~ N(0, I) is drawn fresh per tensor. With L = 0 a step is
    exactly ``torch.optim.SGD(lr, momentum, nesterov=nesterov, weight_decay=weight_decay)``
    (dampening 0) on the gradient at x, in both variants.

    **Symbols and arguments.**

    * η — ``lr``: outer step size (default 1). The paper's outer step is ``η γ (x − μ)``; both
      original codes drop the γ and absorb it into η, so with ``lr=1`` the ``"paper"`` step sets
      x ← μ. The paper lowers it by ×5 every few epochs (e.g. 1, 0.2, 0.04 on CIFAR-10).
    * m — ``momentum`` (default 0.9) and ``nesterov`` (default True): used by the inner loop in
      both variants, by the outer step in ``"port"``, and by the plain SGD step when L = 0.
      ``nesterov=True`` needs ``momentum > 0`` (as torch.optim.SGD).
    * λ — ``weight_decay`` (default 0): L2 penalty added to the gradient (after momentum in
      ``"paper"``, before it in ``"port"``, as in the respective codes).
    * L — ``langevin_steps`` (default 20, the paper's value): SGLD steps, i.e. closure calls,
      per step. Must be the same in every param group (one closure call evaluates them all).
    * η' — ``langevin_lr`` (default 0.1, both codes): SGLD step size.
    * β — ``langevin_ema`` (default 0.75, both codes): weight on the **old** average in
      ``μ ← β μ + (1 − β) x'``, so the new iterate gets 0.25. The paper's pseudo-code writes
      ``μ ← (1 − α) μ + α x'`` with "α = 0.75", the opposite convention (followed by the
      TensorFlow port); to get that, pass ``langevin_ema = 1 − α``.
    * γ_0 — ``scope`` (default 1e-4, the MNIST value; the paper uses 0.03 on CIFAR-10) and
      γ_1 — ``scope_growth`` (default 1e-3): the coupling grows as γ_0 (1 + γ_1)^k, computed by
      :func:`valleys.schedules.scope`.
    * ε — ``noise`` (default 1e-4, both codes): thermal noise; each SGLD step adds Gaussian
      noise of standard deviation ε·√(2η') per coordinate (SGLD at temperature ε²; the paper
      writes √η'·ε).
    * ``variant`` — ``"paper"`` (default: the Lua code the paper's results come from) or
      ``"port"`` (the authors' PyTorch port), which differ as shown above.

    **Closure.** ``step(closure)`` requires a closure that zeroes the gradients, draws a fresh
    mini-batch, computes the loss, calls ``backward()`` and returns the loss as a scalar tensor.
    A step calls it exactly ``max(L, 1)`` times, each time on a new batch: the first call is at
    x' = x and its gradient serves both as ∇f(x) (statistics; the SGD step when L = 0) and as
    the first Langevin gradient; calls 2 … L are at the current x'. ``step`` returns the loss
    of the first call. Parameters whose ``.grad`` is ``None`` after the first call are skipped
    entirely (not moved, no state, counter not advanced); a skipped parameter's gradient that
    is ``None`` in a later call of the same step counts as zero.

    **State.** ``state[p]["step"]`` (k, an int) and, once the SGD step has used momentum,
    ``state[p]["momentum_buffer"]``. Anchor, μ and v live only during a step. So
    ``state_dict()``/``load_state_dict()`` resume exactly, provided torch's RNG state (which
    the noise draws from) is restored too, as the workbench checkpoint does.

    **Differences from the original codes** (both are otherwise followed to the letter):
    the scoping counter advances in both variants (the PyTorch port never incremented it, so
    its γ stayed γ_0); a step calls the closure L times, not L + 1 (the originals evaluate the
    gradient at x and throw it away before the L Langevin gradients); all state is per
    parameter, so ``state_dict`` works; every param group is handled with its own
    hyperparameters (the port only read the first group); β, η' are arguments instead of
    constants.

    **Statistics.** :meth:`stats` returns those of the last step (see there).

    Example::

        opt = EntropySGD(model.parameters(), lr=1.0, langevin_steps=20, scope=0.03)

        def closure():
            opt.zero_grad()
            xb, yb = next(batches)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss

        loss = opt.step(closure)   # 20 forward/backward passes on 20 batches
    """

    # Which path of the math functions ``step`` uses; the foreach path is tested equal to the
    # per-tensor reference path.
    _foreach: bool = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        langevin_steps: int = 20,
        langevin_lr: float = 0.1,
        langevin_ema: float = 0.75,
        scope: float = 1e-4,
        scope_growth: float = 1e-3,
        noise: float = 1e-4,
        variant: str = "paper",
    ) -> None:
        defaults = _validated(
            dict(
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                weight_decay=weight_decay,
                langevin_steps=langevin_steps,
                langevin_lr=langevin_lr,
                langevin_ema=langevin_ema,
                scope=scope,
                scope_growth=scope_growth,
                noise=noise,
                variant=variant,
            )
        )
        self._last_stats: dict[str, Tensor | float] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating its own hyperparameters like the constructor's."""
        group = dict(param_group)
        merged = {**self.defaults, **group}
        group.update(_validated({k: merged[k] for k in self.defaults}))
        if self.param_groups and group["langevin_steps"] != self.param_groups[0]["langevin_steps"]:
            raise ValueError(
                f"Invalid langevin_steps: {group['langevin_steps']!r} (every param group must "
                f"use the same value, here {self.param_groups[0]['langevin_steps']}, because "
                "one closure call evaluates all groups)"
            )
        super().add_param_group(group)

    def stats(self) -> dict[str, float]:
        """Statistics of the last step (an empty dict before the first step).

        * ``grad_norm`` — ‖∇f(x)‖, the gradient of the first closure call, over every parameter
          stepped (all groups).
        * ``gamma`` — γ_k used by the step (that of the first parameter stepped; it differs
          between parameters only when groups set different ``scope``/``scope_growth`` or a
          parameter skipped steps).
        * ``drift_norm`` — ‖x − μ‖, the length of the outer "gradient" (with ``lr=1`` and
          ``"paper"``, the distance the weights move).
        * ``cosine`` — cosine between ∇f(x) and x − μ (0 when either is 0): near 1 the Langevin
          average points the way SGD would; lower values mean the local-entropy direction
          departs from the raw gradient.
        * ``inner_distance`` — mean over the L inner steps of ‖x − x'‖ after each update: how
          far SGLD wanders from the anchor (γ pulls it back).

        With L = 0 (plain SGD) only ``grad_norm`` and ``gamma`` are reported. Statistics are not
        part of ``state_dict``.
        """
        return {k: float(v) for k, v in self._last_stats.items()}

    def _call(self, closure: Callable[[], Any]) -> Tensor:
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor):
            raise TypeError(
                "EntropySGD: the closure must return the loss as a scalar tensor, got "
                f"{type(loss).__name__}; return only the loss (not a tuple)"
            )
        if loss.numel() != 1:
            raise ValueError(
                "EntropySGD: the closure must return the loss as a scalar tensor, got shape "
                f"{tuple(loss.shape)}; reduce it (e.g. with .mean())"
            )
        return loss

    def _gather(self) -> list[dict[str, Any]]:
        """Per group: the parameters with a gradient, those gradients, and their state."""
        gathered = []
        for group in self.param_groups:
            params, grads, states = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("EntropySGD does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                params.append(p)
                grads.append(p.grad)
                states.append(state)
            if params:
                gammas = [
                    scope_schedule(s["step"], group["scope"], group["scope_growth"]) for s in states
                ]
                gathered.append(
                    dict(group=group, params=params, grads=grads, states=states, gammas=gammas)
                )
        return gathered

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """Take one Entropy-SGD step; ``closure`` is required (see the class docstring).

        Returns the loss of the first closure call (at the current weights).
        """
        if closure is None:
            raise ValueError(
                "EntropySGD.step needs a closure that zeroes the gradients, draws a fresh "
                "mini-batch, calls backward() and returns the loss: opt.step(closure)"
            )
        loss = self._call(closure)
        gathered = self._gather()
        if not gathered:
            self._last_stats = {}
            return loss
        n_inner = gathered[0]["group"]["langevin_steps"]
        first_grads = [g for item in gathered for g in item["grads"]]
        stats: dict[str, Tensor | float] = {
            "grad_norm": _global_norm(first_grads),
            "gamma": gathered[0]["gammas"][0],
        }
        if n_inner == 0:
            for item in gathered:
                self._sgd(item, item["grads"], item["group"])
        else:
            stats.update(self._entropy_step(closure, gathered, n_inner, stats["grad_norm"]))
        for item in gathered:
            for state in item["states"]:
                state["step"] += 1
        self._last_stats = stats
        return loss

    def _sgd(self, item: dict[str, Any], grads: list[Tensor], hp: dict[str, Any]) -> None:
        buffers = [s.get("momentum_buffer") for s in item["states"]]
        sgd_update(
            item["params"],
            grads,
            buffers,
            lr=hp["lr"],
            momentum=hp["momentum"],
            nesterov=hp["nesterov"],
            weight_decay=hp["weight_decay"],
            foreach=self._foreach,
        )
        if hp["momentum"] != 0:
            for state, buf in zip(item["states"], buffers, strict=True):
                state["momentum_buffer"] = buf

    def _entropy_step(
        self,
        closure: Callable[[], Any],
        gathered: list[dict[str, Any]],
        n_inner: int,
        grad_norm: Tensor,
    ) -> dict[str, Tensor]:
        """The Langevin inner loop and the outer step; returns the step's statistics."""
        # Later closure calls may zero the first gradients in place: keep a copy for `cosine`.
        grad_at_x = [g.clone() for item in gathered for g in item["grads"]]
        for item in gathered:
            params = item["params"]
            item["anchors"] = [p.detach().clone() for p in params]
            item["means"] = [p.detach().clone() for p in params]
            item["velocities"] = (
                [torch.zeros_like(p) for p in params] if item["group"]["momentum"] != 0 else None
            )
        distance_sum = None
        for ell in range(n_inner):
            if ell > 0:
                self._call(closure)
            for item in gathered:
                hp = item["group"]
                if ell == 0:  # the first call's gradient, at x' = x
                    grads = item["grads"]
                else:
                    grads = [
                        torch.zeros_like(p) if p.grad is None else p.grad for p in item["params"]
                    ]
                langevin_update(
                    item["params"],
                    grads,
                    item["anchors"],
                    item["means"],
                    item["velocities"],
                    gammas=item["gammas"],
                    langevin_lr=hp["langevin_lr"],
                    momentum=hp["momentum"],
                    nesterov=hp["nesterov"],
                    weight_decay=hp["weight_decay"],
                    langevin_ema=hp["langevin_ema"],
                    noise=hp["noise"],
                    variant=hp["variant"],
                    foreach=self._foreach,
                )
            offsets = [
                t for item in gathered for t in torch._foreach_sub(item["params"], item["anchors"])
            ]
            distance = _global_norm(offsets)
            distance_sum = distance if distance_sum is None else distance_sum + distance

        drifts = []
        for item in gathered:
            hp = item["group"]
            drift = list(torch._foreach_sub(item["anchors"], item["means"]))  # x − μ
            linalg.copy_(item["params"], item["anchors"])
            if hp["variant"] == "paper":  # x ← x − η (x − μ): plain SGD without extras
                hp = {**hp, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
            self._sgd(item, drift, hp)
            drifts.extend(drift)
            for key in ("anchors", "means", "velocities"):
                del item[key]

        drift_norm = _global_norm(drifts)
        denom = grad_norm * drift_norm
        dot = _global_dot(grad_at_x, drifts)
        cosine = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0)
        return {
            "drift_norm": drift_norm,
            "cosine": cosine,
            "inner_distance": distance_sum / n_inner,
        }
