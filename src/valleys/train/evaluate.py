"""Evaluation on a held-out split, BatchNorm statistics refresh and EMA weights."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class WeightEMA:
    """Exponential moving average of the parameters, for evaluation (the TF port evaluates
    EMA(0.999) weights).

    The average starts as a copy of the weights when created and after every update is
    ``avg ← decay · avg + (1 − decay) · w`` (TensorFlow's ``ExponentialMovingAverage``
    without ``num_updates``). Buffers (BatchNorm statistics) are not averaged: evaluation
    copies the live model's buffers, or recomputes them with ``run.bn_refresh``.
    """

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.decay = float(decay)
        self.shadow = [p.detach().clone().float() for p in params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params: list[torch.Tensor]) -> None:
        for p, s in zip(params, self.shadow, strict=True):
            p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, t in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(t)
        self.num_updates = int(state["num_updates"])


# ---------------------------------------------------------------------------------------------
# evaluation


_DROPOUT = (nn.modules.dropout._DropoutNd,)
_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


@torch.no_grad()
def refresh_batchnorm(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 1024,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> bool:
    """Recompute every BatchNorm's running statistics on inputs ``x`` (the training set),
    leaving the weights alone: Entropy-SGD's "dry feed" before each evaluation.

    The model runs in train mode with dropout off over ``x`` in batches of ``batch_size``;
    each BatchNorm's statistics are reset and then averaged over the batches weighted by their
    sizes (the momentum of batch i is b_i / (b_1 + … + b_i)), so the running mean is exactly
    the mean over ``x`` and the running variance the size-weighted mean of the batch
    variances. (The original fed the set through with the usual momentum 0.1, so its statistics
    leaned towards the last batches.) Afterwards every module's train/eval flag and every
    BatchNorm's momentum are as before. Returns False (doing nothing) without BatchNorm layers
    that track statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, _BATCHNORM) and m.track_running_stats]
    if not bns:
        return False
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for bn in bns]
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, _DROPOUT):
                m.eval()
        for bn in bns:
            bn.reset_running_stats()
        ctx = autocast or contextlib.nullcontext
        for i in range(0, x.shape[0], batch_size):
            batch = x[i : i + batch_size]
            for bn in bns:
                bn.momentum = batch.shape[0] / (i + batch.shape[0])
            with ctx():
                model(batch)
    finally:
        for bn, momentum in momenta:
            bn.momentum = momentum
        for m, mode in modes:
            m.training = mode
    return True


def _align(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.shape != y.shape and out.numel() == y.numel():
        return out.reshape(y.shape)
    return out


# The same losses by the names of valleys.curvature, for optimizers built from the model.
LOSS_NAMES = {"classification": "cross_entropy", "regression": "mse"}


def loss_function(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for classification, mean squared error for regression."""
    if task == "classification":
        return lambda out, y: F.cross_entropy(out.float(), y)
    return lambda out, y: F.mse_loss(_align(out, y).float(), y.float())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    task: str,
    batch_size: int = 1024,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy (classification) or mean squared error (regression) of
    ``model`` on ``(x, y)``, in eval mode (restored afterwards), over all samples.

    The loss is cross-entropy averaged over samples, or the MSE averaged over all target
    entries (then ``mse`` equals ``loss``).
    """
    from valleys.data.loader import eval_batches

    if x.shape[0] == 0:
        raise ValueError(f"Invalid x: shape {tuple(x.shape)} (evaluate needs at least one sample)")
    was_training = model.training
    model.eval()
    ctx = autocast or contextlib.nullcontext
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    try:
        for xb, yb in eval_batches(x, y, batch_size):
            with ctx():
                out = model(xb)
            if task == "classification":
                total += F.cross_entropy(out.float(), yb, reduction="sum").double()
                correct += (out.argmax(1) == yb).sum()
            else:
                total += F.mse_loss(_align(out, yb).float(), yb.float(), reduction="sum").double()
    finally:
        model.train(was_training)
    if task == "classification":
        n = x.shape[0]
        return {"loss": float(total) / n, "accuracy": float(correct) / n}
    mse = float(total) / y.numel()
    return {"loss": mse, "mse": mse}


# ---------------------------------------------------------------------------------------------
# the run
