"""VSGD against the recurrence of ALGORITHMS.md §5.2 written out by hand, and its fast paths
against the reference path.

The shared contract (resume, loss decreases, groups, parameters without grad) is run for every
registry entry by test_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from valleys.optim import _vsgd_compiled, _vsgd_kernels
from valleys.optim.vsgd import VSGD

IMPLEMENTATIONS = ["reference", "foreach", "compiled"]


def spec_steps(p0, grads, *, lr, ghattg, ps, tau1, tau2, weight_decay, eps):
    """The §5.2 recurrence, one coordinate at a time in plain Python floats, with the b-targets
    in the expanded form of the original (E[g²] − 2μμ_old + μ_old², E[g²] − 2ĝμ + ĝ²).

    Returns (p, mug, bg, bhg) after each step."""
    pa2 = 2 * ps + 1 + 1e-4
    n = len(p0)
    p, mug, bg, bhg = list(p0), [0.0] * n, [0.0] * n, [0.0] * n
    history = []
    for t, g in enumerate(grads, start=1):
        rho1, rho2 = t**-tau1, t**-tau2
        for i in range(n):
            p[i] *= 1 - lr * weight_decay
            if t == 1:
                s_g, s_hg = 2 * ps / (pa2 - 1), 2 * ghattg * ps / (pa2 - 1)
            else:
                s_g, s_hg = bg[i] / pa2, bhg[i] / pa2
            mu_old = mug[i]
            mu = (g[i] * s_g + mu_old * s_hg) / (s_g + s_hg)
            var = s_g * s_hg / (s_g + s_hg)
            second = var + mu * mu
            bg_new = 2 * ps + second - 2 * mu * mu_old + mu_old**2
            bhg_new = 2 * ghattg * ps + second - 2 * g[i] * mu + g[i] ** 2
            bg[i] = (1 - rho1) * bg[i] + rho1 * bg_new
            bhg[i] = (1 - rho2) * bhg[i] + rho2 * bhg_new
            mug[i] = mu
            p[i] -= lr * mu / (math.sqrt(second) + eps)
        history.append((list(p), list(mug), list(bg), list(bhg)))
    return history


HAND_CASES = {
    # the defaults: γ = 1e-8, so the t = 1 variances are prior constants (μ1 = ĝ/31)
    "defaults": (
        [0.3],
        [[0.5], [-0.2], [0.05]],
        dict(lr=0.1, ghattg=30.0, ps=1e-8, tau1=0.81, tau2=0.9, weight_decay=0.0, eps=1e-8),
    ),
    # a strong prior, other exponents and weight decay, three coordinates
    "weight_decay": (
        [1.0, -2.0, 0.25],
        [[0.4, -1.5, 0.01], [0.3, 2.0, -0.02], [-0.1, 0.5, 0.03]],
        dict(lr=0.05, ghattg=5.0, ps=1e-2, tau1=0.6, tau2=0.95, weight_decay=0.1, eps=1e-6),
    ),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", sorted(HAND_CASES))
def test_first_steps_match_the_recurrence_by_hand(case, implementation):
    p0, grads, hp = HAND_CASES[case]
    expected = spec_steps(p0, grads, **hp)
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = VSGD([p], **hp, implementation=implementation)
    for t, (g, (want_p, want_mu, want_bg, want_bhg)) in enumerate(
        zip(grads, expected, strict=True), start=1
    ):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        state = opt.state[p]
        assert state["step"] == t
        for got, want in (
            (p, want_p),
            (state["mug"], want_mu),
            (state["bg"], want_bg),
            (state["bhg"], want_bhg),
        ):
            assert got.tolist() == pytest.approx(want, rel=1e-12, abs=0), (t, got, want)


def test_first_step_constants():
    """The t = 1 numbers of ALGORITHMS.md §5.4: μ1 = ĝ/31 and σ1² ≈ 1.94e-4 at the defaults."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    p.grad = torch.tensor([0.62], dtype=torch.float64)
    opt = VSGD([p])
    opt.step()
    state = opt.state[p]
    s_g = 2e-8 / (1e-4 + 2e-8)
    var = s_g * 30 / 31
    assert state["mug"].item() == pytest.approx(0.62 / 31, rel=1e-12)
    assert state["bg"].item() == pytest.approx(2e-8 + var + (0.62 / 31) ** 2, rel=1e-12)
    assert -p.item() == pytest.approx(0.1 * 0.02 / (math.sqrt(var + 0.02**2) + 1e-8), rel=1e-12)
    assert set(state) == {"step", "mug", "bg", "bhg"}
    assert isinstance(state["step"], int)


def _run(implementation: str, dtype: torch.dtype, steps: int = 20):
    """Several odd-shaped tensors in two groups, random gradients, one parameter that skips
    every third step (so a group holds two step counts at once)."""
    gen = torch.Generator().manual_seed(0)

    def param(*shape, layout=None):
        x = torch.randn(*shape, generator=gen, dtype=dtype)
        return torch.nn.Parameter(x if layout is None else x.to(memory_format=layout))

    skipping = param(5)
    group_a = [param(3, 5), param(7), param(1), param(130, 127), skipping]  # 16510 ≥ batch size
    group_b = [
        param(2, 3, 4),
        param(2, 3, 5, 7, layout=torch.channels_last),
        torch.nn.Parameter(torch.randn(4, 6, generator=gen, dtype=dtype)[:, ::2]),  # not dense
    ]
    opt = VSGD(
        [
            {"params": group_a, "lr": 0.05},
            {
                "params": group_b,
                "lr": 0.02,
                "ghattg": 10.0,
                "ps": 1e-4,
                "tau1": 0.6,
                "tau2": 0.95,
                "weight_decay": 0.1,
                "eps": 1e-6,
            },
        ],
        implementation=implementation,
    )
    params = group_a + group_b
    for k in range(steps):
        for j, p in enumerate(params):
            scale = 10.0 ** -(j % 4)
            p.grad = scale * torch.randn(p.shape, generator=gen, dtype=dtype)
        if k % 3 == 1:
            skipping.grad = None
        opt.step()
    return params, opt


@pytest.mark.parametrize("chunk", [None, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_is_bit_identical_to_reference(dtype, chunk, monkeypatch):
    if chunk is not None:  # on CPU, lists are cut into sub-lists of at most this many elements
        monkeypatch.setattr(_vsgd_kernels, "_FOREACH_CHUNK_CPU", chunk)
    ref_params, ref = _run("reference", dtype)
    params, opt = _run("foreach", dtype)
    for a, b in zip(ref_params, params, strict=True):
        assert torch.equal(a, b)
        for key in ("mug", "bg", "bhg"):
            assert torch.equal(ref.state[a][key], opt.state[b][key]), key
        assert ref.state[a]["step"] == opt.state[b]["step"]


def test_compiled_matches_reference():
    """Not bit for bit: inductor fuses the step into one loop written with two divisions
    instead of four (a cancels in β1 = bhg/(bg + bhg)) and plain multiply-adds where eager
    lerp/addcmul/addcdiv kernels contract to FMA, so each step differs in the last bits. The
    recurrence does not amplify that: after 20 steps the parameters and state agree to ~1e-6
    relative in float32 and ~1e-14 in float64 (μ, which crosses zero, on the scale of its
    tensor). (The one compiled case of this file: both dtypes.)"""
    for dtype, rtol, atol in ((torch.float32, 2e-5, 1e-6), (torch.float64, 1e-12, 1e-14)):
        ref_params, ref = _run("reference", dtype)
        params, opt = _run("compiled", dtype)
        assert _vsgd_compiled._compile_error is None, _vsgd_compiled._compile_error
        for a, b in zip(ref_params, params, strict=True):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
            for key in ("mug", "bg", "bhg"):
                want = ref.state[a][key]
                # μ crosses zero: compare it on the scale of the whole tensor
                scale = rtol * want.abs().max().item()
                torch.testing.assert_close(opt.state[b][key], want, rtol=rtol, atol=scale)
            assert b.stride() == a.stride()


def test_compiled_falls_back_to_foreach_with_a_warning(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_vsgd_compiled, "_get_compiled", broken)
    monkeypatch.setattr(_vsgd_compiled, "_compile_error", None)
    ref_params, _ = _run("reference", torch.float64, steps=4)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no compiler here"):
        params, _ = _run("compiled", torch.float64, steps=4)
    for a, b in zip(ref_params, params, strict=True):
        assert torch.equal(a, b)


def test_beta1_summary_and_stats_from_state():
    params, opt = _run("foreach", torch.float64, steps=5)
    assert VSGD(params).stats() == {} and VSGD(params).beta1_summary() == {}
    betas = []
    for p in params:
        state = opt.state[p]
        betas += [
            h / (g + h)
            for g, h in zip(
                state["bg"].flatten().tolist(), state["bhg"].flatten().tolist(), strict=True
            )
        ]
    betas.sort()
    summary = opt.beta1_summary()
    assert summary["mean"] == pytest.approx(sum(betas) / len(betas), rel=1e-12)
    assert summary["median"] == pytest.approx(betas[(len(betas) - 1) // 2], rel=1e-12)
    assert 0 < summary["median"] < 1
    stats = opt.stats()
    assert set(stats) == {"beta1_mean", "beta1_median", "step"}
    assert stats["beta1_mean"] == summary["mean"]
    assert stats["beta1_median"] == summary["median"]
    assert stats["step"] == 5.0  # the parameter that skipped a step is at 4


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": -0.1},
        {"lr": float("nan")},
        {"ghattg": 0.0},
        {"ps": 0.0},
        {"ps": -1e-8},
        {"tau1": 0.0},
        {"tau1": 1.5},
        {"tau2": -0.5},
        {"tau2": 1.01},
        {"weight_decay": -1e-3},
        {"eps": -1e-8},
        {"implementation": "fused"},
    ],
)
def test_invalid_hyperparameters_raise(bad):
    name = next(iter(bad))
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        VSGD([p], **bad)
    with pytest.raises(ValueError, match=f"Invalid {name}"):  # set by a group
        VSGD([{"params": [p], **bad}])


def test_boundary_hyperparameters_are_accepted():
    p = torch.nn.Parameter(torch.ones(2))
    VSGD([p], lr=0.0, tau1=1.0, tau2=1.0, eps=0.0, weight_decay=0.0)


def test_sparse_gradients_and_complex_parameters_are_rejected():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        VSGD([p]).step()
    z = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        VSGD([z]).step()
