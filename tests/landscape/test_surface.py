"""Loss curves, surfaces and interpolations against closed forms on a quadratic, the filter
normalisation of random directions, and a model left as it was."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from problems import classification_data
from valleys.landscape import (
    full_loss,
    interpolation,
    loss_curve,
    loss_surface,
    random_direction,
)


def _regression():
    """A linear model with MSE, whose loss is the quadratic ‖Aθ − y‖²/n of θ = (w, b)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    design = torch.cat([x, torch.ones(30, 1, dtype=torch.float64)], 1)
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 30, 7)]

    def flat(params):
        return torch.cat([params["weight"].reshape(-1), params["bias"].reshape(-1)])

    def f(theta):
        return float(((design @ theta - y[:, 0]) ** 2).mean())

    return model, batches, flat, f


def _direction(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()
    }


def test_curve_along_a_direction_matches_the_closed_form():
    model, batches, flat, f = _regression()
    theta = flat(dict(model.named_parameters())).detach()
    d = flat(_direction(model, 0))
    alphas = np.linspace(-1, 1, 9)
    curve = loss_curve(model, F.mse_loss, batches, _direction(model, 0), alphas)
    expected = [f(theta + a * d) for a in alphas]
    np.testing.assert_allclose(curve.loss, expected, rtol=1e-12)
    np.testing.assert_array_equal(curve.alphas, alphas)
    assert curve.accuracy is None
    # the quadratic's own coefficients: f(θ + αd) = f(θ) + α·g·d + α²·q
    c = np.polyfit(alphas, curve.loss, 2)
    assert c[2] == pytest.approx(f(theta), rel=1e-10)


def test_surface_matches_the_closed_form_with_the_grid_layout_of_contour():
    model, batches, flat, f = _regression()
    theta = flat(dict(model.named_parameters())).detach()
    d1, d2 = _direction(model, 0), _direction(model, 1)
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    surface = loss_surface(model, F.mse_loss, batches, (d1, d2), alphas, betas)
    assert surface.loss.shape == (3, 5)
    for j, b in enumerate(betas):
        for i, a in enumerate(alphas):
            expected = f(theta + a * flat(d1) + b * flat(d2))
            assert surface.loss[j, i] == pytest.approx(expected, rel=1e-12)
    square = loss_surface(model, F.mse_loss, batches, (d1, d2), [0.0, 1.0])
    assert square.loss.shape == (2, 2)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).double()


@pytest.mark.parametrize("normalization", ["filter", "layer"])
def test_direction_norms_equal_the_weights_norms(normalization):
    model = _net()
    d = random_direction(model, seed=3, normalization=normalization)
    params = dict(model.named_parameters())
    assert set(d) == set(params)
    for name, p in params.items():
        assert d[name].dtype == p.dtype and d[name].shape == p.shape
        if p.dim() == 1:
            assert torch.equal(d[name], torch.zeros_like(p))  # biases and BatchNorm ignored
        elif normalization == "filter":
            dims = tuple(range(1, p.dim()))
            norm = torch.linalg.vector_norm
            torch.testing.assert_close(norm(d[name], dim=dims), norm(p.detach(), dim=dims))
        else:
            torch.testing.assert_close(d[name].norm(), p.detach().norm())


def test_direction_is_seeded_and_may_include_biases():
    model = _net()
    a = random_direction(model, seed=5)
    b = random_direction(model, seed=5)
    c = random_direction(model, seed=6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    gen = torch.Generator().manual_seed(5)
    first, second = random_direction(model, seed=gen), random_direction(model, seed=gen)
    assert torch.equal(first["0.weight"], a["0.weight"])
    assert not torch.equal(second["0.weight"], first["0.weight"])
    kept = random_direction(model, seed=5, ignore_bias_bn=False)
    assert torch.equal(kept["1.weight"], model[1].weight.detach())  # Li et al.: d = θ
    raw = random_direction(model, seed=5, normalization="none")
    assert raw["0.bias"].abs().sum() > 0
    only = random_direction(model, seed=5, params=[model[4].weight])
    assert list(only) == ["4.weight"]


def _bn_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = classification_data(40)
    model.train()
    model(x)
    return model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]


def test_curve_surface_and_interpolation_leave_the_model_as_it_was():
    model, batches = _bn_classifier()
    other = {k: v + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    curve = loss_curve(model, F.cross_entropy, batches, d1, [-1, 0, 1], accuracy=True)
    loss_surface(model, F.cross_entropy, batches, (d1, d2), [-1, 0, 1], accuracy=True)
    interpolation(model, F.cross_entropy, batches, None, other, [0, 0.5, 1], buffers="interpolate")
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert curve.accuracy is not None and ((curve.accuracy >= 0) & (curve.accuracy <= 1)).all()
    centre = full_loss(model, F.cross_entropy, batches, accuracy=True)
    assert curve.loss[1] == pytest.approx(float(centre.loss), rel=1e-12)
    assert curve.accuracy[1] == pytest.approx(float(centre.accuracy))


def test_interpolation_between_two_states_matches_the_closed_form():
    model, batches, flat, f = _regression()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {k: v + torch.randn_like(v) for k, v in start.items()}
    alphas = np.linspace(-0.5, 1.5, 9)
    curve = interpolation(model, F.mse_loss, batches, start, end, alphas)
    a, b = flat(start), flat(end)
    np.testing.assert_allclose(curve.loss, [f((1 - t) * a + t * b) for t in alphas], rtol=1e-12)
    from_model = interpolation(model, F.mse_loss, batches, None, end, alphas)
    np.testing.assert_array_equal(from_model.loss, curve.loss)


@pytest.mark.parametrize("buffers", ["nearest", "start", "end", "interpolate"])
def test_interpolation_takes_buffers_as_told(buffers):
    model, batches = _bn_classifier()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    other, _ = _bn_classifier()
    with torch.no_grad():
        other[1].running_mean.add_(1.0)
        other[1].running_var.mul_(3.0)
        other[0].weight.mul_(1.5)
    end = other.state_dict()
    curve = interpolation(model, F.cross_entropy, batches, start, end, [0.0, 1.0], buffers=buffers)

    def loss_with(params, buffer_state):
        probe, _ = _bn_classifier()
        probe.load_state_dict({**params, **{k: buffer_state[k] for k, _ in probe.named_buffers()}})
        return float(full_loss(probe, F.cross_entropy, batches).loss)

    at_start = start if buffers in ("nearest", "start", "interpolate") else end
    at_end = end if buffers in ("nearest", "end", "interpolate") else start
    assert curve.loss[0] == pytest.approx(loss_with(start, at_start), rel=1e-12)
    assert curve.loss[1] == pytest.approx(loss_with(end, at_end), rel=1e-12)


def test_bad_arguments_raise_one_line_errors():
    model, batches, _, _ = _regression()
    with pytest.raises(ValueError, match="Invalid normalization"):
        random_direction(model, normalization="unit")
    with pytest.raises(ValueError, match="parameter name in direction"):
        loss_curve(model, F.mse_loss, batches, {"wieght": torch.zeros(1, 3)}, [0.0])
    with pytest.raises(ValueError, match="expected the parameter's shape"):
        loss_curve(model, F.mse_loss, batches, {"weight": torch.zeros(3)}, [0.0])
    with pytest.raises(ValueError, match="Invalid alphas"):
        loss_curve(model, F.mse_loss, batches, _direction(model, 0), [])
    with pytest.raises(ValueError, match="Invalid end"):
        interpolation(model, F.mse_loss, batches, None, {"weight": torch.zeros(1, 3)}, [0.0])
    with pytest.raises(ValueError, match="Invalid buffers"):
        interpolation(model, F.mse_loss, batches, None, model.state_dict(), [0.0], buffers="x")
