"""What every landscape diagnostic shares: the data as batches, the full-dataset loss, eval
mode, and evaluating a model at other parameter values without touching it.

Batches
-------
A diagnostic takes ``batches``: the dataset as ``(inputs, targets)`` pairs already on the
model's device, given as

* a re-iterable collection (a list of pairs, a ``DataLoader``): iterated once per pass;
* a callable returning a fresh iterable (``lambda: eval_batches(x, y, 1024)``): called once
  per pass;
* a one-shot iterator (a generator): read once and kept in a list.

The full loss is the per-sample-weighted mean ``f = Σ_b n_b·ℓ_b / Σ_b n_b`` of the
mean-reduced batch losses ``ℓ_b = loss_fn(model(x_b), y_b)`` with ``n_b = len(y_b)``, so a
smaller last batch is weighted correctly. Sums are accumulated in float64 on the device and
returned as tensors: nothing here synchronises with the device inside a pass.

Several processes
-----------------
When a process group is initialised (:mod:`valleys.distributed`, e.g. under ``torchrun``),
every full-dataset pass is shared: batch ``i`` of the pass is computed by rank ``i mod N``
and the sums ``Σ_b n_b·ℓ_b``, ``Σ_b n_b`` (and gradients, Hessian-vector products) are
added up over the ranks, so that every rank gets the full-dataset value and the diagnostics
built on them (Lanczos, Hutchinson, sharpness, surfaces) run identically everywhere. Every
rank must then call the diagnostic with the same batches; to run one on a single rank, call
it inside ``valleys.distributed.single_process()``. A stream of mini-batches (the ascent
batches of :func:`~valleys.landscape.sharpness.keskar_sharpness`) is not shared: each rank
reads the same batches.

Parameters
----------
Diagnostics never write into the model. A model is evaluated at other parameter values with
:func:`call_with` (``torch.func.functional_call``): the given tensors stand in for the named
parameters for one forward pass, so the model's own parameters, buffers (BatchNorm running
statistics, ``num_batches_tracked``) and ``.grad`` stay as they were, even when an exception
interrupts a diagnostic. Everything runs in eval mode (:func:`eval_mode`), after which each
module's training flag is restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, TypeAlias

import torch
from torch import Tensor, nn

from valleys import _validate as check
from valleys import distributed

__all__ = [
    "Batch",
    "Batches",
    "LossFn",
    "LossValue",
    "as_stream",
    "batch_source",
    "call_with",
    "dataset_mean",
    "eval_mode",
    "full_loss",
    "full_loss_and_grad",
    "local_pass",
    "offset_parameters",
    "trainable_parameters",
]

Batch: TypeAlias = tuple[Tensor, Tensor]
Batches: TypeAlias = Iterable[Batch] | Callable[[], Iterable[Batch]]
LossFn: TypeAlias = Callable[[Tensor, Tensor], Tensor]


def batch_source(batches: Batches) -> Callable[[], Iterable[Batch]]:
    """A callable giving one full pass over ``batches`` each time it is called (see the
    module docstring for what ``batches`` may be)."""
    if hasattr(batches, "__iter__"):
        if iter(batches) is batches:  # a one-shot iterator: keep what it yields
            kept = list(batches)
            return lambda: kept
        return lambda: batches  # type: ignore[return-value]
    if callable(batches):
        return batches
    check.fail("batches", type(batches).__name__, "expected an iterable or callable of batches")


def as_stream(batches: Batches) -> Iterator[Batch]:
    """An endless iterator of batches: a one-shot iterator (a training stream) is read as it
    is; a collection or callable is passed over again and again."""
    if hasattr(batches, "__iter__") and iter(batches) is batches:
        return batches  # type: ignore[return-value]
    source = batch_source(batches)

    def cycle() -> Iterator[Batch]:
        while True:
            empty = True
            for batch in source():
                empty = False
                yield batch
            if empty:
                check.fail("batches", "empty", "a pass over the batches yielded none")

    return cycle()


def local_pass(source: Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    """This rank's batches of one pass over ``source()``: batch ``i`` goes to rank
    ``i mod N`` (all of them without a process group)."""
    world, me = distributed.world_size(), distributed.rank()
    for i, batch in enumerate(source()):
        if i % world == me:
            yield batch


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; afterwards every module's training flag is what it was.
    A sharded (FSDP) model is refused (see :func:`trainable_parameters`)."""
    _refuse_sharded(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def trainable_parameters(
    model: nn.Module, params: Iterable[Tensor] | None = None
) -> dict[str, Tensor]:
    """``{name: parameter}`` of the parameters a diagnostic acts on: those of ``params`` (each
    must be a parameter of ``model``), or by default every parameter that requires grad."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    else:
        by_id = {id(p): n for n, p in named.items()}
        chosen = {}
        for p in params:
            if id(p) not in by_id:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                check.fail("params", shape, "each entry must be a parameter of the model")
            chosen[by_id[id(p)]] = p
    if not chosen:
        check.fail("params", "none", "the model has no parameters to act on")
    _refuse_sharded(model)
    return chosen


def _refuse_sharded(model: nn.Module) -> None:
    if distributed.is_sharded(model):
        check.fail(
            "model",
            type(model).__name__,
            "a sharded (FSDP) model: the diagnostics act on full parameter vectors; load the "
            "weights into an unsharded model (every rank may hold one and share the batches)",
        )


def offset_parameters(
    base: Mapping[str, Tensor], *directions: tuple[float | Tensor, Mapping[str, Tensor]]
) -> dict[str, Tensor]:
    """``{name: base[name] + Σ_k c_k·d_k[name]}`` for ``directions = ((c_1, d_1), …)``; a name
    missing from a direction is taken as a zero there."""
    out = {}
    for name, value in base.items():
        for coef, d in directions:
            if name in d:
                value = value + coef * d[name]
        out[name] = value
    return out


def call_with(model: nn.Module, params: Mapping[str, Tensor] | None, inputs: Tensor) -> Tensor:
    """``model(inputs)`` with the tensors of ``params`` (names as in ``named_parameters`` or
    ``named_buffers``) standing in for the model's own; the model is not modified."""
    if not params:
        return model(inputs)
    return torch.func.functional_call(model, dict(params), (inputs,))


def _count(targets: Tensor) -> int:
    return int(targets.shape[0]) if targets.dim() > 0 else 1


def dataset_mean(
    fn: Callable[[Tensor, Tensor], Tensor | Sequence[Tensor]], batches: Batches
) -> tuple[Tensor | list[Tensor], int]:
    """``(Σ_b n_b·fn(x_b, y_b) / Σ_b n_b, Σ_b n_b)``: the per-sample-weighted mean of a
    per-batch mean over one pass, for a tensor or a list of tensors (gradients, Hessian-vector
    products). Accumulates in the dtype ``fn`` returns. With a process group the batches are
    shared out and the sums added up over the ranks (see the module docstring)."""
    total: Tensor | list[Tensor] | None = None
    n = 0
    source = batch_source(batches)
    for x, y in local_pass(source):
        value = fn(x, y)
        b = _count(y)
        if isinstance(value, Tensor):
            total = value * b if total is None else total.add_(value, alpha=b)
        else:
            values = list(value)
            if total is None:
                total = [v * b for v in values]
            else:
                torch._foreach_add_(total, values, alpha=b)
        n += b
    if distributed.world_size() > 1:
        total, n = _sum_over_ranks(fn, source, total, n)
    if total is None or n == 0:
        check.fail("batches", "empty", "the batches hold no samples")
    if isinstance(total, Tensor):
        return total / n, n
    torch._foreach_div_(total, n)
    return total, n


def _sum_over_ranks(
    fn: Callable[[Tensor, Tensor], Tensor | Sequence[Tensor]],
    source: Callable[[], Iterable[Batch]],
    total: Tensor | list[Tensor] | None,
    n: int,
) -> tuple[Tensor | list[Tensor] | None, int]:
    """The sums of :func:`dataset_mean` added up over the ranks. A rank that got no batch
    (fewer batches than ranks) learns the shapes from the first batch and adds zeros."""
    if total is None:
        first = next(iter(source()), None)
        if first is None:  # empty everywhere: every rank fails alike
            return None, 0
        value = fn(*first)
        if isinstance(value, Tensor):
            total = torch.zeros_like(value)
        else:
            total = [torch.zeros_like(v) for v in value]
    parts = [total] if isinstance(total, Tensor) else list(total)
    summed, n = distributed.all_reduce_sum_count(parts, n)
    return (summed[0] if isinstance(total, Tensor) else summed), n


class LossValue(NamedTuple):
    """The full-dataset mean loss (0-d float64 tensor), the accuracy (0-d float64 tensor, or
    None) and the number of samples."""

    loss: Tensor
    accuracy: Tensor | None
    count: int


def _correct_fraction(out: Tensor, y: Tensor) -> Tensor:
    if out.dim() != 2 or y.dim() != 1 or y.is_floating_point():
        check.fail(
            "accuracy",
            True,
            f"needs class scores (N, C) and integer labels (N,), got {tuple(out.shape)} and "
            f"{tuple(y.shape)} {y.dtype}",
        )
    return (out.argmax(1) == y).double().mean()


@torch.no_grad()
def full_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    params: Mapping[str, Tensor] | None = None,
    *,
    accuracy: bool = False,
) -> LossValue:
    """The full-dataset mean of ``loss_fn`` (and the accuracy) of ``model`` in eval mode,
    at ``params`` in place of the named parameters if given (see :func:`call_with`)."""

    def fn(x: Tensor, y: Tensor) -> Tensor:
        out = call_with(model, params, x)
        loss = loss_fn(out, y).double()
        if accuracy:
            return torch.stack([loss, _correct_fraction(out, y)])
        return loss.reshape(1)

    with eval_mode(model):
        mean, n = dataset_mean(fn, batches)
    assert isinstance(mean, Tensor)
    return LossValue(mean[0], mean[1] if accuracy else None, n)


def full_loss_and_grad(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    wrt: Sequence[Tensor],
    params: Callable[[], Mapping[str, Tensor]] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """The full-dataset mean loss (0-d float64) and its gradient with respect to the tensors
    ``wrt``, in eval mode.

    ``params()`` builds, once per batch, the tensors that stand in for the model's parameters
    (e.g. ``base + z`` with ``z`` in ``wrt``); without it the model's own parameters are used
    and ``wrt`` must be among them. Gradients go through ``torch.autograd.grad``, so no
    ``.grad`` field is written.
    """
    wrt = list(wrt)

    def fn(x: Tensor, y: Tensor) -> list[Tensor]:
        with torch.enable_grad():
            loss = loss_fn(call_with(model, params() if params else None, x), y)
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads, strict=True)]
        return [loss.detach().double(), *grads]

    with eval_mode(model):
        mean, _ = dataset_mean(fn, batches)
    assert isinstance(mean, list)
    return mean[0], mean[1:]
