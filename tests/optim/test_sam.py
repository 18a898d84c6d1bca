"""SAM and ASAM against hand computations on a float64 quadratic, and through the loop."""

from __future__ import annotations

import pytest
import torch

from valleys import optim
from valleys.optim.sam import SAM, perturbation

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
B = torch.tensor([1.0, -1.0], dtype=torch.float64)
W0 = [0.5, -2.0]


def quadratic(w: torch.Tensor) -> torch.Tensor:
    """f(w) = ½ wᵀAw − bᵀw, ∇f(w) = Aw − b."""
    return 0.5 * w @ A @ w - B @ w


def grad(w: torch.Tensor) -> torch.Tensor:
    return A @ w - B


class Counting:
    """A closure over the quadratic that records the weights of every call."""

    def __init__(self, w: torch.nn.Parameter, opt: torch.optim.Optimizer):
        self.w, self.opt, self.at = w, opt, []

    def __call__(self) -> torch.Tensor:
        self.opt.zero_grad()
        self.at.append(self.w.detach().clone())
        loss = quadratic(self.w)
        loss.backward()
        return loss


def _setup(**hp):
    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = optim.get("sam", [w], **hp)
    return w, opt, Counting(w, opt)


def test_one_step_matches_the_hand_computation():
    rho, lr = 0.1, 0.05
    w, opt, closure = _setup(rho=rho, lr=lr)
    w0 = w.detach().clone()
    loss = opt.step(closure)
    g = grad(w0)
    eps = rho * g / g.norm()
    expected = w0 - lr * grad(w0 + eps)
    assert len(closure.at) == 2  # exactly two calls: at w, then at w + ε̂
    torch.testing.assert_close(closure.at[0], w0, rtol=0, atol=0)
    torch.testing.assert_close(closure.at[1], w0 + eps, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(loss.detach(), quadratic(w0).detach())
    torch.testing.assert_close(w.detach(), expected, rtol=1e-15, atol=1e-15)
    stats = opt.stats()
    assert stats["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-14)
    assert stats["perturbed_loss"] == pytest.approx(float(quadratic(w0 + eps)), rel=1e-14)
    assert stats["sharpness"] == pytest.approx(
        float(quadratic(w0 + eps) - quadratic(w0)), rel=1e-12
    )


def test_adaptive_perturbation_is_asam():
    rho, lr = 0.5, 0.05
    w, opt, closure = _setup(rho=rho, lr=lr, adaptive=True)
    w0 = w.detach().clone()
    opt.step(closure)
    g = grad(w0)
    t = w0.abs()
    eps = rho * t**2 * g / (t * g).norm()
    torch.testing.assert_close(closure.at[1], w0 + eps, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(w.detach(), w0 - lr * grad(w0 + eps), rtol=1e-15, atol=1e-15)


def test_momentum_base_over_two_steps_and_its_state():
    rho, lr, m = 0.1, 0.05, 0.9
    w, opt, closure = _setup(rho=rho, lr=lr, momentum=m)
    x = w.detach().clone()
    buf = None
    for _ in range(2):
        g = grad(x)
        gp = grad(x + rho * g / g.norm())
        buf = gp.clone() if buf is None else m * buf + gp
        x = x - lr * buf
    opt.step(closure)
    opt.step(closure)
    torch.testing.assert_close(w.detach(), x, rtol=1e-14, atol=1e-15)
    assert len(closure.at) == 4
    state = opt.state_dict()
    torch.testing.assert_close(state["state"][0]["momentum_buffer"], buf, rtol=1e-14, atol=0)
    group = state["param_groups"][0]
    assert (group["base"], group["rho"], group["adaptive"]) == ("sgd", rho, False)
    assert group["momentum"] == m


def test_base_is_any_registry_entry_or_torch_class_with_its_hyperparameters():
    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = optim.get("sam", [w], base="nesterov", lr=0.3)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.3, 0.9, True)  # preset
    opt = optim.get("sam", [w], base="adam", betas=(0.8, 0.99))
    assert isinstance(opt.base_optimizer, torch.optim.Adam)
    assert opt.param_groups is opt.base_optimizer.param_groups
    opt = SAM([w], base=torch.optim.Adagrad, lr=0.2)
    assert opt.param_groups[0]["base"] == "torch.optim.adagrad.Adagrad"
    assert isinstance(opt.base_optimizer, torch.optim.Adagrad)
    for base in {"entropy_sgd", "sgn", "sam"} & set(optim.names()):
        with pytest.raises(ValueError, match="Invalid base"):
            optim.get("sam", [w], base=base)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        optim.get("sam", [w], base="sgdd")
    with pytest.raises(ValueError, match="beta"):
        optim.get("sam", [w], base="adam", betas=(1.5, 0.9))


def test_accepted_hyperparameters_follow_the_base():
    entry = optim.spec("sam")
    assert set(entry.hyperparameters()) == {"base", "rho", "adaptive"}
    assert {"lr", "momentum", "rho"} <= set(entry.accepted())
    assert "betas" in entry.accepted({"base": "adam"})
    assert "betas" not in entry.accepted({"base": "sgd"})


def test_reference_and_foreach_perturbations_are_identical():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for adaptive in (False, True):
        a, na = perturbation(params, grads, rho=0.3, adaptive=adaptive)
        b, nb = perturbation(params, grads, rho=0.3, adaptive=adaptive, foreach=True)
        assert torch.equal(na, nb)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    zeros = [torch.zeros_like(p) for p in params]
    zero, norm = perturbation(params, zeros, rho=1.0, adaptive=False)
    assert float(norm) == 0 and all(not z.any() for z in zero)


def test_an_lr_scheduler_drives_the_base_lr():
    _, opt, closure = _setup(lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    opt.step(closure)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_the_training_loop_gives_both_calls_one_batch(tmp_path):
    from trainkit import make_cfg, records

    from valleys.train import loop

    cfg = make_cfg(
        tmp_path,
        "optim.name=sam",
        "optim.base=adam",
        "optim.lr=0.01",
        "optim.betas=[0.8,0.99]",
        "run.max_steps=3",
        "run.log_every_steps=1",
    )
    result = loop.train(cfg)
    assert (result.step, result.passes) == (3, 6)
    train = records(tmp_path, "train")
    assert set(train[0]["stats"]) == {"grad_norm", "perturbed_loss", "sharpness"}
    # on one batch, the loss in the ascent direction is above the loss at w
    assert all(r["stats"]["sharpness"] > 0 for r in train)
    saved = (tmp_path / "config.yaml").read_text()
    assert "base: adam" in saved and "amsgrad: false" in saved  # the base's defaults resolved
