"""The contract every optimizer of the registry honours.

Adding an optimizer to the registry makes this file test it; the tables below must then get
an entry for it (``test_tables_cover_the_registry`` fails until they do). Entries built from
the model (``takes_model``: SGN) are built by :func:`make_optimizer` from the same model and the
cross-entropy, and read the step's batch from the closure's ``batch()``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from problems import classification_data, least_squares, tiny_classifier
from valleys import optim

# Hyperparameters the contract runs each entry with: stochastic parts on, but small.
HPARAMS: dict[str, dict] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    "nesterov": {"lr": 0.1, "weight_decay": 1e-3},
    "adam": {"lr": 0.02, "weight_decay": 1e-3},
    "adamw": {"lr": 0.02, "weight_decay": 1e-2},
    "entropy_sgd": {"lr": 1.0, "langevin_steps": 3, "scope": 1e-3, "weight_decay": 1e-3},
    "vsgd": {"lr": 0.05, "weight_decay": 1e-3},
    "sam": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "rho": 0.05},
    "sgn": {
        "damping_min": 1e-6,
        "cg_max_iters": 3,
        "cg_warmup_iters": 5,
        "cg_warmup_steps": 2,
        "momentum": 0.5,
    },
}

# Hyperparameters each entry must reject with ValueError.
INVALID: dict[str, list[dict]] = {
    "sgd": [{"lr": -0.1}, {"momentum": -0.5}, {"weight_decay": -1.0}],
    "nesterov": [{"lr": -0.1}, {"momentum": 0.0}],
    "adam": [{"lr": -1.0}, {"betas": (1.5, 0.999)}, {"eps": -1.0}],
    "adamw": [{"lr": -1.0}, {"betas": (0.9, -0.1)}, {"weight_decay": -1.0}],
    "entropy_sgd": [
        {"lr": -1.0},
        {"momentum": 1.0},
        {"weight_decay": -1e-3},
        {"langevin_steps": -1},
        {"langevin_steps": 2.5},
        {"langevin_lr": 0.0},
        {"langevin_ema": 1.0},
        {"scope": float("nan")},
        {"scope_growth": -1.0},
        {"noise": -1e-4},
        {"variant": "lua"},
    ],
    "vsgd": [
        {"lr": -0.1},
        {"ghattg": 0.0},
        {"ps": -1e-8},
        {"tau1": 0.0},
        {"tau2": 1.5},
        {"weight_decay": -1.0},
        {"eps": -1.0},
        {"lr": float("inf")},
    ],
    "sam": [
        {"rho": -0.1},
        {"rho": float("nan")},
        {"adaptive": 1},
        {"base": "entropy_sgd"},
        {"lr": -0.1},
        {"momentum": -0.5},
    ],
    "sgn": [
        {"lr": -1.0},
        {"damping": -1e-3},
        {"damping_min": float("nan")},
        {"trust_region": 1},
        {"damping_schedule": "exp"},
        {"damping_schedule_steps": 0},
        {"cg_max_iters": 0},
        {"cg_warmup_iters": 2.5},
        {"cg_warmup_steps": -1},
        {"cg_tol": -1.0},
        {"precondition": "yes"},
        {"precond_exponent": 1.5},
        {"momentum": 1.0},
        {"line_search": None},
        {"ls_c": 0.0},
        {"ls_factor": 1.0},
        {"ls_max_iters": -1},
        {"faithful": 0},
        {"loss_fn": "hinge"},
    ],
}

NAMES = optim.names()


def _without_noise(name: str, hp: dict) -> dict:
    """The same hyperparameters with injected noise off, for deterministic comparisons."""
    return {**hp, "noise": 0.0} if "noise" in optim.spec(name).hyperparameters() else hp


def make_optimizer(
    name: str, model: torch.nn.Module, hp: dict, params=None
) -> torch.optim.Optimizer:
    """The registry entry ``name`` over ``model``'s parameters (or ``params``), or built from
    the model and the cross-entropy for entries that take the model."""
    if optim.spec(name).takes_model:
        return optim.get(name, model, **{"loss_fn": "cross_entropy", **hp})
    return optim.get(name, model.parameters() if params is None else params, **hp)


class Batches:
    """Closure factory over a dataset with its own seeded generator (its state is saved
    alongside checkpoints so that a resumed run draws the same batches)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 16, seed: int = 0):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def closure(self, model: torch.nn.Module, opt: torch.optim.Optimizer):
        return _Closure(self, model, opt)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=self.gen)
        return self.x[idx], self.y[idx]


class _Closure:
    """Each call zeroes the gradients, draws a fresh batch and returns the loss with its
    gradients; ``batch()`` draws a fresh batch for optimizers that evaluate it themselves."""

    def __init__(self, batches: Batches, model: torch.nn.Module, opt: torch.optim.Optimizer):
        self.batches, self.model, self.opt = batches, model, opt

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.draw()

    def __call__(self) -> torch.Tensor:
        self.opt.zero_grad()
        xb, yb = self.batch()
        loss = torch.nn.functional.cross_entropy(self.model(xb), yb)
        loss.backward()
        return loss


def _full_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def test_tables_cover_the_registry():
    assert set(HPARAMS) == set(NAMES)
    assert set(INVALID) == set(NAMES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases(name, dtype):
    torch.manual_seed(0)
    x, y = classification_data(dtype=dtype)
    model = tiny_classifier(dtype=dtype)
    opt = make_optimizer(name, model, HPARAMS[name])
    closure = Batches(x, y).closure(model, opt)
    before = _full_loss(model, x, y)
    for _ in range(60):
        loss = opt.step(closure)
        assert torch.is_tensor(loss) and loss.dim() == 0
    after = _full_loss(model, x, y)
    assert math.isfinite(after)
    assert after < 0.6 * before, (before, after)
    for p in model.parameters():
        assert p.dtype == dtype
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                assert value.dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_identical(name):
    x, y = classification_data()

    def build():
        model = tiny_classifier(seed=1)
        return model, make_optimizer(name, model, HPARAMS[name])

    torch.manual_seed(0)
    model, opt = build()
    batches = Batches(x, y)
    closure = batches.closure(model, opt)
    for _ in range(5):
        opt.step(closure)
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optim": opt.state_dict(),
            "rng": torch.get_rng_state(),
            "batches": batches.gen.get_state(),
        },
        buf,
    )
    for _ in range(5):
        opt.step(closure)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = build()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    torch.set_rng_state(saved["rng"])
    batches2 = Batches(x, y)
    batches2.gen.set_state(saved["batches"])
    closure2 = batches2.closure(model2, opt2)
    for _ in range(5):
        opt2.step(closure2)
    for a, b in zip(uninterrupted, model2.parameters(), strict=True):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("name", NAMES)
def test_invalid_hyperparameters_raise(name):
    for bad in INVALID[name]:
        p = torch.nn.Parameter(torch.zeros(3))
        with pytest.raises(ValueError):
            make_optimizer(name, torch.nn.Linear(3, 2), bad, params=[p])


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_are_independent(name):
    """Two groups with their own lr on a separable loss move exactly as two optimizers would;
    an optimizer that solves one system over all parameters (SGN) has one group and refuses
    another."""
    hp = _without_noise(name, HPARAMS[name])
    if optim.spec(name).takes_model:
        opt = make_optimizer(name, tiny_classifier(), hp)
        assert len(opt.param_groups) == 1
        with pytest.raises(ValueError, match="one system"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
        return
    lr_a, lr_b = hp["lr"], hp["lr"] / 3
    xa, ya = least_squares(seed=1)
    xb, yb = least_squares(seed=2)

    def part(w, x, y):
        return 0.5 * ((x @ w - y) ** 2).mean()

    def make(dims=5, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return torch.nn.Parameter(torch.randn(dims, generator=gen, dtype=torch.float64))

    wa, wb = make(seed=3), make(seed=4)
    joint = optim.get(name, [{"params": [wa], "lr": lr_a}, {"params": [wb], "lr": lr_b}], **hp)

    def joint_closure():
        joint.zero_grad()
        loss = part(wa, xa, ya) + part(wb, xb, yb)
        loss.backward()
        return loss

    sa, sb = make(seed=3), make(seed=4)
    alone = [
        (optim.get(name, [w], **{**hp, "lr": lr}), w, x, y)
        for w, x, y, lr in ((sa, xa, ya, lr_a), (sb, xb, yb, lr_b))
    ]

    def closure_of(opt, w, x, y):
        def closure():
            opt.zero_grad()
            loss = part(w, x, y)
            loss.backward()
            return loss

        return closure

    for _ in range(10):
        joint.step(joint_closure)
        for opt, w, x, y in alone:
            opt.step(closure_of(opt, w, x, y))
    torch.testing.assert_close(wa, sa, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wb, sb, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(wa, make(seed=3))


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_grad_are_untouched(name):
    torch.manual_seed(0)
    x, y = classification_data()
    model = tiny_classifier()
    unused = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    frozen = unused.detach().clone()
    if optim.spec(name).takes_model:  # a parameter of the model that the loss does not use
        model.register_parameter("unused", unused)
    opt = make_optimizer(name, model, HPARAMS[name], params=[*model.parameters(), unused])
    closure = Batches(x, y).closure(model, opt)
    for _ in range(3):
        opt.step(closure)
    assert unused.grad is None
    assert torch.equal(unused.detach(), frozen)


@pytest.mark.parametrize("name", NAMES)
def test_closure_requirement_is_declared(name):
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = make_optimizer(name, torch.nn.Linear(2, 1).double(), HPARAMS[name], params=[p])
    if optim.spec(name).needs_closure:
        with pytest.raises((TypeError, ValueError)):
            opt.step()
    else:
        p.grad = torch.ones_like(p)
        opt.step()
        assert not torch.equal(p.detach(), torch.ones(2, dtype=torch.float64))


def test_unknown_names_suggest_the_closest():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match=r"did you mean 'entropy_sgd'.*valid: sgd, nesterov"):
        optim.get("entropy-sgd", p)
    with pytest.raises(ValueError, match=r"hyperparameter of optimizer 'vsgd'.*did you mean 'lr'"):
        optim.get("vsgd", p, lrr=0.1)


def test_presets_apply_and_user_values_win():
    p = [torch.nn.Parameter(torch.zeros(1))]
    group = optim.get("nesterov", p, lr=0.3).param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.3, 0.9, True)
    assert optim.get("nesterov", p, momentum=0.5).param_groups[0]["momentum"] == 0.5
    assert optim.spec("entropy_sgd").hyperparameters()["langevin_steps"] == 20
