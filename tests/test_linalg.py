"""valleys.linalg on explicit symmetric matrices in float64."""

from __future__ import annotations

import math

import pytest
import torch

from valleys import linalg


def spd(n: int, seed: int = 0, cond: float = 50.0) -> torch.Tensor:
    """A random symmetric positive definite matrix with eigenvalues in [1, cond]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(1.0, cond, n, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T


def split(v: torch.Tensor) -> list[torch.Tensor]:
    """A 7-vector as a (2, 2) and a (3,) tensor, the shape of a tiny model's parameters."""
    return [v[:4].reshape(2, 2).clone(), v[4:].clone()]


def test_vector_operations():
    xs = [torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)]
    ys = [
        torch.tensor([[4.0, -1.0]], dtype=torch.float64),
        torch.tensor([2.0], dtype=torch.float64),
    ]
    assert float(linalg.dot(xs, ys)) == 1 * 4 + 2 * -1 + 3 * 2
    assert float(linalg.norm(xs)) == pytest.approx(math.sqrt(14.0))
    assert float(linalg.norm(xs, math.inf)) == 3.0
    out = linalg.axpy(2.0, xs, linalg.clone(ys))
    assert torch.equal(linalg.to_vector(out), torch.tensor([6.0, 3.0, 8.0], dtype=torch.float64))
    out = linalg.axpy(torch.tensor(-1.0, dtype=torch.float64), xs, linalg.clone(ys))
    assert torch.equal(linalg.to_vector(out), torch.tensor([3.0, -3.0, -1.0], dtype=torch.float64))
    out = linalg.xpay(xs, 0.5, linalg.clone(ys))
    assert torch.equal(linalg.to_vector(out), torch.tensor([3.0, 1.5, 4.0], dtype=torch.float64))
    assert torch.equal(
        linalg.to_vector(linalg.scale(3.0, linalg.clone(xs))), 3 * linalg.to_vector(xs)
    )
    flat = linalg.to_vector(xs)
    back = linalg.from_vector(flat, xs)
    assert [b.shape for b in back] == [x.shape for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(back, xs, strict=True))
    with pytest.raises(ValueError, match="Invalid flat vector"):
        linalg.from_vector(torch.zeros(4), xs)
    assert all(float(z.abs().sum()) == 0 for z in linalg.zeros_like(xs))


def test_dense_recovers_the_matrix():
    a = spd(7)
    like = split(torch.zeros(7, dtype=torch.float64))

    def matvec(v):
        return split(a @ linalg.to_vector(v))

    torch.testing.assert_close(linalg.dense(matvec, like), a)


def test_cg_solves_in_n_iterations_and_records_residuals():
    a, n = spd(7), 7
    b = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = linalg.cg(lambda v: a @ v, b, max_iters=n)
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)
    assert res.iters == n and res.residual_norms.shape == (n + 1,)
    torch.testing.assert_close(res.residual, b - a @ res.x, rtol=0, atol=1e-9)
    assert float(res.residual_norms[0]) == pytest.approx(float(b.norm()))
    assert not res.breakdown


def test_cg_first_iterations_match_the_textbook_recurrence():
    a = spd(6, seed=3)
    b = torch.randn(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x, r = torch.zeros(6, dtype=torch.float64), b.clone()
    p = r.clone()
    for _ in range(3):
        q = a @ p
        alpha = (r @ r) / (p @ q)
        x = x + alpha * p
        r_new = r - alpha * q
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    res = linalg.cg(lambda v: a @ v, b, max_iters=3)
    torch.testing.assert_close(res.x, x, rtol=1e-12, atol=1e-12)


def test_cg_on_tensor_lists_with_shift_and_diagonal_preconditioner():
    a = spd(7, seed=2, cond=1e3)
    b = torch.randn(7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigma = 0.3
    exact = torch.linalg.solve(a + sigma * torch.eye(7, dtype=torch.float64), b)

    def matvec(v):
        return split(a @ linalg.to_vector(v))

    plain = linalg.cg(matvec, split(b), shift=sigma, max_iters=7)
    torch.testing.assert_close(linalg.to_vector(plain.x), exact, rtol=1e-8, atol=1e-8)
    assert [t.shape for t in plain.x] == [(2, 2), (3,)]
    jacobi = split(1.0 / (torch.diagonal(a) + sigma))
    pre = linalg.cg(matvec, split(b), shift=sigma, max_iters=7, precond=jacobi)
    torch.testing.assert_close(linalg.to_vector(pre.x), exact, rtol=1e-8, atol=1e-8)
    by_fn = linalg.cg(
        matvec, split(b), shift=sigma, max_iters=7, precond=lambda r: torch._foreach_mul(r, jacobi)
    )
    torch.testing.assert_close(linalg.to_vector(by_fn.x), linalg.to_vector(pre.x))


def test_cg_stops_at_the_tolerance_and_from_x0():
    a = spd(20, seed=6, cond=4.0)  # well conditioned: converges long before 20 iterations
    b = torch.ones(20, dtype=torch.float64)
    res = linalg.cg(lambda v: a @ v, b, tol=1e-8, norm_ord=math.inf)
    assert res.converged and res.iters < 20
    assert float(res.residual_norms[-1]) <= 1e-8 < float(res.residual_norms[-2])
    rel = linalg.cg(lambda v: a @ v, b, rtol=1e-3)
    assert rel.converged and float(rel.residual_norms[-1]) <= 1e-3 * float(b.norm())
    warm = linalg.cg(lambda v: a @ v, b, x0=res.x, tol=1e-6, norm_ord=math.inf)
    assert warm.iters == 0 and warm.converged
    more = res.iters + 3
    never = linalg.cg(
        lambda v: a @ v, b, tol=1e-8, norm_ord=math.inf, check_every=0, max_iters=more
    )
    assert never.iters == more and never.converged
    torch.testing.assert_close(never.x, res.x, rtol=1e-7, atol=1e-7)
    zero = linalg.cg(lambda v: a @ v, b, max_iters=0)
    assert zero.iters == 0 and float(zero.x.abs().sum()) == 0


def test_cg_reports_breakdown_on_an_indefinite_matrix():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    res = linalg.cg(lambda v: a @ v, torch.tensor([1.0, 1.0], dtype=torch.float64), max_iters=5)
    assert res.breakdown and not res.converged
    assert torch.isfinite(res.x).all()


def test_lanczos_recovers_the_spectrum_with_an_orthonormal_basis():
    a = spd(12, seed=7, cond=30.0)
    v0 = torch.randn(12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    res = linalg.lanczos(lambda v: a @ v, v0, 12)
    assert res.iters == 12 and res.betas.shape == (11,)
    values, _ = res.eigh()
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a), rtol=1e-9, atol=1e-9)
    v = res.basis
    torch.testing.assert_close(v @ v.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(v @ a @ v.T, res.tridiagonal(), rtol=0, atol=1e-9)
    ritz = res.ritz_vectors()
    torch.testing.assert_close(ritz @ a, values[:, None] * ritz, rtol=0, atol=1e-8)


def test_lanczos_top_eigenvalue_from_few_iterations_on_tensor_lists():
    a = spd(7, seed=9, cond=100.0)

    def matvec(v):
        return split(a @ linalg.to_vector(v))

    v0 = split(torch.ones(7, dtype=torch.float64))
    res = linalg.lanczos(matvec, v0, 7, keep_basis=False)
    assert res.basis is None
    assert float(res.eigh()[0][-1]) == pytest.approx(100.0, rel=1e-9)


def test_lanczos_stops_on_an_invariant_subspace_and_seeds_its_start():
    a = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 5.0, 5.0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    res = linalg.lanczos(lambda v: a @ v, 6, 6, generator=gen)
    assert res.iters == 3  # three distinct eigenvalues: Krylov space of dimension 3
    torch.testing.assert_close(res.eigh()[0], torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    again = linalg.lanczos(lambda v: a @ v, 6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.alphas, res.alphas)
    with pytest.raises(ValueError, match="Invalid num_iters"):
        linalg.lanczos(lambda v: a @ v, 6, 0)


def test_cg_workspace_holds_the_vectors_and_gives_the_same_answer():
    a = spd(7, seed=10)
    b = split(torch.randn(7, generator=torch.Generator().manual_seed(11), dtype=torch.float64))
    jacobi = split(1.0 / torch.diagonal(a))

    def matvec(v):
        return split(a @ linalg.to_vector(v))

    plain = linalg.cg(matvec, b, max_iters=4, shift=0.1, precond=jacobi)
    work = [linalg.zeros_like(b) for _ in range(4)]
    reused = linalg.cg(matvec, b, max_iters=4, shift=0.1, precond=jacobi, workspace=work)
    assert all(t is w for t, w in zip(reused.x, work[0], strict=True))
    assert all(t is w for t, w in zip(reused.residual, work[1], strict=True))
    torch.testing.assert_close(linalg.to_vector(reused.x), linalg.to_vector(plain.x))
    torch.testing.assert_close(linalg.to_vector(reused.residual), linalg.to_vector(plain.residual))
    again = linalg.cg(matvec, b, max_iters=4, shift=0.1, precond=jacobi, workspace=work)
    torch.testing.assert_close(linalg.to_vector(again.x), linalg.to_vector(plain.x))
