r"""Linear algebra on lists of tensors: vector operations, conjugate gradient and Lanczos.

A *vector* here is a sequence of tensors (one per parameter tensor, say) or a single tensor;
a *matvec* is any callable that maps a vector to a vector of the same structure, such as the
Hessian- and GGN-vector products of :mod:`valleys.curvature`. Nothing here knows about
models: the matvec is the only access to the matrix, so the same solvers serve one
mini-batch, a whole dataset (a matvec that averages products over batches) or an explicit
matrix (``lambda v: [A @ v[0]]``).

Scalars that steer the iterations (CG's α and β, Lanczos' α and β) stay 0-d tensors on the
vectors' device: an iteration does not wait for the device, except where a stopping test
needs a Python bool (see ``check_every`` of :func:`cg`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from valleys import _validate as check

__all__ = [
    "CGResult",
    "LanczosResult",
    "Matvec",
    "axpy",
    "cg",
    "clone",
    "copy_",
    "dense",
    "dot",
    "from_vector",
    "lanczos",
    "norm",
    "scale",
    "to_vector",
    "xpay",
    "zeros_like",
]

Vector = Sequence[Tensor]
Matvec = Callable[[Sequence[Tensor]], Sequence[Tensor]]


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst_i ← src_i`` in place, by one ``torch._foreach_copy_``; tensors that it refuses
    (the DTensors of an FSDP2-sharded model: torch registers no sharding rule for it) are
    copied one by one."""
    try:
        torch._foreach_copy_(dst, src)
    except NotImplementedError:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


# ---------------------------------------------------------------------------------------------
# vector operations


def dot(xs: Vector, ys: Vector) -> Tensor:
    """``Σ_i <x_i, y_i>`` as a 0-d tensor (in the tensors' dtype, on their device)."""
    terms = [torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys, strict=True)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def norm(xs: Vector, ord: float = 2.0) -> Tensor:
    """The ``ord``-norm of the concatenated vector (``2`` or ``math.inf``; others are p-norms),
    as a 0-d tensor."""
    if not xs:
        return torch.zeros(())
    if ord == math.inf:  # aminmax: ~10x faster than an inf-norm reduction on the CPU
        parts = []
        for x in xs:
            low, high = torch.aminmax(x.detach())
            parts.append(torch.maximum(high, -low))  # NaN propagates
        return torch.stack(parts).max()
    if ord == 2:
        parts = torch.stack([torch.linalg.vector_norm(x) for x in xs])
    else:
        parts = torch.stack(torch._foreach_norm(list(xs), ord))
    return torch.linalg.vector_norm(parts, ord)


def axpy(alpha: float | Tensor, xs: Vector, ys: Vector) -> Vector:
    """``y ← y + α x`` in place on ``ys`` (``α`` a number or a 0-d tensor); returns ``ys``."""
    if isinstance(alpha, Tensor):  # y += x·α with α broadcast: no temporary tensors
        ys = list(ys)
        torch._foreach_addcmul_(ys, list(xs), [alpha] * len(ys))
    else:
        torch._foreach_add_(list(ys), list(xs), alpha=alpha)
    return ys


def xpay(xs: Vector, alpha: float | Tensor, ys: Vector) -> Vector:
    """``y ← x + α y`` in place on ``ys``; returns ``ys`` (CG's direction update)."""
    torch._foreach_mul_(list(ys), alpha)
    torch._foreach_add_(list(ys), list(xs))
    return ys


def scale(alpha: float | Tensor, xs: Vector) -> Vector:
    """``x ← α x`` in place; returns ``xs``."""
    torch._foreach_mul_(list(xs), alpha)
    return xs


def clone(xs: Vector) -> list[Tensor]:
    """Fresh copies of the tensors of ``xs`` (detached)."""
    return [x.detach().clone() for x in xs]


def zeros_like(xs: Vector) -> list[Tensor]:
    """Zero tensors shaped like those of ``xs``."""
    return [torch.zeros_like(x) for x in xs]


def to_vector(xs: Vector) -> Tensor:
    """The tensors of ``xs`` flattened and concatenated into one 1-D tensor."""
    return torch.cat([x.reshape(-1) for x in xs])


def from_vector(flat: Tensor, like: Vector) -> list[Tensor]:
    """Views of the 1-D ``flat`` shaped like the tensors of ``like`` (inverse of
    :func:`to_vector`)."""
    out, start = [], 0
    for x in like:
        out.append(flat[start : start + x.numel()].view_as(x))
        start += x.numel()
    if start != flat.numel():
        raise ValueError(f"Invalid flat vector: {flat.numel()} entries for tensors holding {start}")
    return out


def dense(matvec: Matvec, like: Vector) -> Tensor:
    """The matrix of ``matvec`` as a dense ``(n, n)`` tensor, column ``j`` being the product
    with the ``j``-th unit vector (``n`` products: for small problems and tests)."""
    n = sum(x.numel() for x in like)
    ref = like[0]
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
    cols = [to_vector(matvec(from_vector(eye[j], like))) for j in range(n)]
    return torch.stack(cols, dim=1)


def _as_list(v: Tensor | Vector) -> tuple[list[Tensor], bool]:
    if isinstance(v, Tensor):
        return [v], True
    return list(v), False


# ---------------------------------------------------------------------------------------------
# conjugate gradient


@dataclass
class CGResult:
    """What :func:`cg` returns.

    * ``x`` — the approximate solution (same structure as ``b``).
    * ``residual`` — ``r = b − (A + σI) x`` for the returned ``x`` (its recursive value).
    * ``iters`` — iterations taken (matvecs used).
    * ``residual_norms`` — 1-D tensor of the residual norm before the first iteration and
      after each one (``iters + 1`` entries, in the norm of the stopping test).
    * ``converged`` — whether the stopping test was met (a Python bool).
    * ``breakdown`` — whether a non-positive curvature ``pᵀ(A + σI)p ≤ 0`` was met (the
      iteration then stops: the matrix is not positive definite along ``p``).
    """

    x: list[Tensor] | Tensor
    residual: list[Tensor] | Tensor
    iters: int
    residual_norms: Tensor
    converged: bool
    breakdown: bool


def cg(
    matvec: Matvec,
    b: Tensor | Vector,
    x0: Tensor | Vector | None = None,
    *,
    max_iters: int | None = None,
    tol: float = 0.0,
    rtol: float = 0.0,
    norm_ord: float = 2.0,
    shift: float = 0.0,
    precond: Vector | Tensor | Matvec | None = None,
    check_every: int = 1,
    workspace: Sequence[Vector | Tensor] | None = None,
) -> CGResult:
    r"""Preconditioned conjugate gradient for ``(A + σI) x = b``, ``A`` symmetric.

    ``A`` is given by ``matvec`` (any callable mapping a vector to ``A`` times it); ``σ`` is
    ``shift`` (e.g. a Levenberg–Marquardt damping), added here so that ``matvec`` can be a
    bare curvature product. ``precond`` is ``M ≈ (A + σI)⁻¹``: a vector (a diagonal ``M``,
    applied elementwise) or a callable. Starting from ``x0`` (default 0)::

        r ← b − (A + σI) x;  y ← M r;  p ← y
        repeat:  q ← (A + σI) p;  α ← <r, y> / <p, q>;  x ← x + α p;  r ← r − α q
                 y_new ← M r;  β ← <r, y_new> / <r_old, y_old>;  p ← y_new + β p

    (with ``x0 = 0`` no product is spent on the initial residual). It stops after
    ``max_iters`` iterations (default: the dimension) or once ``‖r‖ ≤ max(tol, rtol·‖b‖)``,
    the norm being ``norm_ord`` (``math.inf`` for the max-norm used by SGN). The test is made
    before every iteration when ``check_every=1``; it is the only host synchronisation of an
    iteration, so on an accelerator ``check_every=k`` tests only every k-th iteration (up to
    ``k − 1`` extra iterations after convergence, harmless but not free) and ``0`` never
    tests. The iteration also stops when ``pᵀ(A + σI)p ≤ 0`` (``breakdown``); a zero
    denominator otherwise gives a zero step rather than a NaN. Vectors may be one tensor or a
    sequence of tensors; ``x`` comes back in the same form as ``b``.

    ``workspace``: up to four vectors shaped like ``b`` that hold ``x``, ``r``, ``p`` and
    (with a vector preconditioner) ``M r`` instead of fresh allocations; they are overwritten
    and the result's ``x`` and ``residual`` are the first two. On a CPU, reusing storage
    across calls saves the page faults of fresh parameter-sized allocations, which cost about
    as much as the vector arithmetic of a few iterations.
    """
    b_list, single = _as_list(b)
    n = sum(t.numel() for t in b_list)
    max_iters = n if max_iters is None else check.count("max_iters", max_iters)
    tol = check.nonneg("tol", tol)
    rtol = check.nonneg("rtol", rtol)
    shift = check.real("shift", shift)
    check_every = check.count("check_every", check_every)

    def wrap(out: Tensor | Vector) -> list[Tensor]:
        return [out] if isinstance(out, Tensor) else list(out)

    def apply_a(v: list[Tensor]) -> list[Tensor]:
        out = wrap(matvec(v[0] if single else v))
        if shift != 0.0:
            out = list(torch._foreach_add(out, v, alpha=shift))
        return out

    apply_m: Callable[[list[Tensor]], list[Tensor]] | None = None
    if callable(precond):

        def apply_m(r: list[Tensor]) -> list[Tensor]:
            return wrap(precond(r[0] if single else r))

    slots = [_as_list(w)[0] for w in workspace or ()]

    def storage(i: int) -> list[Tensor]:
        return slots[i] if i < len(slots) else [torch.empty_like(t) for t in b_list]

    if precond is not None and not callable(precond):
        m_list, _ = _as_list(precond)
        m_out = storage(3)

        def apply_m(r: list[Tensor]) -> list[Tensor]:
            torch._foreach_copy_(m_out, r)
            torch._foreach_mul_(m_out, m_list)
            return m_out

    r = storage(1)
    torch._foreach_copy_(r, b_list)
    x = storage(0)
    if x0 is None:
        torch._foreach_zero_(x)
    else:
        torch._foreach_copy_(x, _as_list(x0)[0])
        torch._foreach_sub_(r, apply_a(x))
    y = apply_m(r) if apply_m is not None else r
    p = storage(2)
    torch._foreach_copy_(p, y)
    ry = dot(r, y)
    threshold = max(tol, rtol * float(norm(b_list, norm_ord))) if rtol > 0 else tol
    norms = [norm(r, norm_ord)]
    bad = torch.zeros((), dtype=torch.bool, device=ry.device)
    iters, converged, breakdown = 0, False, False
    while True:
        if check_every and iters % check_every == 0:
            if bool(norms[-1] <= threshold):
                converged = True
                break
            if iters > 0 and bool(bad):
                breakdown = True
                break
        if iters >= max_iters:
            break
        # q = (A + σI) p is never formed: <p, q> = <p, Ap> + σ<p, p> and r − αq = r − αAp − ασp
        # (no temporary vector, and the matvec's output is left as it came)
        ap = wrap(matvec(p[0] if single else p))
        pq = dot(p, ap) + shift * dot(p, p) if shift != 0.0 else dot(p, ap)
        positive = pq > 0
        bad = bad | ~positive
        alpha = torch.where(positive, ry / torch.where(positive, pq, 1.0), 0.0)
        axpy(alpha, p, x)
        axpy(-alpha, ap, r)
        if shift != 0.0:
            axpy(-alpha * shift, p, r)
        y = apply_m(r) if apply_m is not None else r
        ry_new = dot(r, y)
        beta = torch.where(ry != 0, ry_new / torch.where(ry != 0, ry, 1.0), 0.0)
        xpay(y, beta, p)
        ry = ry_new
        iters += 1
        norms.append(norm(r, norm_ord))
    if not converged and not breakdown:
        converged = bool(norms[-1] <= threshold)
        breakdown = bool(bad)
    return CGResult(
        x=x[0] if single else x,
        residual=r[0] if single else r,
        iters=iters,
        residual_norms=torch.stack(norms),
        converged=converged,
        breakdown=breakdown,
    )


# ---------------------------------------------------------------------------------------------
# Lanczos


@dataclass
class LanczosResult:
    """What :func:`lanczos` returns: the tridiagonal ``T = Vᵀ A V`` and optionally ``V``.

    * ``alphas`` — diagonal of ``T`` (``k`` entries, float64 on the CPU).
    * ``betas`` — off-diagonal of ``T`` (``k − 1`` entries).
    * ``basis`` — the ``(k, n)`` orthonormal Lanczos vectors (rows, flattened, in the
      vectors' dtype and device), or ``None`` when not kept.
    * ``like`` — the structure of the vectors (to unflatten rows with :func:`from_vector`).
    """

    alphas: Tensor
    betas: Tensor
    basis: Tensor | None
    like: list[Tensor]

    @property
    def iters(self) -> int:
        return int(self.alphas.numel())

    def tridiagonal(self) -> Tensor:
        """``T`` as a dense ``(k, k)`` float64 tensor."""
        return torch.diag(self.alphas) + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and the eigenvectors of ``T`` (columns). With
        ``v0`` of unit norm, the squared first components of the eigenvectors are the
        weights of stochastic Lanczos quadrature."""
        return torch.linalg.eigh(self.tridiagonal())

    def ritz_vectors(self) -> Tensor:
        """Ritz vectors ``V S`` as rows ``(k, n)`` (needs the basis), ordered like
        :meth:`eigh`'s values."""
        if self.basis is None:
            raise ValueError("Invalid request: the Lanczos basis was not kept (keep_basis=True)")
        _, vecs = self.eigh()
        return vecs.T.to(self.basis) @ self.basis  # T is on the CPU, the basis maybe not


def lanczos(
    matvec: Matvec,
    v0: Tensor | Vector | int,
    num_iters: int,
    *,
    reorthogonalize: bool = True,
    keep_basis: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    breakdown_tol: float = 1e-10,
    stop: Callable[[Tensor, Tensor], bool] | None = None,
) -> LanczosResult:
    r"""Lanczos tridiagonalisation of the symmetric operator ``matvec``.

    ``v0`` is the starting vector (one tensor or a sequence of tensors, normalised here) or
    an integer ``n``: then ``matvec`` acts on 1-D tensors of size ``n`` (of ``dtype``) and the
    start is a Gaussian draw from ``generator``. With ``v_1 = v0 / ‖v0‖`` and ``β_0 v_0 = 0``::

        w ← A v_j − β_{j−1} v_{j−1};  α_j ← <w, v_j>;  w ← w − α_j v_j
        (reorthogonalize: w ← w − V(Vᵀw), twice)
        β_j ← ‖w‖;  v_{j+1} ← w / β_j

    for ``num_iters`` steps, or fewer if ``β_j ≤ breakdown_tol·max(1, |α_1|, …)``
    (an invariant subspace was found: the Ritz values are then exact eigenvalues). Full
    reorthogonalisation (classical Gram–Schmidt applied twice against every previous vector)
    keeps ``V`` orthonormal in floating point, which the Ritz values of the top of the
    spectrum need after a few tens of iterations; it stores the ``(k, n)`` basis and costs
    ``O(k n)`` per step. The coefficients are returned in float64. One host synchronisation
    per step (the breakdown test).

    ``stop(alphas, betas)``, if given, is called after every step ``j`` but the last with the
    ``j`` diagonal entries and ``j`` off-diagonal ones (float64, CPU): the last, ``β_j``,
    couples ``T_j`` to the next Lanczos vector, so ``β_j |s_{j,i}|`` is the residual norm of
    the ``i``-th Ritz pair. Returning True ends the iteration with ``T_j`` (a convergence test).
    """
    num_iters = check.count("num_iters", num_iters, 1)
    if isinstance(v0, int) and not isinstance(v0, bool):
        dim = check.count("v0", v0, 1)
        start = torch.randn(dim, generator=generator, dtype=dtype)
        like, single = [start], True
    else:
        like, single = _as_list(v0)
        like = [t.detach() for t in like]
        start = to_vector(like)
    n = start.numel()
    num_iters = min(num_iters, n)
    ref_dtype, device = start.dtype, start.device

    def apply(v: Tensor) -> Tensor:
        parts = from_vector(v, like)
        out = matvec(parts[0] if single else parts)
        return to_vector([out] if isinstance(out, Tensor) else out)

    v = start / torch.linalg.vector_norm(start)
    basis = (
        torch.empty(num_iters, n, dtype=ref_dtype, device=device)
        if (reorthogonalize or keep_basis)
        else None
    )
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    v_prev = torch.zeros_like(v)
    beta_prev = torch.zeros((), dtype=ref_dtype, device=device)
    scale_seen = 1.0
    for j in range(num_iters):
        if basis is not None:
            basis[j] = v
        w = apply(v)
        w = w - beta_prev * v_prev
        alpha = torch.dot(w, v)
        w = w - alpha * v
        if reorthogonalize:
            done = basis[: j + 1]
            for _ in range(2):
                w = w - done.T @ (done @ w)
        alphas.append(alpha)
        if j == num_iters - 1:
            break
        beta = torch.linalg.vector_norm(w)
        size, length = torch.stack([alpha.abs(), beta]).tolist()  # the step's one sync
        scale_seen = max(scale_seen, size)
        if length <= breakdown_tol * scale_seen:
            break
        if stop is not None and stop(
            torch.stack(alphas).double().cpu(), torch.stack([*betas, beta]).double().cpu()
        ):
            break
        betas.append(beta)
        v_prev, v, beta_prev = v, w / beta, beta
    k = len(alphas)
    return LanczosResult(
        alphas=torch.stack(alphas).double().cpu(),
        betas=(torch.stack(betas).double().cpu() if betas else torch.zeros(0, dtype=torch.float64)),
        basis=basis[:k] if (keep_basis and basis is not None) else None,
        like=like,
    )
