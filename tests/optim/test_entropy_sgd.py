"""Entropy-SGD against known answers: torch.optim.SGD for L = 0, the update recurrence written
out by hand on separable quadratics, the SGLD noise level, and the statistics."""

from __future__ import annotations

import io
import math

import pytest
import torch

from problems import batch_closure, classification_data, tiny_classifier
from valleys.optim.entropy_sgd import EntropySGD

NO_NOISE = {"noise": 0.0}


# ---------------------------------------------------------------------------------------------
# Helpers: a separable quadratic f(x) = Σ_i ½ a_i·x_i² − b_i·x_i over several tensors, and the
# Entropy-SGD recurrence on it written straight from the equations.
# ---------------------------------------------------------------------------------------------


def quadratic(seed: int = 0, shapes=((3,), (2, 2))):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes]
    b = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    x0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return a, b, x0


def quadratic_closure(opt, params, a, b, calls=None):
    def closure():
        opt.zero_grad()
        loss = sum(
            0.5 * (ai * p * p).sum() - (bi * p).sum()
            for p, ai, bi in zip(params, a, b, strict=True)
        )
        loss.backward()
        if calls is not None:
            calls.append(loss)
        return loss

    return closure


def reference(x0, a, b, steps, hp):
    """Expected weights after ``steps`` steps with noise 0, plus the last step's statistics."""
    lr, m, nesterov, wd = hp["lr"], hp["momentum"], hp["nesterov"], hp["weight_decay"]
    L, eta, beta = hp["langevin_steps"], hp["langevin_lr"], hp["langevin_ema"]
    n = len(x0)
    x = [t.clone() for t in x0]
    outer_buf = [None] * n
    for k in range(steps):
        gamma = hp["scope"] * (1 + hp["scope_growth"]) ** k
        grad_at_x = [a[i] * x[i] - b[i] for i in range(n)]
        xp = [t.clone() for t in x]
        mu = [t.clone() for t in x]
        v = [torch.zeros_like(t) for t in x]
        distances = []
        for _ in range(L):
            for i in range(n):
                g = a[i] * xp[i] - b[i]
                if hp["variant"] == "port":
                    g = g + wd * xp[i]
                if m > 0:
                    v[i] = m * v[i] + g
                    d = g + m * v[i] if nesterov else v[i]
                else:
                    d = g
                d = d + gamma * (xp[i] - x[i])
                if hp["variant"] == "paper":
                    d = d + wd * xp[i]
                xp[i] = xp[i] - eta * d
                mu[i] = beta * mu[i] + (1 - beta) * xp[i]
            distances.append(math.sqrt(sum(float(((x[i] - xp[i]) ** 2).sum()) for i in range(n))))
        drift = [x[i] - mu[i] for i in range(n)]
        if hp["variant"] == "paper":
            x = [x[i] - lr * drift[i] for i in range(n)]
        else:
            new = []
            for i in range(n):
                d = drift[i] + wd * x[i]
                if m > 0:
                    outer_buf[i] = d.clone() if outer_buf[i] is None else m * outer_buf[i] + d
                    d = d + m * outer_buf[i] if nesterov else outer_buf[i]
                new.append(x[i] - lr * d)
            x = new
    gn = math.sqrt(sum(float((g * g).sum()) for g in grad_at_x))
    dn = math.sqrt(sum(float((d * d).sum()) for d in drift))
    dot = sum(float((g * d).sum()) for g, d in zip(grad_at_x, drift, strict=True))
    stats = {
        "grad_norm": gn,
        "gamma": gamma,
        "drift_norm": dn,
        "cosine": dot / (gn * dn),
        "inner_distance": sum(distances) / L,
    }
    return x, stats


HP = {
    "lr": 0.7,
    "momentum": 0.8,
    "nesterov": True,
    "weight_decay": 0.05,
    "langevin_steps": 4,
    "langevin_lr": 0.2,
    "langevin_ema": 0.6,
    "scope": 0.5,
    "scope_growth": 0.3,
    "noise": 0.0,
}


def run_quadratic(hp, steps, seed=0):
    a, b, x0 = quadratic(seed)
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = EntropySGD(params, **hp)
    closure = quadratic_closure(opt, params, a, b)
    for _ in range(steps):
        opt.step(closure)
    return opt, params, (a, b, x0)


# ---------------------------------------------------------------------------------------------
# L = 0 is torch.optim.SGD.
# ---------------------------------------------------------------------------------------------

SGD_SETTINGS = [
    {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"momentum": 0.0, "nesterov": False, "weight_decay": 1e-2},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-3},
    {"momentum": 0.9, "nesterov": False, "weight_decay": 5e-3},
    {"momentum": 0.5, "nesterov": False, "weight_decay": 0.0},
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("setting", SGD_SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_no_langevin_steps_is_torch_sgd_bit_for_bit(setting, dtype):
    x, y = classification_data(dtype=dtype)
    models = {name: tiny_classifier(seed=3, dtype=dtype) for name in ("sgd", "paper", "port")}
    opts = {"sgd": torch.optim.SGD(models["sgd"].parameters(), lr=0.1, dampening=0.0, **setting)}
    for variant in ("paper", "port"):
        opts[variant] = EntropySGD(
            models[variant].parameters(), lr=0.1, langevin_steps=0, variant=variant, **setting
        )
    closures = {name: batch_closure(models[name], opts[name], x, y, seed=5) for name in models}
    for _ in range(50):
        losses = {name: opts[name].step(closures[name]) for name in models}
        assert torch.equal(losses["paper"], losses["sgd"])
        assert torch.equal(losses["port"], losses["sgd"])
    for variant in ("paper", "port"):
        for p, q in zip(models[variant].parameters(), models["sgd"].parameters(), strict=True):
            assert torch.equal(p, q)
            state = opts[variant].state[p]
            if setting["momentum"] > 0:
                assert torch.equal(
                    state["momentum_buffer"], opts["sgd"].state[q]["momentum_buffer"]
                )
            assert state["step"] == 50


# ---------------------------------------------------------------------------------------------
# The closure contract.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "port"])
@pytest.mark.parametrize("langevin_steps", [0, 1, 5])
def test_closure_called_langevin_steps_times_and_first_loss_returned(langevin_steps, variant):
    a, b, x0 = quadratic()
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = EntropySGD(params, langevin_steps=langevin_steps, variant=variant)
    calls = []
    closure = quadratic_closure(opt, params, a, b, calls)
    for k in range(3):
        loss = opt.step(closure)
        assert len(calls) == (k + 1) * max(langevin_steps, 1)
        assert loss is calls[k * max(langevin_steps, 1)]


def test_closure_is_required_and_must_return_a_scalar_tensor():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = EntropySGD([p], langevin_steps=2)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()

    def closure_tuple():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss, 0.5

    with pytest.raises(TypeError, match="scalar tensor"):
        opt.step(closure_tuple)

    def closure_vector():
        opt.zero_grad()
        loss = p**2
        loss.sum().backward()
        return loss

    with pytest.raises(ValueError, match="scalar tensor"):
        opt.step(closure_vector)


# ---------------------------------------------------------------------------------------------
# The recurrence, γ schedule and μ convention.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("variant", ["paper", "port"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_recurrence_written_by_hand(steps, variant, nesterov):
    hp = {**HP, "variant": variant, "nesterov": nesterov}
    opt, params, (a, b, x0) = run_quadratic(hp, steps)
    expected, stats = reference(x0, a, b, steps, hp)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)
    got = opt.stats()
    assert set(got) == set(stats)
    for key, value in stats.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-14), key
    assert 0 < got["cosine"] < 1  # a genuine angle, not a degenerate case
    has_buffer = "momentum_buffer" in opt.state[params[0]]
    assert has_buffer == (variant == "port")  # the paper's outer step has no momentum


def test_recurrence_without_momentum():
    hp = {**HP, "momentum": 0.0, "nesterov": False}
    for variant in ("paper", "port"):
        _, params, (a, b, x0) = run_quadratic({**hp, "variant": variant}, 2)
        expected, _ = reference(x0, a, b, 2, {**hp, "variant": variant})
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)


def test_scope_advances_and_the_counter_survives_state_dict():
    hp = {**HP, "scope": 0.5, "scope_growth": 0.1, "langevin_steps": 2, "variant": "port"}
    a, b, x0 = quadratic()
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = EntropySGD(params, **hp)
    assert opt.stats() == {}
    closure = quadratic_closure(opt, params, a, b)
    for k in range(1, 4):
        opt.step(closure)
        assert opt.stats()["gamma"] == pytest.approx(0.5 * 1.1 ** (k - 1), rel=1e-15)
        assert all(opt.state[p]["step"] == k for p in params)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = EntropySGD(params, **hp)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert all(opt2.state[p]["step"] == 3 for p in params)
    opt2.step(quadratic_closure(opt2, params, a, b))
    assert opt2.stats()["gamma"] == pytest.approx(0.5 * 1.1**3, rel=1e-15)
    expected, _ = reference(x0, a, b, 4, hp)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)


def constant_gradient_problem(c, **hp):
    """A parameter x0 with loss <c, x>, so every gradient is c whatever x is."""
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    p = torch.nn.Parameter(x0.clone())
    opt = EntropySGD([p], lr=1.0, momentum=0.0, nesterov=False, noise=0.0, **hp)

    def closure():
        opt.zero_grad()
        loss = (c * p).sum()
        loss.backward()
        return loss

    return p, x0, opt, closure


def test_langevin_ema_is_the_weight_on_the_old_average():
    # L = 2, γ = 0, η' = 0.1, gradient c: x'_1 = x − η'c, x'_2 = x − 2η'c and
    # μ_2 = β(βx + (1−β)x'_1) + (1−β)x'_2 = x − η'c(1−β)(β + 2); lr = 1 sets x ← μ_2.
    c = torch.tensor([3.0, 4.0], dtype=torch.float64)
    for beta, factor in ((0.75, 0.6875), (0.25, 1.6875)):
        p, x0, opt, closure = constant_gradient_problem(
            c, langevin_steps=2, langevin_lr=0.1, langevin_ema=beta, scope=0.0
        )
        opt.step(closure)
        torch.testing.assert_close(p.detach(), x0 - 0.1 * factor * c, rtol=0, atol=1e-15)


def test_stats_by_hand():
    # γ = 2, η' = 0.1, β = 0.75, gradient c = (3, 4), ‖c‖ = 5:
    # x'_1 = x − 0.1c;  x'_2 = x'_1 − 0.1(c + 2(x'_1 − x)) = x − 0.18c
    # μ = 0.75(0.75x + 0.25x'_1) + 0.25x'_2 = x − (0.01875 + 0.045)c = x − 0.06375c
    c = torch.tensor([3.0, 4.0], dtype=torch.float64)
    p, x0, opt, closure = constant_gradient_problem(
        c, langevin_steps=2, langevin_lr=0.1, langevin_ema=0.75, scope=2.0, scope_growth=0.5
    )
    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(float((c * x0).sum()))
    got = opt.stats()
    expected = {
        "grad_norm": 5.0,
        "gamma": 2.0,
        "drift_norm": 0.06375 * 5.0,
        "cosine": 1.0,
        "inner_distance": (0.1 * 5.0 + 0.18 * 5.0) / 2,
    }
    assert got == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(p.detach(), x0 - 0.06375 * c, rtol=0, atol=1e-15)
    opt.step(closure)
    assert opt.stats()["gamma"] == pytest.approx(3.0)


def test_stats_without_langevin_steps_and_zero_cosine():
    c = torch.tensor([3.0, 4.0], dtype=torch.float64)
    _, _, opt, closure = constant_gradient_problem(c, langevin_steps=0, scope=0.1)
    opt.step(closure)
    assert opt.stats() == pytest.approx({"grad_norm": 5.0, "gamma": 0.1})

    _, _, opt, closure = constant_gradient_problem(0 * c, langevin_steps=3, scope=0.1)
    opt.step(closure)
    got = opt.stats()
    assert (got["grad_norm"], got["drift_norm"], got["cosine"]) == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# The Langevin noise.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "port"])
def test_noise_std_per_inner_step(variant):
    noise, eta, steps = 1e-2, 0.1, 41
    p = torch.nn.Parameter(torch.zeros(20_000, dtype=torch.float64))
    opt = EntropySGD(
        [p],
        momentum=0.0,
        nesterov=False,
        scope=0.0,
        noise=noise,
        langevin_lr=eta,
        langevin_steps=steps,
        variant=variant,
    )
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(p.detach().clone())  # call ℓ + 1 sees x'_ℓ
        loss = 0.0 * p.sum()
        loss.backward()
        return loss

    torch.manual_seed(0)
    opt.step(closure)
    increments = torch.diff(torch.stack(seen), dim=0)  # (steps − 1) × 20 000 samples
    expected = noise * math.sqrt(2 * eta)
    assert increments.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(increments.mean().item()) < 0.01 * expected
    assert torch.equal(seen[0], torch.zeros_like(p))  # the first call is at x' = x


# ---------------------------------------------------------------------------------------------
# Groups, skipped parameters, the foreach path, validation.
# ---------------------------------------------------------------------------------------------


def test_each_group_uses_its_own_hyperparameters_and_unused_parameters_are_untouched():
    a, b, x0 = quadratic(seed=4, shapes=((3,), (2,)))
    wa, wb = (torch.nn.Parameter(t.clone()) for t in x0)
    unused = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    group_a = {
        "variant": "paper",
        "lr": 0.5,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 0.01,
        "scope": 0.3,
        "langevin_lr": 0.05,
        "langevin_ema": 0.5,
    }
    group_b = {
        "variant": "port",
        "lr": 0.2,
        "momentum": 0.5,
        "nesterov": False,
        "weight_decay": 0.1,
        "scope": 0.1,
        "scope_growth": 0.2,
        "langevin_lr": 0.1,
        "langevin_ema": 0.75,
    }
    opt = EntropySGD(
        [{"params": [wa], **group_a}, {"params": [wb, unused], **group_b}],
        langevin_steps=3,
        noise=0.0,
    )
    closure = quadratic_closure(opt, [wa, wb], a, b)
    for _ in range(3):
        opt.step(closure)
    defaults = dict(opt.defaults)
    for w, ai, bi, xi, group in (
        (wa, a[0], b[0], x0[0], group_a),
        (wb, a[1], b[1], x0[1], group_b),
    ):
        (expected,), _ = reference([xi], [ai], [bi], 3, {**defaults, **group})
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)
    assert unused.grad is None
    assert torch.equal(unused.detach(), torch.ones(4, dtype=torch.float64))
    assert len(opt.state[unused]) == 0


@pytest.mark.parametrize("variant", ["paper", "port"])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, True), (0.9, False)])
def test_foreach_path_equals_per_tensor_reference(variant, momentum, nesterov):
    x, y = classification_data()
    finals = []
    for foreach in (True, False):
        model = tiny_classifier(seed=2)
        opt = EntropySGD(
            model.parameters(),
            langevin_steps=4,
            noise=1e-2,
            scope=0.1,
            weight_decay=1e-2,
            momentum=momentum,
            nesterov=nesterov,
            variant=variant,
        )
        opt._foreach = foreach
        closure = batch_closure(model, opt, x, y, seed=1)
        torch.manual_seed(7)
        for _ in range(5):
            opt.step(closure)
        finals.append(([p.detach().clone() for p in model.parameters()], opt.stats()))
    (params_fast, stats_fast), (params_ref, stats_ref) = finals
    for p, q in zip(params_fast, params_ref, strict=True):
        assert torch.equal(p, q)
    assert stats_fast == stats_ref


INVALID = [
    {"lr": -1.0},
    {"lr": float("nan")},
    {"momentum": 1.0},
    {"momentum": -0.1},
    {"momentum": 0.0},  # with the default nesterov=True
    {"momentum": 0.0, "nesterov": True},
    {"nesterov": "yes"},
    {"weight_decay": -1e-3},
    {"langevin_steps": -1},
    {"langevin_steps": 2.5},
    {"langevin_steps": True},
    {"langevin_lr": 0.0},
    {"langevin_lr": -0.1},
    {"langevin_ema": 1.0},
    {"langevin_ema": -0.1},
    {"scope": -1.0},
    {"scope": float("inf")},
    {"scope_growth": -1.0},
    {"noise": -1e-4},
    {"variant": "lua"},
]


@pytest.mark.parametrize("bad", INVALID, ids=repr)
def test_invalid_hyperparameters_raise(bad):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid"):
        EntropySGD([p], **bad)
    q = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid"):  # the same check for a group's own value
        EntropySGD([{"params": [p]}, {"params": [q], **bad}])


def test_valid_edge_values_are_accepted_and_normalised():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = EntropySGD(
        [p], lr=0, momentum=0, nesterov=False, langevin_steps=3.0, langevin_ema=0, noise=0
    )
    assert opt.param_groups[0]["langevin_steps"] == 3
    assert isinstance(opt.param_groups[0]["langevin_steps"], int)


def test_groups_must_share_langevin_steps():
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="langevin_steps"):
        EntropySGD([{"params": [p]}, {"params": [q], "langevin_steps": 5}])
