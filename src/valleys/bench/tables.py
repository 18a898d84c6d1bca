"""Numbers from run directories: a metric at a time, epoch or effective-epoch budget, the best
value, the time to a target; mean ± std and 95 % confidence intervals over seeds; performance
profiles across tasks.

Everything here reads ``metrics.jsonl`` (and ``landscape.jsonl``, ``env.json``) through
:func:`load_sweep` or :func:`load_run`, so tables can be rebuilt at any time without training.

Reading a curve at a budget
---------------------------
The value *after x* on an axis (training seconds, epochs, effective epochs, steps) is that of
the last evaluation at or before x, as SGN's tables read "accuracy after T seconds", where
"at" allows one step: runs stop, and evaluate, at whole steps, so the evaluation that an
epoch boundary or a time budget x triggers is taken at the end of the first step reaching x,
up to one step after it. One step is the run's mean increment per step on that axis (its
closing position over its steps). A run that did not reach x has no value there; a run that
diverged (``end`` record with ``non-finite loss``) at or before x counts as diverged (NaN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from valleys import _validate as check

__all__ = [
    "AXES",
    "RunData",
    "Stat",
    "Sweep",
    "best",
    "final",
    "higher_is_better",
    "load_run",
    "load_sweep",
    "one_step",
    "performance_profile",
    "sharpness",
    "stat",
    "t_quantile",
    "time_to_target",
    "top_eigenvalue",
    "value_at",
]

# axis name -> (record key, budget key of run config, label)
AXES: dict[str, tuple[str, str | None, str]] = {
    "seconds": ("train_time_s", "max_seconds", "training time (s)"),
    "epochs": ("epoch", "max_epochs", "epochs"),
    "effective_epochs": ("effective_epochs", None, "effective epochs (passes / steps per epoch)"),
    "steps": ("step", "max_steps", "optimizer steps"),
}
DIVERGED = "non-finite loss"


@dataclass
class RunData:
    """One run's records and coordinates in its sweep."""

    id: str
    dir: Path
    task: str = ""
    optimizer: str = ""
    label: str = ""
    budget: str = ""
    seed: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)
    trains: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    landscape: list[dict[str, Any]] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return bool(self.end) and self.end.get("reason") == DIVERGED

    @property
    def complete(self) -> bool:
        return self.end is not None

    @property
    def task_kind(self) -> str:
        keys = {k for r in self.evals for k in r}
        return "regression" if "test_mse" in keys else "classification"


@dataclass
class Sweep:
    """A sweep folder: its manifest (``sweep.json``) and the runs found in it."""

    dir: Path
    manifest: dict[str, Any]
    runs: list[RunData]
    missing: list[str]

    def groups(self) -> dict[tuple[str, str, str], list[RunData]]:
        """``{(task, budget, configuration label): runs sorted by seed}`` in manifest order."""
        out: dict[tuple[str, str, str], list[RunData]] = {}
        for r in self.runs:
            out.setdefault((r.task, r.budget, r.label), []).append(r)
        for runs in out.values():
            runs.sort(key=lambda r: r.seed)
        return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"Malformed record in {path}, line {n}: {err.msg}") from None
    return out


def load_run(path: str | Path, **coords: Any) -> RunData:
    """The records of the run directory ``path`` (``coords``: task, optimizer, label...)."""
    from valleys.bench.sweep import read_yaml

    d = Path(path)
    records = _jsonl(d / "metrics.jsonl")
    ends = [r for r in records if r.get("kind") == "end"]
    config = (
        read_yaml(d / "config.yaml", "Run configuration") if (d / "config.yaml").is_file() else {}
    )
    env = json.loads((d / "env.json").read_text()) if (d / "env.json").is_file() else {}
    return RunData(
        id=str(coords.pop("id", d.name)),
        dir=d,
        evals=[r for r in records if r.get("kind") == "eval"],
        trains=[r for r in records if r.get("kind") == "train"],
        end=ends[-1] if ends else None,
        config=config or {},
        env=env,
        landscape=_jsonl(d / "landscape.jsonl"),
        **coords,
    )


def load_sweep(path: str | Path) -> Sweep:
    """The sweep folder ``path`` (written by ``valleys sweep``): its ``sweep.json`` and every
    run directory that exists (the others are listed in ``missing``)."""
    d = Path(path)
    manifest_path = d / "sweep.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"Not a sweep folder (no sweep.json): {d} (run `valleys sweep SPEC --out {d}` first)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Malformed {manifest_path}: {err.msg}") from None
    runs, missing = [], []
    for entry in manifest.get("runs", []):
        run_dir = d / entry["dir"]
        if not (run_dir / "metrics.jsonl").is_file():
            missing.append(entry["id"])
            continue
        coords = {k: entry.get(k) for k in ("id", "task", "optimizer", "label", "budget", "seed")}
        runs.append(load_run(run_dir, **coords))
    return Sweep(d, manifest, runs, missing)


# ---------------------------------------------------------------------------------------------
# per run


def higher_is_better(metric: str) -> bool:
    """Accuracies are maximised; losses, errors and MSEs minimised."""
    return "accuracy" in metric


def _axis(axis: str) -> tuple[str, str | None]:
    key, budget, _ = AXES[check.choice("axis", axis, AXES)]
    return key, budget


def _xs(run: RunData, axis: str) -> list[float | None]:
    """The evaluations' positions on ``axis``."""
    key, _ = _axis(axis)
    return [r.get(key) for r in run.evals]


def one_step(run: RunData, axis: str) -> float:
    """The run's mean increment per optimizer step on ``axis`` (0 before its first step)."""
    key, _ = _axis(axis)
    last = run.end or (run.trains[-1] if run.trains else None) or {}
    steps, pos = last.get("step") or 0, last.get(key) or 0.0
    return float(pos) / steps if steps else 0.0


def value_at(run: RunData, metric: str, axis: str, x: float) -> tuple[float, float] | None:
    """``(value, position)`` of ``metric`` after ``x`` on ``axis`` (see the module docstring):
    NaN for a run diverged by then, None where the run has no value there."""
    key, _ = _axis(axis)
    if run.diverged and run.end.get(key) is not None and run.end[key] <= x + 1e-9:
        return math.nan, float(run.end[key])
    reached = run.end.get(key) if run.end else None
    if reached is None or reached < x - 1e-9:
        return None
    limit = x + one_step(run, axis) * (1 + 1e-9) + 1e-12
    found = None
    for r, pos in zip(run.evals, _xs(run, axis), strict=True):
        if pos is not None and pos <= limit and r.get(metric) is not None:
            found = (float(r[metric]), float(pos))
    return found


def final(run: RunData, metric: str) -> float | None:
    """The metric of the run's last evaluation (NaN when it diverged)."""
    if run.diverged:
        return math.nan
    values = [r[metric] for r in run.evals if r.get(metric) is not None]
    return float(values[-1]) if values else None


def best(run: RunData, metric: str) -> float | None:
    """The best value of ``metric`` over the run's evaluations."""
    values = [float(r[metric]) for r in run.evals if r.get(metric) is not None]
    if not values:
        return None
    return max(values) if higher_is_better(metric) else min(values)


def time_to_target(run: RunData, metric: str, target: float, axis: str = "seconds") -> float | None:
    """Position on ``axis`` of the first evaluation whose ``metric`` reaches ``target``
    (≥ for accuracies, ≤ otherwise); None if it never does."""
    up = higher_is_better(metric)
    for r, pos in zip(run.evals, _xs(run, axis), strict=True):
        v = r.get(metric)
        if v is not None and pos is not None and (v >= target if up else v <= target):
            return float(pos)
    return None


def _landscape(run: RunData, kind: str, key: str) -> dict[str, Any] | None:
    """The result of the last ``kind`` record holding ``key`` of the run's final checkpoint
    (or of any checkpoint when none is of the final one)."""
    step = run.end.get("step") if run.end else None
    records = [
        r
        for r in run.landscape
        if r.get("kind") == kind and isinstance(r.get("result"), dict) and key in r["result"]
    ]
    at_end = [r for r in records if r.get("step") == step]
    chosen = (at_end or records)[-1:] if records else []
    return chosen[0].get("result") if chosen else None


def sharpness(run: RunData) -> float | None:
    """Keskar sharpness of the run's final model (from ``valleys sharpness`` records)."""
    result = _landscape(run, "sharpness", "sharpness")
    value = result.get("sharpness") if result else None
    return None if value is None else float(value)


def top_eigenvalue(run: RunData) -> float | None:
    """The largest Hessian eigenvalue recorded for the run's final model, if any (from the
    ``top`` part of a ``valleys hessian`` record)."""
    result = _landscape(run, "hessian", "top")
    top = result.get("top") if result else None
    values = top.get("eigenvalues") if isinstance(top, dict) else None
    if not isinstance(values, list) or not values:
        return None
    flat = [v for v in np.ravel(np.asarray(values, dtype=float)) if np.isfinite(v)]
    return max(flat) if flat else None


# ---------------------------------------------------------------------------------------------
# over seeds


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, check.count("df", df, 1)))


@dataclass
class Stat:
    """Mean, sample standard deviation and 95 % CI half-width (t-distribution) of the finite
    values, with how many there were (``n``), how many were NaN (diverged) and missing."""

    n: int
    mean: float
    std: float
    ci95: float
    diverged: int = 0
    missing: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in vars(self).items()
        }


def stat(values: Iterable[float | None]) -> Stat:
    """:class:`Stat` of ``values``: None counts as missing, NaN as diverged; std with ddof 1
    (0 for one value); ci95 = t(0.975, n − 1) · std / √n (NaN for one value)."""
    values = list(values)
    missing = sum(v is None for v in values)
    present = [float(v) for v in values if v is not None]
    finite = np.array([v for v in present if math.isfinite(v)], dtype=float)
    diverged = len(present) - finite.size
    n = int(finite.size)
    if n == 0:
        return Stat(0, math.nan, math.nan, math.nan, diverged, missing)
    mean = float(finite.mean())
    std = float(finite.std(ddof=1)) if n > 1 else 0.0
    ci = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return Stat(n, mean, std, ci, diverged, missing)


def performance_profile(
    costs: Mapping[str, Mapping[str, float | None]], taus: Sequence[float]
) -> dict[str, list[float]]:
    """Dolan–Moré performance profiles: ``costs[method][task]`` is a positive cost (lower is
    better; None, NaN or inf where the method failed the task). For each method, the fraction
    of tasks on which its cost is within a factor τ of the best method's, for each τ in
    ``taus``: ρ_m(τ) = |{t : c_{m,t} ≤ τ · min_m' c_{m',t}}| / |tasks|. A task that no method
    solved counts against every method."""
    methods = list(costs)
    tasks = sorted({t for m in methods for t in costs[m]})
    if not tasks:
        return {m: [0.0 for _ in taus] for m in methods}

    def cost(m: str, t: str) -> float:
        c = costs[m].get(t)
        return math.inf if c is None or not math.isfinite(c) else float(c)

    best_of = {t: min(cost(m, t) for m in methods) for t in tasks}
    out = {}
    for m in methods:
        ratios = [
            cost(m, t) / best_of[t]
            if math.isfinite(best_of[t]) and best_of[t] > 0
            else (1.0 if best_of[t] == 0 and cost(m, t) == 0 else math.inf)
            for t in tasks
        ]
        out[m] = [sum(r <= tau * (1 + 1e-12) for r in ratios) / len(tasks) for tau in taus]
    return out
