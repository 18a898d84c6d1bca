"""The training loop's side of data parallelism (``torchrun --nproc_per_node=N -m valleys
train …``; see ``docs/distributed.md`` and :mod:`valleys.distributed`).

Every process builds the same model, optimizer and batch stream from the same seed; each
takes its part of every global batch of ``data.batch_size`` samples, and the closure averages
gradients and losses over the processes after every pass (SGN its products and trial losses
too), so that parameters and optimizer states stay equal everywhere and follow the
single-process run with the same configuration. What this module adds to the loop:

* :func:`check_batches` — the global batch must split evenly, every part non-empty;
* :func:`evaluate` — each process evaluates its contiguous share of the rows and the sums
  (loss, correct predictions, counts) are added up: the single-process numbers;
* :func:`average_buffers_` — BatchNorm running statistics (computed by each process on its
  part of the batches) averaged before evaluations and checkpoints; being running means,
  their average is what averaging at every step would give;
* :func:`rng_state` / :func:`set_rng_state` — the global generators with the training
  device's CUDA generator apart, restored into each rank's own device;
* :class:`NullLog` — the metrics log of the processes other than rank 0, which write nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from valleys import distributed
from valleys.train import checkpoint as ckpt
from valleys.train import config as C

__all__ = [
    "NullLog",
    "average_buffers_",
    "check_batches",
    "evaluate",
    "rng_state",
    "set_rng_state",
]


class NullLog:
    """The interface of :class:`valleys.train.log.MetricsLog`, writing nothing."""

    offset = 0

    def open(self) -> NullLog:
        return self

    def truncate_to(self, offset: int) -> int:
        return 0

    def write(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def check_batches(cfg: C.Config, num_train: int, world: int) -> None:
    """One-line errors for batches that ``world`` processes cannot share: the global batch
    ``data.batch_size`` must be a multiple of ``world``, and with ``data.drop_last=false`` the
    smaller last batch of an epoch must give every process at least one sample."""
    if world == 1:
        return
    b = cfg.data.batch_size
    if b % world:
        low, high = b - b % world, b - b % world + world
        shown = f"{low} or {high}" if low else f"{high}"
        raise ValueError(
            f"Invalid data.batch_size: {b} (it is the global batch, split evenly over the "
            f"{world} processes of this launch: use a multiple of {world}, e.g. {shown})"
        )
    last = num_train % b
    if cfg.data.sampling == "shuffle" and not cfg.data.drop_last and 0 < last < world:
        raise ValueError(
            f"Invalid data.drop_last: false (each epoch ends with a batch of {last} of the "
            f"{num_train} samples, fewer than the {world} processes: set data.drop_last=true "
            "or another data.batch_size)"
        )


@torch.no_grad()
def average_buffers_(model: nn.Module) -> None:
    """Replace every floating-point buffer of ``model`` by its mean over the processes."""
    if distributed.world_size() == 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if buffers:
        torch._foreach_copy_(buffers, distributed.all_reduce_mean(buffers))


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    task: str,
    batch_size: int = 1024,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """:func:`valleys.train.evaluate.evaluate` of the whole of ``(x, y)``, each process taking
    its contiguous share of the rows and the sums added up over the processes (equal to one
    process's numbers up to the order of the float64 sums)."""
    from valleys.train.evaluate import evaluate as evaluate_rows

    if distributed.world_size() == 1:
        return evaluate_rows(model, x, y, task=task, batch_size=batch_size, autocast=autocast)
    rows = distributed.shard_rows(x.shape[0])
    xs, ys = x[rows], y[rows]
    n, entries = xs.shape[0], ys.numel()
    sums = torch.zeros(4, dtype=torch.float64, device=x.device)
    if n:
        values = evaluate_rows(model, xs, ys, task=task, batch_size=batch_size, autocast=autocast)
        if task == "classification":
            sums[0], sums[1] = values["loss"] * n, values["accuracy"] * n
        else:
            sums[0] = values["loss"] * entries
    sums[2], sums[3] = n, entries
    (sums,) = distributed.all_reduce_sum([sums])
    loss_sum, correct, n_all, entries_all = sums.tolist()
    if task == "classification":
        return {"loss": loss_sum / n_all, "accuracy": correct / n_all}
    mse = loss_sum / entries_all
    return {"loss": mse, "mse": mse}


def rng_state(device: torch.device) -> dict[str, Any]:
    """:func:`valleys.train.checkpoint.get_rng_state`, plus (``"device"``) the generator of
    the training device when it is a GPU."""
    state = ckpt.get_rng_state()
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`'s generators; the saved training device's generator goes to
    ``device``, so that every rank (rank r on ``cuda:r``) continues rank 0's stream — they were
    equal, all seeded alike — and a run resumed on another GPU continues its own."""
    ckpt.set_rng_state(state)
    if device.type == "cuda" and "device" in state:
        torch.cuda.set_rng_state(state["device"], device)
