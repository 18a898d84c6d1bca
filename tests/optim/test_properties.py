"""Property-based tests of every registry optimizer: random parameter shapes (0-d to 4-d, with
size-0 and size-1 dimensions), float32 and float64 (mixed within one optimizer too), random
finite parameter and gradient values (zeros, tiny and large magnitudes included) and a few
steps never raise and leave the parameters, the optimizer state and its diagnostics finite.

Optimizers that take parameters are handed the drawn gradients directly (a closure sets them on
every call, however many calls a step makes). Those built from the model and its loss
(``takes_model``: SGN) cannot be fed gradients: they get a model of drawn layer sizes, dtype and
weights and a drawn batch instead, built the way ``test_contract.py`` builds them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from valleys import optim

NAMES = optim.names()
FROM_PARAMS = [n for n in NAMES if not getattr(optim.spec(n), "takes_model", False)]
FROM_MODEL = [n for n in NAMES if getattr(optim.spec(n), "takes_model", False)]

# Every entry with its defaults, except where a default is a placeholder meant to be chosen.
HPARAMS: dict[str, dict[str, Any]] = {"entropy_sgd": {"langevin_steps": 3}}

# Diagnostics documented as NaN when undefined (SGN's trust-region ratio after a step whose
# model predicted no decrease, e.g. a zero gradient); every other one must be finite.
UNDEFINED_AS_NAN = {("sgn", "tr_ratio")}

DTYPES = st.sampled_from([torch.float32, torch.float64])
SHAPES = st.lists(st.integers(0, 3), max_size=4).map(tuple)  # 0-d to 4-d, sizes 0..3


def _values(limit: float) -> st.SearchStrategy[float]:
    # float32-representable, so that float32 tensors hold exactly the drawn value; hypothesis
    # favours 0, ±limit, tiny and subnormal magnitudes on its own
    return st.floats(-limit, limit, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def problems(draw) -> dict[str, Any]:
    """Parameters (shape, dtype, values) and, per step, one gradient per parameter."""
    steps = draw(st.integers(1, 3))
    params, grads = [], [[] for _ in range(steps)]
    for _ in range(draw(st.integers(1, 3))):
        shape, dtype = draw(SHAPES), draw(DTYPES)
        n = math.prod(shape)
        params.append(
            torch.tensor(
                draw(st.lists(_values(10.0), min_size=n, max_size=n)), dtype=dtype
            ).reshape(shape)
        )
        for step in grads:
            # a scale per tensor spreads magnitudes from 1e-6 to 1e3 on top of the drawn values
            scale = draw(st.sampled_from([0.0, 1e-6, 1.0, 1e3]))
            g = draw(st.lists(_values(1.0), min_size=n, max_size=n))
            step.append(scale * torch.tensor(g, dtype=dtype).reshape(shape))
    return {"params": params, "grads": grads}


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor (and float, as a tensor) inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, float):
        yield torch.tensor(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _assert_finite(name: str, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    for i, p in enumerate(params):
        assert torch.isfinite(p).all(), f"parameter {i} is not finite"
    for t in _tensors(opt.state_dict()["state"]):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), "optimizer state is not finite"
    if hasattr(opt, "stats"):
        for key, value in opt.stats().items():
            for t in _tensors(value):
                if (name, key) in UNDEFINED_AS_NAN:
                    t = torch.nan_to_num(t, nan=0.0, posinf=math.inf, neginf=-math.inf)
                assert torch.isfinite(t).all(), f"stats()[{key!r}] is not finite"


@pytest.mark.parametrize("name", FROM_PARAMS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_finite_gradients_give_finite_steps(name, problem):
    torch.manual_seed(0)  # noise of stochastic optimizers
    params = [nn.Parameter(p.clone()) for p in problem["params"]]
    opt = optim.get(name, params, **HPARAMS.get(name, {}))
    for grads in problem["grads"]:

        def closure(grads=grads) -> torch.Tensor:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            return sum(
                (g.double() * p.detach().double()).sum() for p, g in zip(params, grads, strict=True)
            )

        if optim.spec(name).needs_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
    _assert_finite(name, opt, params)


class _Batch:
    """What a model-built optimizer reads a step's batch from (``Closure.batch``), and the
    closure itself for the gradient."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, x, y):
        self.model, self.opt, self.x, self.y = model, opt, x, y

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y

    def add_passes(self, n: int) -> None:
        pass

    def __call__(self) -> torch.Tensor:
        self.opt.zero_grad()
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        return loss.detach()


@st.composite
def model_problems(draw) -> dict[str, Any]:
    dtype = draw(DTYPES)
    batch, features, hidden, classes = (draw(st.integers(1, 4)) for _ in range(4))
    classes += 1  # cross-entropy needs two classes
    x = torch.tensor(
        draw(st.lists(_values(100.0), min_size=batch * features, max_size=batch * features)),
        dtype=dtype,
    )
    y = draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 10.0]))  # weights from zero to large
    return {
        "dtype": dtype,
        "sizes": (features, hidden, classes),
        "x": x.reshape(batch, features),
        "y": torch.tensor(y),
        "scale": scale,
        "steps": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.parametrize("name", FROM_MODEL)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=model_problems())
def test_models_of_any_size_give_finite_steps(name, problem):
    features, hidden, classes = problem["sizes"]
    torch.manual_seed(problem["seed"])
    model = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    model = model.to(problem["dtype"])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(problem["scale"])
    opt = optim.get(name, model, loss_fn="cross_entropy")
    batch = _Batch(model, opt, problem["x"], problem["y"])
    for _ in range(problem["steps"]):
        opt.step(batch)
    _assert_finite(name, opt, list(model.parameters()))
