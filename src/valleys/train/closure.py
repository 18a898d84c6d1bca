"""The one closure every optimizer is driven through, and fp16 loss scaling.

A *pass* is one call of the closure: one forward and one backward pass on one mini-batch.
Single-pass optimizers call it once per step; Entropy-SGD calls it ``langevin_steps`` times,
each on a fresh batch; SGN and SAM evaluate one batch several times (``same_batch``). See
:mod:`valleys.train.loop` for how the loop counts passes and handles mixed precision.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class LossScaler:
    """Dynamic loss scaling for fp16 (the rule of ``torch.amp.GradScaler``), usable inside a
    closure that is called several times per step.

    ``scale_loss(loss)`` multiplies by the scale; ``unscale_(params)`` divides the gradients
    by it in place and returns a bool tensor, True where any gradient is inf/NaN;
    ``update(found_inf)`` halves the scale after a skipped step and doubles it after
    ``growth_interval`` finite steps in a row. ``state_dict`` is plain data.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params: list[torch.Tensor]) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.bool)
        torch._foreach_mul_(grads, 1.0 / self.scale)
        peaks = torch.stack([n.float() for n in torch._foreach_norm(grads, math.inf)])
        return ~torch.isfinite(peaks).all()

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])


class Closure:
    """The closure handed to every optimizer (see :func:`make_closure`)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        *,
        same_batch: bool = False,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        scaler: LossScaler | None = None,
        reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.next_batch = next_batch
        self.optimizer = optimizer
        self.same_batch = same_batch
        self.autocast = autocast or contextlib.nullcontext
        self.scaler = scaler
        self.reduce = reduce  # averages over processes (valleys.distributed); SGN reads it too
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.calls = 0  # closure calls (forward/backward passes) so far
        self.found_inf: torch.Tensor | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_step(self) -> None:
        """Forget the step's batch (``same_batch``) and the inf/NaN flag."""
        self._batch = None
        self.found_inf = None

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.same_batch and self._batch is not None:
            return self._batch
        batch = self.next_batch()
        if self.same_batch:
            self._batch = batch
        return batch

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        xb, yb = self.batch()
        with self.autocast():
            loss = self.loss_fn(self.model(xb), yb)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale_loss(loss).backward()
        loss = loss.detach()
        if self.reduce is not None:
            loss = self._average(loss)
        if self.scaler is not None:
            bad = self.scaler.unscale_(self.params)
            self.found_inf = bad if self.found_inf is None else self.found_inf | bad
        self.calls += 1
        return loss

    @torch.no_grad()
    def _average(self, loss: torch.Tensor) -> torch.Tensor:
        """Gradients and loss averaged over the processes, in one collective per dtype,
        before unscaling: an inf/NaN on any rank reaches every rank, so all skip together."""
        grads = [p.grad for p in self.params if p.grad is not None]
        *means, loss = self.reduce([*grads, loss])  # type: ignore[misc]
        torch._foreach_copy_(grads, means)
        return loss

    def add_passes(self, n: int) -> None:
        """Count ``n`` passes that the optimizer made on this step's batch by itself, without
        calling the closure (SGN's curvature products and trial losses), so that ``calls``
        counts every pass."""
        self.calls += int(n)


def make_closure(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    same_batch: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    scaler: LossScaler | None = None,
    reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> Closure:
    """The one closure that drives every optimizer.

    Each call zeroes the gradients, takes a batch, computes ``loss_fn(model(x), y)`` (under
    ``autocast``), backpropagates (scaled and unscaled by ``scaler``, recording inf/NaN in
    ``found_inf``), counts itself in ``calls`` and returns the loss (detached, unscaled).

    Batches: by default every call draws a fresh batch from ``next_batch``, which is what
    Entropy-SGD needs. With ``same_batch=True`` the first call of a step draws one and the
    later calls of the same step reuse it (the protocol of optimizers that evaluate one batch
    repeatedly, e.g. line searches); the loop takes the flag from the optimizer's registry
    entry (``OptimizerSpec.same_batch``). Call :meth:`Closure.begin_step` before each step.

    Optimizers built from the model (``OptimizerSpec.takes_model``: SGN) are driven by the
    same closure: they read the step's batch from :meth:`Closure.batch` (with
    ``same_batch=True``), compute their passes themselves under the closure's ``autocast``
    and with its ``scaler``, report them through :meth:`Closure.add_passes`, and set
    ``found_inf`` when one of their scaled passes overflowed.

    Data parallelism: ``reduce`` (e.g. :func:`valleys.distributed.mean_reducer`) averages the
    gradients and the loss of every call over the processes, after the backward pass and
    before the fp16 unscaling and inf/NaN check; SGN averages its own passes with it.
    """
    return Closure(
        model,
        loss_fn,
        next_batch,
        optimizer,
        same_batch=same_batch,
        autocast=autocast,
        scaler=scaler,
        reduce=reduce,
    )
