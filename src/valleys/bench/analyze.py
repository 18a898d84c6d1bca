"""Landscape analyses of trained runs: the workbench side of :mod:`valleys.landscape`.

An analysis loads a run directory or checkpoint (:func:`valleys.train.load_run`), selects the
samples to use (:func:`prepare`), calls one library function, appends one record to
``<run>/landscape.jsonl`` and draws its figures under ``<run>/plots/``::

    from valleys.bench import analyze

    out = analyze.sharpness("runs/digits-mlp-sgd-…", steps=200, samples=1000)
    out.record["result"]["sharpness"], out.files

Records (one JSON object per line, appended, never rewritten) hold ``kind``
(``"sharpness"``, ``"surface"``), ``index`` (1, 2, … in the file), ``time`` (UTC),
``checkpoint``, ``step`` (the checkpoint's training step), ``data`` (split, samples, batch
size, seed), ``args`` (the options given), ``result`` (the library result as plain data),
``seconds`` and ``plots`` (paths relative to the run directory, named
``plots/landscape-<index>-<kind>.{png,svg}``). Options left as ``None`` take the library's
defaults, which the result records.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from valleys import _validate as check
from valleys import distributed, landscape
from valleys.train.log import read_jsonl

__all__ = [
    "RECORDS",
    "Analysis",
    "ProgressBar",
    "Target",
    "append_record",
    "finish",
    "prepare",
    "read_records",
    "sharpness",
    "surface",
]

RECORDS = "landscape.jsonl"
SPLITS = ("train", "test")
METHODS = ("ascent", "lbfgsb")


@dataclass
class Target:
    """A loaded run with the samples an analysis uses, on the run's device.

    ``batch_size`` is the mini-batch size (the run's ``data.batch_size`` unless chosen),
    ``eval_batch_size`` the size of the batches that make up the full loss (the run's
    ``data.eval_batch_size``).
    """

    run: Any  # valleys.train.LoadedRun
    x: torch.Tensor
    y: torch.Tensor
    split: str
    batch_size: int
    eval_batch_size: int
    seed: int

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The selected samples in consecutive batches of ``eval_batch_size`` (views)."""
        b = self.eval_batch_size
        return [(self.x[i : i + b], self.y[i : i + b]) for i in range(0, self.x.shape[0], b)]

    def describe(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "samples": int(self.x.shape[0]),
            "of": int(getattr(self.run.dataset, f"x_{self.split}").shape[0]),
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "seed": self.seed,
        }


def prepare(
    path: str | Path,
    *,
    split: str = "train",
    samples: int | None = None,
    batches: int | None = None,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
) -> Target:
    """Load the run at ``path`` and select the samples of ``split`` to analyse: all of them,
    or the first ``samples`` (and at most ``batches × batch_size``) of a permutation drawn
    from ``seed``, kept in their original order."""
    from valleys.train import load_run
    from valleys.train.loop import select_device

    split = check.choice("split", split, SPLITS)
    seed = check.count("seed", seed)
    if samples is not None:
        samples = check.count("samples", samples, 1)
    if batches is not None:
        batches = check.count("batches", batches, 1)
    if distributed.launched():  # under torchrun: every rank takes its share of the batches
        device = str(distributed.init(select_device(device)))
    run = load_run(path, device=device)
    data = run.config.data
    batch_size = check.count("batch_size", batch_size or data.batch_size, 1)
    eval_batch_size = check.count("eval_batch_size", eval_batch_size or data.eval_batch_size, 1)
    x = getattr(run.dataset, f"x_{split}")
    y = getattr(run.dataset, f"y_{split}")
    limits = [n for n in (samples, None if batches is None else batches * batch_size) if n]
    if limits and min(limits) < x.shape[0]:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(x.shape[0], generator=gen)[: min(limits)].sort().values
        keep = keep.to(x.device)
        x, y = x[keep], y[keep]
    return Target(run, x, y, split, batch_size, eval_batch_size, seed)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def read_records(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/landscape.jsonl`` (of one ``kind`` if given); none when the
    file does not exist."""
    path = Path(run_dir) / RECORDS
    if not path.is_file():
        return []
    return read_jsonl(path, kind)


def append_record(run_dir: str | Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """Append ``record`` as one line of ``<run_dir>/landscape.jsonl`` (flushed and fsync'd;
    earlier lines are never touched). Non-finite numbers become ``null``. Returns what was
    written."""
    clean = _clean(dict(record))
    line = json.dumps(clean, allow_nan=False) + "\n"
    with open(Path(run_dir) / RECORDS, "ab") as f:
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())
    return clean


@dataclass
class Analysis:
    """What an analysis wrote: the record appended to ``landscape.jsonl`` and the figures."""

    record: dict[str, Any]
    files: list[Path] = field(default_factory=list)


class ProgressBar:
    """A tqdm progress bar on stderr counting ``unit``s; silent when disabled and on every
    rank but 0 of a process group."""

    def __init__(self, total: int | None, enabled: bool, unit: str):
        self.bar = None
        if enabled and distributed.is_main():
            import sys

            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _default(function: str, name: str) -> Any:
    """The default of argument ``name`` of ``valleys.landscape.<function>``."""
    import inspect

    return inspect.signature(getattr(landscape, function)).parameters[name].default


def finish(
    target: Target,
    kind: str,
    args: dict[str, Any],
    result: dict[str, Any],
    started: float,
    plots: bool,
    extra: Mapping[str, Any] | None = None,
) -> Analysis:
    """Append the record of an analysis of ``target`` begun at ``started``
    (``time.perf_counter()``) and, with ``plots``, draw its figures through
    :func:`valleys.bench.landscape_plots.plot_record` as
    ``plots/landscape-<index>-<mode or kind>.{png,svg}``. ``result`` is plain data; ``extra``
    adds top-level fields (``mode``). Every analysis (the Hessian's too) ends here. In a
    process group every rank holds the same result and rank 0 alone writes."""
    from valleys.bench.landscape_plots import plot_record

    run_dir = target.run.run_dir
    index = len(read_records(run_dir)) + 1
    record: dict[str, Any] = {
        "kind": kind,
        **(extra or {}),
        "index": index,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(target.run.checkpoint.resolve()),
        "step": target.run.step,
        "data": target.describe(),
        "args": args,
        "result": result,
        "seconds": time.perf_counter() - started,
    }
    files: list[Path] = []
    if not distributed.is_main():
        return Analysis(_clean(record), files)
    if plots:
        label = extra.get("mode", kind) if extra else kind
        stem = run_dir / "plots" / f"landscape-{index:03d}-{label}"
        title = f"{run_dir.name} (step {target.run.step}, {target.split})"
        files = plot_record(_clean(record), stem, title=title)
        record["plots"] = [str(p.relative_to(run_dir)) for p in files]
    return Analysis(append_record(run_dir, record), files)


def sharpness(
    path: str | Path,
    *,
    method: str = "ascent",
    epsilon: float | None = None,
    lr: float | None = None,
    steps: int | None = None,
    momentum: float | None = None,
    objective: str | None = None,
    eval_every: int | None = None,
    max_iterations: int | None = None,
    split: str = "train",
    samples: int | None = None,
    batches: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    plots: bool = True,
) -> Analysis:
    """Keskar sharpness of a run (:func:`valleys.landscape.keskar_sharpness`, or
    :func:`~valleys.landscape.keskar_sharpness_lbfgsb` with ``method="lbfgsb"``) on its
    training split (Keskar's definition; ``split="test"`` for the test set).

    The ascent's mini-batches of ``batch_size`` come from a shuffling stream over the selected
    samples seeded with ``seed``; ``momentum`` goes to the ascent's SGD.
    """
    from valleys.data.loader import BatchStream

    method = check.choice("method", method, METHODS)
    args = _given(
        method=method,
        epsilon=epsilon,
        lr=lr,
        steps=steps,
        momentum=momentum,
        objective=objective,
        eval_every=eval_every,
        max_iterations=max_iterations,
    )
    ascent_only = ("lr", "steps", "momentum", "objective", "eval_every")
    for name in ascent_only if method == "lbfgsb" else ("max_iterations",):
        if name in args:
            takes = "max_iterations" if method == "lbfgsb" else ", ".join(ascent_only)
            raise ValueError(f"Invalid {name} for method {method!r} (it takes {takes})")
    if momentum is not None:
        check.nonneg("momentum", momentum)
    target = prepare(
        path,
        split=split,
        samples=samples,
        batches=batches,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    run = target.run
    started = time.perf_counter()
    if method == "lbfgsb":
        bar = ProgressBar(None, progress, "eval")
        try:
            result = landscape.keskar_sharpness_lbfgsb(
                run.model,
                run.loss_fn,
                target.batches(),
                callback=lambda k: bar.update(k),
                **_given(epsilon=epsilon, max_iterations=max_iterations),
            )
        finally:
            bar.close()
    else:
        stream = BatchStream(
            target.x,
            target.y,
            min(target.batch_size, target.x.shape[0]),
            seed=seed,
            drop_last=False,
        )
        kwargs = _given(
            epsilon=epsilon, lr=lr, steps=steps, objective=objective, eval_every=eval_every
        )
        if momentum:
            kwargs["optimizer_kwargs"] = {"momentum": momentum}
        total = steps if steps is not None else _default("keskar_sharpness", "steps")
        bar = ProgressBar(total, progress, "step")
        try:
            result = landscape.keskar_sharpness(
                run.model,
                run.loss_fn,
                target.batches(),
                ascent_batches=stream,
                callback=lambda k: bar.update(k),
                **kwargs,
            )
        finally:
            bar.close()
    return finish(target, "sharpness", args, result.to_dict(), started, plots)


def _other_state(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    from valleys.train import checkpoint as ckpt
    from valleys.train.restore import checkpoint_path

    file = checkpoint_path(path)
    state = ckpt.load(file)
    if not isinstance(state.get("model"), Mapping):
        raise ValueError(f"Unreadable checkpoint {file}: it holds no model state")
    return dict(state["model"]), file


def surface(
    path: str | Path,
    *,
    dims: int = 1,
    points: int = 21,
    span: tuple[float, float] | None = None,
    to: str | Path | None = None,
    buffers: str | None = None,
    normalization: str | None = None,
    ignore_bias_bn: bool | None = None,
    split: str = "train",
    samples: int | None = None,
    batches: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    plots: bool = True,
) -> Analysis:
    """A loss curve (``dims=1``) or surface (``dims=2``) of a run along filter-normalised
    random directions drawn from ``seed`` (:func:`valleys.landscape.loss_curve`,
    :func:`~valleys.landscape.loss_surface`), or with ``to`` (another run directory or
    checkpoint of the same model) the interpolation from this run's weights (α = 0) to the
    other's (α = 1) (:func:`~valleys.landscape.interpolation`).

    ``points`` per axis over ``span`` (default (-1, 1), or (-0.5, 1.5) when interpolating);
    the loss is over the selected samples in batches of ``batch_size`` (default: the run's
    ``data.eval_batch_size``), with the accuracy for classifiers.
    """
    dims = check.count("dims", dims, 1)
    if dims > 2:
        check.fail("dims", dims, "expected 1 or 2")
    points = check.count("points", points, 1)
    if to is not None and dims != 1:
        check.fail("dims", dims, "an interpolation (to=...) is one-dimensional")
    if span is None:
        span = (-0.5, 1.5) if to is not None else (-1.0, 1.0)
    lo, hi = (check.real("span", v) for v in span)
    if not lo < hi:
        check.fail("span", (lo, hi), "expected low < high")
    target = prepare(
        path,
        split=split,
        samples=samples,
        batches=batches,
        seed=seed,
        device=device,
        eval_batch_size=batch_size,
    )
    target.batch_size = target.eval_batch_size
    run = target.run
    started = time.perf_counter()
    grid = np.linspace(lo, hi, points)
    accuracy = run.task == "classification"
    args = _given(
        dims=dims,
        points=points,
        span=[lo, hi],
        to=None if to is None else str(to),
        buffers=buffers,
        normalization=normalization,
        ignore_bias_bn=ignore_bias_bn,
    )
    total = points * points if dims == 2 else points
    bar = ProgressBar(total, progress, "point")
    update: Callable[[int], None] = lambda k: bar.update(k)  # noqa: E731
    try:
        if to is not None:
            if normalization is not None or ignore_bias_bn is not None:
                raise ValueError("Invalid normalization for an interpolation (no directions)")
            end, other = _other_state(to)
            args["to_checkpoint"] = str(other.resolve())
            res = landscape.interpolation(
                run.model,
                run.loss_fn,
                target.batches(),
                None,
                end,
                grid,
                accuracy=accuracy,
                progress=update,
                **_given(buffers=buffers),
            )
            mode = "interpolation"
        else:
            if buffers is not None:
                raise ValueError("Invalid buffers without to= (only interpolations take buffers)")
            gen = torch.Generator().manual_seed(seed)
            options = _given(normalization=normalization, ignore_bias_bn=ignore_bias_bn)
            first = landscape.random_direction(run.model, seed=gen, **options)
            if dims == 1:
                res = landscape.loss_curve(
                    run.model,
                    run.loss_fn,
                    target.batches(),
                    first,
                    grid,
                    accuracy=accuracy,
                    progress=update,
                )
                mode = "line"
            else:
                second = landscape.random_direction(run.model, seed=gen, **options)
                res = landscape.loss_surface(
                    run.model,
                    run.loss_fn,
                    target.batches(),
                    (first, second),
                    grid,
                    accuracy=accuracy,
                    progress=update,
                )
                mode = "plane"
    finally:
        bar.close()
    return finish(target, "surface", args, res.to_dict(), started, plots, {"mode": mode})
