"""SGN against ALGORITHMS.md §4.2 worked out by hand on float64 least squares (where the GGN is
the Hessian ``2/n XᵀX``), its damping rules as pure functions, and its handling of batches,
BatchNorm, dropout and state.

The shared contract (resume, loss decreases, groups, parameters without grad) is run for every
registry entry by test_contract.py; the workbench runs are in tests/train/test_train_sgn.py.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from problems import least_squares
from valleys.optim import SGN
from valleys.optim.sgn import scheduled_damping, trust_region_update

D = torch.float64


class LeastSquares:
    """``mean((Xw + b − y)²)`` with its gradient and GGN (= Hessian) in closed form."""

    def __init__(self, n: int = 24, d: int = 4, seed: int = 0, bias: bool = False):
        self.x, self.y = least_squares(n, d, seed=seed)
        torch.manual_seed(seed)
        self.model = nn.Linear(d, 1, bias=bias).to(D)
        self.bias = bias

    @property
    def features(self) -> torch.Tensor:
        x = self.x
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=D)], dim=1) if self.bias else x

    def theta(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def loss(self, theta: torch.Tensor) -> float:
        return float(((self.features @ theta - self.y) ** 2).mean())

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        a = self.features
        return 2.0 / a.shape[0] * a.T @ (a @ theta - self.y)

    def ggn(self) -> torch.Tensor:
        a = self.features
        return 2.0 / a.shape[0] * a.T @ a

    def solution(self) -> torch.Tensor:
        return torch.linalg.lstsq(self.features, self.y[:, None]).solution[:, 0]

    def sgn(self, **hp) -> SGN:
        return SGN(self.model, "mse", **hp)

    def step(self, opt: SGN) -> torch.Tensor:
        return opt.step(self.x, self.y)


PLAIN = dict(trust_region=False, line_search=False)  # the bare damped Gauss–Newton step


def test_one_step_lands_on_the_least_squares_solution():
    for bias in (False, True):
        p = LeastSquares(bias=bias)
        opt = p.sgn(damping=1e-12)  # defaults otherwise: 10 CG iterations, TR and LS on
        p.step(opt)
        torch.testing.assert_close(p.theta(), p.solution(), rtol=1e-9, atol=1e-9)
        stats = opt.stats()
        assert stats["alpha"] == 1.0 and stats["ls_iters"] == 0 and stats["rejected"] == 0
        assert stats["tr_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert stats["damping_next"] == pytest.approx(1e-12 * 2 / 3)
        assert stats["cg_iters"] == p.theta().numel()  # exact after n iterations: tol met


def test_the_returned_loss_is_the_loss_before_the_step():
    p = LeastSquares()
    before = p.loss(p.theta())
    assert float(p.step(p.sgn())) == pytest.approx(before, rel=1e-12)


@pytest.mark.parametrize("exponent", [None, 1.0, 0.5])
def test_first_cg_iteration_by_hand(exponent):
    p, rho = LeastSquares(), 0.1
    hp = dict(PLAIN, damping=rho, cg_warmup_iters=1)
    if exponent is not None:
        hp.update(precondition=True, precond_exponent=exponent)
    theta0 = p.theta()
    g = p.grad(theta0)
    m = torch.ones_like(g) if exponent is None else (g * g + rho) ** -exponent
    a = p.ggn() + rho * torch.eye(g.numel(), dtype=D)
    direction = m * g
    delta = -(g @ direction) / (direction @ a @ direction) * direction
    p.step(p.sgn(**hp))
    torch.testing.assert_close(p.theta(), theta0 + delta, rtol=1e-12, atol=1e-14)


def original_cg(a: torch.Tensor, mhat: torch.Tensor, rho: float, m: torch.Tensor, iters: int):
    """The original's CG loop (ALGORITHMS.md §4.2), in its own sign convention."""
    delta = torch.zeros_like(mhat)
    r = mhat.clone()
    y = m * r
    p = -y
    for _ in range(iters):
        q = a @ p + rho * p
        alpha = (r @ y) / (p @ q)
        delta = delta + alpha * p
        r_new = r + alpha * q
        y_new = m * r_new
        beta = (r_new @ y_new) / (r @ y)
        p = -y_new + beta * p
        r, y = r_new, y_new
    return delta, r


def test_preconditioned_cg_follows_the_original_recurrence():
    p, rho = LeastSquares(d=6, seed=1), 0.05
    theta0 = p.theta()
    g = p.grad(theta0)
    m = (g * g + rho) ** -0.7
    delta, _ = original_cg(p.ggn(), g, rho, m, iters=3)
    opt = p.sgn(**PLAIN, damping=rho, cg_warmup_iters=3, precondition=True, precond_exponent=0.7)
    p.step(opt)
    torch.testing.assert_close(p.theta(), theta0 + delta, rtol=1e-10, atol=1e-12)


def test_warmup_iterations_default_and_faithful():
    hp = dict(PLAIN, damping=1e-2, cg_tol=0.0, cg_warmup_iters=4, cg_max_iters=2)
    for faithful, expected in ((False, [4, 4, 4, 2, 2]), (True, [4, 4, 2, 2, 2])):
        p = LeastSquares(d=8)
        opt = p.sgn(**hp, cg_warmup_steps=3, faithful=faithful)
        iters = []
        for _ in range(5):
            p.step(opt)
            iters.append(opt.stats()["cg_iters"])
        assert iters == expected, faithful


def test_cg_stops_at_the_max_norm_tolerance():
    p = LeastSquares()
    theta0 = p.theta()
    opt = p.sgn(cg_tol=1e3)  # ‖m̂‖_∞ is below it: no iteration, Δ = 0
    p.step(opt)
    assert opt.stats()["cg_iters"] == 0 and opt.stats()["passes"] == 2  # gradient + trial
    assert torch.equal(p.theta(), theta0)


def _tr_case(lr: float, faithful: bool, rho: float = 0.3):
    """One trust-region step (no line search, exact CG) and the by-hand quantities."""
    p = LeastSquares(seed=2)
    theta0 = p.theta()
    g, ggn = p.grad(theta0), p.ggn()
    a = ggn + rho * torch.eye(g.numel(), dtype=D)
    opt = p.sgn(lr=lr, damping=rho, line_search=False, faithful=faithful)
    p.step(opt)
    delta = (p.theta() - theta0) / lr
    torch.testing.assert_close(delta, -torch.linalg.solve(a, g), rtol=1e-9, atol=1e-12)
    actual = p.loss(p.theta()) - p.loss(theta0)
    return opt.stats(), g, a, delta, actual


def test_trust_region_ratio_and_damping_update_by_hand():
    rho = 0.3
    for faithful in (False, True):
        stats, g, a, delta, actual = _tr_case(1.0, faithful, rho)
        pred = g @ delta + 0.5 * delta @ a @ delta  # both forms agree for β = 0, α_0 = 1
        ratio = actual / float(pred)
        assert stats["tr_ratio"] == pytest.approx(ratio, rel=1e-8)
        assert ratio > 0.75 and stats["damping_next"] == pytest.approx(rho * 2 / 3)

    # α_0 = 2.5 overshoots: the damped model predicts an increase (pred > 0)
    stats, g, a, delta, actual = _tr_case(2.5, False, rho)
    assert float(2.5 * g @ delta + 0.5 * 2.5**2 * delta @ a @ delta) > 0
    assert math.isnan(stats["tr_ratio"]) and stats["damping_next"] == pytest.approx(1.5 * rho)
    stats, g, a, delta, actual = _tr_case(2.5, True, rho)
    residual = a @ delta + g  # the original's r
    ratio = actual / float(0.5 * (residual + g) @ delta)
    assert stats["tr_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert stats["damping_next"] == pytest.approx(trust_region_update(rho, ratio, 0.0))


def test_trust_region_update_rule():
    assert trust_region_update(1.0, 0.1, 0.0) == 1.5
    assert trust_region_update(1.0, -3.0, 0.0) == 1.5
    assert trust_region_update(1.0, 0.5, 0.0) == 1.0
    assert trust_region_update(1.0, 0.9, 0.0) == pytest.approx(2 / 3)
    assert trust_region_update(1.0, 0.9, 0.8) == 0.8
    assert trust_region_update(1.0, math.nan, 0.0) == 1.0


def test_damping_schedules():
    assert scheduled_damping(7, 1.0, 0.1, "const", 5) == 1.0
    linear = [scheduled_damping(t, 1.0, 0.1, "linear", 5) for t in (1, 3, 5, 7)]
    assert linear == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert scheduled_damping(1, 1.0, 0.1, "linear", 1) == 0.1
    cos = [scheduled_damping(t, 1.0, 0.1, "cos", 4) for t in (1, 3, 4, 5)]
    assert cos == pytest.approx([math.cos(math.pi / 8), math.cos(3 * math.pi / 8), 0.1, 0.1])
    with pytest.raises(ValueError, match="Invalid damping_schedule"):
        scheduled_damping(1, 1.0, 0.1, "exp", 4)


def test_without_trust_region_the_schedule_sets_the_damping():
    p = LeastSquares()
    opt = p.sgn(
        trust_region=False, damping=1.0, damping_min=0.1, damping_schedule="linear",
        damping_schedule_steps=3,
    )  # fmt: skip
    seen = []
    for _ in range(4):
        p.step(opt)
        seen.append(opt.stats()["damping"])
        assert "tr_ratio" not in opt.stats()
    assert seen == pytest.approx([1.0, 0.55, 0.1, 0.1])


def _ls_case(faithful: bool, lr: float, c: float, max_iters: int):
    """The exact Gauss–Newton step Δ (ρ ≈ 0) scaled by the line search."""
    p = LeastSquares(seed=3)
    theta0 = p.theta()
    newton = -torch.linalg.solve(p.ggn(), p.grad(theta0))
    opt = p.sgn(
        lr=lr, damping=1e-12, trust_region=False, ls_c=c, ls_max_iters=max_iters,
        faithful=faithful,
    )  # fmt: skip
    p.step(opt)
    return p, theta0, newton, opt.stats()


def test_line_search_armijo_by_hand():
    # along the Newton step, ℓ(α) − ℓ_0 = q(α²/2 − α) with q = ΔᵀGΔ, and <g, Δ> = −q.
    # Default: accept α when α²/2 − α ≤ −cα, i.e. α ≤ 2(1 − c) = 1.1: α_0 = 2 fails, 1 passes.
    p, theta0, newton, stats = _ls_case(False, lr=2.0, c=0.45, max_iters=3)
    assert (stats["ls_iters"], stats["alpha"]) == (1, 1.0)
    torch.testing.assert_close(p.theta(), theta0 + newton, rtol=1e-9, atol=1e-12)
    # Original: the bound keeps α_0: α²/2 − α ≤ −2c has no solution for c = 0.45, so it
    # backtracks to the end and keeps the last step, α = 2·0.5³.
    p, theta0, newton, stats = _ls_case(True, lr=2.0, c=0.45, max_iters=3)
    assert (stats["ls_iters"], stats["alpha"], stats["rejected"]) == (3, 0.25, 0)
    torch.testing.assert_close(p.theta(), theta0 + 0.25 * newton, rtol=1e-9, atol=1e-12)


def test_a_step_that_increases_the_loss_is_rejected_by_default_only():
    # α_0 = 3 along the Newton step: ℓ(3) − ℓ_0 = 1.5 q > 0, and no backtrack is allowed
    p, theta0, _, stats = _ls_case(False, lr=3.0, c=1e-4, max_iters=0)
    assert stats["rejected"] == 1 and stats["alpha"] == 0.0
    assert torch.equal(p.theta(), theta0)
    p, theta0, newton, stats = _ls_case(True, lr=3.0, c=1e-4, max_iters=0)
    assert stats["rejected"] == 0
    torch.testing.assert_close(p.theta(), theta0 + 3.0 * newton, rtol=1e-9, atol=1e-12)
    assert p.loss(p.theta()) > p.loss(theta0)


def test_momentum_uses_the_bias_corrected_average():
    rho, beta = 1e-3, 0.5
    p = LeastSquares(seed=4)
    x2, y2 = least_squares(24, 4, seed=5)
    opt = p.sgn(**PLAIN, damping=rho, momentum=beta)
    theta0 = p.theta()
    g1 = p.grad(theta0)
    p.step(opt)
    theta1 = p.theta()
    a = p.ggn() + rho * torch.eye(4, dtype=D)
    torch.testing.assert_close(theta1, theta0 - torch.linalg.solve(a, g1))  # m̂_1 = g_1
    second = LeastSquares(seed=4)
    second.x, second.y = x2, y2
    g2 = second.grad(theta1)
    opt.step(x2, y2)
    m2 = beta * (1 - beta) * g1 + (1 - beta) * g2
    mhat = m2 / (1 - beta**2)
    a2 = second.ggn() + rho * torch.eye(4, dtype=D)
    torch.testing.assert_close(p.theta(), theta1 - torch.linalg.solve(a2, mhat))
    buffer = opt.state[p.model.weight]["momentum_buffer"].reshape(-1)
    torch.testing.assert_close(buffer, m2)


def test_a_non_finite_cg_solution_rejects_the_step_or_raises_when_faithful():
    p = LeastSquares()
    x = p.x.clone()
    x[0, 0] = math.nan
    theta0 = p.theta()
    opt = p.sgn(damping=0.1)
    opt.step(x, p.y)
    assert torch.equal(p.theta(), theta0)
    assert opt.stats()["rejected"] == 1 and opt.stats()["damping_next"] == pytest.approx(0.15)
    with pytest.raises(FloatingPointError, match="not finite"):
        p.sgn(faithful=True).step(x, p.y)


class CountingClosure:
    """The closure protocol: ``batch()`` gives the step's batch, ``add_passes`` counts."""

    def __init__(self, x, y):
        self.x, self.y, self.batches, self.passes = x, y, 0, 0

    def batch(self):
        self.batches += 1
        return self.x, self.y

    def add_passes(self, n):
        self.passes += n

    def __call__(self):  # pragma: no cover - SGN never calls it
        raise AssertionError("SGN evaluates the batch itself")


def test_the_closure_form_reads_one_batch_per_step_and_reports_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    x, y = torch.randn(16, 4, dtype=D), torch.arange(16) % 3
    opt = SGN(model, "cross_entropy", cg_max_iters=2, cg_warmup_iters=2)
    closure = CountingClosure(x, y)
    total = 0
    for _ in range(3):
        before = F.cross_entropy(model(x), y).detach()
        loss = opt.step(closure)
        torch.testing.assert_close(loss, before, rtol=1e-12, atol=1e-14)
        total += opt.stats()["passes"]
        assert opt.stats()["passes"] == 1 + 2 + 1 + opt.stats()["ls_iters"]
    assert closure.batches == 3 and closure.passes == total
    with pytest.raises(TypeError, match="needs the mini-batch"):
        opt.step()


def test_state_dict_resumes_exactly():
    def run(opt, model, batches):
        for x, y in batches:
            opt.step(x, y)

    batches = [least_squares(24, 4, seed=s) for s in range(6)]
    p = LeastSquares(seed=6)
    opt = p.sgn(damping=0.05, momentum=0.3)
    run(opt, p.model, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": p.model.state_dict(), "optim": opt.state_dict()}, buf)
    run(opt, p.model, batches[3:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    q = LeastSquares(seed=7)
    q.model.load_state_dict(saved["model"])
    opt2 = q.sgn(damping=0.05, momentum=0.3)
    opt2.load_state_dict(saved["optim"])
    assert opt2.state[q.model.weight]["step"] == 3
    run(opt2, q.model, batches[3:])
    assert torch.equal(q.theta(), p.theta())
    assert opt2.state_dict()["state"][0]["damping"] == opt.state_dict()["state"][0]["damping"]


def test_batchnorm_statistics_move_once_per_step_and_dropout_masks_are_shared():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)
    ).to(D)
    x, y = torch.randn(16, 4, dtype=D), torch.arange(16) % 3
    reference = copy.deepcopy(model)
    opt = SGN(model, "cross_entropy", cg_max_iters=3, cg_warmup_iters=3)
    torch.manual_seed(2)
    loss = opt.step(x, y)
    after_step = torch.rand(2)
    torch.manual_seed(2)
    expected = F.cross_entropy(reference(x), y)  # one training forward pass at θ_0
    assert torch.equal(torch.rand(2), after_step)  # the RNG moved as by one forward pass
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-14)
    for key, value in reference.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-14, atol=0)


def test_only_trainable_parameters_are_solved_for():
    p = LeastSquares(bias=True)
    p.model.bias.requires_grad_(False)
    bias = p.model.bias.detach().clone()
    opt = p.sgn()
    assert [len(g["params"]) for g in opt.param_groups] == [1]
    p.step(opt)
    assert torch.equal(p.model.bias.detach(), bias)
    with pytest.raises(ValueError, match=r"torch\.nn\.Module"):
        SGN([p.model.weight], "mse")


def test_traced_and_eager_curvature_give_the_same_steps():
    """The fast path (traced products) against the reference (torch.func jvp + vjp)."""
    x, y = torch.randn(16, 4, dtype=D), torch.arange(16) % 3
    runs = []
    for method in ("traced", "jvp"):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
        opt = SGN(model, "cross_entropy", cg_max_iters=3, momentum=0.2, precondition=True)
        opt.curvature_method = method
        for _ in range(4):
            opt.step(x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
