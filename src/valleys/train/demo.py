"""A short comparison of optimizers on scikit-learn's digits, run through :func:`train`.

The comparison is ``configs/experiments/digits_compare.yaml``: a base configuration and one
variant per optimizer (SGD, Adam, Entropy-SGD, VSGD, Nesterov with the Knee schedule). Every
variant trains the same MLP from the same initialisation for the same number of
forward/backward passes (Entropy-SGD's Langevin passes count), into its own run directory;
the demo then prints train loss, test accuracy and seconds, and plots the curves of all
variants together. It shows the optimizers working end to end in a minute on a laptop CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from valleys.train import config as C
from valleys.train.loop import train

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs/experiments/digits_compare.yaml"


@dataclass
class DemoResult:
    """What one variant reached."""

    optimizer: str
    steps: int
    passes: int
    effective_epochs: float
    train_loss: float
    test_accuracy: float
    seconds: float
    run_dir: Path


@dataclass
class DemoReport:
    """Every variant's result and the folder holding the runs and the plots."""

    results: list[DemoResult]
    out: Path
    plots: list[Path]


def passes_per_step(cfg: C.Config) -> int:
    """Forward/backward passes per optimizer step: Entropy-SGD's ``langevin_steps`` (at least
    one), one for the single-pass optimizers."""
    from valleys import optim

    hparams = {**optim.spec(cfg.optim.name).hyperparameters(), **cfg.optim.hparams}
    return max(1, int(hparams.get("langevin_steps", 1) or 1))


def run(
    names: Sequence[str] | None = None,
    *,
    epochs: float | None = None,
    seed: int | None = None,
    threads: int | None = None,
    out: str | Path | None = None,
    config: str | Path | None = None,
    progress: Callable[[DemoResult], None] | None = None,
) -> DemoReport:
    """Train the variants ``names`` (all by default) of the comparison file ``config`` for
    ``epochs`` epochs of passes each (the file's ``run.max_epochs`` by default) into
    ``out/<variant>`` (default ``runs/demo-<time>``), then plot them into ``out/plots``."""
    from valleys.bench.plots import plot_runs

    path = Path(config) if config is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"Comparison file not found: {path} (run from a checkout of valleys, or pass "
            "--config FILE)"
        )
    overrides = []
    if seed is not None:
        overrides.append(f"run.seed={seed}")
    if threads is not None:
        overrides.append(f"run.threads={threads}")
    variants = C.load_variants(path, overrides, only=list(names or ()))
    if out is None:
        out = Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"Invalid --out: {str(out)!r} (it exists and is not empty)")
    results = []
    for name, cfg in variants.items():
        budget = epochs if epochs is not None else cfg.run.max_epochs
        if budget is None or not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"Invalid epochs: {budget!r} (expected a number > 0)")
        cfg.run.max_epochs = budget / passes_per_step(cfg)
        cfg.run.max_steps = None
        cfg.run.dir = str(out / name)
        r = train(cfg)
        final = r.final_eval
        result = DemoResult(
            optimizer=name,
            steps=r.step,
            passes=r.passes,
            effective_epochs=r.effective_epochs,
            train_loss=final.get("train_loss", r.train_loss or math.nan),
            test_accuracy=final.get("test_accuracy", math.nan),
            seconds=r.train_time_s,
            run_dir=r.dir,
        )
        results.append(result)
        if progress is not None:
            progress(result)
    plots = plot_runs([r.run_dir for r in results], out / "plots")
    return DemoReport(results, out, plots)


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
