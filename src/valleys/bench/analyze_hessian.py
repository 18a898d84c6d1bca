"""The Hessian analysis of a trained run (``valleys hessian``): the workbench side of
:mod:`valleys.landscape.hessian`, :mod:`~valleys.landscape.hessian_density` and
:mod:`~valleys.landscape.hessian_dense`.

Like the other analyses (:mod:`valleys.bench.analyze`) it loads a run or checkpoint, selects
the samples, runs the chosen analyses of the full-loss Hessian (eval mode) one after the
other, appends one ``kind: "hessian"`` record to ``<run>/landscape.jsonl`` and draws one
figure (``plots/landscape-<index>-hessian.{png,svg}``)::

    from valleys.bench.analyze_hessian import hessian

    out = hessian("runs/digits-mlp-sgd-…", analyses=("top", "trace", "dense"), k=5)
    out.record["result"]["top"]["eigenvalues"]

The record's ``result`` holds ``parameters`` and one entry per analysis: ``top``
(:class:`~valleys.landscape.EigenResult`), ``trace`` (:class:`~valleys.landscape.TraceResult`),
``density`` (:class:`~valleys.landscape.DensityResult`) and ``dense``: a summary of the full
spectrum (extremes, counts of negative and near-zero eigenvalues, trace, a histogram, the
seconds spent) with the eigenvalues themselves saved beside the record as
``hessian-<index>-eigenvalues.npy`` (field ``eigenvalues_file``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from valleys import _validate as check
from valleys import distributed, landscape
from valleys.bench.analyze import Analysis, ProgressBar, finish, prepare, read_records

__all__ = ["ANALYSES", "DEFAULT_ANALYSES", "hessian", "plot_hessian", "spectrum_summary"]

ANALYSES = ("top", "trace", "density", "dense")
DEFAULT_ANALYSES = ("top", "trace", "density")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: The dense Hessian is built over the selected samples in batches of at least this many: the
#: mean is the same whatever the batches, and each batch costs a trace per parameter tensor.
DENSE_BATCH = 512


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _default(function: str, name: str) -> Any:
    import inspect

    return inspect.signature(getattr(landscape, function)).parameters[name].default


def spectrum_summary(eigenvalues: np.ndarray, bins: int = 100) -> dict[str, Any]:
    """Extremes, counts and a histogram of a full spectrum (plain data). ``near_zero``
    counts ``|λ| ≤ 1e-4·max|λ|``."""
    ev = np.asarray(eigenvalues, dtype=float)
    scale = float(np.abs(ev).max()) if ev.size else 0.0
    counts, edges = np.histogram(ev, bins=bins)
    return {
        "count": int(ev.size),
        "min": float(ev.min()),
        "max": float(ev.max()),
        "negative": int((ev < 0).sum()),
        "near_zero": int((np.abs(ev) <= 1e-4 * scale).sum()),
        "trace": float(ev.sum()),
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    }


_UNITS = {"top": "hvp", "trace": "hvp", "density": "hvp", "dense": "column"}


def _total(name: str, given: Mapping[str, Any], n: int, batches: int) -> int:
    """The progress bar's total: products (at most, for "top"), or (column, batch) pairs."""
    if name == "top":
        return given.get("max_iters") or min(n, 300)
    if name == "trace":
        return given.get("samples", _default("hutchinson_trace", "samples"))
    if name == "density":
        probes = given.get("num_probes", _default("spectral_density", "num_probes"))
        steps = given.get("lanczos_steps", _default("spectral_density", "lanczos_steps"))
        return probes * min(steps, n)
    return n * batches


def _run_one(name: str, run: Any, data: list, given: dict, seed: int, cache: bool, update):
    model, loss_fn = run.model, run.loss_fn
    if name == "top":
        return landscape.top_eigen(
            model, loss_fn, data, **given, seed=seed, cache=cache, progress=update
        )
    if name == "trace":
        return landscape.hutchinson_trace(
            model, loss_fn, data, **given, seed=seed, cache=cache, progress=update
        )
    if name == "density":
        return landscape.spectral_density(
            model, loss_fn, data, **given, seed=seed, cache=cache, progress=update
        )
    if "dtype" in given:
        given = {**given, "dtype": DTYPES[given["dtype"]]}
    return landscape.dense_spectrum(model, loss_fn, data, **given, progress=update)


def hessian(
    path: str | Path,
    *,
    analyses: Iterable[str] = DEFAULT_ANALYSES,
    k: int | None = None,
    method: str | None = None,
    tol: float | None = None,
    iterations: int | None = None,
    trace_samples: int | None = None,
    density_probes: int | None = None,
    lanczos_steps: int | None = None,
    sigma: float | None = None,
    chunk_size: int | None = None,
    dtype: str | None = None,
    cache: bool = True,
    split: str = "train",
    samples: int | None = None,
    batches: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    plots: bool = True,
) -> Analysis:
    """Hessian analyses of a run's full loss on the selected samples of ``split`` (all, or
    ``samples`` of them, or at most ``batches × batch_size``), in batches of ``batch_size``
    (default: the run's ``data.eval_batch_size``). The Hessian is that of the mean loss over
    the selected samples, whatever the batches (they only bound the memory of one pass):
    Entropy-SGD's "128 mini-batches of 32" is ``batches=128, batch_size=32``. The dense
    Hessian re-cuts the samples into batches of at least :data:`DENSE_BATCH` (the same mean;
    fewer traces).

    ``analyses``: any of ``"top"`` (:func:`~valleys.landscape.top_eigen` with ``k``,
    ``method``, ``tol``, ``iterations`` as ``max_iters``), ``"trace"``
    (:func:`~valleys.landscape.hutchinson_trace` with ``trace_samples`` probes), ``"density"``
    (:func:`~valleys.landscape.spectral_density` with ``density_probes``, ``lanczos_steps``,
    ``sigma``) and ``"dense"`` (:func:`~valleys.landscape.dense_spectrum` with
    ``chunk_size``, ``dtype`` ``"float32"``/``"float64"``). ``seed`` draws the samples and
    every probe. Options left as ``None`` take the library's defaults.
    """
    chosen = list(dict.fromkeys(analyses))
    if not chosen:
        check.fail("analyses", chosen, "expected at least one of " + ", ".join(ANALYSES))
    for name in chosen:
        check.choice("analysis", name, ANALYSES)
    if dtype is not None:
        check.choice("dtype", dtype, DTYPES)
    options = {
        "top": _given(k=k, method=method, tol=tol, max_iters=iterations),
        "trace": _given(samples=trace_samples),
        "density": _given(num_probes=density_probes, lanczos_steps=lanczos_steps, sigma=sigma),
        "dense": _given(chunk_size=chunk_size, dtype=dtype),
    }
    for name, given in options.items():
        if given and name not in chosen:
            raise ValueError(
                f"Invalid {', '.join(given)} without the {name!r} analysis (add it to the analyses)"
            )
    target = prepare(
        path,
        split=split,
        samples=samples,
        batches=batches,
        batch_size=batch_size,
        seed=seed,
        device=device,
        eval_batch_size=batch_size,
    )
    target.batch_size = target.eval_batch_size
    run = target.run
    data = target.batches()
    n = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    args: dict[str, Any] = {"analyses": chosen, "cache": cache}
    args.update({name: options[name] for name in chosen if options[name]})
    result: dict[str, Any] = {"parameters": n}
    started = time.perf_counter()
    for name in chosen:
        given = dict(options[name])
        batches = data
        if name == "dense":
            size = max(target.eval_batch_size, DENSE_BATCH)
            batches = [
                (target.x[i : i + size], target.y[i : i + size])
                for i in range(0, len(target.y), size)
            ]
        bar = ProgressBar(_total(name, given, n, len(batches)), progress, _UNITS[name])
        try:
            out = _run_one(name, run, batches, given, seed, cache, bar.update)
        finally:
            bar.close()
        if name == "dense":
            ev = out.eigenvalues.numpy()
            index = len(read_records(run.run_dir)) + 1
            file = run.run_dir / f"hessian-{index:03d}-eigenvalues.npy"
            if distributed.is_main():  # in a process group rank 0 alone writes
                np.save(file, ev)
            result["dense"] = {
                **spectrum_summary(ev),
                "dtype": out.dtype,
                "zero_rows": out.zero_rows,
                "seconds_hessian": out.seconds_hessian,
                "seconds_eigvalsh": out.seconds_eigvalsh,
                "batch_size": size,
                "eigenvalues_file": file.name,
            }
        else:
            result[name] = out.to_dict()
    return finish(target, "hessian", args, result, started, plots)


# ---------------------------------------------------------------------------------------------
# the figure


def plot_hessian(
    record: Mapping[str, Any],
    stem: str | Path,
    *,
    title: str = "",
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """The spectrum of a ``hessian`` record: the histogram of the full spectrum (``dense``)
    and the SLQ density (``density``, scaled to counts when both are present), on a log
    scale, with the top eigenvalues (``top``) as dashed lines and the trace (``trace``) in
    the title; a stem plot of the top eigenvalues when that is all there is."""
    from valleys.bench.landscape_plots import _figure, _save

    result = record["result"]
    n = result.get("parameters", 1)
    fig = _figure((6.8, 4.4))
    ax = fig.subplots()
    dense, density, top = result.get("dense"), result.get("density"), result.get("top")
    width = None
    if dense:
        hist = dense["histogram"]
        edges = np.asarray(hist["edges"], dtype=float)
        width = float(edges[1] - edges[0]) if len(edges) > 1 else 1.0
        ax.stairs(hist["counts"], edges, fill=True, alpha=0.45, color="C0", label="eigenvalues")
        ax.set_ylabel("count")
    if density:
        grid = np.asarray(density["grid"], dtype=float)
        values = np.asarray([0.0 if v is None else v for v in density["density"]], dtype=float)
        if width is not None:
            values = values * n * width
        label = f"SLQ density ({density['num_probes']} probes, {density['lanczos_steps']} steps)"
        ax.plot(grid, values, color="C1", lw=1.4, label=label)
        if width is None:
            ax.set_ylabel("density")
    if (dense or density) and ax.get_ylim()[1] > 0:
        ax.set_yscale("log")
        low = 0.5 if dense else max(1e-8, ax.get_ylim()[1] * 1e-8)
        ax.set_ylim(bottom=low)
    if top:
        values = [v for v in top["eigenvalues"] if v is not None]
        if dense or density:
            for i, v in enumerate(values):
                ax.axvline(
                    v, color="C3", lw=0.9, ls="--", label="top eigenvalues" if i == 0 else None
                )
        else:
            ax.stem(range(1, len(values) + 1), values)
            ax.set_xlabel("rank")
            ax.set_ylabel("eigenvalue")
    if dense or density:
        ax.set_xlabel("Hessian eigenvalue")
    parts = [f"Hessian of the full loss, {n:,} parameters"]
    if result.get("trace"):
        t = result["trace"]
        parts.append(f"trace {t['estimate']:.4g} ({t['ci_low']:.4g} … {t['ci_high']:.4g})")
    if dense:
        parts.append(f"{dense['negative']:,} negative, {dense['near_zero']:,} near zero")
    head = "\n".join([parts[0], "; ".join(parts[1:])] if len(parts) > 1 else parts)
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, Path(stem), formats)
