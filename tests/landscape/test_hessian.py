"""Hessian diagnostics against the dense Hessian of the dataset-mean loss from
``torch.autograd.functional.hessian``, on tiny float64 models (a tanh MLP, and one with
BatchNorm in eval mode): top eigenpairs (Lanczos and power), Hutchinson's trace, stochastic
Lanczos quadrature, the dense matrix and its spectrum; and the promises to leave the model
alone.

Most tests use the eager double-backward products (``hvp_method="reverse"``), which are the
fastest on models this small; one goes through the default (traced) products."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from valleys.landscape import (
    dense_hessian,
    dense_spectrum,
    hutchinson_trace,
    spectral_density,
    top_eigen,
)
from valleys.landscape.hessian import seeded
from valleys.landscape.hessian_dense import _compact_, eigvalsh

FAST = {"hvp_method": "reverse"}


def _data(n=60, d=3, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def _mlp(seed=0):
    """3-4-3 tanh MLP: 31 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _bn_model(seed=0):
    """Linear-BatchNorm-tanh-Linear with running statistics away from (0, 1), left in train
    mode (the diagnostics must use eval mode and restore the flag): 35 parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        model[1].running_var.copy_(torch.tensor([1.5, 0.7, 2.0, 0.9]))
    return model.train()


def _batches(x, y, sizes=(25, 25, 10)):
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def exact_hessian(model, x, y, loss_fn=F.cross_entropy):
    """The dense Hessian of the mean loss over all of ``x`` in eval mode."""
    names = [n for n, _ in model.named_parameters()]
    values = tuple(p.detach() for p in model.parameters())
    was = model.training
    model.eval()

    def f(*ps):
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        return loss_fn(out, y)

    blocks = torch.autograd.functional.hessian(f, values)
    model.train(was)
    sizes = [v.numel() for v in values]
    rows = [
        torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(sizes))], 1)
        for i in range(len(sizes))
    ]
    return torch.cat(rows, 0)


@pytest.fixture(params=["mlp", "bn"])
def problem(request):
    model = _mlp() if request.param == "mlp" else _bn_model()
    x, y = _data()
    return model, _batches(x, y), exact_hessian(model, x, y)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [
        m.training for m in model.modules()
    ]


def _unchanged(model, snapshot):
    state, modes = snapshot
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("method", "which", "k"),
    [
        ("lanczos", "largest", 1),
        ("lanczos", "largest", 3),
        ("lanczos", "smallest", 2),
        ("power", "largest", 1),
        ("power", "largest", 2),
    ],
)
def test_top_eigen_matches_the_dense_spectrum(problem, method, which, k):
    model, batches, h = problem
    snapshot = _snapshot(model)
    exact = torch.linalg.eigvalsh(h)
    want = exact.flip(0)[:k] if which == "largest" else exact[:k]
    tol = 1e-9 if method == "lanczos" else 1e-7  # power: eigenvalue error ~ residual²/gap
    r = top_eigen(model, F.cross_entropy, batches, k, method=method, which=which, tol=tol, **FAST)
    assert r.converged and r.eigenvalues.shape == (k,)
    torch.testing.assert_close(r.eigenvalues, want, rtol=1e-6, atol=1e-9)
    for i in range(k):  # unit eigenvectors with small residuals
        v = r.eigenvectors[i]
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-8)
        residual = float((h @ v - r.eigenvalues[i] * v).norm())
        assert residual <= 1e-6 * float(exact.abs().max())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {n: tuple(t.shape) for n, t in r.vector(0).items()} == shapes
    assert r.products >= r.iterations and r.to_dict()["parameters"] == h.shape[0]
    _unchanged(model, snapshot)


def test_top_eigen_by_magnitude_smallest_by_power_and_on_a_subset_of_parameters():
    model = _mlp()
    x, y = _data()
    h = exact_hessian(model, x, y)
    exact = torch.linalg.eigvalsh(h)
    r = top_eigen(model, F.cross_entropy, [(x, y)], 2, which="magnitude", tol=1e-10, **FAST)
    torch.testing.assert_close(r.eigenvalues, exact[exact.abs().argsort(descending=True)[:2]])
    # power iteration needs a second, shifted phase for the negative end
    r = top_eigen(model, F.cross_entropy, [(x, y)], which="smallest", method="power", **FAST)
    assert r.converged and r.eigenvalues[0] == pytest.approx(float(exact[0]), rel=1e-6)
    first = model[0].weight  # the block of the first weight matrix only
    sub = h[:12, :12]
    r = top_eigen(
        model, F.cross_entropy, [(x, y)], params=[first], tol=1e-10, method="power", **FAST
    )
    assert r.eigenvalues[0] == pytest.approx(float(torch.linalg.eigvalsh(sub)[-1]), rel=1e-6)
    assert list(r.vector(0)) == ["0.weight"]


def test_top_eigen_through_the_default_traced_products():
    model = _bn_model()
    x, y = _data()
    snapshot = _snapshot(model)
    exact = torch.linalg.eigvalsh(exact_hessian(model, x, y))
    r = top_eigen(model, F.cross_entropy, _batches(x, y), tol=1e-9)
    assert r.eigenvalues[0] == pytest.approx(float(exact[-1]), rel=1e-6)
    _unchanged(model, snapshot)


def test_lanczos_stops_at_its_tolerance_and_reports_it():
    model = _mlp()
    x, y = _data()
    loose = top_eigen(model, F.cross_entropy, [(x, y)], tol=1e-2, seed=1, **FAST)
    tight = top_eigen(model, F.cross_entropy, [(x, y)], tol=1e-10, seed=1, **FAST)
    assert loose.iterations < tight.iterations and loose.converged
    assert float(loose.residuals[0]) <= 1e-2 * loose.scale
    capped = top_eigen(model, F.cross_entropy, [(x, y)], tol=1e-14, max_iters=3, seed=1, **FAST)
    assert capped.iterations == 3 and not capped.converged


def test_hutchinson_interval_contains_the_exact_trace(problem):
    model, batches, h = problem
    snapshot = _snapshot(model)
    exact = float(h.trace())
    r = hutchinson_trace(model, F.cross_entropy, batches, samples=100, seed=3, **FAST)
    assert r.ci_low <= exact <= r.ci_high
    assert r.samples == 100 and len(r.values) == 100 and r.products == 100
    assert r.estimate == pytest.approx(sum(r.values) / 100)
    # unbiased: the mean over many probes settles on the trace (within 4 standard errors)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    many = hutchinson_trace(model, F.cross_entropy, [(x, y)], samples=800, seed=4, **FAST)
    assert abs(many.estimate - exact) <= 4 * many.stderr
    assert many.stderr < r.stderr
    gauss = hutchinson_trace(
        model, F.cross_entropy, batches, samples=100, distribution="gaussian", **FAST
    )
    assert gauss.ci_low <= exact <= gauss.ci_high
    _unchanged(model, snapshot)


def test_spectral_density_quadrature_mass_and_moments(problem):
    model, batches, h = problem
    snapshot = _snapshot(model)
    n = h.shape[0]
    probes, steps = 40, 6
    x = torch.cat([b[0] for b in batches])
    batches = [(x, torch.cat([b[1] for b in batches]))]  # one batch: fewer products
    d = spectral_density(
        model, F.cross_entropy, batches, num_probes=probes, lanczos_steps=steps, seed=5, **FAST
    )
    assert d.nodes.shape == d.weights.shape == (probes * steps,)
    assert float(d.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-6)
    # each probe's quadrature reproduces v̂ᵀHv̂ and v̂ᵀH²v̂ exactly (same draws as the function)
    gen = seeded(5)
    per_probe = []
    for j in range(probes):
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        v = v / v.norm()
        mask = d.probe == j
        w, t = d.weights[mask] * probes, d.nodes[mask]
        m1, m2 = float((w * t).sum()), float((w * t**2).sum())
        assert m1 == pytest.approx(float(v @ h @ v), abs=1e-12)
        assert m2 == pytest.approx(float((h @ v).norm() ** 2), abs=1e-12)
        per_probe.append([m1, m2])
    # and the mean over probes estimates tr(H)/n and tr(H²)/n (within 4 standard errors)
    values = torch.tensor(per_probe, dtype=torch.float64)
    stderr = values.std(0) / probes**0.5
    want = torch.stack([h.trace() / n, (h @ h).trace() / n])
    assert bool(((values.mean(0) - want).abs() <= 4 * stderr).all())
    assert d.moment(1) == pytest.approx(float(values[:, 0].mean()), rel=1e-12)
    # the broadened density has the same mean, and the variance plus sigma²
    mass = torch.trapezoid(d.density, d.grid)
    mean = torch.trapezoid(d.density * d.grid, d.grid) / mass
    second = torch.trapezoid(d.density * d.grid**2, d.grid) / mass
    assert float(mean) == pytest.approx(d.moment(1), abs=1e-6)
    assert float(second) == pytest.approx(d.moment(2) + d.sigma**2, rel=1e-4)
    _unchanged(model, snapshot)


def test_spectral_density_with_a_full_krylov_space_is_the_spectrum():
    model = _mlp()
    x, y = _data()
    exact = torch.linalg.eigvalsh(exact_hessian(model, x, y))
    d = spectral_density(model, F.cross_entropy, [(x, y)], num_probes=2, lanczos_steps=40, **FAST)
    for j in range(2):
        nodes = d.nodes[d.probe == j]
        assert nodes.numel() <= exact.numel()
        gaps = (nodes[:, None] - exact[None, :]).abs().min(1).values
        assert float(gaps.max()) < 1e-8  # every node is an eigenvalue


@pytest.mark.parametrize(("method", "chunk"), [("jvp", 1), ("jvp", 5), ("linearize", 4)])
def test_dense_hessian_matches_autograd(problem, method, chunk):
    model, batches, h = problem
    snapshot = _snapshot(model)
    if method == "linearize":
        batches = batches[:1]  # one batch, fewer traces
        x, y = batches[0]
        h = exact_hessian(model, x, y)
    got = dense_hessian(model, F.cross_entropy, batches, chunk_size=chunk, method=method)
    assert got.dtype == torch.float64 and torch.equal(got, got.T)
    torch.testing.assert_close(got, h, rtol=0, atol=1e-10)
    _unchanged(model, snapshot)


def test_dense_spectrum_counts_zero_rows_and_matches_eigvalsh():
    model = _bn_model()
    model.register_parameter("unused", nn.Parameter(torch.zeros(2, dtype=torch.float64)))
    x, y = _data()
    batches = _batches(x, y)
    r = dense_spectrum(model, F.cross_entropy, batches, chunk_size=8)
    assert r.zero_rows == 2 and r.dtype == "float64"  # the unused parameter
    h = dense_hessian(model, F.cross_entropy, batches)
    torch.testing.assert_close(r.eigenvalues, torch.linalg.eigvalsh(h), rtol=0, atol=1e-10)
    single = dense_spectrum(model, F.cross_entropy, batches, dtype=torch.float32)
    assert single.dtype == "float32"
    torch.testing.assert_close(single.eigenvalues, r.eigenvalues, rtol=0, atol=1e-5)
    assert len(r.to_dict()["eigenvalues"]) == h.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigvalsh_in_place_and_compaction(dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 50, generator=gen, dtype=torch.float64)
    a = (a + a.T).to(dtype)
    expected = torch.linalg.eigvalsh(a)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(eigvalsh(a.clone(), overwrite=True), expected, rtol=0, atol=tol)
    torch.testing.assert_close(eigvalsh(a), expected)
    keep = torch.tensor([0, 3, 4, 17, 49])
    sub = a[keep][:, keep].clone()
    assert torch.equal(_compact_(a.clone(), keep), sub)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, b: top_eigen(m, F.cross_entropy, b, 40), "Invalid k"),
        (lambda m, b: top_eigen(m, F.cross_entropy, b, method="arnoldi"), "Invalid method"),
        (lambda m, b: top_eigen(m, F.cross_entropy, b, which="top"), "Invalid which"),
        (lambda m, b: top_eigen(m, F.cross_entropy, b, tol=0), "Invalid tol"),
        (lambda m, b: hutchinson_trace(m, F.cross_entropy, b, samples=1), "Invalid samples"),
        (lambda m, b: hutchinson_trace(m, F.cross_entropy, b, confidence=1), "Invalid confid"),
        (lambda m, b: spectral_density(m, F.cross_entropy, b, lanczos_steps=0), "Invalid lanc"),
        (lambda m, b: spectral_density(m, F.cross_entropy, b, sigma=-1.0), "Invalid sigma"),
        (lambda m, b: dense_hessian(m, F.cross_entropy, b, chunk_size=0), "Invalid chunk_size"),
        (lambda m, b: dense_hessian(m, F.cross_entropy, [], method="jvp"), "Invalid batches"),
        (lambda m, b: top_eigen(m, F.cross_entropy, []), "Invalid batches"),
    ],
)
def test_bad_arguments_are_one_line_errors(call, message):
    model = _mlp()
    x, y = _data(n=10)
    with pytest.raises(ValueError, match=message):
        call(model, [(x, y)])


def test_a_dense_hessian_larger_than_memory_is_refused_before_allocating():
    model = nn.Linear(100_000, 10)  # 1,000,010 weights: 7,450 GiB in float64
    x, y = torch.randn(2, 100_000), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="GiB in float64, more than the"):
        dense_hessian(model, F.cross_entropy, [(x, y)])
