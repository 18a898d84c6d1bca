"""Training curves of run directories: loss and metric against steps, epochs, passes and
seconds, as PNG and SVG; for sweeps, the same curves as a mean with a band of ± one standard
deviation over seeds per configuration (:func:`plot_bands`), histograms across seeds
(:func:`plot_histograms`), learning-rate schedules (:func:`plot_schedules`) and performance
profiles (:func:`plot_profile`).

Reads only ``metrics.jsonl`` (see :mod:`valleys.train.log`). Figures are drawn on
matplotlib's Agg canvas directly, so plotting never touches pyplot's global backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from valleys.train.log import read_metrics

__all__ = ["AXES", "plot_bands", "plot_histograms", "plot_profile", "plot_runs", "plot_schedules"]

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


# ---------------------------------------------------------------------------------------------
# sweeps: configurations over seeds


def _figure(size: tuple[float, float], panels: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels)


def _save(fig: Any, stem: Path, formats: Sequence[str]) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def _finish_axes(axes: Sequence[Any]) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)


def _band(
    ax: Any, series: list[tuple[list[float], list[float]]], color: str, label: str, log: bool
) -> None:
    """Mean over seeds with a ± one std band, on the x range every seed covers (interpolated
    linearly; on a log axis the mean and band are geometric). One seed: its curve."""
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in series if len(x)]
    if not curves:
        return
    if log:
        curves = [(x, y) for x, y in curves if np.all(y > 0)] or curves
    lo = max(x[0] for x, _ in curves)
    hi = min(x[-1] for x, _ in curves)
    if len(curves) == 1 or hi <= lo or any(len(x) < 2 for x, _ in curves):
        for i, (x, y) in enumerate(curves):
            ax.plot(x, y, color=color, lw=1.4, alpha=0.9, label=label if i == 0 else None)
        return
    grid = np.linspace(lo, hi, 200)
    tf = np.log if log else (lambda v: v)
    ys = np.stack([np.interp(grid, x, tf(y)) for x, y in curves])
    mean, std = ys.mean(0), ys.std(0, ddof=1)
    back = np.exp if log else (lambda v: v)
    ax.plot(grid, back(mean), color=color, lw=1.6, label=f"{label} (n={len(curves)})")
    ax.fill_between(grid, back(mean - std), back(mean + std), color=color, alpha=0.2, lw=0)


def _finite_series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        a, b = r.get(x), r.get(y)
        if a is not None and b is not None and np.isfinite(b):
            xs.append(float(a))
            ys.append(float(b))
    return xs, ys


def plot_bands(
    groups: dict[str, Sequence[Any]],
    stem: str | Path,
    *,
    x: str,
    xlabel: str,
    metric: str,
    title: str = "",
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Train loss (the logged mini-batch means, log axis) and the test ``metric`` (log axis
    too unless it is an accuracy) against the record key ``x``, one line per configuration: the
    mean over its seeds with a ± one std band (geometric on a log axis). ``groups`` maps a
    label to runs with ``trains`` and ``evals`` record lists."""
    fig, (ax_loss, ax_metric) = _figure((11, 4.2), 2)
    losses = {k: [_finite_series(r.trains, x, "loss") for r in rs] for k, rs in groups.items()}
    values = {k: [_finite_series(r.evals, x, metric) for r in rs] for k, rs in groups.items()}

    def positive(series: dict[str, list[tuple[list, list]]]) -> bool:
        return all(v > 0 for runs in series.values() for _, ys in runs for v in ys)

    log_loss = positive(losses)
    log_metric = "accuracy" not in metric and positive(values)
    for i, label in enumerate(groups):
        color = f"C{i % 10}"
        _band(ax_loss, losses[label], color, label, log=log_loss)
        _band(ax_metric, values[label], color, label, log=log_metric)
    for ax, log in ((ax_loss, log_loss), (ax_metric, log_metric)):
        if log and ax.lines:
            ax.set_yscale("log")
    ax_loss.set_ylabel("train loss (mini-batch mean)")
    ax_metric.set_ylabel(metric.replace("_", " "))
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel(xlabel)
    if title:
        fig.suptitle(title, fontsize=10)
    _finish_axes((ax_loss, ax_metric))
    return _save(fig, Path(stem), formats)


def plot_histograms(
    values: dict[str, Sequence[float]],
    stem: str | Path,
    *,
    xlabel: str,
    title: str = "",
    bins: int = 12,
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Histograms across seeds, one per configuration on shared bins (as the Knee README's
    sharpness and accuracy histograms); non-finite values are left out."""
    fig, ax = _figure((6.4, 4.0))
    clean = {
        k: [float(v) for v in vs if v is not None and np.isfinite(v)] for k, vs in values.items()
    }
    pooled = [v for vs in clean.values() for v in vs]
    if pooled:
        lo, hi = min(pooled), max(pooled)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-12 + abs(lo) * 1e-6, bins + 1)
        for i, (label, vs) in enumerate(clean.items()):
            if vs:
                ax.hist(
                    vs, bins=edges, alpha=0.5, color=f"C{i % 10}", label=f"{label} (n={len(vs)})"
                )
        ax.legend(fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("runs")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, Path(stem), formats)


def plot_schedules(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    stem: str | Path,
    *,
    xlabel: str = "epochs",
    title: str = "",
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Learning rate against ``xlabel``, one line per configuration (from its train records)."""
    fig, ax = _figure((6.4, 3.6))
    for i, (label, (xs, lrs)) in enumerate(series.items()):
        ax.plot(xs, lrs, color=f"C{i % 10}", lw=1.4, drawstyle="steps-post", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("learning rate")
    if title:
        ax.set_title(title, fontsize=10)
    _finish_axes([ax])
    return _save(fig, Path(stem), formats)


def plot_profile(
    taus: Sequence[float],
    profile: dict[str, Sequence[float]],
    stem: str | Path,
    *,
    title: str = "",
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Performance profiles: the fraction of tasks on which each method is within a factor τ
    of the best, against τ (log axis)."""
    fig, ax = _figure((6.4, 4.0))
    for i, (method, fractions) in enumerate(profile.items()):
        ax.step(taus, fractions, where="post", color=f"C{i % 10}", lw=1.6, label=method)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ (cost / best cost on the task)")
    ax.set_ylabel("fraction of tasks")
    if title:
        ax.set_title(title, fontsize=10)
    _finish_axes([ax])
    return _save(fig, Path(stem), formats)
