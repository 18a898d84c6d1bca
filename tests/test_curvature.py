"""valleys.curvature against dense J^T H J and dense Hessians of tiny float64 models."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from valleys import _linearize, curvature, linalg

D = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def _conv() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3)
    ).to(D)


def _regressor(out: int) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, out)).to(D)


def _quartic(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss without a closed form here: its output Hessian comes from autograd."""
    return ((z - y) ** 4).mean() + F.softplus(z).mean()


@functools.cache
def problem(name: str):
    """(model, loss, inputs, targets) of a named tiny problem, one model per name so that its
    traces are made once per test session (tests leave it unchanged)."""
    gen = torch.Generator().manual_seed(3)
    if name == "mlp_ce":
        return (
            _mlp(),
            "cross_entropy",
            torch.randn(6, 4, generator=gen, dtype=D),
            torch.arange(6) % 3,
        )
    if name == "conv_ce":
        x = torch.randn(5, 1, 8, 8, generator=gen, dtype=D)
        return _conv(), nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1, 1, 0])
    if name == "mse":
        x, y = torch.randn(7, 3, generator=gen, dtype=D), torch.randn(7, 2, generator=gen, dtype=D)
        return _regressor(2), "mse", x, y
    if name == "mse_align":  # outputs (B, 1) against targets (B,)
        x, y = torch.randn(7, 3, generator=gen, dtype=D), torch.randn(7, generator=gen, dtype=D)
        return _regressor(1), F.mse_loss, x, y
    if name == "custom":
        x, y = torch.randn(7, 3, generator=gen, dtype=D), torch.randn(7, 2, generator=gen, dtype=D)
        return _regressor(2), _quartic, x, y
    raise KeyError(name)


PROBLEMS = ["mlp_ce", "conv_ce", "mse", "mse_align", "custom"]


def _flat_fn(model, names, like, x):
    """θ (flat) ↦ outputs, with train-mode BatchNorm normalising by the batch statistics
    without updating its running statistics (which torch.func transforms refuse)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False

    def f(theta):
        values = linalg.from_vector(theta, like)
        return functional_call(model, dict(zip(names, values, strict=True)), (x,))

    return f


def _hessian(f, theta: torch.Tensor) -> torch.Tensor:
    """The dense Hessian of a scalar function, one double-backward per column (vmapped
    jacrev(jacrev) gets train-mode BatchNorm wrong in torch 2.13, by up to 0.09 here)."""
    return torch.autograd.functional.hessian(f, theta)


def dense_ggn(model, loss, x, y) -> torch.Tensor:
    params = curvature.trainable_parameters(model)
    names, like = list(params), list(params.values())
    f = _flat_fn(model, names, like, x)
    theta = linalg.to_vector(like)
    z = f(theta)
    jac = torch.func.jacrev(f)(theta).reshape(z.numel(), -1)
    lossf = curvature.output_loss(loss)
    h = _hessian(lambda zf: lossf.value(zf.reshape(z.shape), y), z.detach().reshape(-1))
    return jac.T @ h @ jac


def dense_hessian(model, loss, x, y) -> torch.Tensor:
    params = curvature.trainable_parameters(model)
    names, like = list(params), list(params.values())
    f = _flat_fn(model, names, like, x)
    lossf = curvature.output_loss(loss)
    return _hessian(lambda theta: lossf.value(f(theta), y), linalg.to_vector(like))


def _like(model):
    return list(curvature.trainable_parameters(model).values())


@pytest.mark.parametrize("method", ["traced", "jvp", "linearize"])
@pytest.mark.parametrize("name", PROBLEMS)
def test_ggn_matches_dense_jt_h_j(name, method):
    model, loss, x, y = problem(name)
    prod = curvature.ggn_fn(model, loss, x, y, method=method)
    assert prod.method == method
    got = linalg.dense(prod, _like(model))
    torch.testing.assert_close(got, dense_ggn(model, loss, x, y), rtol=1e-10, atol=1e-12)
    assert prod.products == got.shape[0]


@pytest.mark.parametrize("method", ["traced", "reverse"])
@pytest.mark.parametrize("name", PROBLEMS)
def test_hvp_matches_dense_hessian(name, method):
    model, loss, x, y = problem(name)
    got = linalg.dense(curvature.hvp_fn(model, loss, x, y, method=method), _like(model))
    torch.testing.assert_close(got, dense_hessian(model, loss, x, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("factory", [curvature.ggn_fn, curvature.hvp_fn])
@pytest.mark.parametrize("name", PROBLEMS)
def test_loss_gradient_and_outputs_come_with_the_products(name, factory):
    model, loss, x, y = problem(name)
    prod = factory(model, loss, x, y)
    model.zero_grad()
    out = model(x)
    value = curvature.output_loss(loss).value(out, y)
    value.backward()
    torch.testing.assert_close(prod.loss, value.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(prod.outputs, out.detach(), rtol=1e-12, atol=1e-14)
    for g, p in zip(prod.grad, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-14)
    assert prod.names == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(prod.loss_at(_like(model)), prod.loss, rtol=1e-12, atol=1e-14)


def test_ggn_is_the_hessian_for_linear_least_squares():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=gen, dtype=D), torch.randn(20, generator=gen, dtype=D)
    model = nn.Linear(4, 1).to(D)
    like = _like(model)
    ggn = linalg.dense(curvature.ggn_fn(model, "mse", x, y), like)
    hess = linalg.dense(curvature.hvp_fn(model, "mse", x, y), like)
    torch.testing.assert_close(ggn, hess, rtol=1e-12, atol=1e-14)
    xb = torch.cat([x, torch.ones(20, 1, dtype=D)], dim=1)  # weight columns, then the bias
    torch.testing.assert_close(ggn, 2.0 / 20 * xb.T @ xb, rtol=1e-12, atol=1e-14)


def _bn_model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(D)


@pytest.mark.parametrize("method", ["traced", "jvp"])
def test_batchnorm_in_train_mode_differentiates_the_batch_statistics(method):
    model = _bn_model()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(5), dtype=D)
    y = torch.arange(8) % 3
    before = copy.deepcopy(model.state_dict())
    prod = curvature.ggn_fn(model, "cross_entropy", x, y, method=method)
    got = linalg.dense(prod, _like(model))
    prod.loss_at(_like(model))
    for key, value in model.state_dict().items():  # running statistics untouched
        assert torch.equal(value, before[key]), key
    reference = dense_ggn(model, "cross_entropy", x, y)
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-12)
    hess = linalg.dense(curvature.hvp_fn(model, "cross_entropy", x, y), _like(model))
    torch.testing.assert_close(hess, dense_hessian(model, "cross_entropy", x, y))

    once = copy.deepcopy(model)
    once(x)  # one training forward pass
    prod = curvature.ggn_fn(model, "cross_entropy", x, y, method=method, update_buffers=True)
    prod(_like(model))
    prod.loss_at(_like(model))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, once.state_dict()[key], rtol=1e-14, atol=0), key


def _dropout_model() -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).to(D)


def test_dropout_uses_one_mask_per_call_and_leaves_the_rng_after_one_pass():
    model = _dropout_model()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(7), dtype=D)
    y = torch.arange(6) % 3
    like = _like(model)
    dense = {}
    for method in ["traced", "jvp", "linearize"]:
        torch.manual_seed(11)
        prod = curvature.ggn_fn(model, "cross_entropy", x, y, method=method)
        dense[method] = linalg.dense(prod, like)
        assert torch.equal(prod.loss_at(like), prod.loss)
        after = torch.rand(3)
        torch.manual_seed(11)
        model(x)
        assert torch.equal(torch.rand(3), after), method
    torch.testing.assert_close(dense["jvp"], dense["traced"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense["linearize"], dense["traced"], rtol=1e-10, atol=1e-12)
    torch.manual_seed(12)
    other = linalg.dense(curvature.ggn_fn(model, "cross_entropy", x, y), like)
    assert not torch.allclose(other, dense["traced"])  # another call, other masks
    model.eval()  # no dropout: the products are those of the deterministic function
    plain = linalg.dense(curvature.ggn_fn(model, "cross_entropy", x, y), like)
    torch.testing.assert_close(plain, dense_ggn(model, "cross_entropy", x, y))


def test_frozen_parameters_are_constants_and_unused_ones_get_zeros():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    model.register_parameter("unused", nn.Parameter(torch.ones(2, dtype=D)))
    x, y = torch.randn(6, 4, dtype=D), torch.arange(6) % 3
    prod = curvature.ggn_fn(model, "cross_entropy", x, y)
    assert prod.names == ["unused", "0.weight", "2.weight", "2.bias"]
    v = [torch.ones_like(p) for p in prod.params]
    out = prod(v)
    assert torch.equal(out[0], torch.zeros(2, dtype=D))
    assert torch.equal(prod.grad[0], torch.zeros(2, dtype=D))
    hv = curvature.hvp_fn(model, "cross_entropy", x, y)(v)
    assert torch.equal(hv[0], torch.zeros(2, dtype=D))
    with pytest.raises(ValueError, match="Invalid vector"):
        prod(v[:2])


def test_products_at_other_parameter_values_leave_the_model_alone():
    model, loss, x, y = problem("mlp_ce")
    saved = copy.deepcopy(model.state_dict())
    other = {n: p + 0.3 for n, p in curvature.trainable_parameters(model).items()}
    got = linalg.dense(curvature.ggn_fn(model, loss, x, y, params=other), list(other.values()))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(moved.parameters(), other.values(), strict=True):
            p.copy_(q)
    torch.testing.assert_close(got, dense_ggn(moved, loss, x, y))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])


@pytest.mark.parametrize("factory", [curvature.ggn_fn, curvature.hvp_fn])
def test_averaged_over_unequal_batches_is_the_full_batch_product(factory):
    model, loss, x, y = problem("mse")
    batches = [(x[:3], y[:3]), (x[3:5], y[3:5]), (x[5:], y[5:])]
    matvec = curvature.averaged(lambda xb, yb: factory(model, loss, xb, yb), batches)
    like = _like(model)
    full = linalg.dense(factory(model, loss, x, y), like)
    torch.testing.assert_close(linalg.dense(matvec, like), full, rtol=1e-12, atol=1e-14)
    again = curvature.averaged(lambda xb, yb: factory(model, loss, xb, yb), lambda: iter(batches))
    torch.testing.assert_close(linalg.dense(again, like), full, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="empty"):
        curvature.averaged(lambda xb, yb: factory(model, loss, xb, yb), [])(like)


class _Branchy(nn.Module):
    """Data-dependent control flow: cannot be traced with fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).to(D)

    def forward(self, x):
        z = self.lin(x)
        return torch.tanh(z) if bool(x.sum() > 0) else z


def test_untraceable_models_fall_back_to_eager_products():
    torch.manual_seed(8)
    model = _Branchy()
    x, y = torch.randn(5, 4, dtype=D) + 1.0, torch.arange(5) % 3
    with pytest.warns(RuntimeWarning, match="cannot trace _Branchy"):
        prod = curvature.ggn_fn(model, "cross_entropy", x, y)
    assert prod.method == "jvp"
    like = _like(model)
    torch.testing.assert_close(linalg.dense(prod, like), dense_ggn(model, "cross_entropy", x, y))
    with pytest.warns(RuntimeWarning):
        hvp = curvature.hvp_fn(model, "cross_entropy", x, y)
    assert hvp.method == "reverse"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second warning
        curvature.ggn_fn(model, "cross_entropy", x, y)
    curvature.clear_cache(model)
    with pytest.raises(Exception, match=r"[Dd]ata.dependent|symbolic|bool"):
        curvature.ggn_fn(model, "cross_entropy", x, y, method="traced")


def test_traces_are_cached_per_signature():
    model, loss = _mlp(), "cross_entropy"
    x, y = torch.randn(6, 4, dtype=D), torch.arange(6) % 3
    curvature.ggn_fn(model, loss, x, y)
    curvature.ggn_fn(model, loss, x + 1, y)
    assert len(curvature._CACHE[model]) == 1
    curvature.ggn_fn(model, loss, x[:4], y[:4])
    curvature.hvp_fn(model, loss, x, y)
    assert len(curvature._CACHE[model]) == 3
    model.eval()
    curvature.ggn_fn(model, loss, x, y)
    assert len(curvature._CACHE[model]) == 4
    curvature.clear_cache(model)
    assert model not in curvature._CACHE


def test_output_losses_closed_forms_match_autograd():
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(6, 4, generator=gen, dtype=D)
    u = torch.randn(6, 4, generator=gen, dtype=D)
    y = torch.tensor([0, 3, -100, 2, 1, -100])
    ce = curvature.output_loss(nn.CrossEntropyLoss())
    assert isinstance(ce, curvature.CrossEntropy)
    auto = curvature.OutputLoss(F.cross_entropy)
    for a, b in zip(ce.value_and_grad(z, y), auto.value_and_grad(z, y), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ce.hvp(z, y, u), auto.hvp(z, y, u), rtol=1e-12, atol=1e-14)
    mse = curvature.output_loss("mse")
    t = torch.randn(24, generator=gen, dtype=D)
    auto = curvature.OutputLoss(lambda a, b: F.mse_loss(a, b.reshape(a.shape)))
    for a, b in zip(mse.value_and_grad(z, t), auto.value_and_grad(z, t), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mse.hvp(z, t, u), auto.hvp(z, t, u), rtol=1e-12, atol=1e-14)


def test_output_loss_resolution():
    assert isinstance(curvature.output_loss("cross_entropy"), curvature.CrossEntropy)
    assert isinstance(curvature.output_loss(F.cross_entropy), curvature.CrossEntropy)
    assert isinstance(curvature.output_loss(nn.MSELoss()), curvature.MeanSquaredError)
    smoothed = curvature.output_loss(nn.CrossEntropyLoss(label_smoothing=0.1))
    assert type(smoothed) is curvature.OutputLoss  # no closed form: autograd
    with pytest.raises(ValueError, match=r"Unknown loss: 'cross-entropy' \(did you mean"):
        curvature.output_loss("cross-entropy")
    with pytest.raises(ValueError, match="Invalid loss"):
        curvature.output_loss(3)
    with pytest.raises(ValueError, match="Invalid method"):
        curvature.ggn_fn(_mlp(), "mse", torch.zeros(2, 4, dtype=D), torch.zeros(2, 3), method="x")


def test_drop_zeros_removes_products_by_zero():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b):
        return torch.zeros(3, 4, dtype=D) @ a + b, a.sum() * torch.zeros(2, dtype=D)

    gm = make_fx(f)(torch.ones(4, 5, dtype=D), torch.ones(3, 5, dtype=D))
    _linearize.drop_zeros(gm.graph)
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.mm.default not in targets
    assert torch.ops.aten.mul.Tensor not in targets
    a, b = torch.randn(4, 5, dtype=D), torch.randn(3, 5, dtype=D)
    first, second = gm(a, b)
    assert torch.equal(first, b) and torch.equal(second, torch.zeros(2, dtype=D))
