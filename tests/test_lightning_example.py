"""examples/lightning_train.py: every registry optimizer trains under Lightning (automatic
optimization where Lightning's closure contract allows it, manual otherwise), and its steps are
those of a plain loop."""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch

from valleys import optim

pytest.importorskip("lightning")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_train.py"
SETTINGS = {
    "sgd": {"lr": 0.1},
    "nesterov": {"lr": 0.05},
    "adam": {"lr": 0.01},
    "adamw": {"lr": 0.01},
    "entropy_sgd": {"langevin_steps": 3},
    "vsgd": {"lr": 0.1},
    "sam": {"lr": 0.1},
    "sgn": {"cg_max_iters": 2, "cg_warmup_iters": 2},
}
MANUAL = {"entropy_sgd", "sgn"}


@pytest.fixture(scope="module")
def lt():
    spec = importlib.util.spec_from_file_location("lightning_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    return module


def fit(lt, name, steps, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        return lt.run(
            name, SETTINGS.get(name, {}), steps=steps, accelerator="cpu", progress=False, **kwargs
        )


@pytest.mark.parametrize("name", optim.names())
def test_every_optimizer_trains_under_lightning(lt, name):
    out = fit(lt, name, 15)
    module = out["module"]
    assert module.automatic_optimization == (name not in MANUAL)
    assert len(module.losses) == 15
    assert all(math.isfinite(v) for v in module.losses)
    assert out["test_loss"] < out["test_loss_before"]


@pytest.mark.parametrize("name", ["sam", "sgn"])
def test_closure_optimizers_under_bf16_mixed(lt, name):
    out = fit(lt, name, 10, precision="bf16-mixed")
    assert math.isfinite(out["test_loss"]) and out["test_loss"] < out["test_loss_before"]


def test_sgd_under_lightning_takes_the_steps_of_a_plain_loop(lt):
    module = fit(lt, "sgd", 10)["module"]
    dataset, model = lt.build(seed=0)
    opt = optim.get("sgd", model.parameters(), lr=0.1)
    loss_fn = lt.loss_function(dataset.task)
    losses = []
    for step, (x, y) in enumerate(lt.train_loader(dataset, 32, seed=0)):
        if step == 10:
            break
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses == pytest.approx(module.losses, rel=1e-6)
    for p, q in zip(model.parameters(), module.model.parameters(), strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-6, atol=1e-7)


def test_entropy_sgd_under_lightning_draws_a_fresh_batch_per_langevin_step(lt):
    module = fit(lt, "entropy_sgd", 4)["module"]
    dataset, model = lt.build(seed=0)
    opt = optim.get("entropy_sgd", model.parameters(), langevin_steps=3)
    loss_fn = lt.loss_function(dataset.task)
    for step, (x, y) in enumerate(lt.train_loader(dataset, 3 * 32, seed=0)):
        if step == 4:
            break
        chunks = iter(zip(x.split(32), y.split(32), strict=True))

        def closure(chunks=chunks):
            xb, yb = next(chunks)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss.detach()

        opt.step(closure)
        assert next(chunks, None) is None  # L closure calls, L different batches
    for p, q in zip(model.parameters(), module.model.parameters(), strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)


def test_fp16_closure_optimizers_are_refused_in_one_line(lt):
    with pytest.raises(ValueError, match=r"Invalid precision: '16-mixed' with optimizer 'sam'"):
        lt.run("sam", steps=1, precision="16-mixed", accelerator="cpu", progress=False)


def test_command_line(lt, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = lt.main(["--optim", "sgn", "--steps", "3", "--set", "cg_max_iters=1"])
    out = capsys.readouterr().out
    assert code == 0 and "sgn (manual optimization, 32-true): 3 steps" in out
    assert lt.main(["--optim", "sgd", "--set", "lr=-1", "--steps", "1"]) == 2
    assert "error: Invalid lr" in capsys.readouterr().err
