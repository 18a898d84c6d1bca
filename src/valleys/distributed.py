r"""Data parallelism across processes: the process group, the ranks and the collectives valleys
uses, each a no-op costing nothing when no process group is initialised.

``torchrun --nproc_per_node=N -m valleys train …`` starts N processes with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in their environment; :func:`init` (called by the training loop)
joins them into one process group — gloo on the CPU, nccl on CUDA with process ``LOCAL_RANK``
on ``cuda:LOCAL_RANK`` — and :func:`shutdown` leaves it. A program that initialised its own
group (``torch.distributed.init_process_group``) is used as it is.

Every rank holds the whole model (data parallelism, as ``DistributedDataParallel``); what is
averaged is named explicitly: :func:`all_reduce_mean` of gradients, losses and curvature
products, so that every pass of every optimizer (Entropy-SGD's Langevin passes, SAM's two
passes, SGN's gradient, GGN products and trial losses) sees the mean over the global batch.
With weights ``w_r`` (a rank's share of an uneven batch)::

    all_reduce_mean(t, w)  =  (1/N) Σ_r w_r · t_r        all_reduce_sum(t)  =  Σ_r t_r

A list of tensors is reduced with one collective per dtype (and device): the tensors are
copied into one flat buffer, reduced, and handed back as views of it, so the inputs are never
written. See ``docs/distributed.md`` for how the training loop, SGN and the landscape
diagnostics use these.

Inside :func:`single_process` every function here acts as if no group existed, for code that
runs on one rank only (a diagnostic on rank 0).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from valleys import _validate as check

__all__ = [
    "Reduce",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_reduce_sum_",
    "all_reduce_sum_count",
    "barrier",
    "broadcast_module_",
    "broadcast_object",
    "broadcast_scalar",
    "env_rank",
    "env_world_size",
    "from_main",
    "init",
    "is_initialized",
    "is_main",
    "is_sharded",
    "launched",
    "local_rank",
    "main_first",
    "mean_reducer",
    "rank",
    "shard_rows",
    "shutdown",
    "single_process",
    "world_size",
]

T = TypeVar("T")

#: A reduction of a list of tensors that returns new tensors (the inputs are left alone).
Reduce = Callable[[Sequence[Tensor]], list[Tensor]]

_SOLO: contextvars.ContextVar[bool] = contextvars.ContextVar("valleys_solo", default=False)
_OURS = False  # whether init() created the group (then shutdown() destroys it)


# ---------------------------------------------------------------------------------------------
# environment and ranks


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        check.fail(f"environment variable {name}", value, "expected an integer (set by torchrun)")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """``RANK`` from the environment (0 when unset): usable before the group exists."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset): this process's GPU on its node."""
    return _env_int("LOCAL_RANK", 0)


def launched() -> bool:
    """Whether this process is one of several started by a launcher (``WORLD_SIZE > 1``)."""
    return env_world_size() > 1


def is_initialized() -> bool:
    """Whether a process group is active here (and not masked by :func:`single_process`)."""
    if _SOLO.get():
        return False
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in the group; 1 without one."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the group; 0 without one."""
    return torch.distributed.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes files and prints)."""
    return rank() == 0


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Within this block, act as if no process group existed: no collectives, rank 0 of 1.
    For work done by one rank alone (e.g. ``if is_main(): with single_process(): ...``)."""
    token = _SOLO.set(True)
    try:
        yield
    finally:
        _SOLO.reset(token)


# ---------------------------------------------------------------------------------------------
# the process group


def _device_for(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` when several run."""
    n = world_size() if is_initialized() else env_world_size()
    if n == 1:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"Invalid run.device: {str(device)!r} (names one GPU, but {n} processes run: "
                "set run.device=cuda or auto and each process takes cuda:LOCAL_RANK)"
            )
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    if device.type != "cpu":
        raise ValueError(
            f"Invalid run.device: {str(device)!r} (several processes need cpu or cuda: gloo and "
            "nccl reduce nothing else)"
        )
    return device


def init(device: torch.device | str = "cpu", *, timeout_s: float | None = None) -> torch.device:
    """Join the launcher's process group if this process is one of several (``WORLD_SIZE >
    1``) and none is initialised yet; return the device this rank computes on.

    The backend is nccl for a CUDA ``device`` (``cuda`` becomes ``cuda:LOCAL_RANK``, made the
    current device) and gloo otherwise; ``timeout_s`` is the collectives' timeout (torch's
    default when None). Without a launcher this returns ``device`` and does nothing. Calling
    it again is free. The group is left at exit, or by :func:`shutdown`.
    """
    global _OURS
    device = torch.device(device)
    if _SOLO.get() or not torch.distributed.is_available():
        return device
    if not torch.distributed.is_initialized() and not launched():
        return device
    device = _device_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if name not in os.environ:
                raise ValueError(
                    f"Missing environment variable {name}: WORLD_SIZE={env_world_size()} asks "
                    "for several processes (start them with torchrun, which sets it)"
                )
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=check.positive("timeout_s", timeout_s))
        if backend == "nccl":
            kwargs["device_id"] = device
        torch.distributed.init_process_group(**kwargs)
        if not _OURS:
            atexit.register(shutdown)
        _OURS = True
    return device


def shutdown() -> None:
    """Leave the process group if :func:`init` created it (a no-op otherwise)."""
    global _OURS
    if _OURS and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OURS = False


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# reductions


def _comm_device(device: torch.device) -> torch.device:
    """Where a buffer must be for the backend: nccl reduces CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


@torch.no_grad()
def _reduce(tensors: Sequence[Tensor], weight: float, mean: bool) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    n = world_size()
    for (_, device), idx in groups.items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])  # a fresh buffer
        if weight != 1.0:
            flat.mul_(weight)
        comm = flat.to(_comm_device(device))
        torch.distributed.all_reduce(comm, op=torch.distributed.ReduceOp.SUM)
        if mean:
            comm.div_(n)
        flat = comm.to(device)
        offset = 0
        for i in idx:
            size = tensors[i].numel()
            out[i] = flat[offset : offset + size].view_as(tensors[i])
            offset += size
    return out  # type: ignore[return-value]


def all_reduce_sum(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``Σ_r t_r`` over the ranks for each tensor, as new tensors (one collective per dtype);
    the tensors themselves when there is no group."""
    if not is_initialized():
        return list(tensors)
    return _reduce(tensors, 1.0, mean=False)


@torch.no_grad()
def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """``Σ_r t_r`` written into ``tensor`` itself (no copy of a large matrix on a device the
    backend reduces); returns it."""
    if not is_initialized():
        return tensor
    comm = tensor.to(_comm_device(tensor.device))
    torch.distributed.all_reduce(comm, op=torch.distributed.ReduceOp.SUM)
    if comm is not tensor:
        tensor.copy_(comm)
    return tensor


def all_reduce_sum_count(tensors: Sequence[Tensor], count: int) -> tuple[list[Tensor], int]:
    """``(Σ_r t_r for each tensor, Σ_r count_r)``: per-rank sums over samples and their sample
    counts added up over the ranks (the count travels as float64 with the tensors); the inputs
    themselves when there is no group."""
    if not is_initialized():
        return list(tensors), int(count)
    device = tensors[0].device if tensors else torch.device("cpu")
    n = torch.tensor(float(count), dtype=torch.float64, device=device)
    *summed, n = all_reduce_sum([*tensors, n])
    return summed, round(float(n))


def all_reduce_mean(tensors: Sequence[Tensor], weight: float = 1.0) -> list[Tensor]:
    """``(1/N) Σ_r w_r t_r`` over the N ranks, ``w_r = weight`` on this rank, as new tensors
    (one collective per dtype). With per-batch means ``t_r`` over ``n_r`` samples and
    ``w_r = N n_r / Σ_s n_s`` this is the mean over the global batch; with equal shards
    ``w_r = 1``. The tensors themselves when there is no group."""
    if not is_initialized():
        return list(tensors)
    return _reduce(tensors, float(weight), mean=True)


def mean_reducer(weight: Callable[[], float] | None = None) -> Reduce | None:
    """A :data:`Reduce` averaging over the ranks (``weight()`` read at each call, 1 when None),
    or None when there is no process group: the default of SGN and the training closure."""
    if not is_initialized():
        return None

    def reduce(tensors: Sequence[Tensor]) -> list[Tensor]:
        return all_reduce_mean(tensors, 1.0 if weight is None else weight())

    return reduce


def broadcast_scalar(value: float, src: int = 0) -> float:
    """Rank ``src``'s ``value`` on every rank (e.g. its clock, so that all stop together)."""
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(torch.device("cpu")))
    torch.distributed.broadcast(t, src=src)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (tensors inside arrive on the CPU when
    they were there)."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place)."""
    if not is_initialized():
        return
    tensors = [*module.parameters(), *module.buffers()]
    for t in tensors:
        comm = t.detach().to(_comm_device(t.device))
        torch.distributed.broadcast(comm, src=src)
        if comm.data_ptr() != t.data_ptr():
            t.copy_(comm)


# ---------------------------------------------------------------------------------------------
# running something on one rank


_RAISED = (ValueError, FileNotFoundError, OSError)


def _attempt(fn: Callable[[], T]) -> tuple[bool, Any, BaseException | None]:
    """(ok, result, error to hand to the other ranks, picklable) of ``fn()``; the error itself
    is re-raised by the caller on this rank."""
    try:
        return True, fn(), None
    except _RAISED as err:
        try:
            pickle.dumps(err)
            shared: BaseException = err
        except Exception:
            shared = ValueError(str(err))
        return False, err, shared


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only, its result (or its ``ValueError``/``OSError``) handed to
    every rank: one reading of a file that all ranks act on, one decision for all."""
    if not is_initialized():
        return fn()
    if is_main():
        ok, value, shared = _attempt(fn)
        broadcast_object((ok, value if ok else shared))
        if not ok:
            raise value
        return value
    ok, value = broadcast_object(None)
    if not ok:
        raise value
    return value


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, rank 0 first and the others after it succeeded (e.g. a download
    into a shared folder); rank 0's ``ValueError``/``OSError`` is raised on every rank."""
    if not is_initialized():
        return fn()
    if is_main():
        ok, value, shared = _attempt(fn)
        broadcast_object((ok, shared))
        if not ok:
            raise value
        return value
    ok, err = broadcast_object(None)
    if not ok:
        raise err
    return fn()


# ---------------------------------------------------------------------------------------------
# shards


def shard_rows(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """The rows ``[start, stop)`` of ``n`` that ``rank_`` takes (default: this process): the
    ``world`` contiguous parts of ``torch.tensor_split``, sizes differing by at most one."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(int(n), w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds sharded parameters (FSDP1, FSDP2 ``fully_shard``, DTensors):
    then no rank has the full parameter vector that SGN and the curvature products need."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False  # sharding needs a process group
    from torch.distributed.fsdp import FullyShardedDataParallel

    kinds: tuple[type, ...] = (FullyShardedDataParallel,)
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch before FSDP2: FSDP1 only
        DTensor = None  # type: ignore[assignment,misc]
    else:
        kinds = (*kinds, FSDPModule)
    if any(isinstance(m, kinds) for m in model.modules()):
        return True
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())
