r"""The dense Hessian of the full-dataset loss and its full spectrum, for small models.

``H = ∇²_θ f`` as in :mod:`valleys.landscape.hessian` (full-dataset mean loss, eval mode,
buffers untouched), stored as an ``n × n`` matrix over the flattened parameters (in the
order of ``named_parameters``, as :func:`valleys.linalg.to_vector` flattens them).

How the matrix is built
-----------------------
Column ``j`` of ``H`` is the Hessian-vector product with the unit vector ``e_j``. The
columns are computed in chunks of ``chunk_size`` unit vectors at once, by ``torch.func.vmap``
over a forward-over-reverse product (``jvp`` of ``grad``), batch by batch, and accumulated
with the batch weights ``n_b / Σ n_b`` into a preallocated matrix. Two things keep this
affordable:

* **Block triangle.** The parameters are taken tensor by tensor (blocks ``0, 1, …``). For a
  unit vector in block ``k`` only the rows of blocks ``≥ k`` are computed: the function
  differentiated is the loss as a function of blocks ``k, k+1, …`` with the earlier ones held
  constant, so its backward pass stops at the first layer that uses block ``k``. The rows of
  earlier blocks are filled in by symmetry at the end. For a network whose parameters are
  listed in forward order (the usual case) the columns of the last layers then cost a
  fraction of a full product; the result does not depend on the order.
* **One trace per batch and block** (``method="linearize"``):
  ``torch.func.linearize`` runs the forward and backward pass once and keeps what the
  tangent computation needs, so each chunk costs only the tangent (forward-mode) part
  (about half the time of ``"jvp"`` on a LeNet). ``method="jvp"`` recomputes the primal
  pass inside every chunk (less memory; no tracing, which costs about a second of Python
  work per batch and block). ``"auto"`` (default) traces the blocks that span at least
  :data:`TRACE_MIN_CHUNKS` chunks.

Memory: the matrix (``n² × 8`` bytes in float64, ``n² × 4`` in float32), plus per chunk
about ``chunk_size × batch size`` tangent copies of the activations of the layers after
block ``k``: lower ``chunk_size`` (or the batch size) if that is too much.

The spectrum
------------
:func:`dense_spectrum` builds the matrix and returns all its eigenvalues from a symmetric
eigensolver (LAPACK ``?syevd``, eigenvalues only). Rows that are exactly zero (dead units,
unused parameters) are exact zero eigenvalues and are dropped first (the matrix is compacted
in place). On the CPU, with the MKL that PyTorch ships, the solver runs on the matrix's own
memory (:func:`eigvalsh` with ``overwrite=True``), so the peak is one matrix;
``torch.linalg.eigvalsh`` (used otherwise, and on CUDA) works on a copy, doubling it.
Float32 (the default above 16,384 parameters) halves the memory again; its eigenvalues carry
absolute errors of a few ``1e-7·‖H‖`` to ``1e-6·‖H‖`` (backward stability of the solver in
single precision: ``O(√n·ε‖H‖)``), so eigenvalues much smaller than that are noise.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from valleys import _validate as check
from valleys import distributed
from valleys.landscape.common import (
    Batches,
    LossFn,
    batch_source,
    eval_mode,
    local_pass,
    trainable_parameters,
)

__all__ = ["DENSE_METHODS", "SpectrumResult", "dense_hessian", "dense_spectrum", "eigvalsh"]

DENSE_METHODS = ("auto", "linearize", "jvp")

#: ``method="auto"`` traces a block (``"linearize"``) when it has at least this many chunks:
#: a trace costs about a second of Python work, worth it only when reused.
TRACE_MIN_CHUNKS = 4

#: Above this many parameters :func:`dense_spectrum` defaults to float32 (the float64
#: matrix would exceed 2 GiB).
FLOAT64_LIMIT = 16_384


def _tail_columns(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    names: list[str],
    values: list[Tensor],
    k: int,
    method: str,
) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """``E ↦ (H_{j,k} E)_{j ≥ k}`` for a batch of tangents ``E`` of block ``k``: the rows of
    blocks ``k, k+1, …`` of the batch Hessian times each tangent, by vmap."""
    fixed = dict(zip(names[:k], values[:k], strict=True))
    tail = names[k:]

    def loss_of(*free: Tensor) -> Tensor:
        mapping = {**fixed, **dict(zip(tail, free, strict=True))}
        return loss_fn(torch.func.functional_call(model, mapping, (x,)), y)

    argnums = tuple(range(len(tail)))

    def grads(block: Tensor) -> tuple[Tensor, ...]:
        return torch.func.grad(loss_of, argnums=argnums)(block, *values[k + 1 :])

    if method == "linearize":
        with warnings.catch_warnings():  # torch.fx's constant folding warns about its own nodes
            warnings.simplefilter("ignore", UserWarning)
            _, linear = torch.func.linearize(grads, values[k])
        return torch.func.vmap(linear)
    return torch.func.vmap(lambda e: torch.func.jvp(grads, (values[k],), (e,))[1])


def _symmetrize_(h: Tensor, offsets: list[int], tile: int = 1024) -> None:
    """Make ``h`` symmetric in place: within each diagonal block the mean of both halves (both
    were computed), below it the transpose of the rows above (only those were computed)."""
    for a0, a1 in itertools.pairwise(offsets):
        for r0 in range(a0, a1, tile):
            r1 = min(r0 + tile, a1)
            for c0 in range(r0, a1, tile):
                c1 = min(c0 + tile, a1)
                upper, lower = h[r0:r1, c0:c1], h[c0:c1, r0:r1]
                mean = (upper + lower.T) / 2
                upper.copy_(mean)
                lower.copy_(mean.T)
        if a1 < h.shape[0]:
            h[a1:, a0:a1].copy_(h[a0:a1, a1:].T)


def _memory(device: torch.device) -> int | None:
    """The device's total memory in bytes (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits(n: int, dtype: torch.dtype, device: torch.device) -> None:
    need = n * n * torch.empty((), dtype=dtype).element_size()
    total = _memory(device)
    if total is not None and need > total:
        check.fail(
            "model",
            f"{n:,} parameters",
            f"its dense Hessian takes {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}"
            f", more than the {total / 2**30:.1f} GiB of {device.type} memory: use the "
            "matrix-free top_eigen, hutchinson_trace and spectral_density",
        )


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    params: Iterable[Tensor] | None = None,
    chunk_size: int = 64,
    dtype: torch.dtype | None = torch.float64,
    method: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    r"""The ``n × n`` Hessian of the full-dataset mean loss (eval mode), symmetric.

    Computed in the parameters' dtype and accumulated in ``dtype`` (None: the parameters'),
    on their device; ``chunk_size`` unit vectors per vmap call; ``method``: ``"auto"``,
    ``"linearize"`` or ``"jvp"`` (see the module docstring). ``progress(k)`` is called after
    each chunk with the number of (column, batch) pairs done, out of ``n × number of
    batches`` (of this rank's batches: with a process group each rank assembles the columns
    of its share of the batches and the matrices are summed over the ranks).
    """
    chunk_size = check.count("chunk_size", chunk_size, 1)
    method = check.choice("method", method, DENSE_METHODS)
    named = trainable_parameters(model, params)
    names = list(named)
    values = [p.detach() for p in named.values()]
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + v.numel())
    n, device = offsets[-1], values[0].device
    dtype = dtype or values[0].dtype
    _check_fits(n, dtype, device)
    h = torch.zeros(n, n, dtype=dtype, device=device)
    samples, done = 0, 0
    with eval_mode(model):
        for x, y in local_pass(batch_source(batches)):
            count = int(y.shape[0]) if y.dim() > 0 else 1
            for k, value in enumerate(values):
                size, start = value.numel(), offsets[k]
                chunks = -(-size // chunk_size)
                how = method
                if how == "auto":
                    how = "linearize" if chunks >= TRACE_MIN_CHUNKS else "jvp"
                columns = _tail_columns(model, loss_fn, x, y, names, values, k, how)
                for c0 in range(0, size, chunk_size):
                    c1 = min(c0 + chunk_size, size)
                    basis = torch.zeros(c1 - c0, size, dtype=value.dtype, device=device)
                    basis[:, c0:c1].fill_diagonal_(1.0)
                    out = columns(basis.view(c1 - c0, *value.shape))
                    rows = torch.cat([o.reshape(c1 - c0, -1) for o in out], 1)
                    # row j of the upper block triangle = column j below the diagonal block
                    h[start + c0 : start + c1, start:].add_(rows.to(h.dtype), alpha=count)
                    done += c1 - c0
                    if progress is not None:
                        progress(done)
            samples += count
    if distributed.world_size() > 1:  # each rank summed its share of the batches
        distributed.all_reduce_sum_(h)  # in place: no copy of the matrix
        _, samples = distributed.all_reduce_sum_count([], samples)
    if samples == 0:
        check.fail("batches", "empty", "the batches hold no samples")
    h.div_(samples)
    _symmetrize_(h, offsets)
    return h


# ---------------------------------------------------------------------------------------------
# the symmetric eigensolver


_LAPACK: dict[torch.dtype, Any] | None = None
_LAPACK_CHECKED = False


def _syevd(fn: Any, a: Tensor) -> Tensor:
    """Eigenvalues (ascending) of the symmetric contiguous CPU matrix ``a`` by LAPACK
    ``?syevd`` (Fortran interface), overwriting ``a``."""
    n = a.shape[0]
    real = ctypes.c_float if a.dtype == torch.float32 else ctypes.c_double
    jobz, uplo = ctypes.c_char(b"N"), ctypes.c_char(b"L")
    size, lda, info = ctypes.c_int(n), ctypes.c_int(max(1, n)), ctypes.c_int(0)
    w = torch.empty(n, dtype=a.dtype)

    def call(work: Any, lwork: int, iwork: Any, liwork: int) -> None:
        fn(
            ctypes.byref(jobz),
            ctypes.byref(uplo),
            ctypes.byref(size),
            ctypes.c_void_p(a.data_ptr()),
            ctypes.byref(lda),
            ctypes.c_void_p(w.data_ptr()),
            work,
            ctypes.byref(ctypes.c_int(lwork)),
            iwork,
            ctypes.byref(ctypes.c_int(liwork)),
            ctypes.byref(info),
            ctypes.c_size_t(1),  # the lengths of the two character arguments
            ctypes.c_size_t(1),
        )

    best_work, best_iwork = real(0), ctypes.c_int(0)
    call(ctypes.byref(best_work), -1, ctypes.byref(best_iwork), -1)  # workspace query
    work = torch.empty(max(1, int(best_work.value)), dtype=a.dtype)
    iwork = torch.empty(max(1, best_iwork.value), dtype=torch.int32)
    call(
        ctypes.c_void_p(work.data_ptr()),
        work.numel(),
        ctypes.c_void_p(iwork.data_ptr()),
        iwork.numel(),
    )
    if info.value != 0:
        raise RuntimeError(f"LAPACK ?syevd failed (info = {info.value})")
    return w


def _lapack() -> dict[torch.dtype, Any] | None:
    """``{dtype: ?syevd}`` from the LAPACK inside PyTorch's CPU library (MKL), checked once
    against ``torch.linalg.eigvalsh``; None where it is not available."""
    global _LAPACK, _LAPACK_CHECKED
    if _LAPACK_CHECKED:
        return _LAPACK
    _LAPACK_CHECKED = True
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        found = {torch.float32: lib.ssyevd_, torch.float64: lib.dsyevd_}
        for dtype, fn in found.items():
            fn.restype = None
            a = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]], dtype=dtype)
            expected = torch.linalg.eigvalsh(a)
            if not torch.allclose(_syevd(fn, a.clone()), expected, rtol=1e-5, atol=1e-5):
                return None
    except (OSError, AttributeError, RuntimeError):
        return None
    _LAPACK = found
    return _LAPACK


def eigvalsh(matrix: Tensor, *, overwrite: bool = False) -> Tensor:
    """All eigenvalues (ascending) of the symmetric ``matrix`` (its lower triangle is read).

    With ``overwrite=True``, a contiguous float32/float64 CPU matrix is handed to LAPACK's
    ``?syevd`` in place when PyTorch's own MKL provides it (the matrix is destroyed, no copy
    is made); otherwise, and always without ``overwrite``, ``torch.linalg.eigvalsh`` (a copy).
    """
    lapack = _lapack() if overwrite and matrix.device.type == "cpu" else None
    if lapack is not None and matrix.dtype in lapack and matrix.is_contiguous():
        return _syevd(lapack[matrix.dtype], matrix)
    return torch.linalg.eigvalsh(matrix)


def _compact_(h: Tensor, keep: Tensor) -> Tensor:
    """The submatrix ``h[keep][:, keep]`` (``keep`` ascending), written row by row over the
    start of ``h``'s own storage (each row is read before anything overwrites it)."""
    m = keep.numel()
    flat = h.view(-1)
    for r, i in enumerate(keep.tolist()):
        flat[r * m : (r + 1) * m] = h[i].index_select(0, keep)
    return flat[: m * m].view(m, m)


@dataclass
class SpectrumResult:
    """The full spectrum of the dense Hessian (:func:`dense_spectrum`): ``eigenvalues``
    (ascending, float64, CPU) computed in ``dtype``; ``zero_rows`` rows that were exactly zero
    (counted as zero eigenvalues); the seconds spent building the matrix and solving."""

    eigenvalues: Tensor
    dtype: str
    zero_rows: int
    seconds_hessian: float
    seconds_eigvalsh: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return {**self.__dict__, "eigenvalues": self.eigenvalues.tolist()}


def dense_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    params: Iterable[Tensor] | None = None,
    chunk_size: int = 64,
    dtype: torch.dtype | None = None,
    method: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> SpectrumResult:
    """Every eigenvalue of the dense Hessian (:func:`dense_hessian`, then :func:`eigvalsh` in
    place after dropping exactly-zero rows). ``dtype`` None: float64 up to
    :data:`FLOAT64_LIMIT` parameters, float32 above (see the module docstring for memory and
    accuracy)."""
    n = sum(p.numel() for p in trainable_parameters(model, params).values())
    if dtype is None:
        dtype = torch.float64 if n <= FLOAT64_LIMIT else torch.float32
    started = time.perf_counter()
    h = dense_hessian(
        model,
        loss_fn,
        batches,
        params=params,
        chunk_size=chunk_size,
        dtype=dtype,
        method=method,
        progress=progress,
    )
    if h.device.type == "cuda":
        torch.cuda.synchronize(h.device)
    built = time.perf_counter()
    nonzero = torch.cat([h[r : r + 1024].ne(0).any(1) for r in range(0, n, 1024)])
    keep = torch.nonzero(nonzero).flatten()
    zero_rows = n - keep.numel()
    if zero_rows:
        h = _compact_(h, keep)
    values = eigvalsh(h, overwrite=True).double().cpu()
    del h
    if zero_rows:
        values = torch.cat([values, torch.zeros(zero_rows, dtype=torch.float64)]).sort().values
    return SpectrumResult(
        eigenvalues=values,
        dtype=str(dtype).removeprefix("torch."),
        zero_rows=zero_rows,
        seconds_hessian=built - started,
        seconds_eigvalsh=time.perf_counter() - built,
    )
