"""Optimizers and their registry.

valleys' own optimizers (``EntropySGD``, ``VSGD``, ``SGN``, ``SAM``) sit next to torch's SGD,
Nesterov, Adam and AdamW under one lookup, so that a name and a dict of hyperparameters (from a
config file or the command line) build any of them::

    opt = valleys.optim.get("entropy_sgd", model.parameters(), lr=1.0, langevin_steps=20)

Every entry follows torch.optim's conventions; the ones marked ``needs_closure`` call the
closure several times per step (see each class for how many and on which batch). Entries
marked ``takes_model`` (SGN) are built from the model and its loss instead of parameters::

    opt = valleys.optim.get("sgn", model, loss_fn="cross_entropy", cg_max_iters=3)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from valleys import _validate as check
from valleys.optim.entropy_sgd import EntropySGD
from valleys.optim.sam import SAM
from valleys.optim.sgn import SGN
from valleys.optim.vsgd import VSGD

__all__ = ["SAM", "SGN", "VSGD", "EntropySGD", "OptimizerSpec", "get", "names", "spec"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry.

    ``cls`` is the optimizer class; ``preset`` holds hyperparameters that define the entry on
    top of the class defaults (``nesterov`` is torch's SGD with ``momentum=0.9,
    nesterov=True``); ``needs_closure`` says whether ``step`` must be given a closure;
    ``takes_model`` that the class is built as ``cls(model, loss_fn, **hparams)`` rather than
    from parameters; ``same_batch`` that every evaluation of one step must see the same
    mini-batch (the training loop's closure then hands out one batch per step); ``wraps``
    that the class wraps a base optimizer named by its ``base`` hyperparameter and takes that
    optimizer's hyperparameters too (SAM; see :meth:`accepted`).
    """

    name: str
    cls: type[torch.optim.Optimizer]
    summary: str
    preset: Mapping[str, Any] = field(default_factory=dict)
    needs_closure: bool = False
    takes_model: bool = False
    same_batch: bool = False
    wraps: bool = False

    def hyperparameters(self) -> dict[str, Any]:
        """Every hyperparameter this entry accepts with its default (preset applied)."""
        params = inspect.signature(self.cls.__init__).parameters
        skip = ("self", "model", "loss_fn") if self.takes_model else ("self", "params")
        out = {
            k: p.default for k, p in params.items() if k not in skip and p.kind is not p.VAR_KEYWORD
        }
        out.update(self.preset)
        return out

    def accepted(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The hyperparameters a configuration may set, with their defaults: those of
        :meth:`hyperparameters`, and for a wrapper also its base's (the entry named by
        ``given["base"]``, or by the default base)."""
        out = self.hyperparameters()
        base = (given or {}).get("base", out.get("base"))
        if self.wraps and isinstance(base, str) and base in _REGISTRY:
            out = {**spec(base).hyperparameters(), **out}
        return out


_REGISTRY: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("sgd", torch.optim.SGD, "SGD, optionally with heavy-ball momentum"),
        OptimizerSpec(
            "nesterov",
            torch.optim.SGD,
            "SGD with Nesterov momentum 0.9",
            preset={"momentum": 0.9, "nesterov": True},
        ),
        OptimizerSpec("adam", torch.optim.Adam, "Adam (Kingma & Ba 2015)"),
        OptimizerSpec("adamw", torch.optim.AdamW, "AdamW, decoupled weight decay"),
        OptimizerSpec(
            "entropy_sgd",
            EntropySGD,
            "Entropy-SGD (Chaudhari et al. 2017), Langevin inner loop",
            needs_closure=True,
        ),
        OptimizerSpec("vsgd", VSGD, "Variational SGD (Chen et al. 2024)"),
        OptimizerSpec(
            "sam",
            SAM,
            "Sharpness-Aware Minimization (Foret et al. 2021; ASAM with adaptive) around a base",
            needs_closure=True,
            same_batch=True,
            wraps=True,
        ),
        OptimizerSpec(
            "sgn",
            SGN,
            "Stochastic generalised Gauss-Newton (Gargiani et al. 2020), CG on one batch",
            needs_closure=True,
            takes_model=True,
            same_batch=True,
        ),
    )
}


def names() -> list[str]:
    """The registered optimizer names, in registry order."""
    return list(_REGISTRY)


def spec(name: str) -> OptimizerSpec:
    """The registry entry for ``name``; ``ValueError`` naming the valid ones if unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise check.unknown("optimizer", name, _REGISTRY) from None


def get(name: str, params: Iterable[Any] | nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params``.

    ``hparams`` override the entry's preset and the class defaults. An unknown name or
    hyperparameter raises ``ValueError`` listing the valid ones (with the closest match).
    For an entry built from the model (``takes_model``: SGN) ``params`` is the ``nn.Module``
    and ``hparams`` must hold ``loss_fn``.
    """
    entry = spec(name)
    accepted = entry.accepted(hparams)
    loss_fn = hparams.pop("loss_fn", None) if entry.takes_model else None
    for key in hparams:
        if key not in accepted:
            raise check.unknown(f"hyperparameter of optimizer {name!r}", key, accepted)
    full = {**entry.preset, **hparams}
    if entry.takes_model:
        return _build_from_model(entry, params, loss_fn, full)
    if entry.cls.__module__.startswith("torch."):
        _check_torch_hparams(full)
    try:
        return entry.cls(params, **full)
    except ValueError as err:
        if "empty parameter list" not in str(err):
            raise
        raise ValueError(
            f"Invalid params: optimizer {name!r} got no parameters (pass model.parameters() "
            "of a model that has some, or non-empty param groups)"
        ) from None


def _check_torch_hparams(hp: Mapping[str, Any]) -> None:
    """torch's own messages ("Invalid learning rate: -1") give no valid range, a malformed
    ``betas`` fails with an IndexError and ``lr=None`` with a TypeError: check the shared
    hyperparameters of torch's optimizers first, in valleys' one-line form."""
    for key in ("lr", "momentum", "dampening", "weight_decay", "eps"):
        if key in hp:
            check.nonneg(key, hp[key])
    if "betas" in hp:
        betas = hp["betas"]
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            check.fail("betas", betas, "expected two numbers in [0, 1), e.g. (0.9, 0.999)")
        for i, beta in enumerate(betas):
            check.interval(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
    if hp.get("nesterov") and (hp.get("momentum", 0) <= 0 or hp.get("dampening", 0) != 0):
        check.fail(
            "momentum",
            hp.get("momentum", 0),
            "Nesterov momentum needs momentum > 0 and dampening = 0: set momentum, e.g. 0.9",
        )


def _build_from_model(
    entry: OptimizerSpec, model: Any, loss_fn: Any, hparams: dict[str, Any]
) -> torch.optim.Optimizer:
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"Invalid params for optimizer {entry.name!r}: it is built from the model and its "
            f"loss, not from parameters (optim.get({entry.name!r}, model, loss_fn=..., ...))"
        )
    if loss_fn is None:
        raise ValueError(
            f"Missing loss_fn for optimizer {entry.name!r}: pass loss_fn='cross_entropy', 'mse' "
            "or a callable loss(outputs, targets)"
        )
    return entry.cls(model, loss_fn, **hparams)
