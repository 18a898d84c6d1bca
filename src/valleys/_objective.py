"""The batch objective behind :mod:`valleys.curvature`: output-space losses with their
derivatives, and ``θ ↦ ℓ(f(x; θ), y)`` for one batch with its RNG state and buffers.

Private: the public names are re-exported by :mod:`valleys.curvature`, whose docstring
describes the losses and the handling of BatchNorm and dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from valleys import _validate as check
from valleys._precision import autocast_dtype, master

__all__ = [
    "CrossEntropy",
    "MeanSquaredError",
    "Objective",
    "OutputLoss",
    "output_loss",
    "trainable_parameters",
]

# ---------------------------------------------------------------------------------------------
# output-space losses


class OutputLoss:
    """A mean-reduced loss ``ℓ(z, y)`` of the model outputs with its output-space derivatives.

    This base class differentiates any callable with autograd; subclasses give closed forms.
    """

    name = "autograd"

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        self.fn = fn

    @property
    def key(self) -> Any:
        """What identifies the loss in the trace cache."""
        return (type(self).__name__, id(self.fn))

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        """``ℓ(z, y)``, a 0-d tensor."""
        return self.fn(z, y)

    def value_and_grad(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``ℓ(z, y)`` and ``∂ℓ/∂z`` (``z`` is treated as a constant input)."""
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            value = self.fn(leaf, y)
            (grad,) = torch.autograd.grad(value, leaf)
        return value.detach(), grad

    def hvp(self, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """``H_ℓ(z) u`` with ``H_ℓ = ∂²ℓ/∂z²``, by reverse over reverse (``u`` may carry a
        graph; ``z`` is treated as a constant)."""
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.fn(leaf, y), leaf, create_graph=True)
            if not grad.requires_grad:  # a loss linear in z
                return torch.zeros_like(u)
            (out,) = torch.autograd.grad(grad, leaf, u, create_graph=u.requires_grad)
        return out


class CrossEntropy(OutputLoss):
    """Softmax cross-entropy, mean over the labels that are not ``ignore_index``.

    Closed forms for logits ``(B, C)`` and integer labels ``(B,)``; other shapes or soft
    labels go through autograd.
    """

    name = "cross_entropy"

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__(lambda z, y: F.cross_entropy(z, y, ignore_index=ignore_index))
        self.ignore_index = ignore_index

    @property
    def key(self) -> Any:
        return ("cross_entropy", self.ignore_index)

    def _closed(self, z: Tensor, y: Tensor) -> bool:
        return z.dim() == 2 and y.dim() == 1 and not y.is_floating_point()

    def _weights(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        valid = (y != self.ignore_index).to(z.dtype)
        return valid, valid.sum().clamp(min=1.0)

    def value_and_grad(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self._closed(z, y):
            return super().value_and_grad(z, y)
        valid, count = self._weights(z, y)
        logp = torch.log_softmax(z, dim=1)
        value = F.nll_loss(logp, y, ignore_index=self.ignore_index)
        labels = torch.where(y == self.ignore_index, 0, y)
        grad = logp.exp().scatter_add(1, labels[:, None], -torch.ones_like(logp[:, :1]))
        return value, grad * (valid / count)[:, None]

    def hvp(self, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
        if not self._closed(z, y):
            return super().hvp(z, y, u)
        valid, count = self._weights(z, y)
        p = torch.softmax(z, dim=1)
        pu = p * u
        return (pu - p * pu.sum(dim=1, keepdim=True)) * (valid / count)[:, None]


class MeanSquaredError(OutputLoss):
    """``mean((z − y)²)`` over all entries; ``y`` is reshaped to ``z``'s shape when the two
    differ only in shape (same number of entries)."""

    name = "mse"

    def __init__(self) -> None:
        super().__init__(lambda z, y: F.mse_loss(z, self._align(z, y)))

    @property
    def key(self) -> Any:
        return ("mse",)

    @staticmethod
    def _align(z: Tensor, y: Tensor) -> Tensor:
        if y.shape != z.shape and y.numel() == z.numel():
            y = y.reshape(z.shape)
        return y.to(z.dtype)

    def value_and_grad(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        diff = z - self._align(z, y)
        return diff.square().mean(), diff * (2.0 / z.numel())

    def hvp(self, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
        return u * (2.0 / z.numel())


_NAMED = {"cross_entropy": CrossEntropy, "mse": MeanSquaredError}


def output_loss(loss: str | OutputLoss | Callable[[Tensor, Tensor], Tensor]) -> OutputLoss:
    """The :class:`OutputLoss` for ``loss``: a name (``"cross_entropy"``, ``"mse"``), an
    :class:`OutputLoss`, ``nn.CrossEntropyLoss``/``nn.MSELoss`` with mean reduction and no
    class weights or label smoothing, ``F.cross_entropy``/``F.mse_loss`` (closed forms), or
    any callable ``loss(z, y)`` returning a scalar (autograd)."""
    if isinstance(loss, OutputLoss):
        return loss
    if isinstance(loss, str):
        if loss not in _NAMED:
            raise check.unknown("loss", loss, _NAMED)
        return _NAMED[loss]()
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.reduction == "mean" and loss.weight is None and loss.label_smoothing == 0:
            return CrossEntropy(loss.ignore_index)
    elif isinstance(loss, nn.MSELoss):
        if loss.reduction == "mean":
            return MeanSquaredError()
    elif loss is F.cross_entropy:
        return CrossEntropy()
    elif loss is F.mse_loss:
        return MeanSquaredError()
    if not callable(loss):
        check.fail("loss", loss, "expected 'cross_entropy', 'mse' or a callable loss(z, y)")
    return OutputLoss(loss)


# ---------------------------------------------------------------------------------------------
# the batch objective


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that require grad, by name (shared parameters once), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class Rng:
    """Record the torch RNG state (CPU and the CUDA device) and put it back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None
        self.before = self._get()
        self.after: tuple | None = None

    def _get(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None
        return torch.get_rng_state(), cuda

    def _set(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if self.device is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextlib.contextmanager
    def first(self) -> Iterator[None]:
        """The first forward pass: draws from the recorded state, then records where it
        left the RNG."""
        yield
        self.after = self._get()

    @contextlib.contextmanager
    def preserved(self) -> Iterator[None]:
        """Whatever runs inside leaves the RNG as it found it."""
        state = self._get()
        try:
            yield
        finally:
            self._set(state)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """A later forward pass: the same draws as the first, the RNG left as the first left
        it."""
        self._set(self.before)
        try:
            yield
        finally:
            self._set(self.after if self.after is not None else self.before)


def _updates_statistics(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.training
        and module.track_running_stats
    )


@contextlib.contextmanager
def _statistics_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode stop updating their running statistics (they still
    normalise with the batch statistics, which is what train mode computes)."""
    changed = [m for m in model.modules() if _updates_statistics(m)]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


class Objective:
    """``θ ↦ ℓ(f(x; θ), y)`` for one batch: names, constant tensors, RNG and buffers."""

    def __init__(
        self,
        model: nn.Module,
        loss: Any,
        inputs: Tensor,
        targets: Tensor,
        params: Mapping[str, Tensor] | None,
    ) -> None:
        if not isinstance(model, nn.Module):
            check.fail("model", type(model).__name__, "expected a torch.nn.Module")
        self.model = model
        self.loss = output_loss(loss)
        params = trainable_parameters(model) if params is None else dict(params)
        if not params:
            raise ValueError("Invalid params: empty (the model has no trainable parameters)")
        self.names = list(params)
        self.values = [p.detach() for p in params.values()]
        own = dict(model.named_parameters())
        self.frozen = {n: p.detach() for n, p in own.items() if n not in params}
        self.buffers = dict(model.named_buffers())
        self.x, self.y = inputs, targets
        self.device = self.values[0].device
        self.rng = Rng(self.device)
        # the autocast region in effect now fixes the precision of every later forward pass
        self.precision = autocast_dtype(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The model's forward passes: under autocast to :attr:`precision` (the region the
        objective was built in), or with autocast off if it was built outside one."""
        if self.precision is None and autocast_dtype(self.device) is None:
            return contextlib.nullcontext()
        enabled = self.precision is not None
        return torch.autocast(self.device.type, dtype=self.precision, enabled=enabled)

    def exact(self) -> contextlib.AbstractContextManager:
        """Losses and their output-space derivatives: autocast off (inputs in float32 by
        :func:`master`)."""
        if autocast_dtype(self.device) is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def constants(self, real_buffers: bool) -> dict[str, Tensor]:
        """Frozen parameters and buffers (the buffers themselves, or copies)."""
        buffers = self.buffers if real_buffers else {n: b.clone() for n, b in self.buffers.items()}
        return {**self.frozen, **buffers}

    @property
    def tracks_statistics(self) -> bool:
        """Whether a forward pass would update BatchNorm running statistics."""
        return any(_updates_statistics(m) for m in self.model.modules())

    def call(self, values: Sequence[Tensor], update_buffers: bool = False) -> Tensor:
        """The model's outputs at parameter values ``values``. BatchNorm layers in train mode
        normalise with the batch statistics either way; their running statistics are updated
        only with ``update_buffers`` (torch.func transforms refuse that in-place update, so
        they call this without it)."""
        mapping = {**dict(zip(self.names, values, strict=True)), **self.frozen}
        context = contextlib.nullcontext() if update_buffers else _statistics_frozen(self.model)
        with context, self.autocast():
            out = functional_call(self.model, mapping, (self.x,))
        if not isinstance(out, Tensor):
            raise TypeError(
                f"curvature products need a model that returns one tensor, got {type(out).__name__}"
            )
        return out

    def loss_at(self, values: Sequence[Tensor]) -> Tensor:
        with torch.no_grad(), self.rng.replay():
            z = self.call(values)
            with self.exact():
                return self.loss.value(master(z), self.y).detach()
