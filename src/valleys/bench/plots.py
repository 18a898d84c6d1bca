"""Training curves of run directories: loss and metric against steps, epochs, passes and
seconds, as PNG and SVG.

Reads only ``metrics.jsonl`` (see :mod:`valleys.train.log`). Figures are drawn on
matplotlib's Agg canvas directly, so plotting never touches pyplot's global backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from valleys.train.log import read_metrics

__all__ = ["AXES", "plot_runs"]

# x-axis key in the records -> (file suffix, axis label)
AXES: dict[str, tuple[str, str]] = {
    "step": ("steps", "optimizer steps"),
    "epoch": ("epochs", "epochs (steps / steps per epoch)"),
    "passes": ("passes", "forward/backward passes"),
    "train_time_s": ("seconds", "training time (s)"),
}


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get(x) is not None and r.get(y) is not None:
            xs.append(float(r[x]))
            ys.append(float(r[y]))
    return xs, ys


def _label(run: Path, labels: dict[Path, str]) -> str:
    return labels.get(run, run.name)


def plot_runs(
    runs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    labels: dict[str, str] | None = None,
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Write one figure per x-axis (``curves_vs_{steps,epochs,passes,seconds}``) comparing
    ``runs``: train loss (the logged mini-batch means) and test loss on a log axis, and the test
    metric (accuracy, or MSE for regression; with an EMA also its curve). ``out`` defaults to
    the run directory when there is one run. Returns the files written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dirs = [Path(r) for r in runs]
    if not dirs:
        raise ValueError("No run directories given")
    if out is None:
        if len(dirs) > 1:
            raise ValueError("Several runs: pass an output folder (valleys plot RUN... --out DIR)")
        out = dirs[0]
    out = Path(out)
    names = {Path(k): v for k, v in (labels or {}).items()}
    data = {d: read_metrics(d) for d in dirs}
    regression = any(
        "test_mse" in r for records in data.values() for r in records if r.get("kind") == "eval"
    )
    metric = "test_mse" if regression else "test_accuracy"
    metric_label = "test MSE" if regression else "test accuracy"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for x, (suffix, xlabel) in AXES.items():
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax_loss, ax_metric = fig.subplots(1, 2)
        any_positive = False
        for i, d in enumerate(dirs):
            color = f"C{i % 10}"
            name = _label(d, names)
            train = [r for r in data[d] if r.get("kind") == "train"]
            evals = [r for r in data[d] if r.get("kind") == "eval"]
            xs, ys = _series(train, x, "loss")
            if xs:
                ax_loss.plot(xs, ys, color=color, alpha=0.55, lw=1, label=f"{name} train")
                any_positive |= all(v > 0 for v in ys)
            xs, ys = _series(evals, x, "test_loss")
            if xs:
                ax_loss.plot(xs, ys, color=color, lw=1.8, marker=".", label=f"{name} test")
            xs, ys = _series(evals, x, metric)
            if xs:
                ax_metric.plot(xs, ys, color=color, lw=1.8, marker=".", label=name)
            xs, ys = _series(evals, x, f"ema_{metric}")
            if xs:
                ax_metric.plot(xs, ys, color=color, lw=1.2, ls="--", label=f"{name} EMA")
        if any_positive:
            ax_loss.set_yscale("log")
        ax_loss.set_xlabel(xlabel)
        ax_loss.set_ylabel("loss")
        ax_metric.set_xlabel(xlabel)
        ax_metric.set_ylabel(metric_label)
        for ax in (ax_loss, ax_metric):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        for fmt in formats:
            path = out / f"curves_vs_{suffix}.{fmt}"
            fig.savefig(path, dpi=110)
            written.append(path)
    return written
