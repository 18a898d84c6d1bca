"""A short comparison of every registered optimizer on scikit-learn's digits.

Each optimizer trains the same MLP from the same initialisation for the same number of
forward/backward passes (Entropy-SGD's Langevin passes count), then reports train loss, test
accuracy and seconds. It exists to show the optimizers working end to end in a minute on a
laptop CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from valleys import optim, schedules
from valleys.data import Split, digits
from valleys.models import mlp

# Per-optimizer settings for the demo: the usual values for a small MLP, and Entropy-SGD with
# few Langevin steps so that its outer steps are not too few for the pass budget.
DEMO_HPARAMS: dict[str, dict] = {
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "nesterov": {"lr": 0.1},
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
    "entropy_sgd": {"lr": 1.0, "langevin_steps": 5, "langevin_lr": 0.1},
    "vsgd": {"lr": 0.02},
}


@dataclass
class DemoResult:
    """What one optimizer reached on the demo."""

    optimizer: str
    steps: int
    passes: int
    effective_epochs: float
    train_loss: float
    test_accuracy: float
    seconds: float


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_one(
    name: str,
    split: Split,
    *,
    passes: int,
    batch_size: int,
    seed: int,
    hparams: dict | None = None,
    knee: bool = False,
) -> DemoResult:
    """Train a 64-128-10 ReLU MLP with optimizer ``name`` for ``passes`` forward/backward passes.

    With ``knee`` the Knee schedule (50% explore, linear decay to 0) drives the lr.
    """
    torch.manual_seed(seed)
    model = mlp(split.x_train.shape[1], split.num_classes, widths=(128,))
    opt = optim.get(name, model.parameters(), **(hparams or DEMO_HPARAMS.get(name, {})))
    gen = torch.Generator().manual_seed(seed)
    n = split.x_train.shape[0]
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        loss.backward()
        return loss

    per_step = max(1, opt.param_groups[0].get("langevin_steps", 1))
    total_steps = math.ceil(passes / per_step)
    scheduler = (
        schedules.attach(opt, "knee", total_steps=total_steps, explore_steps=total_steps // 2)
        if knee
        else None
    )
    start = time.perf_counter()
    for _ in range(total_steps):
        opt.step(closure)
        if scheduler is not None:
            scheduler.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(split.x_train), split.y_train))
    label = f"{name}+knee" if knee else name
    return DemoResult(
        label,
        total_steps,
        calls,
        calls * batch_size / n,
        train_loss,
        _accuracy(model, split.x_test, split.y_test),
        seconds,
    )


def run(
    names: Sequence[str] | None = None,
    *,
    epochs: float = 30.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[DemoResult], None] | None = None,
) -> list[DemoResult]:
    """Run the demo for ``names`` (all registered optimizers by default) plus Nesterov with
    the Knee schedule, each for ``epochs`` passes' worth of samples."""
    split = digits.load(seed=seed)
    passes = math.ceil(epochs * split.x_train.shape[0] / batch_size)
    jobs = [(name, False) for name in (names or optim.names())] + [("nesterov", True)]
    # One untimed pass first, so that torch's lazy initialisation is not billed to the first row.
    run_one("sgd", split, passes=1, batch_size=batch_size, seed=seed, hparams={"lr": 0.0})
    results = []
    for name, knee in jobs:
        result = run_one(name, split, passes=passes, batch_size=batch_size, seed=seed, knee=knee)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def format_table(results: Sequence[DemoResult]) -> str:
    """A plain-text table of demo results."""
    header = ("optimizer", "steps", "passes", "eff. epochs", "train loss", "test acc", "seconds")
    rows = [
        (
            r.optimizer,
            str(r.steps),
            str(r.passes),
            f"{r.effective_epochs:.1f}",
            f"{r.train_loss:.4f}",
            f"{100 * r.test_accuracy:.2f}%",
            f"{r.seconds:.2f}",
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
