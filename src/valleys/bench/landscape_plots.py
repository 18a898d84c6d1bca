"""Figures of landscape analyses: a sharpness ascent, 1-D loss curves, 2-D loss contours.

Each function draws from the plain record that :mod:`valleys.bench.analyze` appends to
``<run>/landscape.jsonl`` (so figures can be redrawn from that file alone), writes
``<stem>.png`` and ``<stem>.svg`` and returns the paths. Figures are drawn on matplotlib's Agg
canvas directly, never through pyplot's global backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from valleys.bench.plots import _save

__all__ = ["PLOTTERS", "plot_contour", "plot_curve", "plot_record", "plot_sharpness"]


def _wide(values: np.ndarray) -> bool:
    """Whether positive values span a decade or more (worth a log scale)."""
    finite = values[np.isfinite(values)]
    return finite.size > 0 and bool(np.all(finite > 0)) and finite.max() >= 10 * finite.min()


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_sharpness(
    result: Mapping[str, Any], stem: str | Path, *, title: str = "", formats=("png", "svg")
) -> list[Path]:
    """The full loss at each evaluated iterate of a sharpness computation (``result`` is
    ``SharpnessResult.to_dict()``), with ``f0`` and the running maximum."""
    steps = [h[0] for h in result["history"]]
    values = [np.nan if h[1] is None else h[1] for h in result["history"]]
    fig = _figure((6.4, 4.2))
    ax = fig.subplots()
    ax.plot(steps, values, color="C0", lw=1.5, marker="." if len(steps) < 60 else None)
    ax.plot(steps, np.fmax.accumulate(values), color="C1", lw=1.2, ls="--", label="running max")
    ax.axhline(result["f0"], color="0.4", lw=1, ls=":", label="f(x)")
    xlabel = "L-BFGS-B evaluation" if result.get("method") == "lbfgsb" else "ascent step"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("full loss f(x + z)")
    phi = result.get("sharpness")
    head = f"Keskar sharpness {phi:.4g} (ε = {result['epsilon']:g}, {result['method']})"
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(stem), formats)


def plot_curve(
    curve: Mapping[str, Any],
    stem: str | Path,
    *,
    title: str = "",
    xlabel: str = "α",
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Loss (left axis, log scale when it spans a decade) and accuracy (right axis, if present)
    against ``curve["alphas"]`` (``Curve.to_dict()``)."""
    alphas = np.asarray(curve["alphas"], dtype=float)
    loss = np.asarray([np.nan if v is None else v for v in curve["loss"]], dtype=float)
    fig = _figure((6.4, 4.2))
    ax = fig.subplots()
    ax.plot(alphas, loss, color="C0", lw=1.8, marker=".", label="loss")
    if _wide(loss):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss", color="C0")
    ax.grid(alpha=0.3)
    if curve.get("accuracy") is not None:
        acc = np.asarray([np.nan if v is None else v for v in curve["accuracy"]], dtype=float)
        right = ax.twinx()
        right.plot(alphas, acc, color="C1", lw=1.4, ls="--", marker=".", label="accuracy")
        right.set_ylabel("accuracy", color="C1")
        right.set_ylim(-0.02, 1.02)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, Path(stem), formats)


def plot_contour(
    surface: Mapping[str, Any],
    stem: str | Path,
    *,
    title: str = "",
    levels: int = 20,
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Filled contours of the loss over ``alphas × betas`` (``Surface.to_dict()``), on a
    log10 scale when the loss spans a decade, with the weights marked at the origin."""
    a = np.asarray(surface["alphas"], dtype=float)
    b = np.asarray(surface["betas"], dtype=float)
    z = np.asarray(
        [[np.nan if v is None else v for v in row] for row in surface["loss"]], dtype=float
    )
    finite = z[np.isfinite(z)]
    log = _wide(z)
    shown = np.log10(z) if log else z
    fig = _figure((5.6, 4.8))
    ax = fig.subplots()
    if len(a) > 1 and len(b) > 1 and finite.size > 0 and np.ptp(finite) > 0:
        filled = ax.contourf(a, b, shown, levels=levels, cmap="viridis")
        ax.contour(a, b, shown, levels=levels, colors="k", linewidths=0.4, alpha=0.5)
        bar = fig.colorbar(filled, ax=ax)
        bar.set_label("log10 loss" if log else "loss")
    else:  # a degenerate grid: show the values as an image
        image = ax.imshow(shown, origin="lower", aspect="auto")
        fig.colorbar(image, ax=ax)
    ax.plot([0], [0], marker="*", color="white", markeredgecolor="k", markersize=11)
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, Path(stem), formats)


def _plot_surface(record: Mapping[str, Any], stem: Path, title: str) -> list[Path]:
    if record.get("mode") == "plane":
        return plot_contour(record["result"], stem, title=title)
    xlabel = "α"
    if record.get("mode") == "interpolation":
        xlabel = "α  (0: this run's weights, 1: the other's)"
    return plot_curve(record["result"], stem, title=title, xlabel=xlabel)


def _plot_hessian(record: Mapping[str, Any], stem: Path, title: str) -> list[Path]:
    from valleys.bench.analyze_hessian import plot_hessian

    return plot_hessian(record, stem, title=title)


#: How each ``kind`` of record is drawn: ``plotter(record, stem, title) -> files``. A new
#: analysis registers its own entry here.
PLOTTERS: dict[str, Callable[[Mapping[str, Any], Path, str], list[Path]]] = {
    "sharpness": lambda record, stem, title: plot_sharpness(record["result"], stem, title=title),
    "surface": _plot_surface,
    "hessian": _plot_hessian,
}


def plot_record(record: Mapping[str, Any], stem: str | Path, *, title: str = "") -> list[Path]:
    """The figure(s) of one ``landscape.jsonl`` record, by its ``kind`` (see
    :data:`PLOTTERS`)."""
    kind = record.get("kind")
    if kind not in PLOTTERS:
        raise ValueError(
            f"Invalid landscape record kind: {kind!r} (expected one of {', '.join(PLOTTERS)})"
        )
    return PLOTTERS[str(kind)](record, Path(stem), title)
