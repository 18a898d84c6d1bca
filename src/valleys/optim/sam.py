r"""SAM: Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021), with the
adaptive variant ASAM (Kwon, Kim, Park, Choi, ICML 2021).

The class is a thin shell over any single-gradient optimizer of the registry (its *base*):
:func:`perturbation` computes the ascent step ε̂ on lists of tensors (a per-tensor reference
path and a ``torch._foreach_*`` path doing the same operations in the same order), the base
optimizer takes the descent step with the gradient found at w + ε̂.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from valleys import _validate as check
from valleys import linalg

__all__ = ["SAM", "perturbation"]

# Keys SAM itself keeps in every param group (the base optimizer's keys sit beside them).
_OWN = ("base", "rho", "adaptive")


def perturbation(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    rho: float,
    adaptive: bool,
    foreach: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """SAM's ascent step ε̂ for one param group, and the norm it was scaled by.

    With T = I (SAM) or T = diag(|w|) (ASAM, ``adaptive``) and g the gradients::

        ε̂ = ρ · T² g / ‖T g‖        (ε̂ = 0 where ‖T g‖ = 0)

    ``‖·‖`` is the Euclidean norm over all tensors of the list. Returns ``(ε̂, ‖T g‖)``;
    nothing is modified in place.
    """
    if foreach:
        scaled = list(torch._foreach_mul(grads, [p.abs() for p in params])) if adaptive else grads
        norms = torch._foreach_norm(scaled)
    else:
        scaled = [g * p.abs() for p, g in zip(params, grads, strict=True)] if adaptive else grads
        norms = [torch.linalg.vector_norm(s) for s in scaled]
    device = params[0].device
    norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    # ρ/‖Tg‖ without a host sync and without dividing by zero: a zero gradient gives ε̂ = 0
    factor = torch.where(norm > 0, rho / torch.where(norm > 0, norm, 1.0), 0.0)
    if foreach:
        eps = list(torch._foreach_mul(scaled, [p.abs() for p in params])) if adaptive else scaled
        return list(torch._foreach_mul(eps, factor)), norm
    out = []
    for p, s in zip(params, scaled, strict=True):
        e = s * p.abs() if adaptive else s
        out.append(e * factor)
    return out, norm


def _unusable(entry: Any) -> bool:
    """Entries built from the model (SGN) or wrapping another optimizer (SAM)."""
    return bool(getattr(entry, "takes_model", False) or getattr(entry, "wraps", False))


def _base_spec(name: str) -> Any:
    """The registry entry of the base optimizer ``name``, checked to take one gradient per
    step."""
    from valleys import optim as registry  # the registry imports this module

    entry = registry.spec(name)
    if entry.needs_closure or _unusable(entry):
        usable = [
            n
            for n in registry.names()
            if not (registry.spec(n).needs_closure or _unusable(registry.spec(n)))
        ]
        check.fail(
            "base",
            name,
            "SAM's base optimizer takes one gradient per step: choose one of " + ", ".join(usable),
        )
    return entry


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization around any single-gradient optimizer.

    P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021 (arXiv 2010.01412); adaptive variant:
    J. Kwon, J. Kim, H. Park, I. K. Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks", ICML 2021 (arXiv 2102.11600).

    SAM minimises the worst loss in a ball around the weights,
    ``min_w max_{‖ε‖ ≤ ρ} f(w + ε)``. The inner maximum is taken to first order (one
    normalised gradient ascent step) and the outer minimisation by the base optimizer along
    the gradient at the perturbed point, which favours flat minima.

    **Update rule.** One step, with f_B the loss of the step's mini-batch B::

        g  = ∇f_B(w)                                   (closure call 1, at w)
        ε̂  = ρ · T_w² g / ‖T_w g‖                      (T_w = I; adaptive: T_w = diag(|w|))
        g' = ∇f_B(w + ε̂)                               (closure call 2, same batch B)
        w  ← base step from w along g'                 (e.g. SGD: w ← w − η g')

    With T_w = I this is SAM's ε̂ = ρ g/‖g‖; with T_w = |w| it is ASAM's, whose ball
    ``‖T_w⁻¹ ε‖ ≤ ρ`` scales with each weight, so the sharpness it measures is invariant to
    rescaling a layer. ε̂ = 0 when ‖T_w g‖ = 0.

    **Param groups.** The norm is taken per group: the ball is the product of one ball of
    radius ρ_G per group G (``max`` of the linearised loss over it is ε̂_G = ρ_G T² g_G /
    ‖T g_G‖), so groups are independent problems like in every torch optimizer. With one group
    (the usual case) this is the paper's norm over all weights.

    **Symbols and arguments.**

    * ``base`` — the base optimizer, a registry name (default ``"sgd"``; any entry that takes
      one gradient per step: ``sgd``, ``nesterov``, ``adam``, ``adamw``, ``vsgd``) or a
      ``torch.optim.Optimizer`` class. ``**base_hparams`` are its hyperparameters (``lr``,
      ``momentum``, ``weight_decay``, ``betas``…), checked by it; its defaults apply to the
      rest (the registry's presets included, e.g. ``nesterov``'s momentum 0.9).
    * ρ — ``rho`` (default 0.05, the paper's value for CIFAR-10 with SGD): radius of the ball.
      ASAM needs a larger one (the paper uses 0.5 to 2 on CIFAR-10). ``rho=0`` is the base
      optimizer (with two passes per step).
    * ``adaptive`` (default False): ASAM's T_w = |w| instead of the identity.

    **Closure.** ``step(closure)`` requires a closure that zeroes the gradients, computes the
    loss on the step's mini-batch, calls ``backward()`` and returns the loss as a scalar
    tensor. A step calls it exactly twice: at w, then at w + ε̂, and both calls must see the
    **same** batch (the workbench's closure does this for entries registered with
    ``same_batch``). The weights are restored to w bit for bit before the base step. ``step``
    returns the loss of the first call (at w). Parameters whose ``.grad`` is ``None`` after
    the first call are neither perturbed nor stepped.

    **State.** SAM keeps no state of its own between steps (ε̂ and the saved weights live only
    during a step): ``state`` and ``param_groups`` *are* the base optimizer's, so
    ``state_dict()`` holds the base's state (momentum buffers, Adam moments…) and the groups
    hold ``base``, ``rho``, ``adaptive`` next to the base's hyperparameters; an lr scheduler
    attached to SAM schedules the base's lr.

    **Statistics.** :meth:`stats` returns those of the last step (see there).

    Example::

        opt = SAM(model.parameters(), base="sgd", rho=0.05, lr=0.1, momentum=0.9)
        xb, yb = next(batches)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)      # the same batch in both calls
            loss.backward()
            return loss

        loss = opt.step(closure)               # two forward/backward passes
    """

    # Which path of :func:`perturbation` ``step`` uses; the foreach path is tested equal to the
    # per-tensor reference path.
    _foreach: bool = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: str | type[torch.optim.Optimizer] = "sgd",
        rho: float = 0.05,
        adaptive: bool = False,
        **base_hparams: Any,
    ) -> None:
        if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
            name = f"{base.__module__}.{base.__qualname__}"
            build: Callable[..., torch.optim.Optimizer] = base
        elif isinstance(base, str):
            _base_spec(base)
            name = base

            def build(groups: list[dict[str, Any]], **hp: Any) -> torch.optim.Optimizer:
                from valleys import optim as registry

                return registry.get(name, groups, **hp)

        else:
            check.fail("base", base, "expected an optimizer name such as 'sgd' or a class")
        defaults = {"base": name, "rho": rho, "adaptive": adaptive}
        self._last_stats: dict[str, Tensor] = {}
        super().__init__(params, defaults)
        self.base_optimizer = build(self.param_groups, **base_hparams)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (to the base optimizer too), validating its ``rho`` and ``adaptive``;
        every group has the optimizer's ``base``."""
        group = dict(param_group)
        for key in _OWN:
            group.setdefault(key, self.defaults[key])
        group["rho"] = check.nonneg("rho", group["rho"])
        group["adaptive"] = check.flag("adaptive", group["adaptive"])
        if group["base"] != self.defaults["base"]:
            check.fail("base", group["base"], f"every group uses {self.defaults['base']!r}")
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(group)
        else:  # during __init__: the base optimizer is built from these groups
            super().add_param_group(group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` (its groups hold SAM's keys too)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` of this class (through the base optimizer)."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def stats(self) -> dict[str, float]:
        """Statistics of the last step (an empty dict before the first step).

        * ``grad_norm`` — ‖T_w g‖ at w over every parameter stepped (all groups; ‖g‖ for SAM).
        * ``perturbed_loss`` — f_B(w + ε̂), the loss of the second closure call.
        * ``sharpness`` — f_B(w + ε̂) − f_B(w): SAM's first-order estimate of the sharpness of
          the batch loss in the ball of radius ρ.

        Statistics are not part of ``state_dict``.
        """
        return {k: float(v) for k, v in self._last_stats.items()}

    @staticmethod
    def _call(closure: Callable[[], Any]) -> Tensor:
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shown = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TypeError(
                f"SAM: the closure must return the loss as a scalar tensor, got {shown}; "
                "return only the loss, reduced (e.g. with .mean())"
            )
        return loss

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """Take one SAM step; ``closure`` is required (see the class docstring).

        Returns the loss of the first closure call (at the current weights).
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that zeroes the gradients, computes the loss on the "
                "step's batch (the same batch on every call), calls backward() and returns the "
                "loss: opt.step(closure)"
            )
        loss = self._call(closure)
        moved: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = []
        norms = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("SAM does not support sparse gradients")
            eps, norm = perturbation(
                params,
                [p.grad for p in params],
                rho=group["rho"],
                adaptive=group["adaptive"],
                foreach=self._foreach,
            )
            saved = [p.detach().clone() for p in params]
            torch._foreach_add_(params, eps)
            moved.append((params, saved, eps))
            norms.append(norm)
        if not moved:
            self._last_stats = {}
            return loss
        self.zero_grad(set_to_none=False)
        perturbed = self._call(closure).detach()
        for params, saved, _ in moved:
            linalg.copy_(params, saved)  # w exactly, not (w + ε̂) − ε̂
        self.base_optimizer.step()
        device = norms[0].device
        first = loss.detach()
        self._last_stats = {
            "grad_norm": torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])),
            "perturbed_loss": perturbed,
            "sharpness": perturbed - first,
        }
        return loss
