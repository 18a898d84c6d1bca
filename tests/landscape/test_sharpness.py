"""Keskar sharpness against box maxima known in closed form (convex quadratics, whose maximum
over a box lies at a vertex), and the promises to leave the model alone."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from problems import classification_data
from valleys.landscape import keskar_sharpness, keskar_sharpness_lbfgsb
from valleys.landscape.sharpness import sharpness_value


def _batches(x, y, b):
    return [(x[i : i + b], y[i : i + b]) for i in range(0, x.shape[0], b)]


def _regression():
    """A linear model with MSE: f(θ) = ‖Aθ − y‖²/n, a convex quadratic of θ = (w, b)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    noise = 0.1 * torch.randn(32, generator=gen, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 + noise).unsqueeze(1)
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.8, -1.5]], dtype=torch.float64))
        model.bias.fill_(0.2)
    design = torch.cat([x, torch.ones(32, 1, dtype=torch.float64)], 1).numpy()
    theta = np.array([0.8, -1.5, 0.2])

    def f(t):
        return float(np.mean((design @ t - y.numpy()[:, 0]) ** 2))

    return model, _batches(x, y, 8), theta, f


def _vertex_max(f, theta, epsilon):
    radius = epsilon * (np.abs(theta) + 1)
    return max(f(theta + np.array(s) * radius) for s in itertools.product([-1, 1], repeat=3))


class Quadratic(nn.Module):
    """'Outputs' ½ xᵀAx + bᵀx + c for every input row, so that with loss_fn = mean the full loss
    is that quadratic of the parameter x."""

    def __init__(self, a, b, c, x0):
        super().__init__()
        self.a, self.b, self.c = a, b, c
        self.x = nn.Parameter(x0.clone())

    def forward(self, inputs):
        value = 0.5 * self.x @ self.a @ self.x + self.b @ self.x + self.c
        return value.expand(inputs.shape[0])


def _quadratic():
    a = torch.tensor([[3.0, 0.5, 0.2], [0.5, 2.0, -0.3], [0.2, -0.3, 1.0]], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    x0 = torch.tensor([0.4, 0.9, -0.7], dtype=torch.float64)
    model = Quadratic(a, b, 0.1, x0)
    data = [(torch.zeros(5, 1), torch.zeros(5)), (torch.zeros(2, 1), torch.zeros(2))]

    def f(t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return float(0.5 * t @ a @ t + b @ t + 0.1)

    return model, data, x0.numpy(), f


def _mean(out, _):
    return out.mean()


@pytest.mark.parametrize("objective", ["batch", "full"])
def test_ascent_finds_the_box_maximum_of_a_linear_regression(objective):
    model, batches, theta, f = _regression()
    r = keskar_sharpness(
        model, F.mse_loss, batches, epsilon=0.2, lr=0.1, steps=100, objective=objective
    )
    f0, fmax = f(theta), _vertex_max(f, theta, 0.2)
    assert r.f0 == pytest.approx(f0, rel=1e-12)
    assert r.fmax == pytest.approx(fmax, rel=1e-10)
    assert r.sharpness == pytest.approx(100 * (fmax - f0) / (1 + f0), rel=1e-10)
    assert r.method == "ascent" and r.steps == 100 and r.evaluations == 101


def test_lbfgsb_finds_the_box_maximum_of_a_linear_regression():
    model, batches, theta, f = _regression()
    r = keskar_sharpness_lbfgsb(model, F.mse_loss, batches, epsilon=0.2, max_iterations=50)
    f0, fmax = f(theta), _vertex_max(f, theta, 0.2)
    assert r.method == "lbfgsb"
    assert r.f0 == pytest.approx(f0, rel=1e-12)
    assert r.fmax == pytest.approx(fmax, rel=1e-10)
    assert r.final == pytest.approx(fmax, rel=1e-10)
    assert r.sharpness == pytest.approx(sharpness_value(f0, fmax), rel=1e-10)


@pytest.mark.parametrize("method", ["ascent", "full", "lbfgsb"])
def test_both_methods_find_the_vertex_maximum_of_a_quadratic_form(method):
    model, batches, x0, f = _quadratic()
    epsilon = 0.3
    if method == "lbfgsb":
        r = keskar_sharpness_lbfgsb(model, _mean, batches, epsilon=epsilon, max_iterations=50)
    else:
        objective = "batch" if method == "ascent" else "full"
        r = keskar_sharpness(
            model, _mean, batches, epsilon=epsilon, lr=0.05, steps=200, objective=objective
        )
    fmax = _vertex_max(f, x0, epsilon)
    assert r.f0 == pytest.approx(f(x0), rel=1e-12)
    assert r.fmax == pytest.approx(fmax, rel=1e-10)


def test_default_settings_on_a_nearly_linear_box():
    """With ε = 1e-4 the loss is nearly linear over the box (curvature terms ~1e-7): the
    maximum is about f0 + Σ|g_i| ε(|x_i| + 1), at the vertex sign(g), which the default 1000
    SGD steps of lr 1e-3 reach."""
    model, batches, theta, f = _regression()
    r = keskar_sharpness(model, F.mse_loss, batches)
    grad = np.array([(f(theta + 1e-6 * e) - f(theta - 1e-6 * e)) / 2e-6 for e in np.eye(3)])
    predicted = f(theta) + np.sum(np.abs(grad) * 1e-4 * (np.abs(theta) + 1))
    assert r.fmax == pytest.approx(predicted, rel=1e-6)
    assert r.fmax == pytest.approx(_vertex_max(f, theta, 1e-4), rel=1e-12)
    assert r.epsilon == 1e-4 and r.steps == 1000 and r.info["lr"] == 1e-3


def test_running_maximum_history_and_eval_every():
    model, batches, _, _ = _regression()
    r = keskar_sharpness(model, F.mse_loss, batches, epsilon=0.2, lr=0.1, steps=10, eval_every=3)
    assert [s for s, _ in r.history] == [0, 3, 6, 9, 10]
    values = [v for _, v in r.history]
    assert r.fmax == max(values) and r.final == values[-1] and r.f0 == values[0]
    assert r.fmax >= r.final and r.fmax >= r.f0
    assert dict(r.history)[r.best_step] == r.fmax
    assert r.sharpness >= 0
    record = r.to_dict()
    assert record["history"][0] == [0, r.f0] and record["info"]["eval_every"] == 3


def test_running_maximum_keeps_a_peak_the_final_iterate_left():
    """Ascent with momentum overshoots a concave bump: the final iterate is lower than the
    best one seen, and the result keeps the best (the original reported the final one)."""
    a = -torch.eye(3, dtype=torch.float64)  # f = −½‖x‖², maximum at 0 inside the box
    model = Quadratic(
        a, torch.zeros(3, dtype=torch.float64), 0.0, torch.full((3,), 0.5, dtype=torch.float64)
    )
    batches = [(torch.zeros(4, 1), torch.zeros(4))]
    r = keskar_sharpness(
        model,
        _mean,
        batches,
        epsilon=1.0,
        lr=0.5,
        steps=7,
        optimizer=torch.optim.SGD,
        optimizer_kwargs={"momentum": 0.9},
    )
    assert r.fmax > r.final
    assert r.fmax == max(v for _, v in r.history)
    assert r.info["optimizer"] == "SGD" and r.info["optimizer_kwargs"] == {"momentum": 0.9}


def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
    ).double()
    x, y = classification_data(48)
    model.train()
    for i in range(0, 48, 16):  # non-trivial running statistics
        model(x[i : i + 16])
    model[3].eval()  # a mixed set of flags, which must come back as it was
    return model, _batches(x, y, 16)


@pytest.mark.parametrize("method", ["batch", "full", "lbfgsb"])
def test_model_parameters_buffers_grads_and_flags_are_unchanged(method):
    model, batches = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    if method == "lbfgsb":
        r = keskar_sharpness_lbfgsb(model, F.cross_entropy, batches, epsilon=1e-2)
    else:
        r = keskar_sharpness(
            model, F.cross_entropy, batches, epsilon=1e-2, lr=0.05, steps=20, objective=method
        )
    assert r.sharpness > 0
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert int(after["1.num_batches_tracked"]) == 3
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_params_restricts_the_perturbation():
    model, batches, theta, f = _regression()
    r = keskar_sharpness_lbfgsb(
        model, F.mse_loss, batches, epsilon=0.2, params=[model.bias], max_iterations=20
    )
    radius = 0.2 * (abs(theta[2]) + 1)
    expected = max(f(theta + np.array([0, 0, s * radius])) for s in (-1, 1))
    assert r.fmax == pytest.approx(expected, rel=1e-10)
    assert r.info["num_params"] == 1


def test_ascent_batches_stream_is_read_as_given():
    model, batches, _, _ = _regression()
    drawn = []

    def stream():
        while True:
            for b in batches[:2]:
                drawn.append(b[0].shape[0])
                yield b

    keskar_sharpness(model, F.mse_loss, batches, steps=5, ascent_batches=stream())
    assert len(drawn) == 5


def test_bad_arguments_raise_one_line_errors():
    model, batches, _, _ = _regression()
    with pytest.raises(ValueError, match="Invalid epsilon"):
        keskar_sharpness(model, F.mse_loss, batches, epsilon=0)
    with pytest.raises(ValueError, match="Invalid objective"):
        keskar_sharpness(model, F.mse_loss, batches, objective="mini")
    with pytest.raises(ValueError, match="max_params"):
        keskar_sharpness_lbfgsb(model, F.mse_loss, batches, max_params=2)
    with pytest.raises(ValueError, match="no samples"):
        keskar_sharpness(model, F.mse_loss, [], steps=1)


def test_sharpness_value_formula():
    assert sharpness_value(1.0, 1.5) == pytest.approx(25.0)
    assert math.isclose(sharpness_value(0.0, 0.0), 0.0)
